"""Slab-wise inference: the compressor and the level-0 head over row slabs, bounded memory.

On large volumes (full-resolution abdomen) the level-0 activations dominate memory. Here the
compressor and the level-0 head run over slabs of rows (array axis 1 of (B, H, W, D, C))
with a halo wide enough that every kept row equals the whole-volume result exactly; the
level loop itself is ``FMIR.level_loop``, unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmir_jax.model import network as model_lib
from fmir_jax.ops import warp as W

# Rows of halo per side for a stack of three 3x3x3 convs (compressor; level head).
SLAB_HALO = 3


def slab_map(fn, arrays, rows: int, halo: int = SLAB_HALO):
  """Applies a stack of SAME convs ``fn`` to row slabs (array axis 1) and reassembles.

  ``fn`` must act on rows like a stack of at most ``halo`` 3-tap zero-padded convs. Slab
  ``i`` produces rows ``[s, s + rows)`` with ``s = min(i * rows, H - rows)`` from a window
  of ``rows + 2 halo`` rows placed around them and shifted inside the volume at its ends:
  each window edge is either the volume's own edge (where SAME padding is the truth) or at
  least ``halo`` rows away from the rows kept, so every kept row equals the whole-volume
  result exactly. Only one window's activations are alive at a time (``lax.fori_loop``),
  and no padded or full-size copy of the inputs is made.

  Args:
    fn: ``fn(part, row0)`` of a tuple of arrays with rows on axis 1 (the window) and the
      window's first row in the volume (traced); returns an array or a tuple of arrays
      with rows on axis 1.
    arrays: tuple of arrays (B, H, ...) sharing H.
    rows: rows per slab.
    halo: rows of context per side.

  Returns:
    ``fn``'s output(s) on the whole volume.
  """
  h = arrays[0].shape[1]
  window = rows + 2 * halo
  if window >= h:
    return fn(arrays, 0)
  n_slabs = -(-h // rows)

  def run(i):
    start = jnp.minimum(i * rows, h - rows)
    w0 = jnp.clip(start - halo, 0, h - window)
    part = tuple(jax.lax.dynamic_slice_in_dim(a, w0, window, axis=1) for a in arrays)
    keep = lambda y: jax.lax.dynamic_slice_in_dim(y, start - w0, rows, axis=1)
    return start, jax.tree.map(keep, fn(part, w0))

  def body(i, out):
    start, ys = run(i)
    return jax.tree.map(lambda o, y: jax.lax.dynamic_update_slice_in_dim(o, y, start, axis=1),
                        out, ys)

  _, first = run(0)
  # The output buffer grows from slab 0 (a pad, not a zeros broadcast XLA would allocate
  # at the program's start).
  out = jax.tree.map(
      lambda y: jnp.pad(y, ((0, 0), (0, h - rows)) + ((0, 0),) * (y.ndim - 2)), first)
  return jax.lax.fori_loop(1, n_slabs, body, out)


SLAB_BUDGET_BYTES = 2**28   # 'auto' slab mode: widest level-0 activation per slab


def auto_slab_rows(shape, batch: int, n: int, budget_bytes: int = SLAB_BUDGET_BYTES):
  """Rows per slab for inference on a (H, W, D) grid, or None when the whole volume fits.

  The widest level-0 activation is the compressor's 2n channels (moving and fixed are
  encoded one after the other in slab mode): slabs keep it under ``budget_bytes``.
  """
  h, w, d = (int(v) for v in shape)
  row_bytes = batch * w * d * 2 * n * 4
  if h * row_bytes <= budget_bytes:
    return None
  return max(8, budget_bytes // row_bytes - 2 * SLAB_HALO)



def forward_in_slabs(model: model_lib.FMIR, moving, fixed, *, rows: int,
                     factors=None, finest: int = 0) -> model_lib.FMIROutput:
  """``model(moving, fixed, factors=factors)`` with the compressor and the level-0 head run
  over slabs of ``rows`` rows (``slab_map``): the same result, and no full-size level-0
  activation, padded input or warped copy of the moving features is ever alive.

  Moving and fixed are encoded one after the other; each level-0 slab warps its own rows of
  the moving features (``warp.warp_rows``).
  """
  if model.cfg.head_instance_norm:
    raise ValueError('slab-wise inference needs head_instance_norm=False (instance norm '
                     'takes statistics over the whole volume): use whole volumes')
  if model.cfg.finest_level:        # no level-0 activation to bound: the whole volume
    return model(moving, fixed, factors=factors, finest=finest)
  model_lib.check_same_grid(moving, fixed)
  fac, shapes = model.plan(moving['image'].shape, factors)
  comp = model.compressor

  def encode(v):
    taps = comp.feature_taps(v['feat'])           # once, not per slab
    return slab_map(lambda a, _: comp(a[0], v['feat'], a[1], v['interp_w'], taps),
                    (v['image'], v['interp_h']), rows)

  def head0(x, y, u_up):
    def fn(a, row0):
      xs = a[1] if u_up is None else W.warp_rows(x, a[1], row0)
      return model.blocks[0](xs, a[0])
    return slab_map(fn, (y, x if u_up is None else u_up), rows)

  pyramid = model.feature_pyramid(encode(moving), encode(fixed), shapes)
  return model.level_loop(pyramid, shapes, fac, head0=head0, finest=finest)
