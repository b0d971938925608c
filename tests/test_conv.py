"""The split-2D 3D convolution equals torch's conv3d and XLA's 3D conv (values, gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fmir_jax.ops import conv
from tests.helpers import oracles


# (x shape, kernel size, chunk bytes, slab bytes): single chunk/slab, one plane / row per
# chunk / slab (edge windows clipped, interior under scan), odd sizes, D shorter than the
# kernel, a 1-tap axis.
CASES = [
    ((2, 5, 6, 7, 3), (3, 3, 3), None, None),
    ((1, 4, 5, 9, 2), (3, 3, 3), 1, 1),
    ((1, 6, 5, 9, 2), (3, 3, 5), 2000, 3000),
    ((1, 4, 5, 2, 2), (3, 5, 5), 1, 1),
    ((2, 3, 4, 11, 2), (1, 3, 3), 1500, 1),
]


@pytest.mark.parametrize('shape,ksize,chunk_bytes,slab_bytes', CASES)
def test_split2d_matches_torch(shape, ksize, chunk_bytes, slab_bytes, monkeypatch):
  if chunk_bytes is not None:
    monkeypatch.setattr(conv, 'CHUNK_BYTES', chunk_bytes)
    monkeypatch.setattr(conv, 'SLAB_BYTES', slab_bytes)
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=shape)
  kernel = rng.normal(size=(*ksize, shape[-1], 4))
  xt, wt, yt = oracles.torch_conv3d_same(x, kernel, requires_grad=True)
  gy = rng.normal(size=yt.shape)
  yt.backward(torch.from_numpy(gy))
  want_y = np.moveaxis(yt.detach().numpy(), 1, -1)
  want_gx = np.moveaxis(xt.grad.numpy(), 1, -1)
  want_gw = np.transpose(wt.grad.numpy(), (2, 3, 4, 1, 0))
  with jax.enable_x64(True):
    xj, kj = jnp.asarray(x), jnp.asarray(kernel)
    y, vjp = jax.vjp(lambda a, b: conv.conv3d_same(a, b, 'split2d'), xj, kj)
    gx, gw = vjp(jnp.asarray(np.moveaxis(gy, 1, -1)))
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.asarray(gw), want_gw, rtol=1e-10, atol=1e-10)


def test_split2d_float32_matches_xla_conv():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 12, 10, 6, 8)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 5)).astype(np.float32) * 0.1)
  gy = jnp.asarray(rng.normal(size=(2, 12, 10, 6, 5)).astype(np.float32))
  outs = {}
  for impl in ('split2d', 'xla'):
    loss = lambda a, b, impl=impl: jnp.sum(conv.conv3d_same(a, b, impl) * gy)
    outs[impl] = (conv.conv3d_same(x, kernel, impl), *jax.grad(loss, (0, 1))(x, kernel))
  for got, want in zip(outs['split2d'], outs['xla']):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_nnx_conv_uses_conv3d_same_and_refuses_other_convs():
  rngs = nnx.Rngs(0)
  layer = nnx.Conv(3, 4, (3, 3, 3), padding='SAME', conv_general_dilated=conv.nnx_conv_fn(
      'split2d'), rngs=rngs)
  ref = nnx.Conv(3, 4, (3, 3, 3), padding='SAME', rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 5, 4, 3)).astype(np.float32))
  np.testing.assert_allclose(layer(x), ref(x), atol=1e-5)
  strided = nnx.Conv(3, 4, (3, 3, 3), strides=2, padding='SAME',
                     conv_general_dilated=conv.nnx_conv_fn('split2d'), rngs=rngs)
  with pytest.raises(ValueError, match='stride-1'):
    strided(x)


def test_impl_names():
  assert conv.resolve_impl('auto') == ('split2d' if jax.default_backend() == 'cpu' else 'xla')
  assert conv.resolve_impl('auto', work=conv.AUTO_MIN_WORK - 1) == 'xla'
  with pytest.raises(ValueError, match='unknown conv implementation'):
    conv.resolve_impl('cudnn')
  with pytest.raises(ValueError, match='odd kernel'):
    conv.conv3d_same(jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((2, 3, 3, 2, 1)))
