"""NIfTI input/output and resampling between voxel grids (numpy, nibabel, scipy only).

Conventions: volumes are ``(H, W, D)`` arrays in NIfTI voxel order (i, j, k), the slice axis
is the last one and is never reoriented. A grid is a ``(shape, affine)`` pair where ``affine``
is the 4x4 voxel -> world (RAS, mm) matrix. Resampling is defined in world coordinates, so
every preprocessed volume can be mapped back to its source grid with the recorded
``GridMap``.

This module must stay importable without jax or torch.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from fmir_jax import files

_WHATS = ("image", "label")


class NiftiError(ValueError):
  """A NIfTI file cannot be used: the message names the file, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
  """What the header of one NIfTI file says (no pixel data read).

  path: the file.
  shape: voxel shape (3 entries after validation, 4 when ``allow_4d``).
  affine: 4x4 voxel -> world (RAS, mm) matrix.
  spacing_mm: voxel size from the header zooms, per array axis (first 3 axes).
  dtype: on-disk data type name.
  """
  path: str
  shape: tuple[int, ...]
  affine: np.ndarray
  spacing_mm: tuple[float, float, float]
  dtype: str

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form."""
    return {
        "path": self.path,
        "shape": list(self.shape),
        "affine": np.asarray(self.affine, float).tolist(),
        "spacing_mm": list(self.spacing_mm),
        "dtype": self.dtype,
    }


def _check_what(what: str) -> None:
  if what not in _WHATS:
    raise ValueError(f"what={what!r}: expected one of {_WHATS}.")


def _open(path: str, what: str) -> nib.Nifti1Image:
  """Opens a NIfTI file lazily (header only) with clear errors."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise NiftiError(
        f"{path}: {what} file does not exist. Check the dataset root/layout or the path in "
        "the pair list.")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise NiftiError(
        f"{path}: cannot read the {what} NIfTI header ({type(e).__name__}: {e}). The file "
        "is corrupt or not NIfTI; re-export or re-download it.") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise NiftiError(
        f"{path}: {what} is a {type(img).__name__}, not NIfTI. Convert it to .nii/.nii.gz.")
  return img


def _header_of(path: str, img: nib.Nifti1Image, what: str, allow_4d: bool) -> NiftiHeader:
  """Validates dimensionality and spacing from the header."""
  shape = tuple(int(s) for s in img.shape)
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3 and not (allow_4d and len(shape) == 4):
    hint = (" (a 4D cine/time series: pass the single 3D frame file instead)"
            if len(shape) == 4 else "")
    raise NiftiError(
        f"{path}: {what} has shape {shape}, expected a 3D volume (H, W, D){hint}.")
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  raw = _raw_pixdim(path, img)  # nibabel silently "fixes" 0/negative pixdim on load.
  if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms + raw):
    zooms = raw if raw else zooms
    raise NiftiError(
        f"{path}: {what} has voxel spacing {zooms} mm; all three must be finite and > 0. "
        "Fix pixdim[1:4] in the header.")
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise NiftiError(
        f"{path}: {what} has a singular or non-finite affine {affine.tolist()}. Fix the "
        "sform/qform of the file.")
  return NiftiHeader(path=os.fspath(path), shape=shape, affine=affine,
                     spacing_mm=zooms, dtype=str(img.get_data_dtype()))


def _raw_pixdim(path: str, img: nib.Nifti1Image) -> tuple[float, ...]:
  """pixdim[1:4] exactly as stored in the file (before nibabel's automatic fixes)."""
  try:
    with nib.openers.ImageOpener(path) as f:
      raw = type(img.header).from_fileobj(f, check=False)
    return tuple(float(v) for v in raw["pixdim"][1:4])
  except Exception as e:
    raise NiftiError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e}). "
                     "The file is corrupt; re-export or re-download it.") from e


def read_header(path: str, *, what: str = "image", allow_4d: bool = False) -> NiftiHeader:
  """Reads and validates a NIfTI header without loading pixel data.

  Args:
    path: .nii or .nii.gz file.
    what: "image" or "label" (used in messages).
    allow_4d: accept a 4D file.

  Returns:
    The validated ``NiftiHeader``.

  Raises:
    NiftiError: missing/unreadable file, not 3D, bad spacing or affine.
  """
  _check_what(what)
  return _header_of(os.fspath(path), _open(path, what), what, allow_4d)


def load_nifti(path: str, *, what: str = "image", allow_4d: bool = False
               ) -> tuple[np.ndarray, np.ndarray, NiftiHeader]:
  """Loads a NIfTI volume and validates it.

  Args:
    path: .nii or .nii.gz file.
    what: "image" -> float32 data; "label" -> integer data (uint8 if the values fit,
      else int32), checked to be integer valued and >= 0.
    allow_4d: accept a 4D file (H, W, D, T).

  Returns:
    (data (H, W, D[, T]), affine 4x4 voxel -> world mm, header).

  Raises:
    NiftiError: missing/corrupt file, not 3D, NaN/inf voxels, bad spacing, non-integer or
      negative labels.
  """
  _check_what(what)
  path = os.fspath(path)
  img = _open(path, what)
  header = _header_of(path, img, what, allow_4d)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:
    raise NiftiError(
        f"{path}: cannot read the {what} voxel data ({type(e).__name__}: {e}). The file is "
        "truncated or corrupt; re-export or re-download it.") from e
  data = np.asarray(data).reshape(header.shape)
  if what == "image":
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
      raise NiftiError(
          f"{path}: image has {int(bad.sum())} NaN/inf voxels (first at voxel "
          f"{tuple(int(i) for i in np.argwhere(bad)[0])}). Clean the file (e.g. replace them "
          "with the background value) before use.")
  else:
    data = _as_label_array(data, path)
  return data, header.affine, header


def _as_label_array(data: np.ndarray, path: str) -> np.ndarray:
  """Checks that a label map is integer valued and >= 0; returns uint8 or int32."""
  if np.issubdtype(data.dtype, np.floating):
    if not np.all(np.isfinite(data)):
      raise NiftiError(f"{path}: label map has NaN/inf voxels. Re-export the segmentation.")
    if not np.array_equal(data, np.round(data)):
      raise NiftiError(
          f"{path}: label map has non-integer values (e.g. "
          f"{float(data[data != np.round(data)].flat[0])}); it looks like an image or an "
          "interpolated segmentation. Pass the integer label file.")
  if data.size and data.min() < 0:
    raise NiftiError(f"{path}: label map has negative values (min {data.min()}). Labels must "
                     "be 0 (background) or positive class ids.")
  out_dtype = np.uint8 if (data.size == 0 or data.max() <= 255) else np.int32
  return data.astype(out_dtype)


def check_same_grid(img_path: str, img_affine: np.ndarray, img_shape: Sequence[int],
                    lab_path: str, lab_affine: np.ndarray, lab_shape: Sequence[int], *,
                    atol_mm: float = 1e-3, rtol: float = 1e-4) -> None:
  """Raises NiftiError when a label map is not on the voxel grid of its image.

  Args:
    img_path, lab_path: files, named in the message.
    img_affine, lab_affine: 4x4 voxel -> world (mm) matrices.
    img_shape, lab_shape: voxel shapes.
    atol_mm, rtol: tolerance on the affine entries (mm).
  """
  if tuple(img_shape) != tuple(lab_shape):
    raise NiftiError(
        f"{lab_path}: label shape {tuple(lab_shape)} differs from its image {img_path} shape "
        f"{tuple(img_shape)}. Pass the segmentation of this very image (or resample it onto "
        "the image grid with nearest-neighbour first).")
  a, b = np.asarray(img_affine, float), np.asarray(lab_affine, float)
  if not np.allclose(a, b, atol=atol_mm, rtol=rtol):
    diff = float(np.abs(a - b).max())
    raise NiftiError(
        f"{lab_path}: label affine differs from its image {img_path} affine by up to "
        f"{diff:.4g} mm (tolerance {atol_mm} mm; image {a.round(4).tolist()}, label "
        f"{b.round(4).tolist()}). "
        "Fix the label header (copy the image's sform/qform) or resample it onto the image "
        "grid.")


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size in mm per array axis: the norms of the affine's first three columns."""
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

  Returns:
    (shape, affine) of the new grid.
  """
  n_in = np.asarray(src_shape[:3], float)
  z = np.asarray(spacing_mm, float) / np.asarray(src_spacing_mm, float)
  if np.any(~np.isfinite(z)) or np.any(z <= 0):
    raise ValueError(f"spacing_grid: spacings must be > 0, got source {src_spacing_mm} and "
                     f"target {spacing_mm}.")
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
    src_spacing_mm: source voxel size (the header zooms); default: from ``affine``.
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
    src_spacing_mm: its voxel size (header zooms).
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


_LABEL_DTYPES = (np.uint8, np.int16, np.uint16, np.int32)


def label_dtype(data: np.ndarray, path: str = "labels") -> type:
  """The smallest NIfTI integer type holding the values of ``data`` (e.g. uint8 for ACDC,
  int16 for FreeSurfer aseg ids up to 2035)."""
  lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
  for dt in _LABEL_DTYPES:
    if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
      return dt
  raise ValueError(f"save_nifti: {path}: integer range [{lo}, {hi}] does not fit int32.")


def save_nifti(path: str, data: np.ndarray, affine: np.ndarray, *,
               intent: str | None = None) -> str:
  """Writes a 3D (or 4D) volume atomically (temp file in the same folder + os.replace).

  Args:
    path: destination ending in .nii or .nii.gz.
    data: float arrays are written as float32, bool/integer arrays (labels) with the
      smallest NIfTI integer type that holds their range (uint8, int16, uint16, int32).
    affine: 4x4 voxel -> world (mm).
    intent: optional NIfTI intent name, e.g. "label" or "vector" (stored in the header).

  Returns:
    The path written.
  """
  path = os.fspath(path)
  if not (path.endswith(".nii") or path.endswith(".nii.gz")):
    raise ValueError(f"save_nifti: {path} must end in .nii or .nii.gz.")
  data = np.asarray(data)
  if np.issubdtype(data.dtype, np.floating):
    data = data.astype(np.float32)
  elif data.dtype == bool or np.issubdtype(data.dtype, np.integer):
    data = data.astype(label_dtype(data, path))
  else:
    raise ValueError(f"save_nifti: {path}: unsupported dtype {data.dtype}.")
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise ValueError(f"save_nifti: {path}: affine must be 4x4, got {affine.shape}.")
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  if intent is not None:
    img.header.set_intent(intent)
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path


DISPVECT_INTENT = 1006   # NIFTI_INTENT_DISPVECT


def save_dispvect(path: str, disp_mm: np.ndarray, affine: np.ndarray) -> str:
  """Writes a displacement field as NIfTI-1 (X, Y, Z, 1, 3) float32, intent DISPVECT, mm.

  ``disp_mm[i, j, k, 0, :]`` is a RAS vector (mm) such that, with p = affine @ (i, j, k, 1),
  warped(p) = moving(p + disp_mm); ITK/ANTs/SimpleITK (LPS) read it as
  (-d0, -d1, d2). Written atomically with the user's umask.
  """
  img = nib.Nifti1Image(np.asarray(disp_mm, np.float32)[:, :, :, None, :], affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_intent(DISPVECT_INTENT, name="disp_mm_RAS")
  img.header.set_xyzt_units("mm")
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path


def l2r_case(path: str, given: str | None, flag: str) -> tuple[str, str | None]:
  """(case id, modality id or None) of a scan for the Learn2Reg file names.

  ``given`` ("NNNN" or "NNNN_MMMM", from ``flag``) wins. Otherwise the name must be
  Learn2Reg's ``TASK_NNNN_MMMM.nii.gz`` or hold exactly one number (``img0001.nii.gz``);
  a name with several numbers (``patient101_frame10``) is ambiguous and refused.
  """
  if given is not None:
    m = re.fullmatch(r"(\d{1,4})(?:_(\d{1,4}))?", given)
    if not m:
      raise NiftiError(f"{flag} {given!r}: expected a case number NNNN or NNNN_MMMM "
                       "(case_modality).")
    return f"{int(m.group(1)):04d}", m.group(2) and f"{int(m.group(2)):04d}"
  name = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
  m = re.search(r"_(\d{4})_(\d{4})$", name)
  if m:
    return m.group(1), m.group(2)
  nums = re.findall(r"\d+", name)
  if len(nums) != 1:
    raise NiftiError(f"{path}: cannot tell the Learn2Reg case id from the file name "
                     f"({len(nums)} numbers in it); pass {flag} NNNN.")
  return f"{int(nums[0]):04d}", None


def l2r_names(fixed: tuple[str, str | None], moving: tuple[str, str | None]) -> list[str]:
  """File names under which the Learn2Reg evaluation code finds the field of this pair.

  It reads ``disp_FFFF_MMMM.nii.gz`` (fixed case first) when both scans share a modality
  (or are 0000 -> 0001), else ``disp_FFFF_fmod_MMMM_mmod.nii.gz``: the short name is written
  where it applies, the long one whenever both modality ids are known.
  """
  (f, fm), (m, mm) = fixed, moving
  names = []
  if fm is None or mm is None or fm == mm or (fm, mm) == ("0000", "0001"):
    names.append(f"disp_{f}_{m}.nii.gz")
  if fm is not None and mm is not None:
    names.append(f"disp_{f}_{fm}_{m}_{mm}.nii.gz")
  return names
