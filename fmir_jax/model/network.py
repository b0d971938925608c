"""FMIR network (paper §2.3): feature compressor + 5-level pyramid registration head.

Flax NNX modules hold the parameters; the geometry (pyramid shapes, warps, integration) is
the pure functions of ``fmir_jax.ops.warp``. Arrays are channels-last: images (B, H, W, D),
features (B, H, W, D, C), displacements (B, H, W, D, 3) in voxels of their level's grid,
component k along array axis k.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fmir_jax.ops import conv as conv_lib
from fmir_jax.ops import pyramid
from fmir_jax.ops import upsample as feats
from fmir_jax.ops import warp as W


# PyTorch's default Conv3d weight init (kaiming_uniform with a=sqrt(5)), as the authors used.
_torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

ACTIVATIONS = {
    'leaky_relu': lambda x: jax.nn.leaky_relu(x, 0.2),
    'relu': jax.nn.relu,
}


# He (Kaiming normal) init keeps activations O(1) through the six conv layers: the head
# learns in hundreds rather than thousands of steps (used by the CPU demo).
_he_init = nnx.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
KERNEL_INITS = {'torch': _torch_default_init, 'he': _he_init}
# The field layer: PyTorch's default (the authors), or VoxelMorph's N(0, 1e-5) with zero bias,
# so that the untrained head predicts ~zero displacement whatever the scale of its inputs.
FLOW_INITS = {'torch': _torch_default_init, 'small': nnx.initializers.normal(1e-5)}


def _conv(cin, cout, rngs, init='torch', impl='auto'):
  if init not in KERNEL_INITS:
    raise ValueError(f'unknown kernel init {init!r}: use one of {sorted(KERNEL_INITS)}')
  return nnx.Conv(cin, cout, (3, 3, 3), padding='SAME', kernel_init=KERNEL_INITS[init],
                  conv_general_dilated=conv_lib.nnx_conv_fn(impl), rngs=rngs)


def instance_norm(x, eps=1e-5):
  """Per-sample, per-channel normalisation over the spatial axes (InstanceNorm3d, no affine)."""
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  var = jnp.var(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


@dataclasses.dataclass(frozen=True)
class FMIRConfig:
  """Architecture hyper-parameters (static; part of the checkpoint)."""
  feature_channels: int = 256         # c' (after channel regularisation)
  n: int = 32                         # compressor width
  levels: int = 5
  factors: tuple = (2, 2, 1)          # per-axis pyramid factors (one triple or levels-1)
  integration_steps: int = 7          # scaling-and-squaring steps; 0 = no integration
  activation: str = 'leaky_relu'      # compressor activation
  head_instance_norm: bool = False    # authors' release: InstanceNorm after the 1st head conv
  exact_feature_path: bool = True     # first conv on the patch grid (no c'-channel volume)
  kernel_init: str = 'torch'          # 'torch' (authors: PyTorch default) or 'he' (hidden convs)
  conv_impl: str = 'auto'             # 3D conv kernels: 'auto' | 'split2d' | 'xla' (conv.py)
  flow_init: str = 'torch'            # last conv (27 -> 3): 'torch' or 'small' (VoxelMorph)
  # The compressor and the head start at this pyramid level; the finer levels get its
  # field upsampled (0: the paper). Level 0 holds most of the arithmetic (bench/head_profile.py).
  # The blocks below it are kept untrained, so that every level keeps its index.
  finest_level: int = 0

  @classmethod
  def from_dict(cls, d) -> 'FMIRConfig':
    """The config a run saved (run.json 'model'; JSON lists back to tuples, fields added
    since then take their defaults)."""
    tup = lambda v: tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v
    return cls(**{k: tup(v) for k, v in d.items()})


INPUT_KEYS = ('image', 'feat', 'interp_h', 'interp_w')   # what the model reads of a volume


def check_same_grid(moving, fixed) -> None:
  if moving['image'].shape != fixed['image'].shape:
    raise ValueError(f'moving {moving["image"].shape} and fixed {fixed["image"].shape} '
                     'images must share one grid')


def inputs_at(inputs: dict, shape) -> dict:
  """The model's inputs of a volume on a coarser grid ``shape`` (H', W', D'): the image and
  the upsampled features are what ``W.resize`` of the level-0 volumes gives, without the
  level-0 feature volume: the slice axis is resized on the patch grid and the in-plane
  interpolation matrices are composed with the resize's (everything is linear)."""
  h, w, d = shape
  feat = inputs['feat']                                  # (B, D, h, w, c)
  m_d = jnp.asarray(W.lerp_matrix(feat.shape[1], d), feat.dtype)
  m_h = jnp.asarray(W.lerp_matrix(inputs['interp_h'].shape[1], h))
  m_w = jnp.asarray(W.lerp_matrix(inputs['interp_w'].shape[1], w))
  return {'image': W.resize(inputs['image'][..., None].astype(jnp.float32), shape)[..., 0],
          'feat': jnp.einsum('eD,bDhwc->behwc', m_d, feat),
          'interp_h': jnp.einsum('Hk,bkh->bHh', m_h, inputs['interp_h']),
          'interp_w': jnp.einsum('Wk,bkw->bWw', m_w, inputs['interp_w'])}


class FMIROutput(NamedTuple):
  disp: jax.Array                  # (B, H, W, D, 3) final displacement, level-0 voxels
  v_levels: tuple                  # per level (0 finest): pre-integration residual field
  u_levels: tuple                  # per level: composed displacement at that level


class Compressor(nnx.Module):
  """Three 3x3x3 conv blocks c'+1 -> n -> 2n -> n (shared by moving and fixed)."""

  def __init__(self, cfg: FMIRConfig, *, rngs: nnx.Rngs):
    n = cfg.n
    self.act_name = cfg.activation
    self.exact = cfg.exact_feature_path
    self.conv_impl = cfg.conv_impl
    self.conv0 = _conv(cfg.feature_channels + 1, n, rngs, cfg.kernel_init, cfg.conv_impl)
    self.conv1 = _conv(n, 2 * n, rngs, cfg.kernel_init, cfg.conv_impl)
    self.conv2 = _conv(2 * n, n, rngs, cfg.kernel_init, cfg.conv_impl)

  def feature_taps(self, feat):
    """Patch-grid projection of the exact path (``features.project_taps``), or None."""
    if not self.exact:
      return None
    return feats.project_taps(feat.astype(jnp.float32),
                              self.conv0.kernel.get_value()[:, :, :, 1:])

  def first_layer(self, image, feat, interp_h, interp_w, taps=None):
    """conv0(concat(image, upsample(feat))) before the activation.

    image: (B, H, W, D); feat: (B, D, h, w, c') patch grid; interp_*: (B, N, n).
    Channel 0 of the conv input is the intensity, channels 1.. the features. ``taps``:
    ``feature_taps(feat)`` when already computed (slab-wise inference reuses it).
    """
    kernel = self.conv0.kernel.get_value()
    bias = self.conv0.bias.get_value()
    img = image[..., None].astype(jnp.float32)
    out = conv_lib.conv3d_same(img, kernel[:, :, :, :1], self.conv_impl)
    if self.exact:
      taps = self.feature_taps(feat) if taps is None else taps
      out = out + feats.upsample_taps(taps, interp_h, interp_w)
    else:
      out = out + feats.conv3_of_upsampled_reference(feat.astype(jnp.float32),
                                                     kernel[:, :, :, 1:], interp_h, interp_w)
    return out + bias

  def __call__(self, image, feat, interp_h, interp_w, taps=None):
    act = ACTIVATIONS[self.act_name]
    x = act(self.first_layer(image, feat, interp_h, interp_w, taps))
    x = act(self.conv1(x))
    return act(self.conv2(x))


class LevelBlock(nnx.Module):
  """Per-level head: residual field from (fixed + moving, fixed - moving) features."""

  def __init__(self, cfg: FMIRConfig, *, rngs: nnx.Rngs):
    n = cfg.n
    self.instance_norm = cfg.head_instance_norm
    self.conv0 = _conv(2 * n, 2 * n, rngs, cfg.kernel_init, cfg.conv_impl)
    self.conv1 = _conv(2 * n, 27, rngs, cfg.kernel_init, cfg.conv_impl)
    if cfg.flow_init not in FLOW_INITS:
      raise ValueError(f'unknown flow init {cfg.flow_init!r}: use one of {sorted(FLOW_INITS)}')
    self.flow = nnx.Conv(27, 3, (3, 3, 3), padding='SAME', kernel_init=FLOW_INITS[cfg.flow_init],
                         conv_general_dilated=conv_lib.nnx_conv_fn(cfg.conv_impl), rngs=rngs)

  def __call__(self, x_moving, y_fixed):
    h = self.conv0(jnp.concatenate([y_fixed + x_moving, y_fixed - x_moving], axis=-1))
    if self.instance_norm:
      h = instance_norm(h)
    h = jax.nn.relu(h)
    h = jax.nn.relu(self.conv1(h))
    return self.flow(h)


class FMIR(nnx.Module):
  """Compressor + pyramid head. Inputs are channel-regularised patch-grid features."""

  def __init__(self, cfg: FMIRConfig, *, rngs: nnx.Rngs):
    if not 0 <= cfg.finest_level < cfg.levels:
      raise ValueError(f'finest_level {cfg.finest_level}: use 0..{cfg.levels - 1} for a '
                       f'{cfg.levels}-level head')
    self.cfg = cfg
    self.compressor = Compressor(cfg, rngs=rngs)
    self.blocks = nnx.List([LevelBlock(cfg, rngs=rngs) for _ in range(cfg.levels)])

  def plan(self, image_shape, factors=None):
    """(per-transition factors, per-level (H, W, D) shapes) for a (B, H, W, D) grid."""
    fac = pyramid.level_factors(self.cfg.factors if factors is None else factors, self.cfg.levels)
    return fac, pyramid.pyramid_shapes(tuple(image_shape[1:4]), fac, self.cfg.levels)

  def encode(self, image, feat, interp_h, interp_w):
    """Level-0 features (B, H, W, D, n) of one batch of images."""
    return self.compressor(image, feat, interp_h, interp_w)

  def feature_pyramid(self, f_moving, f_fixed, shapes):
    """[(moving, fixed)] level-0 features resized to every level's shape."""
    pyramid = [(f_moving, f_fixed)]
    for shape in shapes[1:]:
      pyramid.append(tuple(W.resize(f, shape) for f in pyramid[-1]))
    return pyramid

  def level_loop(self, pyramid, shapes, fac, head0=None, finest: int = 0) -> FMIROutput:
    """Coarse to fine: each level warps the moving features by the upsampled field so far,
    predicts a residual field, integrates it and composes (paper §2.3).

    head0: optional ``head0(x_moving, y_fixed, u_up) -> v`` for level 0 in place of
      ``blocks[0](warp(x_moving, u_up), y_fixed)`` (slab-wise execution, ``fmir_jax.model.slabs``).
    finest: the finest level whose block runs (inference only; 0: all). The field of that
      level is upsampled to level 0 as the level loop upsamples it between levels, and the
      levels below it have no ``v_levels``/``u_levels`` entry, except those below the
      config's ``finest_level`` (a head trained without them): the upsampled field and a
      zero residual, which the training loss reads.
    pyramid: per level (moving, fixed) features; entries below ``finest`` are not read.
    """
    cfg = self.cfg
    if not 0 <= finest < cfg.levels:
      raise ValueError(f'finest level {finest}: use 0..{cfg.levels - 1} for a '
                       f'{cfg.levels}-level head')
    v_levels, u_levels = [None] * cfg.levels, [None] * cfg.levels
    u_up = None
    for i in reversed(range(finest, cfg.levels)):
      x, y = pyramid[i]
      if i == 0 and head0 is not None:
        v = head0(x, y, u_up)
      else:
        if u_up is not None:
          x = W.warp(x, u_up)
        v = self.blocks[i](x, y)
      u = W.integrate(v, cfg.integration_steps) if cfg.integration_steps else v
      if u_up is not None:
        u = W.compose(u_up, u)
      v_levels[i], u_levels[i] = v, u
      if i > 0:
        u_up = W.resize_field(u, shapes[i - 1], fac[i - 1])
    for j in range(finest - 1, -1, -1):          # u_up: level j's field
      if j < cfg.finest_level:
        v_levels[j], u_levels[j] = jnp.zeros_like(u_up), u_up
      if j > 0:
        u_up = W.resize_field(u_up, shapes[j - 1], fac[j - 1])
    disp = u_levels[0] if finest == 0 else u_up
    return FMIROutput(disp=disp, v_levels=tuple(v_levels), u_levels=tuple(u_levels))

  def __call__(self, moving, fixed, *, factors=None, finest: int = 0) -> FMIROutput:
    """Predicts the displacement that warps moving onto fixed.

    Args:
      moving, fixed: dicts with 'image' (B, H, W, D), 'feat' (B, D, h, w, c'),
        'interp_h' (B, H, h), 'interp_w' (B, W, w). Both volumes share one grid.
      factors: optional override of the per-axis pyramid factors (inference only).
      finest: the finest level the head runs (``level_loop``; inference only).

    Returns:
      FMIROutput; ``disp`` samples moving at x + disp(x).
    """
    check_same_grid(moving, fixed)
    fac, shapes = self.plan(moving['image'].shape, factors)
    b = moving['image'].shape[0]
    start = self.cfg.finest_level
    both = {k: jnp.concatenate([moving[k], fixed[k]], axis=0) for k in INPUT_KEYS}
    if start:
      both = inputs_at(both, shapes[start])
    f = self.encode(*(both[k] for k in INPUT_KEYS))      # one pass for moving and fixed
    pyramid = [None] * start + self.feature_pyramid(f[:b], f[b:], shapes[start:])
    return self.level_loop(pyramid, shapes, fac, finest=max(finest, start))
