"""Spatial transforms on voxel grids: sampling, resizing, composition, integration.

Pure ``jax.numpy`` functions, jit-able and differentiable with respect to images and
displacements.

Conventions (README, "Conventions"):
  * Volumes are channels-last, ``(H, W, D, C)`` or batched ``(B, H, W, D, C)``.
  * Displacements ``disp_vox`` are ``(H, W, D, 3)`` or ``(B, H, W, D, 3)`` in voxels of the
    array's own grid; component ``k`` moves along array axis ``k``.
  * Warping pulls: ``out[x] = vol[x + disp_vox(x)]``. Sampling positions outside the volume
    read zeros, corner by corner, exactly like ``torch.nn.functional.grid_sample(...,
    align_corners=True, padding_mode='zeros')`` and ``scipy.ndimage.map_coordinates(...,
    order=1, mode='grid-constant', cval=0)``.
  * Resizing is trilinear with aligned corners: output voxel ``j`` of an axis of length
    ``n_out`` samples input position ``j * (n_in - 1) / (n_out - 1)`` (position 0 when
    ``n_out == 1``), like ``torch.nn.functional.interpolate(..., mode='trilinear',
    align_corners=True)``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Shape3 = tuple[int, int, int]

# Warps whose 8 gathered corners fit in this many bytes gather them at once (one gather and
# one scatter-add in the gradient compile fastest); larger ones go by chunks of points,
# corner by corner, which bounds memory but compiles slower.
_ONE_GATHER_MAX_BYTES = 1 << 29
_CHUNK_GATHER_BYTES = 2**27   # corner values per chunk of points (big warps)
_RESIZE_CHUNK_BYTES = 2**28   # resize: above this, one axis at a time in row chunks

# Offsets of the 8 corners of a voxel cell, in array-axis order.
_CORNERS = tuple((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1))


def identity_grid(shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Voxel coordinates of a grid.

  Args:
    shape: spatial shape ``(H, W, D)``.
    dtype: floating dtype of the result.

  Returns:
    ``(H, W, D, 3)`` array with ``grid[i, j, k] == (i, j, k)``.
  """
  shape = _check_shape3(shape, 'shape')
  axes = [jnp.arange(n, dtype=dtype) for n in shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing='ij'), axis=-1)


def _check_shape3(shape: Sequence[int], name: str) -> Shape3:
  """Validates a spatial shape of 3 positive ints."""
  try:
    out = tuple(int(n) for n in shape)
  except TypeError as e:
    raise ValueError(f'{name} must be 3 positive ints, got {shape!r}.') from e
  if len(out) != 3 or any(n < 1 for n in out):
    raise ValueError(f'{name} must be 3 positive ints, got {shape!r}.')
  return out  # type: ignore[return-value]


def _check_pair(vol: jax.Array, disp_vox: jax.Array, vol_name: str,
                vol_rank: int) -> None:
  """Checks that ``vol`` (rank vol_rank or vol_rank+1) and ``disp_vox`` agree."""
  if vol.ndim not in (vol_rank, vol_rank + 1):
    raise ValueError(
        f'{vol_name} must have rank {vol_rank} (unbatched) or {vol_rank + 1} (batched), '
        f'got shape {vol.shape}.')
  batched = vol.ndim == vol_rank + 1
  want_rank = 5 if batched else 4
  if disp_vox.ndim != want_rank or disp_vox.shape[-1] != 3:
    raise ValueError(
        f'disp_vox must have shape {"(B, H, W, D, 3)" if batched else "(H, W, D, 3)"} to '
        f'match {vol_name} of shape {vol.shape}, got {disp_vox.shape}.')
  lead = 1 if batched else 0
  vol_sp = vol.shape[:lead + 3]
  disp_sp = disp_vox.shape[:lead + 3]
  if vol_sp != disp_sp:
    raise ValueError(
        f'{vol_name} leading/spatial shape {vol_sp} differs from disp_vox {disp_sp}; '
        'resize the field to the volume grid first (resize_field).')


def _sample_coords(coords: jax.Array, shape: Shape3) -> tuple[jax.Array, jax.Array]:
  """Flat corner indices and trilinear weights (zero for outside corners).

  Args:
    coords: ``(N, 3)`` floating voxel positions.
    shape: spatial shape of the sampled grid.

  Returns:
    ``(indices, weights)``, each ``(8, N)``: int32 flat indices (clipped into range) and
    weights, one row per cell corner.
  """
  lo = jnp.floor(coords)
  frac = coords - lo
  lo = lo.astype(jnp.int32)
  corners = jnp.asarray(_CORNERS, jnp.int32)                 # (8, 3)
  idx = lo[None] + corners[:, None, :]                       # (8, N, 3)
  sizes = jnp.asarray(shape, jnp.int32)
  valid = jnp.all((idx >= 0) & (idx < sizes), axis=-1)       # (8, N)
  idx = jnp.clip(idx, 0, sizes - 1)
  flat = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
  on = corners[:, None, :].astype(coords.dtype)              # (8, 1, 3)
  w = jnp.prod(on * frac[None] + (1 - on) * (1 - frac[None]), axis=-1)
  return flat, jnp.where(valid, w, 0.0)


def _gather_cells(vol: jax.Array, coords: jax.Array) -> jax.Array:
  """Trilinear samples of ``vol`` (B, H, W, D, C) at ``coords`` (B, M, 3), zero outside.

  One gather of each point's 2x2x2 cell from the volume padded by one zero voxel per side
  (four contiguous runs of 2C values, against eight scattered C-value corners: 1.3-1.7x
  faster forward and backward on CPU). A cell with a corner inside the volume starts at
  ``floor + 1`` in the padded array; cells farther out get zero weight.
  """
  b, *shape, c = vol.shape
  lo = jnp.floor(coords)
  frac = coords - lo
  lo = lo.astype(jnp.int32)
  sizes = jnp.asarray(shape, jnp.int32)
  near = jnp.all((lo >= -1) & (lo <= sizes - 1), axis=-1)                 # (B, M)
  start = jnp.clip(lo + 1, 0, sizes)
  batch = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None, None], start.shape[:2] + (1,))
  dn = jax.lax.GatherDimensionNumbers(offset_dims=(2, 3, 4, 5), collapsed_slice_dims=(0,),
                                      start_index_map=(0, 1, 2, 3))
  padded = jnp.pad(vol, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  cells = jax.lax.gather(padded, jnp.concatenate([batch, start], -1), dn,
                         slice_sizes=(1, 2, 2, 2, c), mode='promise_in_bounds')  # (B,M,2,2,2,C)
  wa, wb, wc = (jnp.stack([1 - frac[..., k], frac[..., k]], -1) for k in range(3))
  w = (wa[..., :, None, None] * wb[..., None, :, None] * wc[..., None, None, :]
       * near[..., None, None, None].astype(frac.dtype))
  return jnp.sum(cells * w[..., None].astype(cells.dtype), axis=(2, 3, 4))   # no matmul: exact f32


def _warp_batched(vol: jax.Array, disp_vox: jax.Array, row0=None) -> jax.Array:
  """Trilinear warp of ``(B, H, W, D, C)`` by ``(B, H, W, D, 3)``.

  With ``row0`` (a traced scalar), ``disp_vox`` is ``(B, R, W, D, 3)`` for the grid rows
  ``[row0, row0 + R)`` only, and so is the result.
  """
  b, *shape, c = vol.shape
  n = int(np.prod(shape))
  dtype = jnp.result_type(vol.dtype, disp_vox.dtype)
  out_shape = (b, *disp_vox.shape[1:4], c)
  grid = identity_grid(disp_vox.shape[1:4], disp_vox.dtype)
  if row0 is not None:
    grid = grid + jnp.asarray([1, 0, 0], disp_vox.dtype) * row0
  m = int(np.prod(disp_vox.shape[1:4]))                     # points per batch element
  if 8 * b * m * c * jnp.dtype(dtype).itemsize <= _ONE_GATHER_MAX_BYTES:
    out = _gather_cells(vol.astype(dtype), (grid + disp_vox).reshape(b, m, 3).astype(dtype))
  else:
    # No padded copy of a volume this big: corner indices are clipped instead.
    coords = (grid + disp_vox).reshape(-1, 3)
    indices, weights = _sample_coords(coords, tuple(shape))    # (8, B*M)
    indices = indices + jnp.repeat(jnp.arange(b, dtype=jnp.int32) * n, m)[None]
    flat = vol.reshape(b * n, c).astype(dtype)
    weights = weights.astype(dtype)
    # Points in chunks (lax.map), corner by corner inside a chunk: no (8, B*N, C) buffer
    # and no eight full-size corner gathers alive at once (a 32-channel level-0 map at
    # 192x160x256 is 1 GB per corner).
    total = b * m
    chunk = max(1, _CHUNK_GATHER_BYTES // (8 * c * jnp.dtype(dtype).itemsize))
    n_chunks = -(-total // chunk)
    pad = n_chunks * chunk - total
    idx = jnp.pad(indices, ((0, 0), (0, pad))).reshape(8, n_chunks, chunk).swapaxes(0, 1)
    wts = jnp.pad(weights, ((0, 0), (0, pad))).reshape(8, n_chunks, chunk).swapaxes(0, 1)

    def one(args):
      ix, wt = args
      acc = wt[0][:, None] * jnp.take(flat, ix[0], axis=0, mode='clip')
      for k in range(1, 8):
        acc = acc + wt[k][:, None] * jnp.take(flat, ix[k], axis=0, mode='clip')
      return acc

    # Rematerialised: the backward pass regathers a chunk's corners instead of keeping all
    # eight gathers of every chunk (1 GB at abdomen half size) as residuals.
    out = jax.lax.map(jax.checkpoint(one), (idx, wts)).reshape(n_chunks * chunk, c)[:total]
  return out.reshape(out_shape)


def warp_rows(vol: jax.Array, disp_rows: jax.Array, row0) -> jax.Array:
  """``warp(vol, disp)[:, row0:row0 + R]`` from ``disp[:, row0:row0 + R]`` alone.

  vol: (B, H, W, D, C); disp_rows: (B, R, W, D, 3) displacement (voxels) of grid rows
  ``[row0, row0 + R)``; row0 may be traced. Slab-wise inference warps one slab at a time.
  """
  if (vol.ndim != 5 or disp_rows.ndim != 5 or disp_rows.shape[-1] != 3
      or disp_rows.shape[0] != vol.shape[0] or disp_rows.shape[2:4] != vol.shape[2:4]):
    raise ValueError(f'warp_rows: vol (B, H, W, D, C) {vol.shape} and disp_rows '
                     f'(B, R, W, D, 3) {disp_rows.shape} must share B, W and D')
  return _warp_batched(vol, disp_rows.astype(jnp.result_type(disp_rows.dtype, jnp.float32)),
                       row0)


@jax.jit
def warp(vol: jax.Array, disp_vox: jax.Array) -> jax.Array:
  """Trilinear backward warp with zero padding.

  Args:
    vol: ``(H, W, D, C)`` or ``(B, H, W, D, C)`` floating image.
    disp_vox: ``(H, W, D, 3)`` or ``(B, H, W, D, 3)`` displacement in voxels, component k
      along array axis k; same leading/spatial shape as ``vol``.

  Returns:
    Array shaped like ``vol`` (dtype promoted with ``disp_vox``):
    ``out[x] = trilinear(vol, x + disp_vox[x])``, outside corners contributing zero.
  """
  vol = jnp.asarray(vol)
  disp_vox = jnp.asarray(disp_vox)
  _check_pair(vol, disp_vox, 'vol', 4)
  if not jnp.issubdtype(disp_vox.dtype, jnp.floating):
    disp_vox = disp_vox.astype(jnp.float32)
  if vol.ndim == 5:
    return _warp_batched(vol, disp_vox)
  return _warp_batched(vol[None], disp_vox[None])[0]


def _warp_nearest_single(labels: jax.Array, disp_vox: jax.Array) -> jax.Array:
  """Nearest-neighbour warp of one ``(H, W, D)`` label map."""
  shape = labels.shape
  coords = jnp.round(identity_grid(shape, disp_vox.dtype) + disp_vox).astype(jnp.int32)
  valid = jnp.all((coords >= 0) & (coords < jnp.asarray(shape, jnp.int32)), axis=-1)
  coords = jnp.clip(coords, 0, jnp.asarray(shape, jnp.int32) - 1)
  flat = (coords[..., 0] * shape[1] + coords[..., 1]) * shape[2] + coords[..., 2]
  out = jnp.take(labels.reshape(-1), flat, mode='clip')
  return jnp.where(valid, out, jnp.zeros((), labels.dtype))


@jax.jit
def warp_nearest(labels: jax.Array, disp_vox: jax.Array) -> jax.Array:
  """Nearest-neighbour backward warp of a label map, zero outside.

  The sampling position ``x + disp_vox(x)`` is rounded with ``jnp.round`` (round half to
  even, as torch ``grid_sample(mode='nearest')``; scipy ``order=0`` rounds half up — the
  two differ only on exact .5 ties).

  Args:
    labels: ``(H, W, D)`` or ``(B, H, W, D)`` integer (or any dtype) label map.
    disp_vox: ``(H, W, D, 3)`` or ``(B, H, W, D, 3)`` displacement in voxels.

  Returns:
    Array shaped and typed like ``labels``; positions outside the volume get 0.
  """
  labels = jnp.asarray(labels)
  disp_vox = jnp.asarray(disp_vox)
  _check_pair(labels, disp_vox, 'labels', 3)
  if not jnp.issubdtype(disp_vox.dtype, jnp.floating):
    disp_vox = disp_vox.astype(jnp.float32)
  if labels.ndim == 4:
    return jax.vmap(_warp_nearest_single)(labels, disp_vox)
  return _warp_nearest_single(labels, disp_vox)


def _axis_lerp(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Static indices and weights of an align-corners linear resize of one axis.

  Returns:
    ``(i0, i1, w)`` each ``(n_out,)``: output j = (1 - w[j]) * x[i0[j]] + w[j] * x[i1[j]].
  """
  if n_out == 1 or n_in == 1:
    pos = np.zeros(n_out, np.float64)
  else:
    pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
  i0 = np.clip(np.floor(pos).astype(np.int32), 0, n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w = pos - i0
  return i0, i1, w


def lerp_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 matrix of an align-corners linear resize of one axis (``resize``
  along that axis is this matrix applied to it)."""
  i0, i1, w = _axis_lerp(n_in, n_out)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - w)
  np.add.at(m, (np.arange(n_out), i1), w)
  return m.astype(np.float32)


def resize(vol: jax.Array, out_shape: Sequence[int]) -> jax.Array:
  """Trilinear align-corners resize of the 3 spatial axes (separable gather + lerp).

  Args:
    vol: ``(H, W, D, C)`` or ``(B, H, W, D, C)`` floating array.
    out_shape: target spatial shape ``(H', W', D')``; any positive sizes, up or down.

  Returns:
    ``(H', W', D', C)`` or ``(B, H', W', D', C)``, matching torch
    ``F.interpolate(mode='trilinear', align_corners=True)``.
  """
  return _resize(jnp.asarray(vol), _check_shape3(out_shape, 'out_shape'))


@functools.partial(jax.jit, static_argnums=1)
def _resize(vol: jax.Array, out_shape: Shape3) -> jax.Array:
  """Jitted body of ``resize`` (``out_shape`` static)."""
  if vol.ndim not in (4, 5):
    raise ValueError(
        f'vol must be (H, W, D, C) or (B, H, W, D, C), got shape {vol.shape}.')
  if not jnp.issubdtype(vol.dtype, jnp.floating):
    raise ValueError(f'vol must be floating for resize, got dtype {vol.dtype}.')
  first = vol.ndim - 4
  out = vol
  for k in range(3):
    axis = first + k
    n_in, n_out = out.shape[axis], out_shape[k]
    if n_in == n_out:
      continue
    i0, i1, w = _axis_lerp(n_in, n_out)
    bshape = [1] * out.ndim
    bshape[axis] = n_out
    w = jnp.asarray(w.reshape(bshape), out.dtype)
    if out.size * out.dtype.itemsize > _RESIZE_CHUNK_BYTES and n_out > 1:
      out = _lerp_axis_chunked(out, axis, i0, i1, w)
    else:
      a = jnp.take(out, jnp.asarray(i0), axis=axis)
      b = jnp.take(out, jnp.asarray(i1), axis=axis)
      out = a + w * (b - a)
  return out


def _lerp_axis_chunked(x, axis, i0, i1, w):
  """``take(x, i0) + w * (take(x, i1) - take(x, i0))`` along ``axis`` in chunks of output
  rows (``lax.fori_loop``): only one chunk's gathered rows are alive, not the pair of
  full-size gathers XLA makes otherwise (1 GB each for a 32-channel level-0 map at
  192x160x256). Same arithmetic."""
  n_out = len(i0)
  row_bytes = x.size // x.shape[axis] * x.dtype.itemsize
  rows = int(max(1, min(n_out, _RESIZE_CHUNK_BYTES // (4 * row_bytes))))
  n_chunks = -(-n_out // rows)
  starts = np.minimum(np.arange(n_chunks) * rows, n_out - rows)
  # Input rows a chunk reads: [lo, lo + span), span static (clamped inside the array).
  lo = np.minimum(i0[starts], x.shape[axis] - 1)
  span = int(max(i1[s + rows - 1] - l + 1 for s, l in zip(starts, lo)))
  lo = np.minimum(lo, x.shape[axis] - span)
  starts_j, lo_j = jnp.asarray(starts, jnp.int32), jnp.asarray(lo, jnp.int32)
  i0_j, i1_j = jnp.asarray(i0, jnp.int32), jnp.asarray(i1, jnp.int32)

  def chunk(k, out):
    s, l = starts_j[k], lo_j[k]
    part = jax.lax.dynamic_slice_in_dim(x, l, span, axis=axis)
    a_idx = jax.lax.dynamic_slice_in_dim(i0_j, s, rows) - l
    b_idx = jax.lax.dynamic_slice_in_dim(i1_j, s, rows) - l
    wk = jax.lax.dynamic_slice_in_dim(w, s, rows, axis=axis)
    a = jnp.take(part, a_idx, axis=axis)
    b = jnp.take(part, b_idx, axis=axis)
    if out is None:
      return a + wk * (b - a)
    return jax.lax.dynamic_update_slice_in_dim(out, a + wk * (b - a), s, axis=axis)

  # The output grows from chunk 0 (a pad, not a zeros broadcast XLA would allocate early).
  first = chunk(0, None)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n_out - rows)
  return jax.lax.fori_loop(1, n_chunks, chunk, jnp.pad(first, widths))


def resize_field(disp_vox: jax.Array, out_shape: Sequence[int],
                 component_scale: Sequence[float]) -> jax.Array:
  """Resizes a displacement field and rescales its components to the new voxel units.

  Args:
    disp_vox: ``(H, W, D, 3)`` or ``(B, H, W, D, 3)`` displacement in input voxels.
    out_shape: target spatial shape ``(H', W', D')``.
    component_scale: 3 factors; component k is multiplied by ``component_scale[k]``
      (the pyramid factor ``s_k`` when upsampling, ``1 / s_k`` when downsampling).

  Returns:
    ``(H', W', D', 3)`` or ``(B, H', W', D', 3)`` displacement in output voxels.
  """
  disp_vox = jnp.asarray(disp_vox)
  if disp_vox.shape[-1:] != (3,):
    raise ValueError(f'disp_vox must end in 3 components, got shape {disp_vox.shape}.')
  scale = tuple(float(s) for s in component_scale)
  if len(scale) != 3:
    raise ValueError(f'component_scale must have 3 entries, got {component_scale!r}.')
  out = resize(disp_vox, out_shape)
  return out * jnp.asarray(scale, out.dtype)


def compose(u_up: jax.Array, u_res: jax.Array) -> jax.Array:
  """Composes two displacement fields: phi = phi_up o phi_res.

  Args:
    u_up: ``(..., H, W, D, 3)`` outer displacement (applied second to points).
    u_res: same shape, inner displacement.

  Returns:
    ``u_res + warp(u_up, u_res)``, so that ``x + u(x) = y + u_up(y)`` with
    ``y = x + u_res(x)``.
  """
  u_up = jnp.asarray(u_up)
  u_res = jnp.asarray(u_res)
  if u_up.shape != u_res.shape:
    raise ValueError(
        f'compose needs equal shapes, got u_up {u_up.shape} and u_res {u_res.shape}.')
  return u_res + warp(u_up, u_res)


@functools.partial(jax.jit, static_argnames='steps')
def integrate(v: jax.Array, steps: int = 7) -> jax.Array:
  """Scaling and squaring: displacement of the flow exp(v) of a stationary field.

  Args:
    v: ``(H, W, D, 3)`` or ``(B, H, W, D, 3)`` velocity in voxels.
    steps: number of squarings (static); 0 returns ``v`` unchanged.

  Returns:
    Displacement shaped like ``v``: ``u = v / 2**steps``, then ``steps`` times
    ``u = u + warp(u, u)``.
  """
  v = jnp.asarray(v)
  steps = int(steps)
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}.')
  if steps == 0:
    return v
  u = v / (2.0 ** steps)
  # Rematerialising the body keeps the loop's saved residuals to one field per step instead
  # of the 8 gathered corners, which makes the reverse pass and its compile several times
  # cheaper (bench/run.py times the train step that uses it).
  body = jax.checkpoint(lambda _, u: u + warp(u, u))
  return jax.lax.fori_loop(0, steps, body, u)
