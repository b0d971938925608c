"""Patch geometry: where each voxel sits on the encoder's patch grid, and the model inputs.

A volume (H, W, D) is encoded slice by slice: each (H, W) slice is resized by ``r`` input
pixels per voxel and placed at ``pad`` pixels inside the K x K encoder input, which a ViT
cuts into p x p patches. For in-plane array axis a in {0, 1}, voxel index i then maps to the
continuous patch-grid coordinate ``offset[a] + scale[a] * i`` (patch centres at integer
coordinates); the feature store records ``{"offset", "scale"}`` per volume and
``interp_matrix`` turns it into linear-interpolation weights.

numpy only (the feature-extraction stage uses it too).
"""
from __future__ import annotations

from typing import Sequence, TypedDict

import numpy as np


class ModelInputs(TypedDict):
  """What the model reads of one volume (a leading batch axis B when batched).

  image: (H, W, D) float32 intensities in [0, 1]; feat: (D, h, w, c) patch-grid features;
  interp_h: (H, h) and interp_w: (W, w) patch-grid -> voxel interpolation weights.
  """
  image: np.ndarray
  feat: np.ndarray
  interp_h: np.ndarray
  interp_w: np.ndarray


def patch_geometry(pad_px: Sequence[float], resize_factor: Sequence[float],
                   patch_size: int) -> dict[str, list[float]]:
  """Voxel -> patch-grid coordinate map for the two in-plane axes.

  Args:
    pad_px: (2,) where the resized slice starts inside the K x K input, in input pixels.
    resize_factor: (2,) input pixels per voxel (r), per in-plane array axis.
    patch_size: p, input pixels per patch.

  Returns:
    {"offset": [oy, ox], "scale": [sy, sx]}: voxel i sits at patch coordinate offset + scale*i,
    with scale = r/p and offset = (pad + 0.5 r)/p - 0.5.
  """
  if patch_size <= 0:
    raise ValueError(f'patch_size must be positive, got {patch_size}.')
  offset = [(float(p) + 0.5 * float(r)) / patch_size - 0.5 for p, r in zip(pad_px, resize_factor)]
  scale = [float(r) / patch_size for r in resize_factor]
  return {'offset': offset, 'scale': scale}


def interp_matrix(n_out: int, n_in: int, offset: float, scale: float) -> np.ndarray:
  """Linear interpolation weights from a patch grid to voxels along one axis.

  Args:
    n_out: number of voxels along the axis.
    n_in: number of patches along the axis.
    offset, scale: geometry of that axis (voxel i -> coordinate offset + scale*i, clamped to
      [0, n_in - 1]).

  Returns:
    (n_out, n_in) float32 matrix W with rows summing to 1; ``W @ f`` samples f at the voxels.
  """
  if n_out <= 0 or n_in <= 0:
    raise ValueError(f'interp_matrix needs positive sizes, got n_out={n_out}, n_in={n_in}.')
  coords = np.clip(offset + scale * np.arange(n_out, dtype=np.float64), 0.0, n_in - 1.0)
  lo = np.floor(coords).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  w_hi = coords - lo
  weights = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(weights, (rows, lo), 1.0 - w_hi)
  np.add.at(weights, (rows, hi), w_hi)
  return weights.astype(np.float32)


def model_inputs(image: np.ndarray, feat: np.ndarray, geometry: dict, *,
                 batch: bool = False) -> ModelInputs:
  """The model's inputs for one volume: ``image`` (H, W, D), ``feat`` (D, h, w, c) and its
  ``geometry`` ({"offset", "scale"}, as ``patch_geometry`` returns and the store records).

  batch: add a leading batch axis of 1 to every array.
  """
  image = np.asarray(image, np.float32)
  h, w = image.shape[:2]
  _, hp, wp, _ = np.shape(feat)
  out = ModelInputs(
      image=image, feat=feat,
      interp_h=interp_matrix(h, hp, geometry['offset'][0], geometry['scale'][0]),
      interp_w=interp_matrix(w, wp, geometry['offset'][1], geometry['scale'][1]))
  if batch:
    out = ModelInputs(**{k: np.asarray(v)[None] for k, v in out.items()})
  return out
