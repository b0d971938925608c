"""The registration grid of a pair (``fmir register``'s first stage) and its pyramid factors.

  * "model": the run's training grid, planned from the fixed image by the training
    dataset's reader (``feature_extract.datasets.<reader>.model_grid``).
  * "native": the fixed image's field of view at ``spacing_mm`` (default: the fixed
    spacing), padded (centred) to multiples of the product of the pyramid factors; a
    warning when that spacing is far from every spacing the head was trained at.

Pyramid factors on a native grid: ``--pyramid-factors``, else those of the training grid
with the same spacing, else ``pyramid.factors_for_spacing`` (halve the axes within 1.5x of the
finest spacing).

``check_inputs`` then checks the planned grid against the pair before any heavy work: the
moving image must overlap the fixed one in world space, and the host memory the
registration needs (``host_memory_bytes``) must fit in the memory available.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from fmir_jax.core import resample
from fmir_jax.core import nifti
from fmir_jax.core import world
from fmir_jax.core.errors import RegisterError
from fmir_jax.ops import pyramid

GRIDS = ('model', 'native')
SPACING_WARN_RATIO = 1.5     # native spacing this far from the training spacing: warn

# Host memory of one registration beyond what the process holds when the grid is planned
# (run, encoder and both images already loaded), from the arrays it allocates. Two stages
# that do not overlap in time, hence a max (``host_memory_bytes``):
#   head stage, per registration-grid voxel: both preprocessed images (2 x 4 B float32),
#     their encoder features on the patch grid (2 x 4 B x c / p^2 at about one encoder pixel
#     per voxel) and the XLA buffers of the head (activations, level fields, integration);
#     the instance optimiser's buffers are smaller;
#   output stage, per fixed-grid voxel: disp_mm (3 x 4 B), its float64 intermediates and the
#     warped image and labels;
# plus the runtime's own working memory (compilation, thread pools).
# The per-voxel head constant and the runtime term are calibrated so that the estimate
# bounds the peak RSS (resource.getrusage) of `fmir register` with the general head,
# compiling or not, from small (48^3) to medium (192^3) pairs, while staying close to it at
# the larger sizes, where the formula matters. Other heads and backbones differ: an
# estimate, not a guarantee.
RUNTIME_BYTES = 512 << 20
HEAD_BYTES_PER_VOXEL = 432
IMAGE_BYTES_PER_VOXEL = 2 * 4
OUTPUT_BYTES_PER_FIXED_VOXEL = 48
MEMORY_NOTE_FRACTION = 0.5   # log the estimate when it exceeds this share of the available
MEMORY_NOTE_BYTES = 4 << 30  # ... or this much


@dataclasses.dataclass(frozen=True)
class Grid:
  """The registration grid: shape, voxel -> world affine, how it was planned."""
  shape: tuple[int, int, int]
  affine: np.ndarray
  mode: str
  warnings: tuple[str, ...] = ()

  @property
  def spacing_mm(self) -> tuple[float, float, float]:
    return resample.voxel_spacing(self.affine)


def native_grid(shape: Sequence[int], affine: np.ndarray, src_spacing_mm: Sequence[float],
                spacing_mm: Sequence[float], multiple: Sequence[int]
                ) -> tuple[tuple[int, int, int], np.ndarray]:
  """The fixed image's field of view at ``spacing_mm``, padded (centred) to multiples.

  Raises:
    RegisterError: an axis would have fewer than 2 voxels.
  """
  res_shape, res_affine = resample.spacing_grid(shape, affine, src_spacing_mm, spacing_mm)
  if min(res_shape) < 2:
    fov_mm = [n * s for n, s in zip(shape[:3], src_spacing_mm)]
    raise RegisterError(
        f'--grid native: at {tuple(float(s) for s in spacing_mm)} mm the fixed image '
        f'({" x ".join(f"{f:.1f}" for f in fov_mm)} mm) gives a {res_shape} grid, with an axis '
        'of fewer than 2 voxels; pass a finer --spacing (at most '
        f'{",".join(f"{f / 2:.3g}" for f in fov_mm)} mm).')
  out = tuple(int(math.ceil(n / m) * m) for n, m in zip(res_shape, multiple))
  start = [-((o - n) // 2) for o, n in zip(out, res_shape)]
  return out, resample.translate_affine(res_affine, start)


def plan_grid(fixed: nifti.NiftiHeader, reader, reader_options: dict[str, Any], opts,
              factors, levels: int, train_spacings_mm: Sequence[Sequence[float]]) -> Grid:
  """The registration grid for a pair with this fixed image (see the module docstring);
  ``train_spacings_mm``: the voxel sizes the head was trained at (a warning when the native
  spacing is far from all of them)."""
  if opts.grid == 'model':
    if reader.target_shape(**reader_options) is None:
      raise RegisterError(f'the run\'s {reader.NAME!r} features record no model grid (shape '
                          'and spacing_mm): use --grid native.')
    shape, affine = reader.model_grid(fixed, **reader_options)
    shape = tuple(int(s) for s in shape)
    check_factors(opts.pyramid_factors, levels, shape)
    return Grid(shape, np.asarray(affine, float), 'model')
  spacing = opts.spacing_mm or fixed.spacing_mm
  check_factors(opts.pyramid_factors, levels,
                resample.spacing_grid(fixed.shape, fixed.affine, fixed.spacing_mm, spacing)[0])
  shape, affine = native_grid(fixed.shape, fixed.affine, fixed.spacing_mm, spacing,
                              pyramid.factors_product(factors, levels))
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
  training store with this spacing; else ``pyramid.factors_for_spacing``."""
  if override is not None:
    return override
  if grid == 'model':
    return model_factors
  for sp, f in zip(train_spacings_mm, train_factors):
    if np.allclose(sp, spacing_mm, rtol=1e-3):
      return f
  return pyramid.factors_for_spacing(spacing_mm)


def check_factors(override, levels: int, shape: Sequence[int]) -> None:
  """Refuses ``--pyramid-factors`` whose product over the level transitions exceeds the
  grid on an axis: its coarsest level would be less than one voxel of the image, and the
  native grid would be padded to that product (100,100,100 over four levels: 10^18 voxels).
  No check without an override (the defaults come from the grid's own spacing).

  Raises:
    RegisterError: naming the flag, the products and the grid shape.
  """
  if override is None:
    return
  product = pyramid.factors_product(override, levels)
  if all(p <= int(n) for p, n in zip(product, shape)):
    return
  nested = isinstance(override[0], (tuple, list))
  text = ';'.join(','.join(str(v) for v in t) for t in (override if nested else [override]))
  raise RegisterError(
      f'--pyramid-factors {text}: over the {levels - 1} level transitions they multiply to '
      f'{tuple(product)} voxels per axis, more than the {tuple(int(n) for n in shape)} of the '
      'registration grid (the coarsest level would be smaller than one voxel); use smaller '
      'factors, e.g. 2,2,2 or 2,2,1.')


def check_inputs(grid: Grid, fixed: nifti.NiftiHeader, moving: nifti.NiftiHeader, factors,
                 levels: int, backbone=None) -> Grid:
  """Checks the planned grid against the pair before any heavy work (resampling, encoding).

  Args:
    grid: from ``plan_grid``.
    fixed, moving: the images' headers.
    factors, levels: the pyramid of the head (the native-grid padding of a suggested
      spacing).
    backbone: the encoder (``channels``, ``patch_size``: the features' size), or None.

  Returns:
    ``grid`` with the headers' warnings (e.g. pixdim vs affine) and, when it is large, the
    host memory estimate added to its warnings.

  Raises:
    RegisterError: the images do not overlap in world space (the warped image would be all
      background), or the estimated host memory exceeds the memory available (the message
      names a ``--spacing`` that fits).
  """
  if not world.grids_overlap(fixed.shape, fixed.affine, moving.shape, moving.affine):
    raise RegisterError(
        f'{moving.path}: the moving image does not overlap the fixed image {fixed.path} in '
        f'world space (fixed {_box(fixed)}, moving {_box(moving)}), so the warped image '
        'would be all background; align the headers (the same scanner/world coordinates) or '
        'pre-align the pair with a linear (rigid/affine) registration first.')
  per_voxel = feature_bytes_per_voxel(backbone)
  need = host_memory_bytes(grid.shape, fixed.shape, per_voxel)
  avail = available_memory_bytes()
  notes = tuple(fixed.warnings) + tuple(moving.warnings)
  if avail is not None and need > avail:
    raise RegisterError(_memory_message(grid, fixed, factors, levels, per_voxel, need,
                                        avail))
  if need > MEMORY_NOTE_BYTES or (avail is not None and need > MEMORY_NOTE_FRACTION * avail):
    notes += (f'registration on the {grid.shape} grid needs about {_gib(need)} of host '
              'memory' + ('' if avail is None else f' ({_gib(avail)} available)') +
              '; a coarser --spacing needs less',)
  return dataclasses.replace(grid, warnings=notes + tuple(grid.warnings))


def feature_bytes_per_voxel(backbone) -> float:
  """Bytes per registration-grid voxel of both images' encoder features (float32 on the
  patch grid, at about one encoder pixel per voxel): 2 x 4 x c / p^2."""
  c, p = getattr(backbone, 'channels', None), getattr(backbone, 'patch_size', None)
  if not c or not p:
    return 0.0
  return 2 * 4 * float(c) / float(p) ** 2


def host_memory_bytes(grid_shape: Sequence[int], fixed_shape: Sequence[int],
                      feature_bytes: float = 0.0) -> int:
  """Estimated host memory (bytes) a registration allocates beyond what is held when its
  grid is planned: ``RUNTIME_BYTES + max(head stage, output stage)`` (see the constants)."""
  n_grid = math.prod(int(n) for n in grid_shape[:3])
  n_fixed = math.prod(int(n) for n in fixed_shape[:3])
  head = n_grid * (HEAD_BYTES_PER_VOXEL + IMAGE_BYTES_PER_VOXEL + feature_bytes)
  return int(RUNTIME_BYTES + max(head, n_fixed * OUTPUT_BYTES_PER_FIXED_VOXEL))


def available_memory_bytes() -> int | None:
  """Memory this process may still allocate: /proc/meminfo MemAvailable (else
  ``os.sysconf``), capped by a cgroup (container) limit less its usage; None if unknown."""
  avail = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          avail = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if avail is None:
    try:
      avail = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (AttributeError, OSError, ValueError):
      pass
  limit = _cgroup_room()
  if limit is not None:
    avail = limit if avail is None else min(avail, limit)
  return avail


def _cgroup_room() -> int | None:
  """A cgroup memory limit less the usage that cannot be reclaimed (v2, else v1)."""
  for limit_f, usage_f, stat_f, key in (
      ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current',
       '/sys/fs/cgroup/memory.stat', 'inactive_file'),
      ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
       '/sys/fs/cgroup/memory/memory.usage_in_bytes', '/sys/fs/cgroup/memory/memory.stat',
       'total_inactive_file')):
    try:
      with open(limit_f) as f:
        text = f.read().strip()
      if text == 'max' or int(text) >= 1 << 60:      # no limit
        return None
      with open(usage_f) as f:
        usage = int(f.read().strip())
      cache = 0
      with open(stat_f) as f:
        for line in f:
          name, _, value = line.partition(' ')
          if name == key:
            cache = int(value)
      return max(0, int(text) - max(0, usage - cache))
    except (OSError, ValueError):
      continue
  return None


def _memory_message(grid: Grid, fixed: nifti.NiftiHeader, factors, levels: int,
                    feature_bytes: float, need: int, avail: int) -> str:
  """The one-line refusal: the estimate, the memory available and a --spacing that fits."""
  head = (f'registration on the {grid.shape} grid at {_fmt(grid.spacing_mm)} mm needs about '
          f'{_gib(need)} of host memory, {_gib(avail)} available')
  floor = host_memory_bytes((1, 1, 1), fixed.shape, feature_bytes)
  if floor > avail:
    return (f'{fixed.path}: {head}; even writing the outputs on the fixed grid '
            f'{tuple(fixed.shape)} needs about {_gib(floor)}: free memory or use a larger '
            'machine.')
  multiple = pyramid.factors_product(factors, levels)
  spacing = np.asarray(grid.spacing_mm, float)
  n_grid = math.prod(grid.shape)
  n_fit = (avail - RUNTIME_BYTES) / (HEAD_BYTES_PER_VOXEL + IMAGE_BYTES_PER_VOXEL
                                     + feature_bytes)
  spacing = spacing * max(1.0, (n_grid / max(n_fit, 1.0)) ** (1 / 3))
  for _ in range(60):          # padding to pyramid multiples: grow until the plan fits
    try:
      shape = native_grid(fixed.shape, fixed.affine, fixed.spacing_mm, spacing, multiple)[0]
    except RegisterError:      # an axis of fewer than 2 voxels: no coarser grid exists
      break
    if host_memory_bytes(shape, fixed.shape, feature_bytes) <= avail:
      break
    spacing = spacing * 1.05
  spacing = np.asarray([_round_up(v) for v in spacing])
  flag = '--spacing' if grid.mode == 'native' else '--grid native --spacing'
  return (f'{fixed.path}: {head}; pass {flag} {",".join(f"{v:g}" for v in spacing)} '
          '(a coarser grid that fits) or free memory.')


def _round_up(v: float) -> float:
  """v rounded up to 2 significant digits (a spacing to type)."""
  scale = 10.0 ** (math.floor(math.log10(v)) - 1)
  return math.ceil(v / scale - 1e-9) * scale


def _fmt(values: Sequence[float]) -> str:
  return 'x'.join(f'{float(v):.3g}' for v in values)


def _gib(n: float) -> str:
  return f'{n / (1 << 30):.1f} GiB'


def _box(header: nifti.NiftiHeader) -> str:
  """The world bounding box of an image: 'x [a, b] y [c, d] z [e, f] mm'."""
  lo, hi = world.bounding_box(header.shape, header.affine)
  return ' '.join(f'{k} [{a:.1f}, {b:.1f}]' for k, a, b in zip('xyz', lo, hi)) + ' mm'
