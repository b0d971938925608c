"""Registration losses and image pyramids (pure jax.numpy).

Arrays are channels-last: images ``(B, H, W, D, C)``, fields ``(B, H, W, D, 3)`` in voxels.
Conventions follow VoxelMorph (``ncc_loss``, ``diffusion_loss``) and paper §2.5.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fmir_jax.ops import warp as warp_lib

NCC_WINDOWS = (9, 5, 3, 3, 3)   # paper §2.5: the NCC window per pyramid level, finest first


def _check_rank5(x: jax.Array, name: str) -> None:
  if x.ndim != 5:
    raise ValueError(f'{name} must be (B, H, W, D, C), got shape {x.shape}.')


def _window3(window: int | Sequence[int]) -> tuple[int, int, int]:
  """Normalises a window to 3 odd positive ints."""
  win = (int(window),) * 3 if np.isscalar(window) else tuple(int(w) for w in window)
  if len(win) != 3 or any(w < 1 or w % 2 == 0 for w in win):
    raise ValueError(f'window must be an odd positive int or 3 of them, got {window!r}.')
  return win  # type: ignore[return-value]


def box_sum(x: jax.Array, window: int | Sequence[int]) -> jax.Array:
  """Zero-padded 'SAME' box sum over the 3 spatial axes.

  Args:
    x: ``(B, H, W, D, C)``.
    window: odd box size, int or per-axis triple (may exceed the axis length).

  Returns:
    ``(B, H, W, D, C)``; ``out[x] = sum of x over the window centred at x`` (outside = 0).
  """
  win = _window3(window)
  for k, w in enumerate(win):
    if w == 1:
      continue
    dims = [1] * 5
    dims[1 + k] = w
    pad = [(0, 0)] * 5
    pad[1 + k] = (w // 2, w // 2)
    # A numpy zero init lets JAX recognise the add monoid (differentiable, fast path).
    x = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, tuple(dims),
                              (1,) * 5, tuple(pad))
  return x


def ncc_map(a: jax.Array, b: jax.Array, window: int | Sequence[int],
            eps: float = 1e-5) -> jax.Array:
  """Local squared normalised cross-correlation, VoxelMorph's formula.

  Window sums use zero padding and a constant window size ``N = prod(window)``, so at the
  border the local means are those of the zero-padded image (exactly as VoxelMorph).

  Args:
    a, b: ``(B, H, W, D, C)`` images.
    window: odd window size (int or per-axis triple).
    eps: added to the variance product.

  Returns:
    ``(B, H, W, D, C)`` map ``cross**2 / (var_a * var_b + eps)`` with
    ``cross = Σab - μ_b Σa - μ_a Σb + μ_a μ_b N`` and ``var_a = Σa² - 2 μ_a Σa + μ_a² N``.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_rank5(a, 'a')
  if a.shape != b.shape:
    raise ValueError(f'ncc: a {a.shape} and b {b.shape} must have equal shapes.')
  return _ncc_map(a, b, _window3(window), float(eps))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _ncc_map(a: jax.Array, b: jax.Array, window: tuple[int, int, int],
             eps: float) -> jax.Array:
  """Jitted body of ``ncc_map``."""
  n = float(np.prod(window))
  # One box filter over the 5 stacked quantities (fewer ops: faster compile and run).
  stacked = jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1)
  sa, sb, saa, sbb, sab = jnp.split(box_sum(stacked, window), 5, axis=-1)
  ma, mb = sa / n, sb / n
  cross = sab - mb * sa - ma * sb + ma * mb * n
  var_a = saa - 2 * ma * sa + ma * ma * n
  var_b = sbb - 2 * mb * sb + mb * mb * n
  return cross * cross / (var_a * var_b + eps)


def masked_ncc_map(a: jax.Array, b: jax.Array, w: jax.Array, window: int | Sequence[int],
                   eps: float = 1e-5) -> jax.Array:
  """``ncc_map`` with each window's statistics taken over the weights ``w`` >= 0 only (a
  mask: voxels of weight 0 neither count nor colour their neighbours' local means).

  With S = box sums of w, wa, wb, wa², wb², wab: cross = S_wab - S_wa S_wb / S_w,
  var_a = S_wa² - S_wa² / S_w, and the map is cross² / (var_a var_b + eps) (0 where a
  window holds no weight). With w = 1 it equals ``ncc_map`` away from the border.

  Args:
    a, b, w: ``(B, H, W, D, C)``.
  """
  a, b, w = jnp.asarray(a), jnp.asarray(b), jnp.asarray(w)
  _check_rank5(a, 'a')
  if not a.shape == b.shape == w.shape:
    raise ValueError(f'masked ncc: a {a.shape}, b {b.shape}, w {w.shape} must be equal.')
  return _masked_ncc_map(a, b, w, _window3(window), float(eps))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _masked_ncc_map(a, b, w, window, eps):
  stacked = jnp.concatenate([w, w * a, w * b, w * a * a, w * b * b, w * a * b], axis=-1)
  sw, sa, sb, saa, sbb, sab = jnp.split(box_sum(stacked, window), 6, axis=-1)
  inv = 1.0 / jnp.maximum(sw, 1e-6)
  cross = sab - sa * sb * inv
  var_a = jnp.maximum(saa - sa * sa * inv, 0.0)
  var_b = jnp.maximum(sbb - sb * sb * inv, 0.0)
  return jnp.where(sw > 1e-6, cross * cross / (var_a * var_b + eps), 0.0)


def ncc_loss(a: jax.Array, b: jax.Array, window: int | Sequence[int],
             eps: float = 1e-5) -> jax.Array:
  """Negative mean local NCC (VoxelMorph NCC loss), a scalar in [-1, 0].

  Args:
    a, b: ``(B, H, W, D, 1)`` (any C works) images.
    window: odd window size (int or per-axis triple); may exceed small axes.
    eps: added to the variance product.
  """
  return -jnp.mean(ncc_map(a, b, window, eps))


def mutual_information(a: jax.Array, b: jax.Array, w: jax.Array, bins: int = 32,
                       sigma_bins: float = 1.0) -> jax.Array:
  """Mutual information (nats) of two images' intensities under voxel weights, by Parzen
  windows (Mattes et al.): each intensity adds a Gaussian of ``sigma_bins`` bins, centred on
  it, to ``bins`` bins spanning its image's [min, max] (the range is not differentiated).

  With p(i, j) the weighted joint histogram, MI = sum p log(p / (p_a p_b)); it does not
  change under an invertible intensity map, so it matches a pair of different contrasts.

  Args:
    a, b, w: images and weights >= 0, all of one shape (any rank).
  """
  a, b, w = (jnp.asarray(x, jnp.float32).reshape(-1) for x in (a, b, w))
  if not a.shape == b.shape == w.shape:
    raise ValueError(f'mutual information: a {a.shape}, b {b.shape}, w {w.shape} differ.')

  def parzen(x):                          # (N, bins) soft assignment, rows summing to 1
    lo, hi = lax.stop_gradient(jnp.min(x)), lax.stop_gradient(jnp.max(x))
    pos = (x - lo) / jnp.maximum(hi - lo, 1e-12) * (bins - 1)
    k = jnp.exp(-0.5 * jnp.square((pos[:, None] - jnp.arange(bins)) / sigma_bins))
    return k / jnp.sum(k, axis=1, keepdims=True)

  joint = (parzen(a) * w[:, None]).T @ parzen(b)
  p = joint / (jnp.sum(joint) + 1e-12)
  pa, pb = jnp.sum(p, 1, keepdims=True), jnp.sum(p, 0, keepdims=True)
  return jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30) / (pa * pb + 1e-30)), 0))


def diffusion_loss(v: jax.Array) -> jax.Array:
  """Diffusion regulariser, VoxelMorph ``Grad('l2')``.

  Args:
    v: ``(B, H, W, D, 3)`` field (voxels).

  Returns:
    Scalar ``(1/3) Σ_k mean((v[x + e_k] - v[x])**2)`` over the 3 spatial axes; an axis of
    length 1 has no differences and contributes 0.
  """
  v = jnp.asarray(v)
  _check_rank5(v, 'v')
  return _diffusion_loss(v)


@jax.jit
def _diffusion_loss(v: jax.Array) -> jax.Array:
  """Jitted body of ``diffusion_loss``."""
  total = jnp.zeros((), v.dtype)
  for axis in (1, 2, 3):
    if v.shape[axis] > 1:
      total += jnp.mean(jnp.square(jnp.diff(v, axis=axis)))
  return total / 3.0


def soft_dice(a_onehot: jax.Array, b_onehot: jax.Array,
              include_background: bool = False, eps: float = 1e-5) -> jax.Array:
  """Mean soft Dice over (batch, class).

  Args:
    a_onehot, b_onehot: ``(B, H, W, D, K)`` soft one-hot maps, class 0 = background.
    include_background: keep class 0 in the mean.
    eps: smoothing in numerator and denominator; a class absent from both scores 1.

  Returns:
    Scalar mean over b and classes of ``(2 Σ ab + eps) / (Σ a + Σ b + eps)``.
  """
  _check_rank5(a_onehot, 'a_onehot')
  if a_onehot.shape != b_onehot.shape:
    raise ValueError(
        f'soft_dice: a_onehot {a_onehot.shape} and b_onehot {b_onehot.shape} differ.')
  if not include_background:
    if a_onehot.shape[-1] < 2:
      raise ValueError('soft_dice needs K >= 2 classes when include_background=False, '
                       f'got shape {a_onehot.shape}.')
    a_onehot, b_onehot = a_onehot[..., 1:], b_onehot[..., 1:]
  inter = jnp.sum(a_onehot * b_onehot, axis=(1, 2, 3))
  denom = jnp.sum(a_onehot, axis=(1, 2, 3)) + jnp.sum(b_onehot, axis=(1, 2, 3))
  return jnp.mean((2.0 * inter + eps) / (denom + eps))


def dice_loss(a_onehot: jax.Array, b_onehot: jax.Array,
              include_background: bool = False) -> jax.Array:
  """``1 - soft_dice``."""
  return 1.0 - soft_dice(a_onehot, b_onehot, include_background)


def gaussian_kernel1d(sigma: float, truncate: float) -> np.ndarray:
  """Normalised 1D Gaussian taps of radius ``int(truncate * sigma + 0.5)`` (as scipy)."""
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / float(sigma)) ** 2)
  return k / k.sum()


def gaussian_blur(vol: jax.Array, sigma: float = 1.0, in_plane_only: bool = False,
                  truncate: float = 3.0) -> jax.Array:
  """Separable Gaussian blur of the spatial axes with reflect padding.

  Matches ``scipy.ndimage.gaussian_filter(x, sigma, mode='reflect', truncate=truncate)``
  applied to each spatial axis (reflect = half-sample symmetric, ``d c b a | a b c d``).

  Args:
    vol: ``(B, H, W, D, C)``.
    sigma: standard deviation in voxels (0 returns ``vol``).
    in_plane_only: blur H and W only (anisotropic cardiac volumes), not D.
    truncate: kernel radius in sigmas.

  Returns:
    Blurred array, same shape and dtype.
  """
  vol = jnp.asarray(vol)
  _check_rank5(vol, 'vol')
  if sigma < 0:
    raise ValueError(f'sigma must be >= 0, got {sigma}.')
  if sigma == 0:
    return vol
  return _gaussian_blur(vol, float(sigma), bool(in_plane_only), float(truncate))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _gaussian_blur(vol: jax.Array, sigma: float, in_plane_only: bool,
                   truncate: float) -> jax.Array:
  """Jitted body of ``gaussian_blur``."""
  taps = gaussian_kernel1d(sigma, truncate)
  radius = len(taps) // 2
  for axis in ((1, 2) if in_plane_only else (1, 2, 3)):
    n = vol.shape[axis]
    if n == 1:
      continue  # reflect padding of a single voxel is constant: blur is the identity
    pad = [(0, 0)] * 5
    pad[axis] = (radius, radius)
    padded = jnp.pad(vol, pad, mode='symmetric')
    out = jnp.zeros_like(vol)
    for t, w in enumerate(taps):
      out += float(w) * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
    vol = out
  return vol


def _check_shapes_start(x: jax.Array, shapes: Sequence[Sequence[int]], name: str):
  _check_rank5(x, name)
  if not shapes or tuple(shapes[0]) != tuple(x.shape[1:4]):
    raise ValueError(f'shapes[0] must equal the spatial shape of {name} {x.shape[1:4]}, '
                     f'got {tuple(shapes[0]) if shapes else None}; use '
                     'warp.pyramid_shapes(spatial_shape, factors, levels).')


def image_pyramid(img: jax.Array, shapes: Sequence[Sequence[int]], sigma: float = 1.0,
                  in_plane_only: bool = False) -> list[jax.Array]:
  """Gaussian image pyramid.

  Args:
    img: ``(B, H, W, D, C)`` level-0 image.
    shapes: spatial shapes per level (``pyramid.pyramid_shapes``); ``shapes[0] == (H, W, D)``.
    sigma: blur before each downsampling, voxels of the finer level.
    in_plane_only: blur H and W only.

  Returns:
    List of ``(B, *shapes[i], C)``: level 0 = img, level i+1 =
    ``resize(gaussian_blur(level_i), shapes[i+1])``.
  """
  _check_shapes_start(img, shapes, 'img')
  levels = [img]
  for shape in shapes[1:]:
    levels.append(warp_lib.resize(gaussian_blur(levels[-1], sigma, in_plane_only), shape))
  return levels


def label_pyramid(onehot: jax.Array, shapes: Sequence[Sequence[int]]) -> list[jax.Array]:
  """One-hot label pyramid: level i+1 = trilinear resize of level i (no blur).

  Args:
    onehot: ``(B, H, W, D, K)`` floating one-hot labels.
    shapes: spatial shapes per level, ``shapes[0] == (H, W, D)``.
  """
  _check_shapes_start(onehot, shapes, 'onehot')
  levels = [onehot]
  for shape in shapes[1:]:
    levels.append(warp_lib.resize(levels[-1], shape))
  return levels


def multilevel_loss(
    v_levels: Sequence[jax.Array],
    u_levels: Sequence[jax.Array],
    moving_levels: Sequence[jax.Array],
    fixed_levels: Sequence[jax.Array],
    moving_label_levels: Sequence[jax.Array] | None = None,
    fixed_label_levels: Sequence[jax.Array] | None = None,
    windows: Sequence[int] = NCC_WINDOWS,
    lambdas: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """FMIR training loss summed over pyramid levels with weight ``1 / 2**i``.

  Level i (0 = finest) contributes
    ``λ_ncc   * ncc_loss(warp(moving_i, u_i), fixed_i, windows[i])``
    ``λ_dice  * dice_loss(warp(moving_onehot_i, u_i), fixed_onehot_i)`` (trilinear warp)
    ``λ_smooth * diffusion_loss(v_i)``.

  Args:
    v_levels: L fields ``(B, H_i, W_i, D_i, 3)``, pre-integration (smoothness term).
    u_levels: L displacements ``(B, H_i, W_i, D_i, 3)`` in level-i voxels.
    moving_levels, fixed_levels: L images ``(B, H_i, W_i, D_i, 1)`` (``image_pyramid``).
    moving_label_levels, fixed_label_levels: L one-hots ``(B, H_i, W_i, D_i, K)`` or None.
    windows: NCC window per level (at least L entries).
    lambdas: ``(λ_ncc, λ_dice, λ_smooth)``.

  Returns:
    ``(total, terms)``; ``terms`` holds the level-weighted sums before λ: ``'ncc'``,
    ``'smooth'`` and, only when computed (labels given and λ_dice != 0), ``'dice'``; plus
    ``'total'``. Dice is skipped when labels are absent or λ_dice == 0.
  """
  n = len(v_levels)
  for name, seq in (('u_levels', u_levels), ('moving_levels', moving_levels),
                    ('fixed_levels', fixed_levels)):
    if len(seq) != n:
      raise ValueError(f'{name} has {len(seq)} levels, v_levels has {n}.')
  if len(windows) < n:
    raise ValueError(f'windows needs one entry per level ({n}), got {tuple(windows)}.')
  if len(lambdas) != 3:
    raise ValueError(f'lambdas must be (ncc, dice, smooth), got {lambdas!r}.')
  lam_ncc, lam_dice, lam_smooth = (float(x) for x in lambdas)
  if (moving_label_levels is None) != (fixed_label_levels is None):
    raise ValueError('Pass both moving_label_levels and fixed_label_levels, or neither.')
  use_dice = moving_label_levels is not None and lam_dice != 0.0
  if use_dice and (len(moving_label_levels) < n or len(fixed_label_levels) < n):
    raise ValueError(f'label pyramids need {n} levels, got {len(moving_label_levels)} and '
                     f'{len(fixed_label_levels)}.')
  ncc = smooth = dice = jnp.zeros((), jnp.float32)
  for i in range(n):
    weight = 1.0 / 2 ** i
    warped = warp_lib.warp(moving_levels[i], u_levels[i])
    ncc += weight * ncc_loss(warped, fixed_levels[i], windows[i])
    smooth += weight * diffusion_loss(v_levels[i])
    if use_dice:
      warped_lab = warp_lib.warp(moving_label_levels[i], u_levels[i])
      dice += weight * dice_loss(warped_lab, fixed_label_levels[i])
  total = lam_ncc * ncc + lam_smooth * smooth
  terms = {'ncc': ncc, 'smooth': smooth}
  if use_dice:
    total += lam_dice * dice
    terms['dice'] = dice
  terms['total'] = total
  return total, terms
