"""The exact low-cost feature path equals upsample-then-conv (forward and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fmir_jax.ops import upsample
from tests.helpers import oracles


def _linear_interp(n_out, n_in, offset, scale):
  """Independent oracle: linear interpolation weights at clamped coordinates."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    x = min(max(offset + scale * i, 0.0), n_in - 1.0)
    j = min(int(np.floor(x)), n_in - 2) if n_in > 1 else 0
    t = x - j
    m[i, j] += 1 - t
    if n_in > 1:
      m[i, j + 1] += t
  return m


@pytest.mark.parametrize('shape,patch', [((16, 12, 3), (4, 3)), ((9, 13, 2), (3, 4))])
def test_upsample_matches_torch_bilinear(shape, patch):
  # align_corners=False bilinear upsampling by an integer factor r == offset/scale geometry
  # scale = 1/r, offset = 0.5/r - 0.5 (pixel-centre convention).
  h, w = patch
  r = 4
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(1, 3, h, w, 5)).astype(np.float32)
  ah = _linear_interp(h * r, h, 0.5 / r - 0.5, 1 / r)[None]
  aw = _linear_interp(w * r, w, 0.5 / r - 0.5, 1 / r)[None]
  got = np.asarray(upsample.upsample_features(jnp.asarray(feat), ah, aw))  # (1,H,W,D,c)
  t = torch.from_numpy(feat[0]).permute(0, 3, 1, 2)  # (D, c, h, w)
  want = torch.nn.functional.interpolate(t, scale_factor=r, mode='bilinear',
                                         align_corners=False).permute(2, 3, 0, 1).numpy()
  np.testing.assert_allclose(got[0], want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('dims', [(2, 5, 4, 3, 6, 13, 11), (1, 1, 3, 5, 4, 9, 16)])
def test_exact_path_equals_reference(dims):
  b, d, h, w, c, H, W = dims
  n = 4
  key = jax.random.PRNGKey(0)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  feat = jax.random.normal(k1, (b, d, h, w, c))
  kernel = jax.random.normal(k2, (3, 3, 3, c, n)) * 0.1
  # Any linear maps will do (the identity is exact for them); use real interpolation for one
  # axis and a dense random matrix for the other.
  ah = jnp.asarray(np.stack([_linear_interp(H, h, 0.3, (h - 1) / max(H - 1, 1))] * b))
  aw = jax.random.uniform(k3, (b, W, w))
  fast = upsample.conv3_of_upsampled(feat, kernel, ah, aw)
  ref = upsample.conv3_of_upsampled_reference(feat, kernel, ah, aw)
  assert fast.shape == (b, H, W, d, n)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(ref).max()))

  cot = jax.random.normal(k4, ref.shape)
  def loss(fn, f, k):
    return jnp.sum(fn(f, k, ah, aw) * cot)
  gf = jax.grad(lambda f, k: loss(upsample.conv3_of_upsampled, f, k), argnums=(0, 1))(
      feat, kernel)
  gr = jax.grad(lambda f, k: loss(upsample.conv3_of_upsampled_reference, f, k),
                argnums=(0, 1))(feat, kernel)
  for a, r in zip(gf, gr):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(r).max()))


def test_reference_conv_matches_torch():
  """The reference itself: zero-padded 3x3x3 conv == torch conv3d(padding='same', i.e. 1)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 2, 3, 4, 5)).astype(np.float32)  # (B, D, h, w, c)
  k = rng.normal(size=(3, 3, 3, 5, 2)).astype(np.float32)
  eye_h = np.eye(3, dtype=np.float32)[None]
  eye_w = np.eye(4, dtype=np.float32)[None]
  got = np.asarray(upsample.conv3_of_upsampled_reference(x, k, eye_h, eye_w))  # (1,3,4,2,2)
  _, _, y = oracles.torch_conv3d_same(np.transpose(x, (0, 2, 3, 1, 4)), k,  # (B, H, W, D, c)
                                      dtype='float32')
  want = y.permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
