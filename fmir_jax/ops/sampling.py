"""Channel-first trilinear sampling with a hand-written gradient (instance optimisation).

``warp.warp`` samples channels-last volumes and is differentiated by autodiff, which is right
for the network. Instance optimisation differentiates the sampling position thousands of
times per pair: here volumes are channel-first (C, H, W, D) and fields (3, H, W, D), each
channel is gathered and interpolated on its own (which XLA's CPU backend vectorises far
better than channels-last cells), and the gradient is written by hand. Same convention:
``out(x) = vol(x + disp_vox(x))``, component k along array axis k, zero outside.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fmir_jax.ops import warp as warp_lib

Shape3 = tuple[int, int, int]


_GATHER = lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(),
                                     start_index_map=(0, 1, 2))
_SCATTER = lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3), inserted_window_dims=(),
                                       scatter_dims_to_operand_dims=(0, 1, 2))
_IN_BOUNDS = lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _cells(disp_vox: jax.Array):
  """Cells of the points x + disp_vox(x); disp_vox (3, H, W, D).

  Returns (start (M, 3) int32 corner in the 1-voxel zero-padded grid, 3 fractions (M,),
  inside (M,) bool: False where the cell lies wholly outside the volume).
  """
  shape = disp_vox.shape[1:]
  starts, frac, inside = [], [], True
  for k in range(3):
    x = (lax.broadcasted_iota(disp_vox.dtype, shape, k) + disp_vox[k]).reshape(-1)
    lo = jnp.floor(x)
    frac.append(x - lo)
    lo = lo.astype(jnp.int32)
    inside = inside & (lo >= -1) & (lo <= shape[k] - 1)
    starts.append(jnp.clip(lo, -1, shape[k] - 1) + 1)
  return jnp.stack(starts, -1), frac, inside


def _corners(channel, start, inside):
  """(M, 2, 2, 2) corner values of each point's cell in one (H, W, D) channel, 0 outside."""
  v = lax.gather(jnp.pad(channel, 1), start, _GATHER, (2, 2, 2), mode=_IN_BOUNDS)
  return jnp.where(inside[:, None, None, None], v, 0.0)


def _trilinear(v, frac, derivs=False):
  """Trilinear value (M,) of (M, 2, 2, 2) corners, or its 3 derivatives in the fractions."""
  lerp = lambda p, q, t: p + (q - p) * t
  a, b, c = frac
  z = [[lerp(v[:, i, j, 0], v[:, i, j, 1], c) for j in (0, 1)] for i in (0, 1)]
  y = [lerp(z[i][0], z[i][1], b) for i in (0, 1)]
  if not derivs:
    return lerp(y[0], y[1], a)
  dz = [[v[:, i, j, 1] - v[:, i, j, 0] for j in (0, 1)] for i in (0, 1)]
  return (y[1] - y[0], lerp(z[0][1] - z[0][0], z[1][1] - z[1][0], a),
          lerp(lerp(*dz[0], b), lerp(*dz[1], b), a))


@jax.custom_vjp
def sample_cf(vol: jax.Array, disp_vox: jax.Array) -> jax.Array:
  """``warp.warp`` for channel-first arrays, with a hand-written gradient.

  vol (C, H, W, D) sampled at x + disp_vox(x), disp_vox (3, H, W, D) on the same grid;
  trilinear, zero outside. The position gradient regathers the cells' corners (once for all
  channels) and the volume gradient, only when asked for (XLA drops it otherwise), is one
  window scatter-add per channel; this is what makes an instance-optimisation step cheap
  (autodiff of ``warp.warp`` gathers and scatters every channel of every corner).
  """
  return _sample_fwd(vol, disp_vox)[0]


def _sample_fwd(vol, disp_vox):
  start, frac, inside = _cells(disp_vox)
  out = jnp.stack([_trilinear(_corners(ch, start, inside), frac) for ch in vol])
  return out.reshape(vol.shape), (vol, start, frac, inside)


def _sample_bwd(res, ct):
  vol, start, frac, inside = res
  shape, ct = ct.shape[1:], ct.reshape(ct.shape[0], -1)
  # The position gradient is linear in the corners: contract the channels first.
  weighted = sum(c[:, None, None, None] * _corners(ch, start, inside) for ch, c in zip(vol, ct))
  g_disp = jnp.stack(_trilinear(weighted, frac, derivs=True)).reshape(3, *shape)
  one = jnp.asarray([0.0, 1.0], ct.dtype)
  wa, wb, wc = (1 - one + (2 * one - 1) * f[:, None] for f in frac)        # (M, 2) each
  corner_w = wa[:, :, None, None] * wb[:, None, :, None] * wc[:, None, None, :]
  corner_w = jnp.where(inside[:, None, None, None], corner_w, 0.0)
  zeros = jnp.zeros(tuple(n + 2 for n in shape), ct.dtype)
  g_vol = jnp.stack([lax.scatter_add(zeros, start, corner_w * c[:, None, None, None],
                                     _SCATTER, mode=_IN_BOUNDS)[1:-1, 1:-1, 1:-1]
                     for c in ct])
  return g_vol, g_disp


sample_cf.defvjp(_sample_fwd, _sample_bwd)


def integrate_cf(v_vox: jax.Array, squarings: int) -> jax.Array:
  """``warp.integrate`` (scaling and squaring) on (3, H, W, D) fields, with ``sample_cf``."""
  u = v_vox / 2.0 ** squarings
  return lax.fori_loop(0, squarings, lambda _, u: u + sample_cf(u, u), u)


def resize_field_cf(field: jax.Array, shape: Shape3, scale: Sequence[float]) -> jax.Array:
  """``warp.resize_field`` on a (3, H, W, D) field: resize, component k times scale[k]."""
  out = warp_lib.resize(field[..., None], shape)[..., 0]
  return out * jnp.asarray(scale, out.dtype)[:, None, None, None]
