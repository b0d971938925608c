"""fmir_jax/register/refine.py: multi-scale instance optimisation.

Independent oracles: scipy.ndimage.map_coordinates warps (pull convention,
warped(x) = moving(x + u(x))) and numpy central-difference Jacobians (both from
tests/helpers/oracles.py), and a numpy/scipy
MIND-SSC written from the Heinrich et al. (2013) / Learn2Reg reference code.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from scipy import ndimage

from fmir_jax.ops import losses
from fmir_jax.register import refine
from fmir_jax.ops import sampling
from fmir_jax.ops import warp
from tests.helpers import oracles

SHAPE = (32, 32, 24)
CROP = (slice(4, -4),) * 3
# Three scales on the small test grid (32x32x24 -> 16x16x12 -> 8x8x6).
NCC = refine.RefineOptions(steps=(60, 40, 10), lr_vox=(0.25, 0.25, 0.125), min_size=6)


def smooth_image(rng, shape=SHAPE, sigma=2.0):
  x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def smooth_field(rng, max_vox, sigma, shape=SHAPE):
  u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
                for _ in range(3)], -1)
  return (u * max_vox / np.abs(u).max()).astype(np.float32)


def pair(seed, max_vox=4.0, sigma=8.0):
  """(moving, fixed, u*) with fixed(x) = moving(x + u*(x)), so warp(moving, u*) = fixed."""
  rng = np.random.default_rng(seed)
  moving = smooth_image(rng)
  u_true = smooth_field(rng, max_vox, sigma)
  return moving, oracles.warp(moving, u_true, mode='nearest'), u_true


def mse(a, b):
  return float(np.mean((a - b)[CROP] ** 2))


def epe(u, v):
  return float(np.mean(np.linalg.norm(u - v, axis=-1)[CROP]))


@pytest.fixture(scope='module')
def ncc_refiner():
  return refine.Refiner(NCC)


@pytest.mark.slow
def test_recovers_known_smooth_deformation(ncc_refiner):
  moving, fixed, u_true = pair(0)
  u, rec = ncc_refiner.refine(moving, fixed, (1.0, 1.0, 1.0))
  assert u.shape == (*SHAPE, 3) and u.dtype == np.float32
  assert rec.shapes == ((8, 8, 6), (16, 16, 12), SHAPE) and rec.steps == (60, 40, 10)
  assert all(a < b for a, b in zip(rec.loss_after, rec.loss_before))
  assert mse(oracles.warp(moving, u, mode='nearest'), fixed) < mse(moving, fixed) / 10
  assert epe(u, u_true) < 0.4 * epe(0 * u_true, u_true)


@pytest.mark.slow
def test_true_field_init_is_kept(ncc_refiner):
  moving, fixed, u_true = pair(1)
  u0, rec0 = ncc_refiner.refine(moving, fixed, (1.0, 1.0, 1.0))
  u1, rec1 = ncc_refiner.refine(moving, fixed, (1.0, 1.0, 1.0), init_disp_vox=u_true)
  assert rec1.loss_after[-1] <= rec0.loss_after[-1]           # no worse than from zero
  assert epe(u1, u_true) < 0.15 * epe(0 * u_true, u_true)     # stays close
  assert epe(u1, u_true) < 0.5 * epe(u0, u_true)


@pytest.mark.slow
def test_mind_recovers_inverted_contrast():
  moving, fixed, u_true = pair(2)
  inverted = 1.0 - moving                     # warp(inverted, u*) = 1 - fixed
  # Our NCC (VoxelMorph's, squared) is sign-invariant too away from the zero-padded border;
  # MIND is the contrast-free one, and the one tested here.
  a, b = (jnp.asarray(x)[None, ..., None] for x in (inverted, fixed))
  ncc = lambda x: np.asarray(losses.ncc_map(x, b, 5))[0, ..., 0][CROP]
  np.testing.assert_allclose(ncc(a), ncc(1 - a), atol=1e-3)   # float32 window sums
  opts = refine.RefineOptions(similarity='mind', steps=(100,), lr_vox=(0.25,))  # one scale
  u, rec = refine.Refiner(opts).refine(inverted, fixed, (1.0, 1.0, 1.0))
  assert rec.shapes == (SHAPE,) and rec.loss_after[0] < 0.5 * rec.loss_before[0]
  assert mse(1.0 - oracles.warp(inverted, u, mode='nearest'), fixed) < mse(moving, fixed) / 4
  assert epe(u, u_true) < 0.5 * epe(0 * u_true, u_true)


@pytest.mark.slow
def test_diffeomorphic_large_deformation_does_not_fold():
  moving, fixed, u_true = pair(3, max_vox=7.0, sigma=4.0)
  assert oracles.jacobian_det(u_true).min() < 0          # the truth itself folds: a hard case
  # Weak smoothing (default 2.0): large, rough updates, where a displacement would fold.
  opts = refine.RefineOptions(diffeomorphic=True, steps=(80, 20), lr_vox=(0.25, 0.125),
                              smooth=0.5)
  u, _ = refine.Refiner(opts).refine(moving, fixed, (1.0, 1.0, 1.0))
  assert oracles.jacobian_det(u).min() > 0
  assert np.abs(u).max() > 3.0
  assert mse(oracles.warp(moving, u, mode='nearest'), fixed) < mse(moving, fixed) / 3


@pytest.mark.slow
def test_fold_penalty_matches_numpy_jacobian_and_unfolds_a_hard_pair():
  rng = np.random.default_rng(9)
  u = rng.normal(0, 0.6, (10, 9, 8, 3))
  got = np.asarray(refine.jacobian_det_cf(jnp.asarray(np.moveaxis(u, -1, 0), jnp.float32)))
  np.testing.assert_allclose(got, oracles.jacobian_det(u), atol=1e-5)
  want = np.mean(np.maximum(0.2 - oracles.jacobian_det(u), 0) ** 2)
  np.testing.assert_allclose(refine.fold_penalty(jnp.asarray(np.moveaxis(u, -1, 0)), 0.2),
                             want, rtol=1e-4)
  assert float(refine.fold_penalty(jnp.zeros((3, 6, 6, 6)))) == 0.0   # identity: no penalty
  # The hard pair of the diffeomorphic test, weakly smoothed displacements: folds without
  # the penalty, (almost) none with it, and the images still match.
  moving, fixed, _ = pair(3, max_vox=7.0, sigma=4.0)
  base = dict(steps=(80, 40), lr_vox=(0.5, 0.25), smooth=0.05)
  folds = {}
  for w in (0.0, 10.0):
    u, _ = refine.Refiner(refine.RefineOptions(fold=w, **base)).refine(moving, fixed,
                                                                      (1.0, 1.0, 1.0))
    folds[w] = float(np.mean(oracles.jacobian_det(u)[CROP] <= 0))
    assert mse(oracles.warp(moving, u, mode='nearest'), fixed) < mse(moving, fixed) / 3
  assert folds[0.0] > 0.003 and folds[10.0] < 0.1 * folds[0.0], folds


@pytest.mark.slow
def test_second_pair_of_same_shape_does_not_recompile():
  events = []
  def listener(event, *args, **kwargs):
    if event.startswith('/jax/core/compile/'):   # tracing, lowering, backend compile
      events.append(event)
  refiner = refine.Refiner(NCC)
  m0, f0, _ = pair(4)
  m1, f1, _ = pair(5)
  refiner.refine(m0, f0, (1.0, 1.0, 1.0))
  n_programs = refiner.compiles
  assert n_programs == 1 + 3                     # the pyramid + one per scale
  monitoring.register_event_duration_secs_listener(listener)
  try:
    _, rec = refiner.refine(m1, f1, (1.0, 1.0, 1.0), init_disp_vox=np.ones((*SHAPE, 3)))
  finally:
    monitoring.unregister_event_duration_listener(listener)
  assert refiner.compiles == n_programs and events == []
  assert rec.compile_seconds < rec.seconds_total


def mind_reference(img, radius, dilation):
  """numpy/scipy MIND-SSC after the Learn2Reg reference (MINDSSC, without its channel
  permutation): replicate-padded shifts, box mean (scipy uniform_filter, mode='nearest'),
  minus the min over pairs, over the clipped mean, exp(-.)."""
  six = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]]) - 1
  dist = ((six[:, None] - six[None]) ** 2).sum(-1)
  pairs = [(six[i], six[j]) for i, j in itertools.product(range(6), range(6))
           if i > j and dist[i, j] == 2]
  assert len(pairs) == 12
  d = dilation
  pad = np.pad(img.astype(np.float64), d, mode='edge')
  n = img.shape
  shift = lambda o: pad[d + d * o[0]:d + d * o[0] + n[0], d + d * o[1]:d + d * o[1] + n[1],
                        d + d * o[2]:d + d * o[2] + n[2]]
  ssd = np.stack([ndimage.uniform_filter((shift(p) - shift(q)) ** 2, 2 * radius + 1,
                                         mode='nearest') for p, q in pairs])
  mind = ssd - ssd.min(0, keepdims=True)
  var = mind.mean(0, keepdims=True)
  var = np.clip(var, var.mean() * 1e-3, var.mean() * 1e3)
  return np.exp(-mind / var)


@pytest.mark.parametrize('radius,dilation', [(1, 2), (2, 1)])
def test_mind_ssc_matches_numpy_reference(radius, dilation):
  img = smooth_image(np.random.default_rng(6), (12, 10, 9), sigma=1.0)
  got = np.asarray(refine.mind_ssc(img, radius, dilation))
  assert got.shape == (12, 12, 10, 9)
  np.testing.assert_allclose(got, mind_reference(img, radius, dilation), atol=2e-5)


def test_sampler_and_integrate_match_warp_module():
  rng = np.random.default_rng(7)
  vol = jnp.asarray(rng.random((2, 7, 6, 5)), jnp.float32)        # (C, H, W, D)
  disp = jnp.asarray(rng.normal(0, 2.0, (3, 7, 6, 5)), jnp.float32)  # some points outside
  ref = lambda v, d: jnp.moveaxis(warp.warp(jnp.moveaxis(v, 0, -1), jnp.moveaxis(d, 0, -1)),
                                  -1, 0)
  np.testing.assert_allclose(sampling.sample_cf(vol, disp), ref(vol, disp), atol=1e-6)
  grad = lambda f: jax.jit(jax.grad(lambda v, d: jnp.sum(jnp.sin(3 * f(v, d))), (0, 1)))
  for got, want in zip(grad(sampling.sample_cf)(vol, disp), grad(ref)(vol, disp)):
    np.testing.assert_allclose(got, want, atol=1e-4)
  v = jnp.asarray(rng.normal(0, 1.5, (3, 7, 6, 5)), jnp.float32)
  want = jnp.moveaxis(warp.integrate(jnp.moveaxis(v, 0, -1), 4), -1, 0)
  np.testing.assert_allclose(sampling.integrate_cf(v, 4), want, atol=1e-5)


def test_pyramid_keeps_thick_slices_and_short_axes():
  r = refine.Refiner()
  shapes, factors, scales = r.plan((128, 128, 16), (1.8, 1.8, 10.0))
  assert shapes == ((128, 128, 16), (64, 64, 16), (32, 32, 16), (16, 16, 16))
  assert all(f[2] == 1 for f in factors)
  assert scales[-1].windows == (7, 7, 1) and scales[-1].steps == 10
  shapes, _, scales = r.plan((80, 96, 80), (1.0, 1.0, 1.0))
  assert shapes[-1] == (10, 12, 10) and [s.steps for s in scales] == [100, 80, 40, 10]
  shapes, _, scales = r.plan((32, 32, 24), (1.0, 1.0, 1.0))   # too small for 4 scales
  assert shapes == ((32, 32, 24), (16, 16, 12)) and [s.steps for s in scales] == [220, 10]


@pytest.mark.slow
def test_a_fixed_mask_keeps_an_implant_out_of_the_similarity(ncc_refiner):
  """An implant (a bright ball) only in the fixed image drags the unmasked field; with a
  fixed mask leaving it out (ANTs' -x), the field near it follows the true one."""
  moving, fixed, u_true = pair(0)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij'), -1)
  r2 = ((idx - (16, 14, 12)) ** 2).sum(-1)
  implant = np.where(r2 < 25, 1.5, fixed).astype(np.float32)
  mask = (r2 >= 49).astype(np.float32)
  near = r2 < 81
  err = lambda u: float(np.linalg.norm(u - u_true, axis=-1)[near].mean())  # noqa: E731
  plain = err(ncc_refiner.refine(moving, implant, (1.0, 1.0, 1.0))[0])
  # with an all-ones moving mask beside it: that path too, at no change to the weights
  masked = err(ncc_refiner.refine(moving, implant, (1.0, 1.0, 1.0), fixed_mask=mask,
                                  moving_mask=np.ones_like(mask))[0])
  identity = float(np.linalg.norm(u_true, axis=-1)[near].mean())
  assert plain > identity and masked < 0.5 * identity and masked < 0.4 * plain, (
      plain, masked, identity)
  with pytest.raises(ValueError, match='fixed_mask'):
    ncc_refiner.refine(moving, implant, (1.0, 1.0, 1.0), fixed_mask=0 * mask)
