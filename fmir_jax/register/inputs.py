"""What one ``fmir register`` pair brings from disk: the two images, optional label maps,
masks (``--fixed-mask/--moving-mask``) and landmarks (``--fixed-landmarks/
--moving-landmarks``), read and checked before any work; and the masks on the registration
grid, the landmarks' target registration error from a result's map.

numpy + nibabel + scipy only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fmir_jax.core import nifti
from fmir_jax.core import resample
from fmir_jax.core.errors import RegisterError
from fmir_jax.register import apply as apply_lib


@dataclasses.dataclass(frozen=True)
class PairFiles:
  """One pair's input files (all but the two images optional)."""
  fixed: str
  moving: str
  fixed_labels: str | None = None
  moving_labels: str | None = None
  fixed_mask: str | None = None
  moving_mask: str | None = None
  fixed_landmarks: str | None = None
  moving_landmarks: str | None = None


@dataclasses.dataclass(frozen=True)
class Mask:
  """A binary mask (H, W, D) bool on its own grid (voxel -> RAS mm ``affine``)."""
  path: str
  inside: np.ndarray
  affine: np.ndarray


@dataclasses.dataclass
class LoadedPair:
  """Inputs read from disk: images float32 (H, W, D), labels integer or None, masks or None,
  landmarks (N, 3) RAS mm (row i of one matches row i of the other) or None."""
  fixed: np.ndarray
  fixed_header: nifti.NiftiHeader
  moving: np.ndarray
  moving_header: nifti.NiftiHeader
  fixed_labels: np.ndarray | None
  moving_labels: np.ndarray | None
  fixed_mask: Mask | None = None
  moving_mask: Mask | None = None
  fixed_points_mm: np.ndarray | None = None
  moving_points_mm: np.ndarray | None = None


def load_pair(paths: PairFiles) -> LoadedPair:
  """Reads and validates the images and the optional label maps, masks and landmarks.

  Both images must be placed in world space (a qform or an sform: registration resamples
  through world coordinates). Header warnings (pixdim vs affine) are not issued here but
  kept in the headers: ``register_grid.check_inputs`` logs and reports them. A label map
  must be on its image's grid; a mask may be on any grid of the same world (it is resampled).
  """
  def image(path):
    data, _, hdr = nifti.load_nifti(path, what='image', warn=False)
    nifti.require_world_placement(hdr, 'image')
    if min(hdr.shape) < 2:
      raise RegisterError(f'{path}: image has shape {hdr.shape}: a single slice is a 2D '
                          'image; registration needs a 3D volume with at least 2 voxels per '
                          'axis.')
    return data, hdr

  def labels(path, hdr):
    if path is None:
      return None
    # A label map's voxel size is its image's (check_same_grid): its pixdim is not used.
    lab, lab_affine, lab_hdr = nifti.load_nifti(path, what='label', warn=False)
    nifti.check_same_grid(hdr.path, hdr.affine, hdr.shape, lab_hdr.path, lab_affine,
                          lab_hdr.shape)
    return lab

  f, fh = image(paths.fixed)
  m, mh = image(paths.moving)
  fixed_pts, moving_pts = load_landmarks(paths.fixed_landmarks, paths.moving_landmarks)
  return LoadedPair(f, fh, m, mh, labels(paths.fixed_labels, fh),
                    labels(paths.moving_labels, mh), load_mask(paths.fixed_mask, '--fixed-mask'),
                    load_mask(paths.moving_mask, '--moving-mask'), fixed_pts, moving_pts)


def load_mask(path: str | None, flag: str) -> Mask | None:
  """A mask file (voxels > 0 are inside), or None; refused when it has no voxel inside."""
  if path is None:
    return None
  data, affine, hdr = nifti.load_nifti(path, what='label', warn=False)
  nifti.require_world_placement(hdr, 'label')
  inside = np.asarray(data) > 0
  if not inside.any():
    raise RegisterError(f'{flag} {path}: the mask is empty (no voxel > 0); pass a mask with '
                        'the region to register as 1, or leave the flag out.')
  return Mask(path, inside, np.asarray(affine, np.float64))


def mask_on_grid(mask: Mask | None, shape, grid_affine: np.ndarray, flag: str,
                 world_to_mask: np.ndarray | None = None) -> np.ndarray | None:
  """(H, W, D) float32 weights in [0, 1] of a mask on the registration grid (linear
  interpolation, 0 outside the mask's grid), or None. ``world_to_mask``: a 4x4 map applied
  to the grid's world points first (the linear stage's fixed -> moving map)."""
  if mask is None:
    return None
  src = mask.affine if world_to_mask is None else np.linalg.inv(world_to_mask) @ mask.affine
  out = resample.resample_to_grid(mask.inside.astype(np.float32), src, grid_affine, shape,
                                  order=1, cval=0.0)
  if not out.max() > 0.5:
    raise RegisterError(f'{flag} {mask.path}: no voxel of the mask falls on the registration '
                        "grid; check that it belongs to its image (same world coordinates).")
  return np.clip(out, 0.0, 1.0)


def load_landmarks(fixed: str | None, moving: str | None
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """((N, 3), (N, 3)) RAS mm landmarks of the two CSVs (``apply.read_points`` columns),
  matched row by row, or (None, None)."""
  if (fixed is None) != (moving is None):
    raise RegisterError('--fixed-landmarks and --moving-landmarks go together: two CSVs of '
                        'corresponding points, row i of one matching row i of the other.')
  if fixed is None:
    return None, None
  f = apply_lib.read_points(fixed, '--fixed-landmarks')[2]
  m = apply_lib.read_points(moving, '--moving-landmarks')[2]
  if len(f) != len(m):
    raise RegisterError(f'--fixed-landmarks {fixed} has {len(f)} points, --moving-landmarks '
                        f'{moving} {len(m)}: they must correspond row by row.')
  return f, m


def landmark_errors(fixed_mm: np.ndarray, moving_mm: np.ndarray, disp_mm: np.ndarray,
                    fixed_affine: np.ndarray, linear_mm: np.ndarray | None) -> dict[str, Any]:
  """Target registration error (mm) of corresponding landmarks: |p + u(p) - q| for fixed
  point p, moving point q and the result's map u (``disp_mm`` on the fixed grid); before:
  the identity (|p - q|); after_linear: the linear map alone. Points outside the fixed grid
  are counted and left out."""
  mapped = apply_lib.map_ras(disp_mm, fixed_affine, fixed_mm)
  inside = np.isfinite(mapped[:, 0])

  def stats(points):
    err = np.linalg.norm(points[inside] - moving_mm[inside], axis=-1)
    if not err.size:
      return None
    return {'mean': float(err.mean()), 'median': float(np.median(err)),
            'max': float(err.max())}

  linear = None if linear_mm is None else fixed_mm @ linear_mm[:3, :3].T + linear_mm[:3, 3]
  after = np.linalg.norm(mapped - moving_mm, axis=-1)
  return {'points': int(len(fixed_mm)), 'outside_fixed_grid': int((~inside).sum()),
          'before_mm': stats(fixed_mm), 'after_linear_mm': None if linear is None else
          stats(linear), 'after_mm': stats(mapped),
          'after_mm_per_point': [None if not ok else round(float(e), 4)
                                 for e, ok in zip(after, inside)]}
