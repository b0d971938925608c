"""Instance optimisation: multi-scale refinement of one pair's displacement field.

Adam on a correction to the initial field (the network's prediction) over an image pyramid,
coarse to fine: u = u0 + d, or u = u0 o exp(v) with ``diffeomorphic=True``. A ``Refiner``
compiles the programs of a grid shape once (one per scale, each a ``lax.fori_loop``) and
reuses them for every later pair of that shape.

Conventions (README, "Conventions"): volumes (H, W, D); ``disp_vox`` (H, W, D, 3) in voxels of its grid,
component k along axis k, warped(x) = moving(x + disp_vox(x)). Inside, arrays are
channel-first (C, H, W, D) and fields (3, H, W, D), sampled by ``fmir_jax.ops.sampling``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fmir_jax.ops import losses
from fmir_jax.ops import pyramid
from fmir_jax.ops import sampling
from fmir_jax.ops import warp as warp_lib

Shape3 = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class RefineOptions:
  """Settings of the instance optimisation; the defaults need no tuning.

  steps: Adam steps per scale, coarse to fine (``len(steps)`` scales at most): most work on
    coarse grids, where a step is cheap; few at full resolution.
  lr_vox: Adam step size per scale (coarse to fine), in voxels of that scale's grid, decaying
    linearly to ``lr_end`` x itself. Halved at full resolution: Adam's first steps move every
    voxel by ~lr whatever its gradient, more noise than 10 steps would remove.
  similarity: 'ncc' (``losses.ncc_loss``, VoxelMorph's squared local NCC) or 'mind' (mean
    squared difference of MIND-SSC descriptors: pairs of different contrast).
  ncc_window: window in voxels along the finest-spaced axis of a scale; other axes get the
    odd size spanning about the same millimetres (1 across 10 mm slices at 1.8 mm in-plane).
  smooth: weight of ``losses.diffusion_loss`` on the correction (d, or v); None: 2.0 for
    'ncc', 0.3 for 'mind' (chosen on phantom pairs: Dice, few folds).
  fold: weight of ``fold_penalty`` on the whole field (init and correction): mean squared
    shortfall of the Jacobian determinant below ``fold_margin``, so that Adam keeps the
    field from folding (0: off). 10 (chosen on the register benchmark's phantom pairs:
    folding 0.43/0.14/0.16 % -> 0.008/0.001/0.000 % of voxels, Dice unchanged).
  diffeomorphic: optimise a stationary velocity v, integrated by scaling and squaring
    (``squarings``: v / 32 moves under 0.5 voxel while |v| < 16 voxels).
  mind_radius, mind_dilation: MIND-SSC box radius and neighbour distance (voxels).
  min_size: an axis is halved only if it keeps at least this many voxels.
  blur_sigma: Gaussian sigma (voxels) applied along an axis before halving it.
  """
  steps: tuple[int, ...] = (100, 80, 40, 10)
  lr_vox: tuple[float, ...] = (0.25, 0.25, 0.25, 0.125)
  lr_end: float = 0.1
  similarity: str = 'ncc'
  ncc_window: int = 7
  smooth: float | None = None
  fold: float = 10.0
  fold_margin: float = 0.2
  diffeomorphic: bool = False
  squarings: int = 5
  mind_radius: int = 1
  mind_dilation: int = 2
  min_size: int = 10
  blur_sigma: float = 1.0

  def __post_init__(self):
    if not self.steps or any(int(s) < 0 for s in self.steps):
      raise ValueError(f'steps must be >= 0 per scale, got {self.steps!r}.')
    if len(self.lr_vox) != len(self.steps) or not all(lr > 0 for lr in self.lr_vox):
      raise ValueError(f'lr_vox needs one positive size per scale of steps {self.steps!r}, '
                       f'got {self.lr_vox!r}.')
    if self.similarity not in ('ncc', 'mind'):
      raise ValueError(f"similarity must be 'ncc' or 'mind', got {self.similarity!r}.")
    if self.ncc_window < 1 or self.ncc_window % 2 == 0:
      raise ValueError(f'ncc_window must be odd and positive, got {self.ncc_window}.')
    if self.squarings < 0 or not 0 < self.lr_end <= 1:
      raise ValueError(f'need squarings >= 0 and 0 < lr_end <= 1, got {self}.')

  def with_budget(self, fraction: float) -> 'RefineOptions':
    """The same options with every scale's steps scaled by ``fraction`` (at least 1 step
    where there were any): ``fmir register --io-budget``."""
    if not fraction > 0:
      raise ValueError(f'budget must be > 0, got {fraction!r}.')
    return dataclasses.replace(self, steps=tuple(max(1, round(s * fraction)) if s else 0
                                                 for s in self.steps))

  @property
  def smooth_weight(self) -> float:
    if self.smooth is not None:
      return float(self.smooth)
    return 2.0 if self.similarity == 'ncc' else 0.3


@dataclasses.dataclass(frozen=True)
class RefineRecord:
  """What one ``refine`` did; per-scale tuples run coarse to fine.

  loss_before / loss_after: the scale's objective at its first and last Adam step (before
  that step's update; NaN without steps). seconds: per scale; prepare_seconds: pyramids
  (and MIND); seconds_total: the whole refinement, compilation excluded; compile_seconds:
  what this call spent compiling (0 once the Refiner holds the grid's programs).
  """
  shapes: tuple[Shape3, ...]
  steps: tuple[int, ...]
  loss_before: tuple[float, ...]
  loss_after: tuple[float, ...]
  seconds: tuple[float, ...]
  prepare_seconds: float
  seconds_total: float
  compile_seconds: float


# --------------------------------------------------------------------------- pyramid


def pyramid_plan(shape: Sequence[int], spacing_mm: Sequence[float], n_scales: int,
                 min_size: int = 10) -> tuple[tuple[Shape3, ...], tuple[Shape3, ...]]:
  """Per-axis halving plan, fine to coarse.

  An axis is halved only where its spacing is at most 1.5x the finest spacing of that scale
  (10 mm slices wait until the in-plane spacing catches up) and ``ceil(n / 2) >= min_size``
  (short axes stay). The pyramid stops early when no axis can be halved.

  Returns:
    ``(shapes, factors)``: up to ``n_scales`` shapes (``shapes[0] == shape``) and the
    integer factor triples between them (``factors[i]``: scale i to scale i + 1).
  """
  spacing = np.asarray(spacing_mm, np.float64)
  if spacing.shape != (3,) or not np.all(spacing > 0):
    raise ValueError(f'spacing_mm must be 3 positive numbers, got {spacing_mm!r}.')
  cur, factors = tuple(int(n) for n in shape), []
  for _ in range(n_scales - 1):
    f = tuple(k if math.ceil(n / 2) >= min_size else 1
              for k, n in zip(pyramid.factors_for_spacing(spacing), cur))
    if f == (1, 1, 1):
      break
    factors.append(f)
    cur = tuple(math.ceil(n / k) for n, k in zip(cur, f))
    spacing = spacing * np.asarray(f)
  shapes = pyramid.pyramid_shapes(shape, factors or (1, 1, 1), len(factors) + 1)
  return tuple(shapes), tuple(factors)


def align_corners_ratio(fine: Shape3, coarse: Shape3) -> tuple[float, ...]:
  """Fine voxels per coarse voxel of an align-corners resize, per axis: (n-1) / (m-1)."""
  return tuple((a - 1) / (b - 1) if b > 1 else 1.0 for a, b in zip(fine, coarse))


def ncc_windows(spacing_mm: np.ndarray, window: int) -> tuple[int, int, int]:
  """Odd per-axis NCC window spanning about ``window`` of the finest spacing."""
  return tuple(max(1, 2 * int(round((window * spacing_mm.min() / s - 1) / 2)) + 1)
               for s in spacing_mm)


def downsample(vol: jax.Array, shape: Shape3, factor: Shape3, sigma: float) -> jax.Array:
  """(C, H, W, D) -> (C, *shape): Gaussian blur (reflect padding, ``losses`` taps) along
  the halved axes only, then the align-corners trilinear ``warp.resize``."""
  for axis, f in enumerate(factor, start=1):
    n = vol.shape[axis]
    if f == 1 or sigma <= 0 or n == 1:
      continue
    taps = losses.gaussian_kernel1d(sigma, 3.0)
    pad = [(0, 0)] * 4
    pad[axis] = (len(taps) // 2,) * 2
    padded = jnp.pad(vol, pad, mode='symmetric')
    vol = sum(float(w) * lax.slice_in_dim(padded, t, t + n, axis=axis)
              for t, w in enumerate(taps))
  return jnp.moveaxis(warp_lib.resize(jnp.moveaxis(vol, 0, -1), shape), -1, 0)


# --------------------------------------------------------------------------- MIND-SSC

# The 6-neighbourhood in the reference code's order (its 3x3x3 kernel positions minus 1).
_SIX = ((-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0))
# The 12 pairs of those at distance sqrt(2) (Heinrich et al. 2013), reference order.
_SSC_PAIRS = tuple((_SIX[i], _SIX[j]) for i, j in itertools.product(range(6), range(6))
                   if i > j and sum((a - b) ** 2 for a, b in zip(_SIX[i], _SIX[j])) == 2)


def mind_ssc(image: jax.Array, radius: int = 1, dilation: int = 2) -> jax.Array:
  """MIND-SSC descriptor (Heinrich et al. 2013), as the Learn2Reg reference ``MINDSSC``.

  Per neighbour pair (p, q): D = mean over a (2 radius + 1)^3 box of
  (I(x + dilation p) - I(x + dilation q))^2, edge padding throughout; D -= min over pairs;
  V = mean over pairs clipped to [1e-3, 1e3] x its volume mean; MIND = exp(-D / V).

  Args:
    image: (H, W, D) float image (any intensity scale).

  Returns:
    (12, H, W, D) float32 in (0, 1], channels in ``_SSC_PAIRS`` order (the reference's final
    channel permutation is not applied).
  """
  img = jnp.asarray(image, jnp.float32)
  d, w = int(dilation), 2 * int(radius) + 1
  padded = jnp.pad(img, d, mode='edge')
  shift = {o: lax.slice(padded, [d + d * k for k in o],
                        [d + d * k + n for k, n in zip(o, img.shape)]) for o in _SIX}
  ssd = jnp.stack([jnp.square(shift[p] - shift[q]) for p, q in _SSC_PAIRS])
  ssd = jnp.pad(ssd, [(0, 0)] + [(int(radius),) * 2] * 3, mode='edge')
  for axis in (1, 2, 3):                                     # separable box sum
    dims = [1, 1, 1, 1]
    dims[axis] = w
    ssd = lax.reduce_window(ssd, np.zeros((), ssd.dtype), lax.add, tuple(dims),
                            (1, 1, 1, 1), 'VALID')
  ssd = ssd / float(w ** 3)
  mind = ssd - jnp.min(ssd, axis=0, keepdims=True)
  var = jnp.mean(mind, axis=0, keepdims=True)
  var = jnp.clip(var, jnp.mean(var) * 1e-3, jnp.mean(var) * 1e3)
  return jnp.exp(-mind / var)


# --------------------------------------------------------------------------- optimisation


@dataclasses.dataclass(frozen=True)
class _Scale:
  """One scale: grid, NCC window, Adam steps and step size (voxels), and the factors taking
  the coarser scale's field components to this grid's voxels (None at the coarsest)."""
  shape: Shape3
  windows: tuple[int, int, int]
  steps: int
  lr_vox: float
  up_ratio: tuple[float, ...] | None


def _displacement(opts: RefineOptions, param: jax.Array, init: jax.Array) -> jax.Array:
  """(3, H, W, D) displacement: init + d, or init o exp(v) (exp(v) first, then init)."""
  if opts.diffeomorphic:
    flow = sampling.integrate_cf(param, opts.squarings)
    return flow + sampling.sample_cf(init, flow)
  return init + param


def _objective(opts, scale, weights, mov, fix, init, param):
  """Similarity of the warped moving features to the fixed ones + smooth x diffusion of the
  correction. mov, fix: (C, H, W, D) image or MIND; init, param: (3, H, W, D).
  ``weights``: None, or (fixed mask (1, H, W, D), moving mask (1, H, W, D) or None): the
  similarity is then the mean over voxels weighted by the fixed mask times the moving mask
  sampled where the field takes each voxel (a weight without gradient, as ANTs' masks)."""
  disp = _displacement(opts, param, init)
  if weights is not None and weights[1] is not None:
    both = sampling.sample_cf(jnp.concatenate([mov, weights[1]]), disp)
    warped, w = both[:-1], weights[0][0] * lax.stop_gradient(both[-1])
  else:
    warped = sampling.sample_cf(mov, disp)
    w = None if weights is None else weights[0][0]
  if opts.similarity == 'ncc' and w is not None:      # window statistics over the mask
    per_voxel = -losses.masked_ncc_map(warped[..., None], fix[..., None],
                                       jnp.broadcast_to(w, warped.shape)[..., None],
                                       scale.windows)[..., 0]
  elif opts.similarity == 'ncc':
    per_voxel = -losses.ncc_map(warped[..., None], fix[..., None], scale.windows)[..., 0]
  else:
    per_voxel = jnp.mean(jnp.square(warped - fix), axis=0, keepdims=True)
  sim = jnp.mean(per_voxel) if w is None else (
      jnp.sum(w * per_voxel) / (jnp.sum(w) * per_voxel.shape[0] + 1e-12))
  # (3, H, W, D, 1): components as the batch; the same mean as (1, H, W, D, 3).
  loss = sim + opts.smooth_weight * losses.diffusion_loss(param[..., None])
  if opts.fold:
    loss = loss + opts.fold * fold_penalty(disp, opts.fold_margin)
  return loss


def jacobian_det_cf(disp_vox: jax.Array) -> jax.Array:
  """det(I + grad u) per voxel of a (3, H, W, D) voxel displacement: central differences,
  one-sided at the faces (``np.gradient``, as ``metrics.jacobian_determinant``)."""
  j = [[(k == i) + g for k, g in enumerate(jnp.gradient(disp_vox[i], axis=(0, 1, 2)))]
       for i in range(3)]
  return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
          - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
          + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def fold_penalty(disp_vox: jax.Array, margin: float = 0.2) -> jax.Array:
  """mean(relu(margin - det J)^2) of a (3, H, W, D) voxel displacement: zero where every
  voxel keeps at least ``margin`` of its volume, growing as a fold approaches."""
  return jnp.mean(jnp.square(jax.nn.relu(margin - jacobian_det_cf(disp_vox))))


def _run_scale(opts, scale, use_masks, mov, fix, init, fmask, mmask, coarser=None):
  """Adam over one scale (``lax.fori_loop``), from the coarser scale's upsampled parameter.

  Returns (param, disp_vox, loss at the first step, loss at the last step), fields
  (3, H, W, D). The losses come from the steps' own value_and_grad (separate evaluations
  would double the compile time).
  """
  param0 = (jnp.zeros((3, *scale.shape), jnp.float32) if coarser is None
            else sampling.resize_field_cf(coarser, scale.shape, scale.up_ratio))
  lr = optax.linear_schedule(scale.lr_vox, scale.lr_vox * opts.lr_end, max(scale.steps, 1))
  tx = optax.adam(lr)
  weights = None if not use_masks else (fmask, mmask if use_masks == 'both' else None)

  def step(i, carry):
    p, state, first, _ = carry
    value, grad = jax.value_and_grad(
        lambda q: _objective(opts, scale, weights, mov, fix, init, q))(p)
    updates, state = tx.update(grad, state, p)
    return optax.apply_updates(p, updates), state, jnp.where(i == 0, value, first), value

  nan = jnp.full((), jnp.nan, jnp.float32)
  param, _, first, last = lax.fori_loop(0, scale.steps, step,
                                        (param0, tx.init(param0), nan, nan))
  return param, _displacement(opts, param, init), first, last


def _prepare(opts, shapes, factors, moving, fixed, init, fixed_mask, moving_mask):
  """Per scale, fine to coarse: moving and fixed features (C, H_i, W_i, D_i) (the image, or
  MIND-SSC at full resolution then resized without blur: it is box-filtered already), the
  initial field (3, H_i, W_i, D_i) and the masks (1, H_i, W_i, D_i), blurred as images. The
  two images travel stacked as channels."""
  feats = jnp.stack([moving, fixed])
  if opts.similarity == 'mind':
    feats = jax.vmap(lambda im: mind_ssc(im, opts.mind_radius, opts.mind_dilation))(feats)
    feats = feats.reshape(-1, *feats.shape[2:])               # (2 x 12, H, W, D)
  sigma = opts.blur_sigma if opts.similarity == 'ncc' else 0.0
  pyramid, inits = [feats], [jnp.moveaxis(init, -1, 0)]
  for shape, factor in zip(shapes[1:], factors):
    pyramid.append(downsample(pyramid[-1], shape, factor, sigma))
    inits.append(sampling.resize_field_cf(inits[0], shape,
                                          [1 / r for r in align_corners_ratio(shapes[0], shape)]))
  half = feats.shape[0] // 2
  masks = [jnp.stack([fixed_mask, moving_mask])]
  for shape, factor in zip(shapes[1:], factors):
    masks.append(downsample(masks[-1], shape, factor, opts.blur_sigma))
  return ([p[:half] for p in pyramid], [p[half:] for p in pyramid], inits,
          [m[:1] for m in masks], [m[1:] for m in masks])


def check_masks(shape, fixed_mask, moving_mask) -> list[np.ndarray]:
  """[fixed, moving] float32 weights on a grid of ``shape`` (None: ones), checked."""
  out = []
  for m, what in ((fixed_mask, 'fixed_mask'), (moving_mask, 'moving_mask')):
    m = np.ones(shape, np.float32) if m is None else np.asarray(m, np.float32)
    if m.shape != tuple(shape) or not m.max() > 0:
      raise ValueError(f'{what} {m.shape} must be on the grid {tuple(shape)}, not empty.')
    out.append(m)
  return out


class Refiner:
  """Multi-scale instance optimisation holding its compiled programs per grid.

  Keep one for a batch of pairs: the first pair of a grid compiles a pyramid program and one
  program per scale (``compiles`` counts them); later pairs of that shape (and any spacing
  with the same plan) run them again without tracing or compiling.
  """

  def __init__(self, options: RefineOptions | None = None):
    self.options = options or RefineOptions()
    self.compiles = 0
    self._programs: dict = {}

  def plan(self, shape: Sequence[int], spacing_mm: Sequence[float]):
    """(shapes fine to coarse, factors, ``_Scale``s coarse to fine) of a grid. A grid too
    small for ``len(steps)`` scales runs the finest ones, the coarsest of them adding the
    steps of those it could not make."""
    opts = self.options
    shapes, factors = pyramid_plan(shape, spacing_mm, len(opts.steps), opts.min_size)
    dropped = len(opts.steps) - len(shapes)
    steps = [sum(opts.steps[:dropped + 1]), *opts.steps[dropped + 1:]]
    scales = []
    for i, n_steps, lr in zip(reversed(range(len(shapes))), steps, opts.lr_vox[dropped:]):
      spacing = np.asarray(spacing_mm, np.float64) * align_corners_ratio(shapes[0], shapes[i])
      up = align_corners_ratio(shapes[i], shapes[i + 1]) if i + 1 < len(shapes) else None
      scales.append(_Scale(shapes[i], ncc_windows(spacing, opts.ncc_window), int(n_steps),
                           float(lr), up))
    return shapes, factors, tuple(scales)

  def _compiled(self, shape: Shape3, spacing_mm, use_masks: str | None = None):
    """(prepare, [scale programs coarse to fine], scales) of a grid, compiled once per
    mask use (None, 'fixed' or 'both')."""
    shapes, factors, scales = self.plan(shape, spacing_mm)
    key = (shapes, factors, scales, use_masks)
    if key not in self._programs:
      opts, f32 = self.options, lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
      prep = jax.jit(lambda *a: _prepare(opts, shapes, factors, *a))
      programs = [prep.lower(f32(*shape), f32(*shape), f32(*shape, 3), f32(*shape),
                             f32(*shape)).compile()]
      channels, coarser = (12 if opts.similarity == 'mind' else 1), ()
      for scale in scales:
        feat, field = f32(channels, *scale.shape), f32(3, *scale.shape)
        mask = f32(1, *scale.shape)
        run = jax.jit(lambda *a, s=scale: _run_scale(opts, s, use_masks, *a))
        programs.append(run.lower(feat, feat, field, mask, mask, *coarser).compile())
        coarser = (field,)
      self.compiles += len(programs)
      self._programs[key] = (programs[0], programs[1:], scales)
    return self._programs[key]

  def refine(self, moving: np.ndarray, fixed: np.ndarray, spacing_mm: Sequence[float],
             init_disp_vox: np.ndarray | None = None, fixed_mask: np.ndarray | None = None,
             moving_mask: np.ndarray | None = None) -> tuple[np.ndarray, RefineRecord]:
    """Refines the displacement of one pair.

    Args:
      moving, fixed: (H, W, D) images on one grid, normalised (e.g. to [0, 1]).
      spacing_mm: that grid's voxel spacing (per-axis pyramid factors and NCC windows).
      init_disp_vox: (H, W, D, 3) initial displacement in voxels (the network's
        prediction), or None for zero.
      fixed_mask, moving_mask: optional (H, W, D) weights in [0, 1] on the grid: the
        similarity counts voxel x by fixed_mask(x) x moving_mask(x + disp(x)) (ANTs' -x);
        the regularisers keep the whole field.

    Returns:
      (disp_vox, record): (H, W, D, 3) float32 numpy displacement in voxels,
      warped(x) = moving(x + disp_vox(x)), and a ``RefineRecord``.
    """
    moving, fixed = np.asarray(moving, np.float32), np.asarray(fixed, np.float32)
    if moving.ndim != 3 or moving.shape != fixed.shape:
      raise ValueError(f'moving {moving.shape} and fixed {fixed.shape} must be one (H, W, D).')
    init = np.zeros((*moving.shape, 3), np.float32) if init_disp_vox is None else (
        np.asarray(init_disp_vox, np.float32))
    if init.shape != (*moving.shape, 3):
      raise ValueError(f'init_disp_vox must be {(*moving.shape, 3)}, got {init.shape}.')
    masks = check_masks(moving.shape, fixed_mask, moving_mask)
    t0 = time.perf_counter()
    prepare, programs, scales = self._compiled(moving.shape, spacing_mm, 'both' if (
        moving_mask is not None) else None if fixed_mask is None else 'fixed')
    compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
    movs, fixs, inits, fmasks, mmasks = jax.block_until_ready(
        prepare(moving, fixed, init, *masks))
    prepare_s, param, seconds, losses_ = time.perf_counter() - t0, (), [], []
    for level, run in zip(reversed(range(len(scales))), programs):
      ts = time.perf_counter()
      out = jax.block_until_ready(run(movs[level], fixs[level], inits[level], fmasks[level],
                                      mmasks[level], *param))
      seconds.append(time.perf_counter() - ts)
      param, disp = out[:1], out[1]
      losses_.append((float(out[2]), float(out[3])))
    record = RefineRecord(tuple(s.shape for s in scales), tuple(s.steps for s in scales),
                          tuple(b for b, _ in losses_), tuple(a for _, a in losses_),
                          tuple(seconds), prepare_s, time.perf_counter() - t0, compile_s)
    return np.moveaxis(np.asarray(disp), 0, -1), record


def refine(moving: np.ndarray, fixed: np.ndarray, spacing_mm: Sequence[float],
           init_disp_vox: np.ndarray | None = None,
           options: RefineOptions | None = None) -> tuple[np.ndarray, RefineRecord]:
  """One-off ``Refiner(options).refine(...)``; it compiles on every call, so keep a
  ``Refiner`` for several pairs."""
  return Refiner(options).refine(moving, fixed, spacing_mm, init_disp_vox)
