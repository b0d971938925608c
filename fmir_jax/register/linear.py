"""Linear pre-alignment: a rigid or affine map between two images on one registration grid,
found coarse to fine before the head runs (``fmir register --linear``).

The map is in world millimetres, fixed -> moving: a fixed point y is matched with the
moving point T(y) = M (y - c) + c + t, with c the fixed image's centre of mass. M = R S H:
a rotation R (Euler angles about x, y, z), per-axis scales S = diag(exp(s)) and a unit
upper-triangular shear H; "rigid" keeps S = H = I. The similarity is the squared
correlation of the whole images (one contrast) or their mutual information (any). Start: t from the centres of mass (with
``principal_axes``, the better of no rotation and the principal-axes rotations, each with
the four sign choices that keep it proper). Then Adam over an image pyramid, coarse to fine;
"affine" runs the coarsest scale's first half rigid. Optional masks weight the similarity
(a fixed point counts by its fixed mask and the moving mask where the map takes it). A
``LinearAligner`` compiles a grid
shape's programs once and reuses them for every pair of that shape (the grid's affine and
the images are arguments).

Arrays inside are channel-first (C, H, W, D), sampled by ``ops.sampling`` (zero outside).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from scipy import ndimage

from fmir_jax.ops import losses, sampling
from fmir_jax.register import refine

# Parameter units for Adam (one unit of q moves the map by about this much): t in 10 mm,
# angles in 0.1 rad (5.7 degrees), log-scales and shears in 0.1.
_UNITS = np.array([10.0] * 3 + [0.1] * 3 + [0.1] * 3 + [0.1] * 3, np.float32)
_RIGID = np.array([1.0] * 6 + [0.0] * 6, np.float32)
SIMILARITIES = ('correlation', 'mi')


@dataclasses.dataclass(frozen=True)
class LinearOptions:
  """Settings of the linear stage; the defaults need no tuning for pairs off by up to
  about 20 degrees and 30 mm.

  kind: 'affine' or 'rigid' ('none' is the registrar's switch to skip the stage).
  steps: Adam steps per scale, coarse to fine.
  lr: Adam step size per scale in parameter units (``_UNITS``), decaying to a fifth.
  similarity: 'correlation', the squared correlation of the whole images (pairs of one
    contrast, or one inverted; a local NCC is flat over uniform tissue and biased there by
    interpolation), or 'mi', their mutual information (Parzen windows,
    ``losses.mutual_information``): any monotone or non-monotone intensity relation.
  max_voxels: scales of more voxels are skipped (the alignment ends on the finest scale
    at most this large).
  max_voxel_steps: a scale of n voxels takes at most this / n of its steps.
  min_size: an axis is halved only if it keeps at least this many voxels.
  principal_axes: also try the principal-axes rotations as starting points (large
    rotations; off by default: on rounded anatomy they can start in a wrong minimum).
  blur_sigma: Gaussian sigma (voxels) along an axis before halving it.
  shape_weight: weight of the squared spread of the three log-scales (about their mean: a
    common scale is free) and of the squared shears, added to the loss: the correlation
    alone can be raised by collapsing one axis (thick slices, an inverted contrast). A true
    per-axis scale pays it too (a smaller weight recovers a known anisotropic affine more
    closely), but on deformed anatomy the default serves the head best (docs/results.md,
    the linear stage on known maps).
  """
  kind: str = 'affine'
  steps: tuple[int, ...] = (300, 200, 100)
  max_voxels: int = 1 << 17
  lr: tuple[float, ...] = (0.1, 0.05, 0.02)
  max_voxel_steps: int = 2_500_000
  min_size: int = 8
  principal_axes: bool = False
  blur_sigma: float = 1.0
  shape_weight: float = 1.0
  similarity: str = 'correlation'

  def __post_init__(self):
    if self.kind not in ('affine', 'rigid'):
      raise ValueError(f'kind must be affine or rigid, got {self.kind!r}.')
    if self.similarity not in SIMILARITIES:
      raise ValueError(f'similarity must be one of {SIMILARITIES}, got {self.similarity!r}.')
    if not self.steps or len(self.lr) != len(self.steps) or min(self.steps) < 0:
      raise ValueError(f'steps {self.steps!r} and lr {self.lr!r}: one lr per scale, steps >= 0.')


@dataclasses.dataclass(frozen=True)
class LinearRecord:
  """What one alignment found and did; per-scale tuples run coarse to fine.

  matrix_mm: 4x4 fixed world (RAS mm) -> moving world. start: 'centres of mass' or
  'principal axes'. translation_mm, rotation_deg (about x, y, z), scale, shear: its
  parameters. loss_start: the similarity at the start; loss_before/after: each scale's
  first and last step.
  """
  kind: str
  similarity: str
  shape_weight: float
  matrix_mm: tuple[tuple[float, ...], ...]
  start: str
  translation_mm: tuple[float, float, float]
  rotation_deg: tuple[float, float, float]
  scale: tuple[float, float, float]
  shear: tuple[float, float, float]
  shapes: tuple[tuple[int, int, int], ...]
  loss_start: float
  loss_before: tuple[float, ...]
  loss_after: tuple[float, ...]
  seconds_total: float
  compile_seconds: float


# --------------------------------------------------------------------------- the map


def _rotation(r: jax.Array) -> jax.Array:
  """Rz @ Ry @ Rx of angles (rx, ry, rz) in radians."""
  cx, cy, cz = jnp.cos(r)
  sx, sy, sz = jnp.sin(r)
  one, zero = jnp.ones(()), jnp.zeros(())
  rx = jnp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rz = jnp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return rz @ ry @ rx


def matrix_mm(params: jax.Array, centre_mm: jax.Array, rotation0: jax.Array) -> jax.Array:
  """4x4 fixed -> moving world map of 12 parameters (t, angles, log-scales, shears; in
  their own units, not ``_UNITS``) about ``centre_mm``, after a start rotation (3x3)."""
  t, r, s, h = params[:3], params[3:6], params[6:9], params[9:]
  shear = jnp.eye(3).at[0, 1].set(h[0]).at[0, 2].set(h[1]).at[1, 2].set(h[2])
  m = _rotation(r) @ rotation0 @ jnp.diag(jnp.exp(s)) @ shear
  offset = centre_mm + t - m @ centre_mm
  return jnp.concatenate([jnp.concatenate([m, offset[:, None]], 1),
                          jnp.array([[0.0, 0.0, 0.0, 1.0]])], 0)


def _disp_vox(t_mm: jax.Array, vox_to_mm: jax.Array, idx: jax.Array) -> jax.Array:
  """(3, H, W, D) voxel displacement on a grid (voxel -> mm ``vox_to_mm``) of the map
  ``t_mm``: inv(A) T A x - x."""
  m = jnp.linalg.inv(vox_to_mm) @ t_mm @ vox_to_mm
  return jnp.einsum('ij,jhwd->ihwd', m[:3, :3] - jnp.eye(3), idx) + m[:3, 3, None, None, None]


def _scale_affine(grid_affine: jax.Array, fine: Sequence[int], coarse: Sequence[int]):
  """Voxel -> mm of a coarse scale (align-corners: coarse index i is fine index i x ratio)."""
  ratio = refine.align_corners_ratio(tuple(fine), tuple(coarse))
  return grid_affine @ jnp.diag(jnp.array([*ratio, 1.0], jnp.float32))


def _index_grid(shape: Sequence[int]) -> jax.Array:
  return jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape],
                                indexing='ij'))


def weighted_correlation2(warped: jax.Array, fix: jax.Array, w: jax.Array) -> jax.Array:
  """Squared correlation of two images under voxel weights w >= 0 (all of one shape)."""
  total = jnp.sum(w) + 1e-12
  a = warped - jnp.sum(w * warped) / total
  b = fix - jnp.sum(w * fix) / total
  return jnp.square(jnp.sum(w * a * b)) / (jnp.sum(w * a * a) * jnp.sum(w * b * b) + 1e-12)


def _loss(opts, mov, fix, t_mm, vox_to_mm, idx, fmask, mmask, use_mmask):
  """Minus the similarity (squared correlation or mutual information) of the moving image
  sampled through ``t_mm`` and the fixed one, over the fixed mask (and, with ``use_mmask``,
  the points the map takes into the moving mask: a weight, not a gradient, as ANTs')."""
  disp = _disp_vox(t_mm, vox_to_mm, idx)
  if use_mmask:
    both = sampling.sample_cf(jnp.concatenate([mov, mmask]), disp)
    warped, w = both[:1], fmask * lax.stop_gradient(both[1:])
  else:
    warped, w = sampling.sample_cf(mov, disp), fmask
  if opts.similarity == 'mi':
    return -losses.mutual_information(warped, fix, w)
  return -weighted_correlation2(warped, fix, w)


# --------------------------------------------------------------------------- the start


def moments(image: np.ndarray, vox_to_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(centre of mass (3,) mm, principal axes (3, 3) columns by decreasing variance) of an
  image's intensity (negative values count as 0)."""
  w = np.clip(np.asarray(image, np.float64), 0, None)
  total = w.sum()
  if total <= 0:
    raise ValueError('an empty image (no positive intensity) has no centre of mass')
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in w.shape], indexing='ij'), -1)
  pts = idx.reshape(-1, 3) @ vox_to_mm[:3, :3].T + vox_to_mm[:3, 3]
  w = w.reshape(-1) / total
  com = w @ pts
  d = pts - com
  cov = (d * w[:, None]).T @ d
  vals, vecs = np.linalg.eigh(cov)
  return com, vecs[:, ::-1]


def foreground(image, weight) -> np.ndarray:
  """|image - background| x weight: the background level is the median over the outer
  shell (2 voxels) of the region weight > 0.5, so that a bright background (an inverted
  contrast, MR noise) does not pull the centre of mass off the body."""
  image, weight = np.asarray(image, np.float64), np.asarray(weight, np.float64)
  inside = weight > 0.5
  shell = inside & ~ndimage.binary_erosion(inside, iterations=2, border_value=0)
  level = np.median(image[shell]) if shell.any() else 0.0
  return np.abs(image - level) * weight


def start_rotations(axes_fixed: np.ndarray, axes_moving: np.ndarray) -> np.ndarray:
  """(5, 3, 3): the identity and the four proper rotations taking the fixed principal axes
  onto the moving ones (each axis pair up to sign)."""
  out = [np.eye(3)]
  for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
    r = axes_moving @ np.diag(signs) @ axes_fixed.T
    if np.linalg.det(r) < 0:                 # the axes' own handedness differs: flip one
      r = axes_moving @ np.diag(signs) @ np.diag([1, 1, -1]) @ axes_fixed.T
    out.append(r)
  return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------- optimisation


def _run_scale(opts, use_mmask, n_rigid, steps, lr, mov, fix, fmask, mmask, vox_to_mm,
               centre, rot0, q0):
  """Adam over one scale; returns (q, loss at the first step, loss at the last)."""
  idx = _index_grid(mov.shape[1:])
  units = jnp.asarray(_UNITS)
  mask = jnp.asarray(_RIGID if opts.kind == 'rigid' else np.ones(12, np.float32))
  tx = optax.adam(optax.linear_schedule(lr, lr / 5, max(steps, 1)))

  def objective(q):
    p = q * units
    shape = jnp.sum(jnp.square(p[6:9] - jnp.mean(p[6:9]))) + jnp.sum(jnp.square(p[9:]))
    return _loss(opts, mov, fix, matrix_mm(p, centre, rot0), vox_to_mm, idx, fmask, mmask,
                 use_mmask) + opts.shape_weight * shape

  def step(i, carry):
    q, state, first, _ = carry
    value, grad = jax.value_and_grad(objective)(q)
    grad = grad * jnp.where(i < n_rigid, jnp.asarray(_RIGID), mask)
    updates, state = tx.update(grad, state, q)
    return optax.apply_updates(q, updates), state, jnp.where(i == 0, value, first), value

  nan = jnp.full((), jnp.nan, jnp.float32)
  q, _, first, last = lax.fori_loop(0, steps, step, (q0, tx.init(q0), nan, nan))
  return q, first, last


def _prepare(opts, shapes, factors, moving, fixed, fixed_mask, moving_mask):
  """Pyramids of the (1, H_i, W_i, D_i) images and masks, fine to coarse: four lists."""
  pyramid = [jnp.stack([moving, fixed, fixed_mask, moving_mask])]
  for shape, factor in zip(shapes[1:], factors):
    pyramid.append(refine.downsample(pyramid[-1], shape, factor, opts.blur_sigma))
  return tuple([p[k:k + 1] for p in pyramid] for k in range(4))


class LinearAligner:
  """The linear stage holding its compiled programs per grid shape (see the module doc)."""

  def __init__(self, options: LinearOptions | None = None):
    self.options = options or LinearOptions()
    self.compiles = 0
    self._programs: dict = {}

  def _plan(self, shape, spacing_mm):
    opts = self.options
    shapes, factors = refine.pyramid_plan(shape, spacing_mm, len(opts.steps), opts.min_size)
    dropped = len(opts.steps) - len(shapes)
    steps = [sum(opts.steps[:dropped + 1]), *opts.steps[dropped + 1:]]
    # the finest scales over max_voxels are left out (their steps too): 12 numbers are
    # found as well on a grid of 1e5 voxels, at a fraction of the time
    used = max(1, sum(math.prod(s) <= opts.max_voxels for s in shapes))
    # each scale's steps capped at max_voxel_steps / its voxels: a fine scale only refines
    # what the coarser ones found, and its steps are most of the time
    steps = [max(1, min(n, opts.max_voxel_steps // math.prod(s)))
             for n, s in zip(steps, shapes[::-1])]
    return shapes, factors, tuple(steps[:used]), tuple(opts.lr[dropped:][:used])

  def field_of_view(self, fov: np.ndarray, spacing_mm, moving: bool) -> np.ndarray:
    """A weight (H, W, D) of 0 and 1 from where an image has data on the grid (``fov``:
    its all-ones volume resampled there), shrunk by one voxel of the coarsest scale per axis:
    the blurred ramp from the image to the 0 beyond its data would otherwise count, and
    drag the map wherever the background is not dark (an inverted contrast). The grid's
    faces are an edge of data only for the moving image (sampled there through the map)."""
    shapes = self._plan(fov.shape, spacing_mm)[0]
    radius = [math.ceil(n / c) for n, c in zip(shapes[0], shapes[-1])]
    inside = (np.asarray(fov) >= 0.999).astype(np.uint8)
    # a box erosion as a separable minimum filter: the same voxels, far cheaper than
    # binary_erosion with a (2r + 1)^3 structure
    return ndimage.minimum_filter(inside, size=[2 * r + 1 for r in radius], mode='constant',
                                  cval=0 if moving else 1).astype(np.float32)

  def _compiled(self, shape, spacing_mm, use_mmask: bool):
    plan = self._plan(shape, spacing_mm)
    key = plan + (use_mmask,)
    if key not in self._programs:
      opts, f32 = self.options, lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
      shapes, factors, steps, lrs = plan
      prep = jax.jit(lambda *a: _prepare(opts, shapes, factors, *a))
      programs = [prep.lower(*[f32(*shape)] * 4).compile()]
      coarsest = shapes[-1]

      def starts(mov, fix, fmask, mmask, vox_to_mm, centre, rots, q0):
        idx = _index_grid(coarsest)
        return jax.vmap(lambda r: _loss(opts, mov, fix,
                                        matrix_mm(q0 * jnp.asarray(_UNITS), centre, r),
                                        vox_to_mm, idx, fmask, mmask, use_mmask))(rots)
      feat = f32(1, *coarsest)
      n_starts = 5 if opts.principal_axes else 1
      programs.append(jax.jit(starts).lower(feat, feat, feat, feat, f32(4, 4), f32(3),
                                            f32(n_starts, 3, 3), f32(12)).compile())
      for i, (n, lr) in enumerate(zip(steps, lrs)):
        level_shape = shapes[len(shapes) - 1 - i]
        n_rigid = n // 2 if (i == 0 and opts.kind == 'affine') else 0
        run = jax.jit(lambda *a, s=n, l=lr, nr=n_rigid: _run_scale(opts, use_mmask, nr, s,
                                                                   l, *a))
        feat = f32(1, *level_shape)
        programs.append(run.lower(feat, feat, feat, feat, f32(4, 4), f32(3), f32(3, 3),
                                  f32(12)).compile())
      self.compiles += len(programs)
      self._programs[key] = programs
    return plan, self._programs[key]

  def align(self, moving: np.ndarray, fixed: np.ndarray, grid_affine: np.ndarray,
            fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None
            ) -> tuple[np.ndarray, LinearRecord]:
    """Aligns two images on one grid.

    Args:
      moving, fixed: (H, W, D) images on the grid, normalised (e.g. to [0, 1]).
      grid_affine: the grid's 4x4 voxel -> world (mm).
      fixed_mask, moving_mask: optional (H, W, D) weights in [0, 1] on the grid (the moving
        one in the moving image's frame): the similarity counts a fixed point y with weight
        fixed_mask(y) x moving_mask(T(y)), and the centres of mass are the masked images'.

    Returns:
      (4x4 float64 fixed world -> moving world map, record).
    """
    moving, fixed = np.asarray(moving, np.float32), np.asarray(fixed, np.float32)
    if moving.ndim != 3 or moving.shape != fixed.shape:
      raise ValueError(f'moving {moving.shape} and fixed {fixed.shape} must be one (H, W, D).')
    affine = np.asarray(grid_affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    masks = refine.check_masks(moving.shape, fixed_mask, moving_mask)
    t0, compiles = time.perf_counter(), self.compiles
    (shapes, *_), programs = self._compiled(moving.shape, tuple(spacing),
                                            moving_mask is not None)
    compile_s = time.perf_counter() - t0 if self.compiles > compiles else 0.0   # cached: 0
    t0 = time.perf_counter()
    movs, fixs, fmasks, mmasks = programs[0](moving, fixed, *masks)
    scale_affines = [np.asarray(_scale_affine(jnp.asarray(affine, jnp.float32), shapes[0], s))
                     for s in shapes]
    # Centres of mass of the masked images (coarsest scale: cheap); one mask alone serves
    # both images (its region, at the identity, is where the other's anatomy is too).
    fm = fmasks[-1][0] if fixed_mask is not None else mmasks[-1][0]
    mm = mmasks[-1][0] if moving_mask is not None else fmasks[-1][0]
    com_f, axes_f = moments(foreground(fixs[-1][0], fm), scale_affines[-1])
    com_m, axes_m = moments(foreground(movs[-1][0], mm), scale_affines[-1])
    rots = start_rotations(axes_f, axes_m) if self.options.principal_axes else \
        np.eye(3, dtype=np.float32)[None]
    q0 = np.zeros(12, np.float32)
    q0[:3] = (com_m - com_f) / _UNITS[:3]
    centre = com_f.astype(np.float32)
    start_losses = np.asarray(programs[1](movs[-1], fixs[-1], fmasks[-1], mmasks[-1],
                                          scale_affines[-1], centre, rots, q0))
    best = int(np.argmin(start_losses))
    rot0, q = rots[best], jnp.asarray(q0)
    before, after = [], []
    for i, run in enumerate(programs[2:]):
      level = len(shapes) - 1 - i
      q, first, last = run(movs[level], fixs[level], fmasks[level], mmasks[level],
                           scale_affines[level], centre, rot0, q)
      before.append(float(first))
      after.append(float(last))
    params = np.asarray(q, np.float64) * _UNITS
    t_mm = np.asarray(matrix_mm(jnp.asarray(params, jnp.float32), centre, rot0), np.float64)
    r = _euler_deg(t_mm[:3, :3] @ np.linalg.inv(np.diag(np.exp(params[6:9]))
                                                 @ _shear(params[9:])))
    record = LinearRecord(
        kind=self.options.kind, similarity=self.options.similarity,
        shape_weight=self.options.shape_weight,
        matrix_mm=tuple(tuple(float(v) for v in row) for row in t_mm),
        start='centres of mass' if best == 0 else 'principal axes',
        translation_mm=tuple(float(v) for v in t_mm[:3, 3] + t_mm[:3, :3] @ com_f - com_f),
        rotation_deg=r, scale=tuple(float(v) for v in np.exp(params[6:9])),
        shear=tuple(float(v) for v in params[9:]), shapes=tuple(shapes[::-1]),
        loss_start=float(start_losses[best]), loss_before=tuple(before),
        loss_after=tuple(after), seconds_total=time.perf_counter() - t0,
        compile_seconds=compile_s)
    return t_mm, record


def _shear(h: np.ndarray) -> np.ndarray:
  s = np.eye(3)
  s[0, 1], s[0, 2], s[1, 2] = h
  return s


def _euler_deg(r: np.ndarray) -> tuple[float, float, float]:
  """(rx, ry, rz) degrees of R = Rz Ry Rx."""
  ry = np.arcsin(np.clip(-r[2, 0], -1, 1))
  rx, rz = np.arctan2(r[2, 1], r[2, 2]), np.arctan2(r[1, 0], r[0, 0])
  return tuple(float(np.degrees(a)) for a in (rx, ry, rz))
