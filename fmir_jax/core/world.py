"""Displacement fields in world space: the maths between a registration grid and the
original NIfTI grids (numpy + scipy only).

Conventions: a grid is a ``(shape, affine)`` pair, ``affine`` the 4x4 voxel -> world (RAS, mm)
matrix. ``disp_vox`` (H, W, D, 3) is in voxels of its grid with component k along array
axis k; ``disp_mm`` (X, Y, Z, 3) is a RAS vector in mm on the fixed image's grid such that
warped(p) = moving(p + disp_mm(p)) for the world point p of each fixed voxel. Sampling
follows ``resample.resample_to_grid``'s edge rule (``resample.sample_voxels``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fmir_jax.core import metrics
from fmir_jax.core import resample

_CHUNK_VOXELS = 1 << 21   # fixed-grid voxels sampled per chunk (bounds host memory)


def _slabs(shape: Sequence[int]):
  """(k0, k1) ranges of the last axis, ``_CHUNK_VOXELS`` voxels or so each."""
  step = max(1, _CHUNK_VOXELS // max(1, int(shape[0]) * int(shape[1])))
  return [(k0, min(int(shape[2]), k0 + step)) for k0 in range(0, int(shape[2]), step)]


def voxel_world(shape: Sequence[int], affine: np.ndarray, k0: int = 0,
                k1: int | None = None) -> np.ndarray:
  """World mm coordinates (H, W, k1-k0, 3) of the voxels with last index in [k0, k1)."""
  k1 = shape[2] if k1 is None else k1
  ii, jj, kk = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(k0, k1),
                           indexing='ij')
  vox = np.stack([ii, jj, kk], -1).astype(np.float64)
  a = np.asarray(affine, np.float64)
  return vox @ a[:3, :3].T + a[:3, 3]


def disp_vox_to_mm(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Voxel displacements (..., 3) of the grid of ``affine`` -> world mm (RAS), float32."""
  m = np.asarray(affine, np.float64)[:3, :3]
  return (np.asarray(disp_vox, np.float64) @ m.T).astype(np.float32)


def disp_to_fixed_world(disp_vox: np.ndarray, reg_affine: np.ndarray,
                        fixed_shape: Sequence[int], fixed_affine: np.ndarray) -> np.ndarray:
  """Registration-grid voxel displacement -> RAS mm displacement on the fixed grid.

  Args:
    disp_vox: (H, W, D, 3) voxels of the registration grid.
    reg_affine: 4x4 voxel -> world of the registration grid.
    fixed_shape, fixed_affine: the fixed image's original grid.

  Returns:
    (X, Y, Z, 3) float32 RAS mm, linearly interpolated in world space; 0 outside the
    registration grid (edge value within half a voxel of it). On the registration grid
    itself (same shape and affine) no resampling is needed and none is done.
  """
  disp_mm = disp_vox_to_mm(disp_vox, reg_affine)
  if (tuple(disp_mm.shape[:3]) == tuple(int(n) for n in fixed_shape)
      and np.allclose(reg_affine, fixed_affine, rtol=0, atol=1e-6)):
    return disp_mm      # the registration grid is the fixed grid: resampling is the identity
  return np.stack([resample.resample_to_grid(disp_mm[..., k], reg_affine, fixed_affine,
                                       fixed_shape, order=1, cval=0.0)
                   for k in range(3)], -1).astype(np.float32)


def warp_to_fixed(moving: np.ndarray, moving_affine: np.ndarray, fixed_shape: Sequence[int],
                  fixed_affine: np.ndarray, disp_mm: np.ndarray | None, order: int,
                  cval: float = 0.0) -> np.ndarray:
  """Samples the moving image at p + disp_mm(p) for every fixed voxel world point p.

  Args:
    moving: (Hm, Wm, Dm) image (order 1) or labels (order 0, dtype kept).
    moving_affine: its 4x4 voxel -> world (mm).
    fixed_shape, fixed_affine: output grid.
    disp_mm: (X, Y, Z, 3) RAS mm displacement on the fixed grid, or None (identity).
    order: 1 linear, 0 nearest.
    cval: value farther than half a voxel outside the moving image.

  Returns:
    (X, Y, Z) array on the fixed grid (float32 for order 1, moving.dtype for order 0).
  """
  fixed_shape = tuple(int(s) for s in fixed_shape)
  inv = np.linalg.inv(np.asarray(moving_affine, np.float64))
  out = np.empty(fixed_shape, moving.dtype if order == 0 else np.float32)
  for k0, k1 in _slabs(fixed_shape):
    p = voxel_world(fixed_shape, fixed_affine, k0, k1)
    if disp_mm is not None:
      p = p + disp_mm[:, :, k0:k1]
    vox = p @ inv[:3, :3].T + inv[:3, 3]
    out[:, :, k0:k1] = resample.sample_voxels(moving, np.moveaxis(vox, -1, 0), order, cval)
  return out


def after_linear(disp_mm: np.ndarray, fixed_affine: np.ndarray, t_mm: np.ndarray
                 ) -> np.ndarray:
  """The displacement of "deform, then map": p -> T(p + disp_mm(p)), as p + total(p).

  Args:
    disp_mm: (X, Y, Z, 3) RAS mm on the fixed grid (the deformable part).
    fixed_affine: that grid's 4x4 voxel -> world.
    t_mm: 4x4 fixed world -> moving world map (the linear part).

  Returns:
    (X, Y, Z, 3) float32 RAS mm: T(p + disp_mm(p)) - p.
  """
  shape = disp_mm.shape[:3]
  t = np.asarray(t_mm, np.float64)
  out = np.empty(disp_mm.shape, np.float32)
  for k0, k1 in _slabs(shape):
    p = voxel_world(shape, fixed_affine, k0, k1)
    q = (p + disp_mm[:, :, k0:k1]) @ t[:3, :3].T + t[:3, 3]
    out[:, :, k0:k1] = q - p
  return out


def jacobian_det_mm(disp_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """det of the Jacobian of p -> p + disp_mm(p) per voxel of its grid: (X, Y, Z) float32.

  The same determinant as in the grid's voxels (``metrics.jacobian_determinant`` of the
  field in voxels), computed in slabs along the last axis, one voxel of overlap each side,
  so that host memory stays bounded on large fixed grids.
  """
  shape = disp_mm.shape[:3]
  if shape[2] < 2:
    raise ValueError(f'a Jacobian needs two slices or more, got a {shape} grid')
  a_inv = np.linalg.inv(np.asarray(affine, np.float64)[:3, :3])
  out = np.empty(shape, np.float32)
  for k0, k1 in _slabs(shape):
    lo, hi = max(0, k0 - 1), min(shape[2], k1 + 1)   # at least 2 slices: shape[2] >= 2
    det = metrics.jacobian_determinant(np.asarray(disp_mm[:, :, lo:hi], np.float64) @ a_inv.T)
    out[:, :, k0:k1] = det[:, :, k0 - lo:k1 - lo]
  return out


def l2r_disp_vox(disp_mm: np.ndarray, fixed_affine: np.ndarray,
                 moving_affine: np.ndarray) -> np.ndarray:
  """Learn2Reg voxel field (X, Y, Z, 3) float32: inv(A_moving)(p + disp_mm) - fixed index.

  The Learn2Reg evaluation warps with ``map_coordinates(moving, identity + disp)``; where
  both scans share one grid this is the voxel displacement.
  """
  shape = disp_mm.shape[:3]
  inv = np.linalg.inv(np.asarray(moving_affine, np.float64))
  p = voxel_world(shape, fixed_affine) + disp_mm
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  return (p @ inv[:3, :3].T + inv[:3, 3] - idx).astype(np.float32)


def grid_corners(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
  """World mm (8, 3) of the corners of a grid's extent: half a voxel beyond the outer voxel
  centres, the edge rule of ``resample.sample_voxels``."""
  lo, hi = -0.5, np.asarray(shape[:3], np.float64) - 0.5
  vox = np.array([[hi[0] if i else lo, hi[1] if j else lo, hi[2] if k else lo]
                  for i in (0, 1) for j in (0, 1) for k in (0, 1)])
  a = np.asarray(affine, np.float64)
  return vox @ a[:3, :3].T + a[:3, 3]


def bounding_box(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
  """(2, 3) world mm: the lowest and highest x, y, z (RAS) of a grid's extent."""
  c = grid_corners(shape, affine)
  return np.stack([c.min(0), c.max(0)])


def grids_overlap(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int],
                  affine_b: np.ndarray, tol_mm: float = 1e-6) -> bool:
  """Whether the extents of two grids (parallelepipeds in world space) share a volume.

  Exact for any affines (rotated, sheared): two convex parallelepipeds are disjoint iff
  their projections on one of the separating-axis candidates are (the face normals of each
  and the cross products of their edges). Extents that only touch do not overlap.
  """
  def box(shape, affine):
    a = np.asarray(affine, np.float64)
    edges = a[:3, :3] * np.asarray(shape[:3], np.float64)       # column k: axis k's extent
    centre = a[:3, :3] @ ((np.asarray(shape[:3], np.float64) - 1) / 2) + a[:3, 3]
    return centre, edges.T                                      # rows: edge vectors
  (ca, ea), (cb, eb) = box(shape_a, affine_a), box(shape_b, affine_b)
  axes = [np.cross(e[i], e[j]) for e in (ea, eb) for i, j in ((0, 1), (1, 2), (2, 0))]
  axes += [np.cross(u, v) for u in ea for v in eb]
  for axis in axes:
    norm = np.linalg.norm(axis)
    if norm < 1e-12:                     # parallel edges: no new candidate
      continue
    axis = axis / norm
    radius = 0.5 * (np.abs(ea @ axis).sum() + np.abs(eb @ axis).sum())
    if abs(float((ca - cb) @ axis)) >= radius - tol_mm:
      return False
  return True
