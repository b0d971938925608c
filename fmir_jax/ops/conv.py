"""3D 'SAME' convolution (stride 1, odd kernel) with a fast path for XLA:CPU.

XLA:CPU lowers a 3D convolution to a generic kernel that reaches a fraction of the machine's
matmul rate (PyTorch/oneDNN is about twice as fast on the same conv; ``bench/run.py --suite
cpu`` measures both), and its autodiff of the kernel gradient is slower still. Its 2D
convolution (Eigen's spatial convolution) and its large matmuls run at the machine's rate,
so the ``'split2d'`` implementation rewrites the same arithmetic:

* forward: the slice axis D is moved into the batch, and the D taps of the kernel into the
  output channels, so one 2D ``kh x kw`` convolution over (H, W) computes all taps; the D taps
  are then summed with shifted slices (zero outside): ``y[d] = sum_c z_c[d + c - r]``.
* input gradient: the same forward with the kernel flipped in space and in/out swapped.
* kernel gradient: ``dw[a, b, c] = sum_n x_pad[n + (a, b, c)] dy[n]``: the W and D taps are
  unfolded into channels (``kw*kd*C``), then for each H tap a contiguous row slab makes one
  ``(kw*kd*C, N) @ (N, O)`` matmul. Rows are processed in slabs under ``lax.scan`` so the
  unfolded copy stays below ``slab_bytes``.

Same numbers as ``lax.conv_general_dilated`` up to float32 summation order (tests compare
values and gradients with it and with ``torch.nn.functional.conv3d``). On GPU/TPU the vendor
3D convolution is used (``impl='auto'``).

Layout: x (B, H, W, D, C) channels-last, kernel (kh, kw, kd, C, O) as ``nnx.Conv`` stores it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('auto', 'split2d', 'xla')
_DN3 = ('NHWDC', 'HWDIO', 'NHWDC')
SLAB_BYTES = 64 * 2**20     # unfolded-input budget per row slab (kernel gradient)
CHUNK_BYTES = 48 * 2**20    # per-tap output budget per chunk of D planes (forward)
# 'auto' keeps XLA's conv for tiny convolutions (output elements x input channels below
# this), where it compiles quicker than the split-2D program and runs as fast. Above it
# split2d is several times faster on CPU, where XLA's 3D conv is not a matmul (bench/run.py
# times both; docs/results.md, "Engine benchmarks").
AUTO_MIN_WORK = 2**18


def resolve_impl(impl: str, work: int | None = None) -> str:
  """'auto' -> 'split2d' on CPU (for convs of at least AUTO_MIN_WORK output elements x
  input channels, when ``work`` is given), 'xla' elsewhere; validates the name."""
  if impl not in IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}: use one of {IMPLS}')
  if impl == 'auto':
    if jax.default_backend() != 'cpu' or (work is not None and work < AUTO_MIN_WORK):
      return 'xla'
    return 'split2d'
  return impl


def _check(x, kernel):
  if x.ndim != 5 or kernel.ndim != 5:
    raise ValueError(f'conv3d_same wants x (B, H, W, D, C) and kernel (kh, kw, kd, C, O); '
                     f'got {x.shape} and {kernel.shape}')
  if any(k % 2 == 0 for k in kernel.shape[:3]):
    raise ValueError(f'conv3d_same needs odd kernel sizes, got {kernel.shape[:3]}')
  if x.shape[-1] != kernel.shape[3]:
    raise ValueError(f'input has {x.shape[-1]} channels, kernel expects {kernel.shape[3]}')


def _xla(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME', dimension_numbers=_DN3)


def _split2d_forward(x, kernel, chunk_bytes=None):
  """2D conv over (H, W) with D in the batch and the D taps in the output channels.

  Runs over chunks of ``k`` D planes (the per-tap output of a chunk stays below
  ``chunk_bytes``). Each chunk is moved to (B * k, H, W, C) for the 2D conv and its taps are
  added, back in channels-last layout, into the (B, H, W, D, O) output: no full-size
  transposed or padded copy is made.
  """
  b, h, w, d, c = x.shape
  kh, kw, kd, _, o = kernel.shape
  r = kd // 2
  chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  plane_bytes = b * h * w * kd * o * jnp.dtype(x.dtype).itemsize
  k = int(max(1, min(d, chunk_bytes // max(plane_bytes, 1))))
  k2 = jnp.transpose(kernel, (0, 1, 3, 2, 4)).reshape(kh, kw, c, kd * o)

  def add_chunk(acc, s, size, lo=0, hi=None):
    """Adds the taps of input planes [s, s + size) to output planes [s - r, s + size + r).

    ``lo``/``hi`` clip that window statically at the volume's ends (first/last chunk).
    """
    x_s = lax.dynamic_slice_in_dim(x, s, size, axis=3)
    x_s = jnp.transpose(x_s, (0, 3, 1, 2, 4)).reshape(b * size, h, w, c)
    z = lax.conv_general_dilated(x_s, k2, (1, 1), 'SAME',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    z = jnp.transpose(z.reshape(b, size, h, w, kd, o), (0, 2, 3, 1, 4, 5))
    # Input plane p, tap t -> output plane p - t + r (window row p - s - t + 2r).
    contrib = sum(jnp.pad(z[..., t, :], ((0, 0), (0, 0), (0, 0), (2 * r - t, t), (0, 0)))
                  for t in range(kd))
    hi = size + 2 * r if hi is None else hi
    contrib = contrib[:, :, :, lo:hi]
    if acc is None:   # first chunk (s = 0, lo = r): the output grows from it
      return jnp.pad(contrib, ((0, 0), (0, 0), (0, 0), (0, d - (hi - lo)), (0, 0)))
    window = lax.dynamic_slice_in_dim(acc, s - r + lo, hi - lo, axis=3)
    return lax.dynamic_update_slice_in_dim(acc, window + contrib, s - r + lo, axis=3)

  # Chunks whose output window lies inside [0, D) run under lax.scan; the others (at the
  # volume's ends) run on their own with the window clipped statically.
  starts = range(0, d, k)
  interior = [s0 for s0 in starts if s0 >= r and s0 + k + r <= d]
  # The output buffer grows from the first chunk (a pad, not a zeros broadcast that XLA
  # would allocate at the program's start).
  acc = None
  for s0 in starts:
    if s0 not in interior:
      size = min(k, d - s0)
      acc = add_chunk(acc, s0, size, lo=max(0, r - s0), hi=min(size + 2 * r, d - s0 + r))
  if len(interior) == 1:
    acc = add_chunk(acc, interior[0], k)
  elif interior:
    acc, _ = lax.scan(lambda a, s0: (add_chunk(a, s0, k), None), acc,
                      jnp.asarray(interior, jnp.int32))
  return acc


def _kernel_grad(x, dy, kernel_shape, slab_bytes=None):
  """dw[a, b, c, :, :] = sum_n x_pad[n + (a, b, c)] (x) dy[n], as row-slab matmuls."""
  bsz, h, w, d, c = x.shape
  kh, kw, kd, _, o = kernel_shape
  rh, rw, rd = kh // 2, kw // 2, kd // 2
  slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
  row_bytes = bsz * w * d * kw * kd * c * x.dtype.itemsize
  rows = int(max(1, min(h, slab_bytes // max(row_bytes, 1))))
  n_slabs = -(-h // rows)
  h_pad = n_slabs * rows
  # Pad H to whole slabs (+ halo); zero dy rows contribute nothing.
  xp = jnp.pad(x, ((0, 0), (rh, rh + h_pad - h), (rw, rw), (rd, rd), (0, 0)))
  dyp = jnp.pad(dy, ((0, 0), (0, h_pad - h), (0, 0), (0, 0), (0, 0)))
  def slab(acc, i):
    start = i * rows
    dy_s = lax.dynamic_slice_in_dim(dyp, start, rows, axis=1).reshape(-1, o)
    x_s = lax.dynamic_slice_in_dim(xp, start, rows + 2 * rh, axis=1)
    # Unfold the W and D taps into channels: (B, rows + 2 rh, W, D, kw * kd * C), tap-major.
    cols = jnp.concatenate([x_s[:, :, bb:bb + w, cc:cc + d] for bb in range(kw)
                            for cc in range(kd)], axis=-1)
    parts = [cols[:, a:a + rows].reshape(-1, kw * kd * c).T @ dy_s for a in range(kh)]
    return acc + jnp.stack(parts), None

  acc0 = jnp.zeros((kh, kw * kd * c, o), dtype=jnp.promote_types(x.dtype, dy.dtype))
  acc, _ = lax.scan(slab, acc0, jnp.arange(n_slabs))
  return acc.reshape(kh, kw, kd, c, o)


@jax.custom_vjp
def _split2d(x, kernel):
  return _split2d_forward(x, kernel)


def _split2d_fwd(x, kernel):
  return _split2d_forward(x, kernel), (x, kernel)


def _split2d_bwd(res, dy):
  x, kernel = res
  flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
  dx = _split2d_forward(dy.astype(x.dtype), flipped.astype(x.dtype))
  dw = _kernel_grad(x, dy, kernel.shape).astype(kernel.dtype)
  return dx, dw


_split2d.defvjp(_split2d_fwd, _split2d_bwd)


def conv3d_same(x, kernel, impl: str = 'auto'):
  """Stride-1 zero-padded 'SAME' 3D convolution, no bias.

  Args:
    x: (B, H, W, D, C) input.
    kernel: (kh, kw, kd, C, O), odd sizes.
    impl: 'split2d' (2D conv + matmul kernel gradient, fast on XLA:CPU), 'xla' (one
      ``lax.conv_general_dilated``) or 'auto' (split2d on CPU for all but small convs, xla
      elsewhere).

  Returns:
    (B, H, W, D, O).
  """
  _check(x, kernel)
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  work = x.size // x.shape[-1] * kernel.shape[-1] * x.shape[-1]
  if resolve_impl(impl, work) == 'xla':
    return _xla(x, kernel)
  return _split2d(x, kernel)


def nnx_conv_fn(impl: str):
  """A ``conv_general_dilated`` stand-in for ``nnx.Conv`` that runs ``conv3d_same``.

  Only the case ``nnx.Conv(..., padding='SAME')`` builds for a 3D kernel with unit strides
  and dilations is accepted; anything else raises (no silent change of arithmetic).
  """
  resolve_impl(impl)

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    del dimension_numbers, precision, unused   # nnx.Conv: channels-last lhs, HWDIO rhs
    same = [((k - 1) // 2, k // 2) for k in rhs.shape[:3]]
    ok = (lhs.ndim == 5 and tuple(window_strides) == (1, 1, 1)
          and (padding == 'SAME' or [tuple(p) for p in padding] == same)
          and all(v == 1 for v in (lhs_dilation or (1,))) and feature_group_count == 1
          and all(v == 1 for v in (rhs_dilation or (1,))))
    if not ok:
      raise ValueError('conv3d_same supports stride-1, undilated, ungrouped SAME 3D convs '
                       f'only (strides {window_strides}, padding {padding})')
    return conv3d_same(lhs, rhs, impl)

  return conv
