"""Oracle tests for fmir_jax.ops.warp (scipy map_coordinates, torch grid_sample/interpolate)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmir_jax.ops import warp as W
from tests.helpers import oracles
from fmir_jax.ops import pyramid


def _rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _torch_warp(vol, disp):
  """vol (H,W,D,C), disp (H,W,D,3) -> (H,W,D,C) via grid_sample(align_corners=True)."""
  shape = np.array(vol.shape[:3])
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  pos = grid + disp.astype(np.float64)
  norm = 2.0 * pos / (shape - 1) - 1.0            # (H,W,D,3) in array-axis order
  norm = norm[..., ::-1].copy()                   # torch: (x=last axis, y, z=first)
  inp = torch.from_numpy(np.moveaxis(vol, -1, 0)[None].astype(np.float64))
  out = F.grid_sample(inp, torch.from_numpy(norm[None]), mode='bilinear',
                      padding_mode='zeros', align_corners=True)
  return np.moveaxis(out[0].numpy(), 0, -1)


SHAPE = (7, 6, 5)


def test_warp_matches_scipy_and_torch_out_of_bounds():
  vol = _rand(SHAPE + (2,), 0)
  disp = _rand(SHAPE + (3,), 1, scale=2.5)  # many samples leave the volume
  out = np.asarray(jax.jit(W.warp)(vol, disp))
  ref_s = oracles.warp(vol, disp, dtype=np.float64)
  ref_t = _torch_warp(vol, disp)
  assert np.abs(ref_s - ref_t).max() < 1e-10  # the two oracles agree
  assert np.abs(out - ref_s).max() < 1e-5
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij'), -1)
  pos = grid + disp
  outside = np.any((pos < -1) | (pos > np.array(SHAPE) ), axis=-1)
  assert outside.sum() > 10 and np.all(out[outside] == 0)


def test_zero_field_is_identity_and_integer_shift():
  vol = _rand(SHAPE + (3,), 2)
  np.testing.assert_allclose(W.warp(vol, np.zeros(SHAPE + (3,), np.float32)), vol,
                             atol=0, rtol=0)
  shift = np.array([1.0, -2.0, 1.0], np.float32)
  out = np.asarray(W.warp(vol, np.broadcast_to(shift, SHAPE + (3,))))
  # out[i, j, k] = vol[i+1, j-2, k+1] where in range
  np.testing.assert_allclose(out[:-1, 2:, :-1], vol[1:, :-2, 1:], atol=1e-6)
  assert np.all(out[-1] == 0) and np.all(out[:, :2] == 0) and np.all(out[..., -1, :] == 0)


def test_warp_batched_equals_per_item():
  vol = _rand((3,) + SHAPE + (2,), 3)
  disp = _rand((3,) + SHAPE + (3,), 4, scale=1.5)
  out = np.asarray(W.warp(vol, disp))
  for b in range(3):
    np.testing.assert_allclose(out[b], np.asarray(W.warp(vol[b], disp[b])), atol=1e-6)
  labels = np.random.default_rng(5).integers(0, 4, (3,) + SHAPE).astype(np.uint8)
  lab = np.asarray(W.warp_nearest(labels, disp))
  for b in range(3):
    np.testing.assert_array_equal(lab[b], np.asarray(W.warp_nearest(labels[b], disp[b])))


def test_warp_nearest_matches_scipy_order0():
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 5, SHAPE).astype(np.int32)
  disp = rng.uniform(-2.5, 2.5, SHAPE + (3,)).astype(np.float32)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij'), -1)
  frac = np.abs((grid + disp) % 1.0 - 0.5)
  disp = np.where(frac < 0.05, disp + 0.2, disp).astype(np.float32)  # avoid .5 ties
  out = np.asarray(W.warp_nearest(labels, disp))
  assert out.dtype == labels.dtype
  ref = oracles.warp_nearest(labels.astype(np.float64), disp, mode='grid-constant')
  np.testing.assert_array_equal(out, ref.astype(np.int32))
  assert set(np.unique(out)) <= set(np.unique(labels)) | {0}
  assert (out == 0).sum() > (labels == 0).sum()  # some samples fell outside


def test_warp_gradients_match_finite_differences():
  with jax.enable_x64(True):
    vol = _rand((4, 5, 3, 2), 7).astype(np.float64)
    disp = _rand((4, 5, 3, 3), 8, scale=0.7).astype(np.float64)
    wts = _rand((4, 5, 3, 2), 9).astype(np.float64)
    f = jax.jit(lambda v, d: jnp.sum(W.warp(v, d) * wts))
    gv, gd = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(vol, disp))
    rng = np.random.default_rng(10)
    eps = 1e-6
    for _ in range(5):
      dv = rng.standard_normal(vol.shape)
      dd = rng.standard_normal(disp.shape)
      fd_v = (f(vol + eps * dv, disp) - f(vol - eps * dv, disp)) / (2 * eps)
      fd_d = (f(vol, disp + eps * dd) - f(vol, disp - eps * dd)) / (2 * eps)
      np.testing.assert_allclose(np.vdot(gv, dv), fd_v, rtol=1e-6, atol=1e-8)
      np.testing.assert_allclose(np.vdot(gd, dd), fd_d, rtol=1e-6, atol=1e-8)
    assert np.abs(gd).max() > 0
    # integrate (fori_loop with a rematerialised body) differentiates correctly too
    g = jax.jit(lambda d: jnp.sum(W.integrate(d, steps=3) * wts[..., :1]))
    gi = np.asarray(jax.grad(g)(disp))
    for _ in range(2):
      dd = rng.standard_normal(disp.shape)
      fd = (g(disp + eps * dd) - g(disp - eps * dd)) / (2 * eps)
      np.testing.assert_allclose(np.vdot(gi, dd), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('in_shape,out_shape', [
    ((5, 7, 3), (9, 4, 6)),     # mixed up/down, non-divisible
    ((8, 6, 4), (3, 3, 2)),     # down
    ((4, 3, 1), (7, 5, 1)),     # size-1 axis kept
    ((4, 3, 2), (1, 6, 5)),     # down to size 1
])
def test_resize_matches_torch(in_shape, out_shape):
  vol = _rand((2,) + in_shape + (3,), 11)
  out = np.asarray(W.resize(vol, out_shape))
  ref = oracles.resize(vol, out_shape)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(W.resize(vol[0], out_shape), out[0], atol=1e-6)


def test_resize_field_scales_components():
  disp = _rand((5, 4, 3, 3), 12)
  out = np.asarray(W.resize_field(disp, (9, 7, 3), (2.0, 2.0, 1.0)))
  plain = np.asarray(W.resize(disp, (9, 7, 3)))
  np.testing.assert_allclose(out, plain * np.array([2.0, 2.0, 1.0]), atol=1e-6)
  # resizing to the same shape keeps the field; corners are preserved under resize
  np.testing.assert_allclose(plain[0, 0, 0], disp[0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(plain[-1, -1, -1], disp[-1, -1, -1], atol=1e-6)
  # a constant field stays constant (times the scale)
  const = np.broadcast_to(np.array([1.0, -0.5, 3.0], np.float32), (5, 4, 3, 3))
  np.testing.assert_allclose(W.resize_field(const, (3, 2, 6), (0.5, 0.5, 0.5)),
                             np.broadcast_to([0.5, -0.25, 1.5], (3, 2, 6, 3)), atol=1e-6)


def test_pyramid_shapes():
  assert pyramid.pyramid_shapes((128, 128, 16), (2, 2, 1), 5) == (
      (128, 128, 16), (64, 64, 16), (32, 32, 16), (16, 16, 16), (8, 8, 16))
  assert pyramid.pyramid_shapes((33, 27, 7), (2, 2, 2), 5) == (
      (33, 27, 7), (17, 14, 4), (9, 7, 2), (5, 4, 1), (3, 2, 1))
  assert pyramid.pyramid_shapes((10, 10, 10), [(2, 2, 1), (1, 3, 2)], 3) == (
      (10, 10, 10), (5, 5, 10), (5, 2, 5))
  with pytest.raises(ValueError, match='factors'):
    pyramid.pyramid_shapes((10, 10, 10), [(2, 2, 1)], 4)


def test_compose_constant_shifts_is_sum():
  a = np.broadcast_to(np.array([1.0, 0.5, -1.0], np.float32), (8, 7, 6, 3))
  b = np.broadcast_to(np.array([-0.25, 1.0, 0.75], np.float32), (8, 7, 6, 3))
  u = np.asarray(W.compose(a, b))
  np.testing.assert_allclose(u[1:-2, 1:-2, 2:-2], (a + b)[1:-2, 1:-2, 2:-2], atol=1e-6)
  # general case against the scipy definition u = b + a(x + b(x))
  a2, b2 = _rand((6, 5, 4, 3), 13), _rand((6, 5, 4, 3), 14, scale=0.8)
  np.testing.assert_allclose(W.compose(a2, b2), b2 + oracles.warp(a2, b2, dtype=np.float64),
                             atol=1e-5)


def test_integrate_zero_constant_and_diffeomorphic():
  zero = np.zeros((6, 5, 4, 3), np.float32)
  np.testing.assert_array_equal(W.integrate(zero), zero)
  v = _rand((6, 5, 4, 3), 15)
  np.testing.assert_array_equal(W.integrate(v, steps=0), v)
  # Zero padding at the border leaks inward through the squarings with geometrically
  # decaying weight, so compare 5 voxels away from every face.
  const = np.broadcast_to(np.array([0.6, -0.4, 0.3], np.float32), (16, 16, 14, 3))
  u = np.asarray(jax.jit(W.integrate)(const))
  np.testing.assert_allclose(u[5:-5, 5:-5, 5:-5], const[5:-5, 5:-5, 5:-5], atol=1e-5)
  assert np.abs(u[-1, :, :, 0] - 0.6).max() > 0.1  # the border does see the padding
  # a smooth field that would fold if used directly (|grad v| > 1) integrates to a
  # diffeomorphism: det(I + grad u) > 0 everywhere (np.gradient oracle).
  shape = (16, 16, 12)
  g = np.stack(np.meshgrid(*[np.linspace(0, 2 * np.pi, n) for n in shape],
                           indexing='ij'), -1)
  v = np.stack([3.0 * np.sin(g[..., 1]) * np.cos(g[..., 2]),
                3.0 * np.sin(g[..., 0]),
                2.0 * np.cos(g[..., 0] + g[..., 1])], -1).astype(np.float32)

  assert oracles.jacobian_det(v).min() < 0  # the direct field folds
  u = np.asarray(W.integrate(v, steps=7))
  assert oracles.jacobian_det(u)[1:-1, 1:-1, 1:-1].min() > 0
  # integrate equals a plain Python loop of self-compositions
  u_ref = v / 128.0
  for _ in range(7):
    u_ref = u_ref + oracles.warp(u_ref, u_ref, dtype=np.float64)
  np.testing.assert_allclose(u, u_ref, atol=1e-4)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='disp_vox'):
    W.warp(np.zeros((4, 4, 4, 1), np.float32), np.zeros((4, 4, 3, 3), np.float32))
  with pytest.raises(ValueError, match='out_shape'):
    W.resize(np.zeros((4, 4, 4, 1), np.float32), (4, 0, 4))
  with pytest.raises(ValueError, match='component_scale'):
    W.resize_field(np.zeros((4, 4, 4, 3), np.float32), (2, 2, 2), (2, 2))


@pytest.mark.parametrize('in_shape,out_shape', [((9, 7, 3), (4, 5, 6)), ((5, 4, 3), (11, 4, 3))])
def test_chunked_resize_matches_torch(in_shape, out_shape, monkeypatch):
  # Tiny chunk budget: every axis runs the row-chunked fori_loop path (big volumes).
  monkeypatch.setattr(W, '_RESIZE_CHUNK_BYTES', 64)
  vol = _rand((2,) + in_shape + (3,), 13)
  out = np.asarray(W._resize.__wrapped__(jnp.asarray(vol), out_shape))
  np.testing.assert_allclose(out, oracles.resize(vol, out_shape), atol=1e-5)


@pytest.mark.slow
def test_warp_rows_and_chunked_gather_match_scipy(monkeypatch):
  vol = _rand((2,) + SHAPE + (2,), 14)
  disp = _rand((2,) + SHAPE + (3,), 15, scale=2.0)
  ref = np.stack([oracles.warp(vol[i], disp[i], dtype=np.float64) for i in range(2)])
  # Corner-by-corner chunked gather (the path of full-size volumes).
  monkeypatch.setattr(W, '_ONE_GATHER_MAX_BYTES', 0)
  monkeypatch.setattr(W, '_CHUNK_GATHER_BYTES', 8 * 2 * 4 * 10)
  np.testing.assert_allclose(W._warp_batched(jnp.asarray(vol), jnp.asarray(disp)), ref,
                             atol=1e-5)
  rows = W.warp_rows(jnp.asarray(vol), jnp.asarray(disp[:, 2:5]), jnp.int32(2))
  np.testing.assert_allclose(rows, ref[:, 2:5], atol=1e-5)
  with pytest.raises(ValueError, match='must share B, W and D'):
    W.warp_rows(jnp.asarray(vol), jnp.asarray(disp[:1, 2:5]), 2)


@pytest.mark.slow
def test_chunked_gather_gradients_equal_one_gather(monkeypatch):
  vol = jnp.asarray(_rand((1,) + SHAPE + (2,), 16))
  disp = jnp.asarray(_rand((1,) + SHAPE + (3,), 17, scale=1.5))
  w = jnp.asarray(_rand((1,) + SHAPE + (2,), 18))
  loss = lambda v, d: jnp.sum(W._warp_batched(v, d) * w)
  want = jax.grad(loss, (0, 1))(vol, disp)
  monkeypatch.setattr(W, '_ONE_GATHER_MAX_BYTES', 0)
  monkeypatch.setattr(W, '_CHUNK_GATHER_BYTES', 8 * 2 * 4 * 25)
  got = jax.grad(loss, (0, 1))(vol, disp)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_factors_for_spacing():
  assert pyramid.factors_for_spacing((2.4, 2.4, 10.0)) == (2, 2, 1)      # ACDC-like: keep z
  assert pyramid.factors_for_spacing((8.0, 8.0, 8.0)) == (2, 2, 2)       # isotropic
  assert pyramid.factors_for_spacing((1.0, 1.5, 1.6)) == (2, 2, 1)       # 1.5x the finest is in
