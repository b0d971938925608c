"""The registration grid of a pair (``fmir register``'s first stage) and its pyramid factors.

  * "model": the run's training grid, planned from the fixed image by the training
    dataset's reader (``feature_extract.datasets.<reader>.model_grid``).
  * "native": the fixed image's field of view at ``spacing_mm`` (default: the fixed
    spacing), padded (centred) to multiples of the product of the pyramid factors; a
    warning when that spacing is far from every spacing the head was trained at.

Pyramid factors on a native grid: ``--pyramid-factors``, else those of the training grid
with the same spacing, else ``warp.factors_for_spacing`` (halve the axes within 1.5x of the
finest spacing).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from fmir_jax import grids
from fmir_jax import io
from fmir_jax.errors import RegisterError

GRIDS = ('model', 'native')
SPACING_WARN_RATIO = 1.5     # native spacing this far from the training spacing: warn


@dataclasses.dataclass(frozen=True)
class Grid:
  """The registration grid: shape, voxel -> world affine, how it was planned."""
  shape: tuple[int, int, int]
  affine: np.ndarray
  mode: str
  warnings: tuple[str, ...] = ()

  @property
  def spacing_mm(self) -> tuple[float, float, float]:
    return grids.voxel_spacing(self.affine)


def factors_product(factors, levels: int) -> tuple[int, int, int]:
  """Per-axis product of the pyramid factors over the levels-1 transitions."""
  from fmir_jax import model as model_lib
  fac = model_lib.level_factors(factors, levels)
  return tuple(int(np.prod([f[k] for f in fac])) for k in range(3))


def native_grid(shape: Sequence[int], affine: np.ndarray, src_spacing_mm: Sequence[float],
                spacing_mm: Sequence[float], multiple: Sequence[int]
                ) -> tuple[tuple[int, int, int], np.ndarray]:
  """The fixed image's field of view at ``spacing_mm``, padded (centred) to multiples.

  Raises:
    RegisterError: an axis would have fewer than 2 voxels.
  """
  res_shape, res_affine = grids.spacing_grid(shape, affine, src_spacing_mm, spacing_mm)
  if min(res_shape) < 2:
    fov_mm = [n * s for n, s in zip(shape[:3], src_spacing_mm)]
    raise RegisterError(
        f'--grid native: at {tuple(float(s) for s in spacing_mm)} mm the fixed image '
        f'({" x ".join(f"{f:.1f}" for f in fov_mm)} mm) gives a {res_shape} grid, with an axis '
        'of fewer than 2 voxels; pass a finer --spacing (at most '
        f'{",".join(f"{f / 2:.3g}" for f in fov_mm)} mm).')
  out = tuple(int(math.ceil(n / m) * m) for n, m in zip(res_shape, multiple))
  start = [-((o - n) // 2) for o, n in zip(out, res_shape)]
  return out, grids.translate_affine(res_affine, start)


def plan_grid(fixed: io.NiftiHeader, reader, reader_options: dict[str, Any], opts,
              factors, levels: int, train_spacings_mm: Sequence[Sequence[float]]) -> Grid:
  """The registration grid for a pair with this fixed image (see the module docstring);
  ``train_spacings_mm``: the voxel sizes the head was trained at (a warning when the native
  spacing is far from all of them)."""
  if opts.grid == 'model':
    if reader.target_shape(**reader_options) is None:
      raise RegisterError(f'the run\'s {reader.NAME!r} features record no model grid (shape '
                          'and spacing_mm): use --grid native.')
    shape, affine = reader.model_grid(fixed, **reader_options)
    return Grid(tuple(int(s) for s in shape), np.asarray(affine, float), 'model')
  spacing = opts.spacing_mm or fixed.spacing_mm
  shape, affine = native_grid(fixed.shape, fixed.affine, fixed.spacing_mm, spacing,
                              factors_product(factors, levels))
  warnings = ()
  far = [np.any(r > SPACING_WARN_RATIO) or np.any(r < 1 / SPACING_WARN_RATIO)
         for r in (np.asarray(spacing, float) / np.asarray(t, float) for t in train_spacings_mm)]
  if far and all(far):
    near = min(train_spacings_mm, key=lambda t: float(np.max(np.abs(np.log(
        np.asarray(spacing, float) / np.asarray(t, float))))))
    warnings = (f'native spacing {tuple(round(float(v), 3) for v in spacing)} mm is far '
                f'from the training spacing {tuple(near)} mm: features and the head see '
                f'another scale; consider --spacing {",".join(f"{v:g}" for v in near)}',)
  return Grid(shape, affine, 'native', warnings)


def factors_for(spacing_mm, *, override, grid: str, model_factors,
                train_spacings_mm: Sequence[Sequence[float]], train_factors: Sequence[Any]):
  """Pyramid factors for a registration grid of this voxel size: ``override``
  (--pyramid-factors); on the model grid the run's (``model_factors``); else those of the
  training store with this spacing; else ``warp.factors_for_spacing``."""
  from fmir_jax import warp
  if override is not None:
    return override
  if grid == 'model':
    return model_factors
  for sp, f in zip(train_spacings_mm, train_factors):
    if np.allclose(sp, spacing_mm, rtol=1e-3):
      return f
  return warp.factors_for_spacing(spacing_mm)
