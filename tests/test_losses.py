"""Oracle tests for fmir_jax.ops.losses (scipy filters, torch interpolate, closed forms)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from fmir_jax.ops import losses as L
from tests.helpers import oracles
from fmir_jax.ops import pyramid


def _rand(shape, seed):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def _ncc_map_oracle(a, b, win, eps=1e-5):
  """VoxelMorph NCC map with scipy box filters (zero padding), float64."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  size = (1, win, win, win, 1)
  n = float(win ** 3)
  s = lambda x: ndi.uniform_filter(x, size=size, mode='constant', cval=0.0) * n
  sa, sb, saa, sbb, sab = s(a), s(b), s(a * a), s(b * b), s(a * b)
  ma, mb = sa / n, sb / n
  cross = sab - mb * sa - ma * sb + ma * mb * n
  va = saa - 2 * ma * sa + ma * ma * n
  vb = sbb - 2 * mb * sb + mb * mb * n
  return cross ** 2 / (va * vb + eps)


@pytest.mark.parametrize('shape,win', [((1, 7, 6, 5, 1), 3), ((2, 10, 9, 2, 1), 9)])
def test_ncc_map_matches_scipy_oracle(shape, win):
  a, b = _rand(shape, 0), _rand(shape, 1)
  out = np.asarray(L.ncc_map(a, b, win))
  ref = _ncc_map_oracle(a, b, win)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=1e-5)
  assert np.isfinite(float(L.ncc_loss(a, b, win)))
  np.testing.assert_allclose(L.ncc_loss(a, b, win), -ref.mean(), rtol=1e-4)


def test_ncc_interior_is_squared_pearson_and_affine_invariant():
  a = _rand((1, 8, 8, 8, 1), 2)
  b = 0.5 * a + _rand((1, 8, 8, 8, 1), 3)
  out = np.asarray(L.ncc_map(a, b, 3))
  for (i, j, k) in [(1, 1, 1), (3, 5, 2), (6, 6, 6), (4, 2, 5)]:
    pa = a[0, i - 1:i + 2, j - 1:j + 2, k - 1:k + 2, 0].ravel()
    pb = b[0, i - 1:i + 2, j - 1:j + 2, k - 1:k + 2, 0].ravel()
    r = np.corrcoef(pa, pb)[0, 1]
    np.testing.assert_allclose(out[0, i, j, k, 0], r ** 2, rtol=1e-3)
  # a*x + b with a > 0: the same everywhere for the scale, in the interior for the offset
  scaled = np.asarray(L.ncc_map(3.0 * a + 0.7, b, 3))
  np.testing.assert_allclose(scaled[:, 1:-1, 1:-1, 1:-1], out[:, 1:-1, 1:-1, 1:-1],
                             rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(L.ncc_loss(3.0 * a, b, 3), L.ncc_loss(a, b, 3), rtol=1e-4)


def test_masked_ncc_is_the_weighted_pearson_of_each_window():
  """Brute force: per voxel, the squared weighted correlation of its window's values (the
  window cut at the border, voxels of weight 0 left out); w = 1 is ncc_map inside."""
  a, b = _rand((1, 7, 6, 5, 1), 5), _rand((1, 7, 6, 5, 1), 6)
  b = 0.6 * a + b
  w = (_rand((1, 7, 6, 5, 1), 7) > 0.35).astype(np.float32)
  out = np.asarray(L.masked_ncc_map(a, b, w, 3))
  for i, j, k in np.ndindex(7, 6, 5):
    sl = tuple(slice(max(c - 1, 0), c + 2) for c in (i, j, k))
    pa, pb, pw = (x[(0, *sl, 0)].ravel().astype(np.float64) for x in (a, b, w))
    sw = pw.sum()
    if sw == 0:
      assert out[0, i, j, k, 0] == 0
      continue
    ma, mb = (pw * pa).sum() / sw, (pw * pb).sum() / sw
    cross = (pw * (pa - ma) * (pb - mb)).sum()
    va, vb = (pw * (pa - ma) ** 2).sum(), (pw * (pb - mb) ** 2).sum()
    np.testing.assert_allclose(out[0, i, j, k, 0], cross ** 2 / (va * vb + 1e-5),
                               rtol=2e-3, atol=1e-5)
  ones = np.asarray(L.masked_ncc_map(a, b, np.ones_like(a), 3))
  np.testing.assert_allclose(ones[:, 1:-1, 1:-1, 1:-1], np.asarray(L.ncc_map(a, b, 3))[
      :, 1:-1, 1:-1, 1:-1], rtol=1e-3, atol=1e-5)


def test_ncc_self_is_minus_one():
  a = _rand((2, 9, 8, 3, 1), 4)  # D=3 < window 9
  for win in (9, 5, 3):
    val = float(L.ncc_loss(a, a, win))
    assert -1.0 <= val < -0.999, (win, val)


def test_diffusion_loss_closed_forms():
  assert float(L.diffusion_loss(np.full((1, 5, 4, 3, 3), 2.5, np.float32))) == 0.0
  rng = np.random.default_rng(5)
  A = rng.standard_normal((3, 3))
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in (6, 5, 4)], indexing='ij'), -1)
  v = (grid @ A.T + rng.standard_normal(3))[None].astype(np.float32)  # v_c = Σ_k A[c,k] x_k
  np.testing.assert_allclose(L.diffusion_loss(v), np.sum(A ** 2) / 9.0, rtol=1e-5)
  # an axis of length 1 contributes nothing
  v1 = v[:, :, :, :1]
  np.testing.assert_allclose(L.diffusion_loss(v1),
                             (np.sum(A[:, 0] ** 2) + np.sum(A[:, 1] ** 2)) / 9.0, rtol=1e-5)


def test_soft_dice_closed_form():
  lab_a = np.zeros((1, 6, 6, 4), np.int32)
  lab_b = np.zeros((1, 6, 6, 4), np.int32)
  lab_a[0, 1:4, 1:4, :] = 1           # 36 voxels
  lab_b[0, 2:5, 1:4, :] = 1           # 36 voxels, overlap 24
  lab_a[0, 4:6, 4:6, :2] = 2          # 8 voxels
  lab_b[0, 4:6, 4:6, :] = 2           # 16 voxels, overlap 8
  oh = lambda l: np.eye(3, dtype=np.float32)[l]
  expect = np.mean([2 * 24 / 72, 2 * 8 / 24])
  np.testing.assert_allclose(L.soft_dice(oh(lab_a), oh(lab_b)), expect, rtol=1e-5)
  np.testing.assert_allclose(L.dice_loss(oh(lab_a), oh(lab_b)), 1 - expect, rtol=1e-5)
  bg_a, bg_b = (lab_a == 0).sum(), (lab_b == 0).sum()
  bg_i = ((lab_a == 0) & (lab_b == 0)).sum()
  np.testing.assert_allclose(
      L.soft_dice(oh(lab_a), oh(lab_b), include_background=True),
      np.mean([2 * bg_i / (bg_a + bg_b), 2 * 24 / 72, 2 * 8 / 24]), rtol=1e-5)
  np.testing.assert_allclose(L.soft_dice(oh(lab_a), oh(lab_a)), 1.0, rtol=1e-6)


@pytest.mark.parametrize('in_plane_only', [False, True])
def test_gaussian_blur_matches_scipy_reflect(in_plane_only):
  x = _rand((2, 9, 7, 2, 2), 6)  # D=2 is shorter than the kernel radius 3
  out = np.asarray(L.gaussian_blur(x, 1.0, in_plane_only))
  sig = (0, 1.0, 1.0, 0 if in_plane_only else 1.0, 0)
  ref = ndi.gaussian_filter(x.astype(np.float64), sig, mode='reflect', truncate=3.0)
  np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.slow
def test_image_and_label_pyramids_match_scipy_torch():
  img = _rand((1, 12, 10, 6, 1), 7)
  shapes = pyramid.pyramid_shapes((12, 10, 6), (2, 2, 1), 3)
  pyr = L.image_pyramid(img, shapes, sigma=1.0, in_plane_only=True)
  assert [p.shape[1:4] for p in pyr] == list(shapes)
  ref = img.astype(np.float64)
  for i in range(1, 3):
    blurred = ndi.gaussian_filter(ref, (0, 1, 1, 0, 0), mode='reflect', truncate=3.0)
    ref = oracles.resize(blurred, shapes[i])
    np.testing.assert_allclose(pyr[i], ref, atol=1e-5)
  onehot = np.eye(3, dtype=np.float32)[np.random.default_rng(8).integers(0, 3, (1, 12, 10, 6))]
  lp = L.label_pyramid(onehot, shapes)
  assert [p.shape for p in lp] == [(1,) + s + (3,) for s in shapes]
  np.testing.assert_allclose(np.asarray(lp[2]).sum(-1), 1.0, atol=1e-5)  # partition of unity
  with pytest.raises(ValueError, match='shapes'):
    L.image_pyramid(img, shapes[1:])


def _tiny_problem(seed, dtype=np.float32, levels=3):
  rng = np.random.default_rng(seed)
  cast = lambda x: x.astype(dtype)
  shapes = pyramid.pyramid_shapes((8, 8, 4), (2, 2, 1), levels)
  fixed = L.image_pyramid(cast(rng.random((1,) + shapes[0] + (1,))), shapes)
  moving = L.image_pyramid(cast(rng.random((1,) + shapes[0] + (1,))), shapes)
  lab = lambda: cast(np.eye(3)[rng.integers(0, 3, (1,) + shapes[0])])
  ml, fl = L.label_pyramid(lab(), shapes), L.label_pyramid(lab(), shapes)
  v = [cast(0.5 * rng.standard_normal((1,) + s + (3,))) for s in shapes]
  return shapes, fixed, moving, ml, fl, v


@pytest.mark.slow
def test_multilevel_loss_terms_and_identity_case():
  shapes, fixed, moving, ml, fl, v = _tiny_problem(9, levels=2)
  zeros = [jnp.zeros_like(x) for x in v]
  loss = jax.jit(L.multilevel_loss, static_argnames=('windows', 'lambdas'))
  total, terms = loss(zeros, zeros, fixed, fixed, fl, fl)
  expect_ncc = sum(float(L.ncc_loss(f, f, w)) / 2 ** i
                   for i, (f, w) in enumerate(zip(fixed, (9, 5))))
  np.testing.assert_allclose(terms['ncc'], expect_ncc, rtol=1e-6)
  assert expect_ncc < -1.49  # ≈ -(1 + 1/2)
  # level 0 one-hots are exact (Dice 1); coarser ones are soft, so 1 - Σ2a²/Σ2a > 0
  soft = lambda a: np.mean((a[..., 1:] ** 2).sum((1, 2, 3)) / a[..., 1:].sum((1, 2, 3)))
  expect_dice = sum((1 - soft(np.asarray(a, np.float64))) / 2 ** i for i, a in enumerate(fl))
  np.testing.assert_allclose(terms['dice'], expect_dice, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(1 - soft(np.asarray(fl[0], np.float64)), 0.0, atol=1e-12)
  np.testing.assert_allclose(terms['smooth'], 0.0, atol=0)
  np.testing.assert_allclose(total, terms['ncc'] + terms['dice'], rtol=1e-6)
  # general case: total is the λ-weighted sum; smooth term is Σ diffusion(v_i) / 2**i
  u = [0.3 * x for x in v]
  total, terms = loss(v, u, moving, fixed, ml, fl, lambdas=(1.0, 0.5, 2.0))
  np.testing.assert_allclose(
      terms['smooth'], sum(float(L.diffusion_loss(x)) / 2 ** i for i, x in enumerate(v)),
      rtol=1e-6)
  np.testing.assert_allclose(
      total, terms['ncc'] + 0.5 * terms['dice'] + 2.0 * terms['smooth'], rtol=1e-6)
  assert expect_dice < float(terms['dice']) < 1.5
  # Dice skipped without labels (and, by the same branch, when λ_dice == 0)
  total1, terms1 = loss(v, u, moving, fixed, lambdas=(1.0, 0.5, 2.0))
  assert 'dice' not in terms1
  np.testing.assert_allclose(total1, terms['ncc'] + 2.0 * terms['smooth'], rtol=1e-6)
  with pytest.raises(ValueError, match='windows'):
    L.multilevel_loss(v, u, moving, fixed, windows=(9,))


def test_multilevel_loss_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    shapes, fixed, moving, ml, fl, v = _tiny_problem(10, np.float64, levels=2)

    @jax.jit
    def f(v):  # u = v (no integration) keeps the compile short; warp grads are in test_warp
      return L.multilevel_loss(v, v, moving, fixed, ml, fl)[0]

    grads = jax.grad(f)(v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    rng = np.random.default_rng(11)
    eps = 1e-6
    for _ in range(2):
      d = [rng.standard_normal(x.shape) for x in v]
      plus = f([x + eps * dx for x, dx in zip(v, d)])
      minus = f([x - eps * dx for x, dx in zip(v, d)])
      fd = (plus - minus) / (2 * eps)
      an = sum(float(np.vdot(np.asarray(g), dx)) for g, dx in zip(grads, d))
      np.testing.assert_allclose(an, fd, rtol=1e-5, atol=1e-8)
