"""Tests for fmir_jax.model.channel_reg against numpy oracles (np.cov, np.linalg.svd)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmir_jax.model import channel_reg as CR


def test_draw_channels_distinct_deterministic_and_random():
  key = jax.random.key(0)
  draw = jax.jit(CR.draw_channels, static_argnums=(1, 2))
  idx = np.asarray(draw(key, 768, 256))
  assert idx.dtype == np.int32 and idx.shape == (256,)
  assert len(set(idx.tolist())) == 256 and idx.min() >= 0 and idx.max() < 768
  np.testing.assert_array_equal(idx, np.asarray(draw(key, 768, 256)))
  other = np.asarray(draw(jax.random.key(1), 768, 256))
  assert not np.array_equal(np.sort(idx), np.sort(other))
  full = np.asarray(CR.draw_channels(key, 5, 5))
  np.testing.assert_array_equal(np.sort(full), np.arange(5))
  # uniform: every channel is kept with probability c'/c
  keys = jax.random.split(jax.random.key(2), 2000)
  draws = np.asarray(jax.vmap(lambda k: CR.draw_channels(k, 8, 2))(keys))
  freq = np.bincount(draws.ravel(), minlength=8) / draws.size
  np.testing.assert_allclose(freq, 1 / 8, atol=0.03)
  with pytest.raises(ValueError, match='c_prime=256'):
    CR.draw_channels(key, 128, 256)


def test_select_channels_same_indices_for_both():
  rng = np.random.default_rng(0)
  mov, fix = rng.standard_normal((2, 3, 4, 2, 10)).astype(np.float32)
  idx = CR.draw_channels(jax.random.key(3), 10, 4)
  sm, sf = jax.jit(CR.select_channels)(mov, idx), CR.select_channels(fix, idx)
  np.testing.assert_array_equal(sm, mov[..., np.asarray(idx)])
  np.testing.assert_array_equal(sf, fix[..., np.asarray(idx)])


def _anisotropic(n, c, seed):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((c, c)))
  std = np.array([6.0, 4.0, 2.5, 1.0, 0.6, 0.3, 0.2, 0.1])[:c]
  x = (rng.standard_normal((n, c)) * std) @ q.T + rng.standard_normal(c) * 3
  return x, q, std


def test_pca_recovers_known_axes_and_variances():
  x, q, std = _anisotropic(40000, 8, 1)
  basis = CR.PCAAccumulator(8).update(x.astype(np.float32)).finalize(4)
  cos = np.abs(np.sum(basis.components * q[:, :4], axis=0))
  assert np.all(cos > 0.99), cos
  np.testing.assert_allclose(basis.explained_variance, std[:4] ** 2, rtol=0.05)
  np.testing.assert_allclose(basis.components.T @ basis.components, np.eye(4), atol=1e-12)
  assert np.all(np.diff(basis.explained_variance) < 0)
  # sign convention: the largest-magnitude entry of each component is positive
  comp = basis.components
  assert np.all(comp[np.argmax(np.abs(comp), 0), np.arange(4)] > 0)


def test_pca_streaming_equals_one_shot_and_numpy_oracles():
  x, _, _ = _anisotropic(3000, 8, 2)
  x = x.reshape(10, 30, 10, 8)  # leading axes are flattened
  one = CR.PCAAccumulator(8).update(x).finalize(8)
  acc = CR.PCAAccumulator(8)
  for chunk in np.array_split(x.reshape(-1, 8), 7):
    acc.update(chunk)
  streamed = acc.finalize(8)
  assert streamed.n_samples == one.n_samples == 3000
  np.testing.assert_allclose(streamed.mean, one.mean, atol=1e-12)
  np.testing.assert_allclose(streamed.components, one.components, atol=1e-9)
  flat = x.reshape(-1, 8)
  np.testing.assert_allclose(one.mean, flat.mean(0), atol=1e-10)
  evals = np.sort(np.linalg.eigvalsh(np.cov(flat, rowvar=False, bias=True)))[::-1]
  np.testing.assert_allclose(one.explained_variance, evals, rtol=1e-9)
  _, s, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
  np.testing.assert_allclose(one.explained_variance, s ** 2 / 3000, rtol=1e-9)
  np.testing.assert_allclose(np.abs(np.sum(one.components * vt.T, 0)), 1.0, atol=1e-9)


def test_pca_project_jit_and_decreasing_variances():
  x, _, _ = _anisotropic(5000, 8, 3)
  basis = CR.PCAAccumulator(8).update(x).finalize(5)
  feat = x.astype(np.float16).reshape(50, 100, 8)
  proj = jax.jit(CR.pca_project)(feat, basis.mean, basis.components)
  assert proj.dtype == jnp.float32 and proj.shape == (50, 100, 5)
  ref = (feat.astype(np.float64).reshape(-1, 8) - basis.mean) @ basis.components
  np.testing.assert_allclose(np.asarray(proj).reshape(-1, 5), ref, atol=1e-4)
  var = np.asarray(proj).reshape(-1, 5).var(0)
  assert np.all(np.diff(var) < 0)
  np.testing.assert_allclose(var, basis.explained_variance, rtol=0.02)
  np.testing.assert_allclose(np.asarray(proj).reshape(-1, 5).mean(0), 0.0, atol=0.02)


def test_pca_basis_roundtrip_and_bad_inputs():
  x, _, _ = _anisotropic(500, 8, 4)
  basis = CR.PCAAccumulator(8).update(x).finalize(3)
  d = basis.to_dict()
  assert all(isinstance(v, np.ndarray) for v in d.values())
  back = CR.PCABasis.from_dict(d)
  for f in ('mean', 'components', 'explained_variance'):
    np.testing.assert_array_equal(getattr(back, f), getattr(basis, f))
  assert back.n_samples == 500 and back.c == 8 and back.c_prime == 3
  with pytest.raises(ValueError, match='lacks'):
    CR.PCABasis.from_dict({'mean': d['mean']})
  with pytest.raises(ValueError, match='components'):
    CR.PCABasis.from_dict(dict(d, components=d['components'][:5]))
  with pytest.raises(ValueError, match=r'\(\.\.\., 8\)'):
    CR.PCAAccumulator(8).update(np.zeros((4, 7)))
  with pytest.raises(ValueError, match='non-finite'):
    CR.PCAAccumulator(2).update(np.array([[0.0, np.nan]]))
  with pytest.raises(ValueError, match='c_prime'):
    CR.PCAAccumulator(8).update(x).finalize(9)
  with pytest.raises(ValueError, match='no samples'):
    CR.PCAAccumulator(8).covariance()


def test_uncentred_fit_is_the_svd_of_the_raw_features():
  # The authors' release: right singular vectors of the raw (uncentred) feature matrix.
  x, _, _ = _anisotropic(5000, 8, 4)
  basis = CR.PCAAccumulator(8).update(x).finalize(3, fit='uncentred')
  _, sv, vt = np.linalg.svd(x, full_matrices=False)
  cos = np.abs(np.sum(basis.components * vt[:3].T, axis=0))
  np.testing.assert_allclose(cos, 1.0, atol=1e-9)
  np.testing.assert_allclose(basis.explained_variance, sv[:3] ** 2 / len(x), rtol=1e-9)
  np.testing.assert_array_equal(basis.mean, np.zeros(8))
  np.testing.assert_array_equal(basis.scale, np.ones(8))


def test_standardised_fit_is_the_pca_of_z_scores_and_whitens_to_unit_variance():
  x, _, _ = _anisotropic(20000, 8, 5)
  basis = CR.PCAAccumulator(8).update(x).finalize(4, fit='standardised')
  np.testing.assert_allclose(basis.mean, x.mean(0), atol=1e-9)
  np.testing.assert_allclose(basis.scale, x.std(0), rtol=1e-9)
  evals, evecs = np.linalg.eigh(np.corrcoef(x, rowvar=False))
  top = evecs[:, ::-1][:, :4]
  np.testing.assert_allclose(np.abs(np.sum(basis.components * top, 0)), 1.0, atol=1e-9)
  np.testing.assert_allclose(basis.explained_variance, evals[::-1][:4], rtol=1e-9)
  maps = CR.head_inputs(basis, CR.NORMS['standardise'])
  y = np.asarray(CR.pca_project(x.astype(np.float32), maps['mean'], maps['components']))
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-3)           # whitened components
  z = (x - maps['draw_mean']) / maps['draw_scale']                 # the training draw's input
  np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-3)
  # paper: the draw sees raw channels, the projection is the plain centred PCA
  paper = CR.PCAAccumulator(8).update(x).finalize(4)
  pm = CR.head_inputs(paper, CR.NORMS['paper'])
  np.testing.assert_array_equal(pm['draw_mean'], np.zeros(8, np.float32))
  np.testing.assert_array_equal(pm['draw_scale'], np.ones(8, np.float32))
  np.testing.assert_allclose(pm['components'], paper.components, atol=1e-7)
  with pytest.raises(ValueError, match='channel_norm'):
    CR.norm_of('whiten')


def _correlated(n, c, rank, seed):
  """Features with one shared positive factor (as mind's channels) plus ``rank - 1`` others."""
  rng = np.random.default_rng(seed)
  latent = rng.standard_normal((n, rank))
  mixing = rng.standard_normal((rank, c))
  mixing[0] = 2.0 + rng.random(c)              # every channel loads on the first factor
  x = latent @ mixing * rng.uniform(0.5, 3.0, c) + rng.uniform(-2, 2, c)
  return x.astype(np.float32)


def test_matched_inputs_are_scaled_rotated_pca_scores_with_a_draws_spectrum():
  c, cp = 12, 5
  x = _correlated(30000, c, 8, 11)
  basis = CR.PCAAccumulator(c).update(x).finalize(cp, fit='standardised')
  maps = CR.head_inputs(basis, CR.NORMS['matched'])
  y = np.asarray(CR.pca_project(x, maps['mean'], maps['components']), np.float64)
  z = (x - x.mean(0)) / x.std(0)
  # oracle: numpy's eigen-decomposition of the correlation matrix
  evals, evecs = np.linalg.eigh(np.corrcoef(x, rowvar=False))
  top_vals, top = evals[::-1][:cp], evecs[:, ::-1][:, :cp]
  # the inputs' covariance has the top-c' spectrum scaled by c'/c (an orthogonal mix of the
  # PCA scores), not unit variances as whitening gives
  np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(y, rowvar=False, bias=True))[::-1],
                             top_vals * cp / c, rtol=2e-3)
  # the inputs span the PCA subspace: regressing them on the numpy scores is exact
  scores = z @ top
  coef, *_ = np.linalg.lstsq(scores, y, rcond=None)
  np.testing.assert_allclose(scores @ coef, y, atol=2e-3 * np.abs(y).max())
  np.testing.assert_allclose(coef.T @ coef, np.eye(cp) * cp / c, atol=2e-4)
  # the sum of the inputs is the channel sum within the PCA subspace, scaled so that it is
  # c'/c of the channel sum (the mean over draws of a draw's sum, below) when the channel
  # sum lies in that subspace (here to 0.5 %)
  projected = (z @ top @ top.T).sum(1)
  in_span = np.linalg.norm(top.T @ np.ones(c)) / np.sqrt(c)
  assert 0.99 < in_span <= 1.0
  np.testing.assert_allclose(y.sum(1), projected * cp / c / in_span,
                             atol=2e-3 * np.abs(y.sum(1)).max())
  key, draws = jax.random.key(3), []
  for k in jax.random.split(key, 4000):
    draws.append(z[:200, np.asarray(CR.draw_channels(k, c, cp))].sum(1))
  np.testing.assert_allclose(np.mean(draws, 0), z[:200].sum(1) * cp / c,
                             atol=0.05 * np.abs(z[:200].sum(1)).max())
  # the training-time draw sees z-scored channels, as 'standardise'
  np.testing.assert_allclose(maps['draw_scale'], x.std(0), rtol=1e-4)


def test_draw_matching_mix_is_an_orthogonal_reflection_onto_the_ones_direction():
  rng = np.random.default_rng(2)
  comp, _ = np.linalg.qr(rng.standard_normal((9, 4)))
  h = CR.draw_matching_mix(comp)
  np.testing.assert_allclose(h @ h.T, np.eye(4), atol=1e-12)
  np.testing.assert_allclose(h, h.T, atol=1e-12)
  a = comp.T @ np.ones(9)
  np.testing.assert_allclose(h @ (a / np.linalg.norm(a)), np.full(4, 0.5), atol=1e-12)
  # components orthogonal to the channel sum: nothing to spread, no mix
  flat = np.zeros((4, 2))
  flat[0, 0], flat[1, 0], flat[2, 1], flat[3, 1] = 1, -1, 1, -1
  np.testing.assert_array_equal(CR.draw_matching_mix(flat / np.sqrt(2)), np.eye(2))


def test_selection_inputs_show_the_head_the_training_draw():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((50, 10)).astype(np.float32) * 3 + 1
  basis = CR.PCAAccumulator(10).update(x).finalize(4, fit='standardised')
  maps = CR.head_inputs(basis, CR.NORMS['standardise'])
  idx = np.array([7, 2, 9, 0])
  sel = CR.selection_inputs(maps, idx)
  got = np.asarray(CR.pca_project(x, sel['mean'], sel['components']))
  want = ((x - basis.mean) / basis.scale)[:, idx]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_old_basis_files_load_as_centred_fits():
  x, _, _ = _anisotropic(1000, 8, 7)
  d = CR.PCAAccumulator(8).update(x).finalize(3).to_dict()
  old = {k: d[k] for k in ('mean', 'components', 'explained_variance', 'n_samples')}
  back = CR.PCABasis.from_dict(old)
  assert back.fit == 'centred'
  np.testing.assert_array_equal(back.scale, np.ones(8))
  assert CR.PCABasis.from_dict(d).fit == 'centred'
