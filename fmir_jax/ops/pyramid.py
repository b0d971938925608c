"""Resolution pyramids: the per-level downsampling factors and the shapes they give.

One home for the rule the model, the losses, the register grid and instance optimisation
share. numpy only (``fmir register`` plans its grid with it before importing jax).

Factors are per array axis ``(sx, sy, sz)``: level i + 1 has ``ceil(level_i / s_i)`` voxels
along each axis. A config gives one triple for every transition or ``levels - 1`` triples.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Shape3 = tuple[int, int, int]
Factors = tuple[Shape3, ...]   # one (sx, sy, sz) per level transition, finest first


def level_factors(factors, levels: int) -> Factors:
  """``factors`` (one positive integer triple, or ``levels - 1`` of them) -> ``levels - 1``
  triples; ValueError naming the value otherwise."""
  seq = list(factors)
  if len(seq) == 3 and all(np.isscalar(s) for s in seq):
    seq = [seq] * (int(levels) - 1)

  def triple(t) -> bool:
    return (not np.isscalar(t) and len(t) == 3
            and all(np.isscalar(s) and int(s) == s and int(s) >= 1 for s in t))

  if len(seq) != int(levels) - 1 or not all(triple(t) for t in seq):
    raise ValueError(f'pyramid factors {factors!r}: need one positive (sx, sy, sz) triple or '
                     f'{int(levels) - 1} of them for {int(levels)} levels')
  return tuple(tuple(int(s) for s in t) for t in seq)


def pyramid_shapes(shape: Sequence[int], factors, levels: int) -> tuple[Shape3, ...]:
  """Spatial shapes of a resolution pyramid.

  Args:
    shape: level-0 spatial shape ``(H, W, D)``.
    factors: one per-axis downsampling triple ``(sx, sy, sz)`` used between all levels,
      or a list of ``levels - 1`` triples (entry i maps level i to level i + 1).
    levels: number of levels (>= 1).

  Returns:
    Tuple of ``levels`` shapes; level i + 1 = ``ceil(level_i / s_i)`` per axis.
  """
  if int(levels) < 1:
    raise ValueError(f'levels must be >= 1, got {levels}.')
  dims = tuple(shape)
  if len(dims) != 3 or any(int(n) != n or int(n) < 1 for n in dims):
    raise ValueError(f'shape must be 3 positive ints, got {shape!r}.')
  shapes = [tuple(int(n) for n in dims)]
  for f in level_factors(factors, levels):
    shapes.append(tuple(math.ceil(n / s) for n, s in zip(shapes[-1], f)))
  return tuple(shapes)


def factors_product(factors, levels: int) -> Shape3:
  """Per-axis product of the pyramid factors over the ``levels - 1`` transitions: the
  multiple a grid must be for every level to divide evenly."""
  fac = level_factors(factors, levels)
  return tuple(int(np.prod([f[k] for f in fac])) for k in range(3))


def factors_for_spacing(spacing_mm) -> Shape3:
  """Per-axis pyramid factors from voxel spacing: halve the axes whose voxels are at most
  1.5x the finest (2.4x2.4x10 mm -> (2, 2, 1); isotropic -> (2, 2, 2)). Used for grids a
  head was not trained on and by the instance-optimisation pyramid."""
  finest = min(float(s) for s in spacing_mm)
  return tuple(2 if float(s) <= 1.5 * finest else 1 for s in spacing_mm)
