"""Resampling between voxel grids (numpy, scipy only).

A grid is a ``(shape, affine)`` pair where ``affine`` is the 4x4 voxel -> world (RAS, mm)
matrix of NIfTI. Resampling is defined in world coordinates, so every preprocessed volume can
be mapped back to its source grid with the recorded ``GridMap``. Volumes are ``(H, W, D)`` in
NIfTI voxel order; the slice axis is the last one and is never reoriented.

This module must stay importable without jax or torch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy import ndimage


# A source spacing passed with an affine may differ from the affine's column norms by float32
# rounding of header fields, not more (both must describe the same voxels).
SPACING_RTOL = 1e-3


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size in mm per array axis: the norms of the affine's first three columns.

  The one source of truth for voxel size (``io.NiftiHeader.spacing_mm`` is this of the file's
  affine); a header's pixdim is only compared with it.
  """
  return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


def resample_to_grid(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                     dst_shape: Sequence[int], order: int, cval: float = 0.0) -> np.ndarray:
  """Resamples a volume onto another grid through world coordinates.

  Destination voxel x samples the source at ``inv(src_affine) @ dst_affine @ x``. Samples
  within half a voxel outside the source take the edge value; farther out they take ``cval``.

  Args:
    data: (H, W, D) source volume.
    src_affine: 4x4 voxel -> world (mm) of ``data``.
    dst_affine: 4x4 voxel -> world (mm) of the result.
    dst_shape: (H', W', D') shape of the result.
    order: spline order: 0 nearest (labels, keeps dtype), 1 linear (images, float32).
    cval: value outside the source volume.

  Returns:
    (H', W', D') array: float32 for order >= 1, ``data.dtype`` for order 0.
  """
  data = np.asarray(data)
  if data.ndim != 3:
    raise ValueError(f"resample_to_grid: data must be 3D (H, W, D), got shape {data.shape}.")
  if order not in (0, 1, 3):
    raise ValueError(f"resample_to_grid: order={order}; use 0 (labels) or 1/3 (images).")
  dst_shape = tuple(int(s) for s in dst_shape)
  m = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
  src = data if order == 0 else data.astype(np.float32, copy=False)
  out = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=dst_shape,
                                 order=order, mode="nearest")
  inside = _inside_mask(m, dst_shape, data.shape)
  if not inside.all():
    out[~inside] = cval
  return out


def _inside(x: np.ndarray, n: int) -> np.ndarray:
  """The edge rule of every resampling here: a source position x (voxels) along an axis of
  n voxels is inside when it lies within half a voxel of the outer voxel centres."""
  return (x >= -0.5) & (x <= n - 0.5)


def _inside_mask(m: np.ndarray, dst_shape: tuple[int, ...], src_shape: tuple[int, ...]
                 ) -> np.ndarray:
  """(H', W', D') bool: destination voxels whose source position is inside the source."""
  axes = [np.arange(n, dtype=np.float64) for n in dst_shape]
  grids = np.meshgrid(*axes, indexing="ij", sparse=True)
  inside = np.ones(dst_shape, bool)
  for k in range(3):
    inside &= _inside(m[k, 0] * grids[0] + m[k, 1] * grids[1] + m[k, 2] * grids[2] + m[k, 3],
                      src_shape[k])
  return inside


def inside_grid(src_shape: Sequence[int], src_affine: np.ndarray, dst_shape: Sequence[int],
                dst_affine: np.ndarray) -> np.ndarray:
  """(H', W', D') bool: the destination voxels that ``resample_to_grid`` samples inside the
  source grid (the others take its ``cval``)."""
  m = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
  return _inside_mask(m, tuple(int(n) for n in dst_shape), tuple(int(n) for n in src_shape))


def fill_nearest(image: np.ndarray, known: np.ndarray) -> np.ndarray:
  """``image`` with each voxel outside ``known`` (bool, same shape) given the value of the
  nearest voxel inside it (Euclidean, in voxels): an edge extension of any shape."""
  if known.all() or not known.any():
    return image
  idx = ndimage.distance_transform_edt(~known, return_distances=False, return_indices=True)
  return image[tuple(idx)]


def sample_voxels(data: np.ndarray, coords_vox: np.ndarray, order: int,
                  cval: float = 0.0) -> np.ndarray:
  """Samples a volume at arbitrary voxel positions with ``resample_to_grid``'s edge rule.

  Args:
    data: (H, W, D) volume (order 0 keeps its dtype; order 1 works in float32).
    coords_vox: (3, ...) positions in voxels of ``data``.
    order: 0 nearest (labels) or 1 linear (images).
    cval: value farther than half a voxel outside ``data``.

  Returns:
    (...) samples.
  """
  src = data if order == 0 else np.asarray(data, np.float32)
  out = ndimage.map_coordinates(src, coords_vox, order=order, mode="nearest")
  inside = np.ones(out.shape, bool)
  for k in range(3):
    inside &= _inside(coords_vox[k], data.shape[k])
  out[~inside] = cval
  return out


def spacing_grid(src_shape: Sequence[int], src_affine: np.ndarray,
                 src_spacing_mm: Sequence[float], spacing_mm: Sequence[float]
                 ) -> tuple[tuple[int, int, int], np.ndarray]:
  """The grid with a new voxel size covering the same physical extent, same axis order.

  The new shape is ``round(n * src_spacing / spacing)`` per axis; the grid centre stays put.
  ``src_spacing_mm`` must be ``voxel_spacing(src_affine)`` (e.g. ``NiftiHeader.spacing_mm``):
  another value (a header's pixdim that disagrees with its sform) would give a grid whose
  voxels are not ``spacing_mm`` in size, so it is refused.

  Returns:
    (shape, affine) of the new grid.
  """
  n_in = np.asarray(src_shape[:3], float)
  z = np.asarray(spacing_mm, float) / np.asarray(src_spacing_mm, float)
  if np.any(~np.isfinite(z)) or np.any(z <= 0):
    raise ValueError(f"spacing_grid: spacings must be > 0, got source {src_spacing_mm} and "
                     f"target {spacing_mm}.")
  norms = np.asarray(voxel_spacing(src_affine))
  if np.any(np.abs(np.asarray(src_spacing_mm, float) - norms) > SPACING_RTOL * norms):
    raise ValueError(f"spacing_grid: source spacing {tuple(src_spacing_mm)} mm is not the "
                     f"voxel size of its affine {tuple(round(v, 6) for v in norms)} mm; pass "
                     "grids.voxel_spacing(affine) (NiftiHeader.spacing_mm).")
  n_out = np.maximum(1, np.round(n_in / z)).astype(int)
  t = np.eye(4)
  t[:3, :3] = np.diag(z)
  t[:3, 3] = (n_in - 1) / 2 - (n_out - 1) / 2 * z
  return tuple(int(n) for n in n_out), np.asarray(src_affine, float) @ t


def resample_to_spacing(data: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float],
                        order: int, *, src_spacing_mm: Sequence[float] | None = None,
                        cval: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Resamples to a new voxel size, keeping voxel axis order and the physical extent.

  Args:
    data: (H, W, D) volume.
    affine: 4x4 voxel -> world (mm).
    spacing_mm: target voxel size per array axis.
    order: 0 nearest (labels), 1 linear (images).
    src_spacing_mm: source voxel size, ``voxel_spacing(affine)`` (the default).
    cval: value outside the source.

  Returns:
    (resampled (H', W', D'), its affine).
  """
  src_spacing = voxel_spacing(affine) if src_spacing_mm is None else src_spacing_mm
  shape, new_affine = spacing_grid(np.shape(data), affine, src_spacing, spacing_mm)
  return resample_to_grid(data, affine, new_affine, shape, order, cval), new_affine


def crop_start(center_vox: Sequence[float], out_shape: Sequence[int]) -> tuple[int, int, int]:
  """First source voxel index of a crop of ``out_shape`` centred on ``center_vox``.

  With ``center_vox = (n - 1) / 2`` and ``out_shape = n`` the start is 0.
  """
  return tuple(int(np.floor(c + 0.5)) - int(n) // 2 for c, n in zip(center_vox, out_shape))


def crop_or_pad(data: np.ndarray, center_vox: Sequence[float], out_shape: Sequence[int],
                cval: float = 0.0) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Crops and/or pads a volume to ``out_shape`` centred on a voxel position.

  Args:
    data: (H, W, D) volume.
    center_vox: crop centre in voxel coordinates of ``data`` (may be fractional).
    out_shape: (H', W', D').
    cval: pad value.

  Returns:
    (out (H', W', D'), start) with ``out[x] = data[x + start]`` where that index exists and
    ``cval`` elsewhere; ``start`` may be negative (padding before).
  """
  data = np.asarray(data)
  start = crop_start(center_vox, out_shape)
  out = np.full(tuple(int(n) for n in out_shape), cval, dtype=data.dtype)
  src, dst = [], []
  for s, n_in, n_out in zip(start, data.shape, out_shape):
    lo, hi = max(s, 0), min(s + int(n_out), n_in)
    if hi <= lo:
      return out, start
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  out[tuple(dst)] = data[tuple(src)]
  return out, start


def translate_affine(affine: np.ndarray, start: Sequence[float]) -> np.ndarray:
  """Affine of a sub-grid whose voxel 0 is voxel ``start`` of the grid of ``affine``."""
  t = np.eye(4)
  t[:3, 3] = np.asarray(start, float)
  return np.asarray(affine, float) @ t


@dataclasses.dataclass(frozen=True)
class GridMap:
  """A source grid and the target (model) grid it was resampled to, both in world mm.

  ``to_target`` reproduces the forward resampling; ``to_source`` maps arrays on the target
  grid (e.g. a warped label map) back onto the original file's grid.
  """
  src_shape: tuple[int, int, int]
  src_affine: np.ndarray
  dst_shape: tuple[int, int, int]
  dst_affine: np.ndarray

  def to_target(self, data: np.ndarray, order: int, cval: float = 0.0) -> np.ndarray:
    """(src_shape) -> (dst_shape) array."""
    _check_shape(data, self.src_shape, "GridMap.to_target")
    return resample_to_grid(data, self.src_affine, self.dst_affine, self.dst_shape, order,
                            cval)

  def to_source(self, data: np.ndarray, order: int, cval: float = 0.0) -> np.ndarray:
    """(dst_shape) -> (src_shape) array."""
    _check_shape(data, self.dst_shape, "GridMap.to_source")
    return resample_to_grid(data, self.dst_affine, self.src_affine, self.src_shape, order,
                            cval)

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form."""
    return {
        "src_shape": list(self.src_shape),
        "src_affine": np.asarray(self.src_affine, float).tolist(),
        "dst_shape": list(self.dst_shape),
        "dst_affine": np.asarray(self.dst_affine, float).tolist(),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> GridMap:
    """Inverse of ``to_dict``."""
    try:
      return cls(src_shape=tuple(int(v) for v in d["src_shape"]),
                 src_affine=np.asarray(d["src_affine"], np.float64).reshape(4, 4),
                 dst_shape=tuple(int(v) for v in d["dst_shape"]),
                 dst_affine=np.asarray(d["dst_affine"], np.float64).reshape(4, 4))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"GridMap.from_dict: malformed grid map {d!r}: {e}") from e

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, GridMap):
      return NotImplemented
    return (self.src_shape == other.src_shape and self.dst_shape == other.dst_shape
            and np.array_equal(self.src_affine, other.src_affine)
            and np.array_equal(self.dst_affine, other.dst_affine))

  __hash__ = None  # type: ignore[assignment]


def _check_shape(data: np.ndarray, shape: tuple[int, ...], where: str) -> None:
  if tuple(np.shape(data)) != tuple(shape):
    raise ValueError(f"{where}: data shape {np.shape(data)} != grid shape {tuple(shape)}.")


def target_grid(src_shape: Sequence[int], src_affine: np.ndarray,
                src_spacing_mm: Sequence[float], spacing_mm: Sequence[float],
                out_shape: Sequence[int], center_src_vox: Sequence[float]) -> GridMap:
  """Plans "resample to ``spacing_mm``, then crop/pad to ``out_shape``" as one grid.

  Equivalent to ``resample_to_spacing`` followed by ``crop_or_pad`` centred on the source
  voxel position ``center_src_vox``, but resampling once, straight onto the final grid.

  Args:
    src_shape: (H, W, D) of the source.
    src_affine: its 4x4 voxel -> world (mm).
    src_spacing_mm: its voxel size, ``voxel_spacing(src_affine)`` (``NiftiHeader.spacing_mm``).
    spacing_mm: target voxel size.
    out_shape: target shape.
    center_src_vox: crop centre, in source voxel coordinates.

  Returns:
    The ``GridMap`` from the source grid to the target grid.
  """
  res_shape, res_affine = spacing_grid(src_shape, src_affine, src_spacing_mm, spacing_mm)
  # Source voxel position -> voxel position on the resampled grid.
  to_res = np.linalg.inv(res_affine) @ np.asarray(src_affine, float)
  center_res = (to_res @ np.append(np.asarray(center_src_vox, float), 1.0))[:3]
  start = crop_start(center_res, out_shape)
  return GridMap(src_shape=tuple(int(s) for s in src_shape[:3]),
                 src_affine=np.asarray(src_affine, np.float64),
                 dst_shape=tuple(int(s) for s in out_shape),
                 dst_affine=translate_affine(res_affine, start))
