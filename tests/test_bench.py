"""bench/: the PyTorch reference equals the JAX model for the same weights (displacement,
per-level fields, loss and a gradient), and a smoke run of bench/run.py writes finite JSON."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bench import common
from bench import torch_fmir
from fmir_jax.model import network as model_lib
from fmir_jax.train import step as step_lib
from tests.helpers import oracles

# End to end: runs the benchmarks at smoke size (the unit run leaves it out: -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = common.Case('t', (12, 10, 6), (3, 3), (0.0, 0.0), (2.0, 2.0), (2, 2, 1), channels=6,
                   c_prime=5, n=3, levels=3, steps=3, patch_size=8)


def _models(exact: bool):
  cfg = model_lib.FMIRConfig(feature_channels=CASE.c_prime, n=CASE.n, levels=CASE.levels,
                             factors=CASE.factors, integration_steps=CASE.steps,
                             exact_feature_path=exact)
  # 'rbg' keys: eager threefry init draws cost ~2 s of compile per conv shape on CPU.
  rngs = nnx.Rngs(jax.random.key(3, impl='rbg'))
  graphdef, params = nnx.split(model_lib.FMIR(cfg, rngs=rngs), nnx.Param)
  # Scale each level's flow conv so that the displacements are a few voxels (default init
  # gives ~0.1 voxel, which would leave the warps nearly untested).
  for i in range(CASE.levels):
    p = params['blocks'][i]['flow']
    p['kernel'].set_value(p['kernel'].get_value() * 40.0)
    p['bias'].set_value(jnp.asarray([0.8, -0.6, 0.3]))
  tm = torch_fmir.TorchFMIR(CASE.c_prime, CASE.n, CASE.levels, CASE.factors, CASE.steps)
  torch_fmir.load_jax_params(tm, params)
  return graphdef, params, tm


def _inputs():
  batch = common.pair_batch(CASE, seed=5, channels=CASE.c_prime)
  jx = {r: {k: jnp.asarray(np.asarray(batch[r][k], np.float32))
            for k in ('image', 'feat', 'interp_h', 'interp_w')} for r in batch}
  th = {r: torch_fmir.to_torch(batch[r]) for r in batch}
  return jx, th


def _cl(t: torch.Tensor) -> np.ndarray:
  """torch (B, C, H, W, D) -> numpy (B, H, W, D, C)."""
  return t.detach().numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize('exact', [True, False])
def test_torch_reference_equals_jax_model(exact):
  graphdef, params, tm = _models(exact)
  jx, th = _inputs()
  out = jax.jit(lambda p, m, f: nnx.merge(graphdef, p)(m, f))(params, jx['moving'], jx['fixed'])
  with torch.no_grad():
    disp, v_levels, u_levels = tm(th['moving'], th['fixed'])
  d_jax = np.asarray(out.disp)
  assert d_jax.shape == (1, *CASE.shape, 3)
  assert 0.5 < np.abs(d_jax).max() < 8.0        # real, in-volume displacements
  np.testing.assert_allclose(_cl(disp), d_jax, atol=2e-4 * np.abs(d_jax).max())
  for i in range(CASE.levels):
    np.testing.assert_allclose(_cl(v_levels[i]), np.asarray(out.v_levels[i]), rtol=1e-4,
                               atol=1e-4 * np.abs(np.asarray(out.v_levels[i])).max())
    np.testing.assert_allclose(_cl(u_levels[i]), np.asarray(out.u_levels[i]), rtol=1e-4,
                               atol=2e-4 * np.abs(np.asarray(out.u_levels[i])).max())


def test_torch_loss_and_gradient_equal_jax():
  graphdef, params, tm = _models(True)
  jx, th = _inputs()
  spec = step_lib.LossSpec(windows=(5, 3, 3), blur_in_plane_only=True)

  def loss_fn(p):
    out = nnx.merge(graphdef, p)(jx['moving'], jx['fixed'])
    return step_lib.registration_loss(out, jx['moving'], jx['fixed'], spec)[0]

  loss_j, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  loss_t = torch_fmir.registration_loss(tm, tm(th['moving'], th['fixed']), th['moving'],
                                        th['fixed'], windows=(5, 3, 3), in_plane_only=True)
  loss_t.backward()
  np.testing.assert_allclose(float(loss_t.detach()), float(loss_j), rtol=1e-4)
  for name, conv in (('conv0', tm.compressor.conv0), ('conv2', tm.compressor.conv2)):
    g_j = np.asarray(grads['compressor'][name]['kernel'].get_value()).transpose(4, 3, 0, 1, 2)
    g_t = conv.weight.grad.numpy()
    np.testing.assert_allclose(g_t, g_j, rtol=1e-3, atol=1e-3 * np.abs(g_j).max())


def test_torch_warp_matches_scipy():
  """grid_sample convention check against scipy's trilinear map_coordinates."""
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(5, 6, 4)).astype(np.float32)
  disp = rng.uniform(-1.5, 1.5, size=(3, 5, 6, 4)).astype(np.float32)
  got = torch_fmir.warp(torch.from_numpy(vol)[None, None], torch.from_numpy(disp)[None])
  want = oracles.warp(vol, np.moveaxis(disp, 0, -1), coord_dtype=np.float32)
  np.testing.assert_allclose(got[0, 0].numpy(), want, atol=1e-5)


def test_smoke_run_writes_finite_json(tmp_path):
  path = tmp_path / 'smoke.json'
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'run.py'), '--suite',
                      'smoke', '--json', str(path)], capture_output=True, text=True,
                     cwd=ROOT, timeout=300, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  res = json.loads(path.read_text())
  assert 'torch/jax_exact' in r.stdout
  per = res['cases']['smoke']
  for impl in ('jax_exact', 'jax_straight', 'torch'):
    for what in ('infer', 'train'):
      s = per[impl][what]
      assert math.isfinite(s['median_s']) and s['median_s'] > 0, (impl, what, s)
      assert s['peak_host_bytes'] > 1e7
    assert math.isfinite(per[impl]['train']['loss'])
  for impl in ('jax_exact', 'jax_straight'):
    for what in ('infer', 'train'):
      s = per[impl][what]
      assert s['compile_s'] > 0 and s['flops'] > 0 and s['flop_per_s'] > 0
  for key, value in res['ratios']['smoke'].items():
    assert math.isfinite(value) and value > 0, key
  assert res['store_read']['pairs_per_s'] > 0
  assert res['store_read']['read_over_train'] > 0
  assert res['extract']['slices_per_s'] > 0
  assert len(res['load_average_start']) == 3


def test_corner_by_corner_warp_matches_scipy(monkeypatch):
  """The memory-bounded warp branch (used for large maps) against scipy, with its gradient
  equal to the one-gather branch's."""
  from fmir_jax.ops import warp as W
  rng = np.random.default_rng(2)
  vol = rng.normal(size=(1, 7, 6, 5, 2)).astype(np.float32)
  disp = rng.uniform(-2.0, 2.0, size=(1, 7, 6, 5, 3)).astype(np.float32)
  grad_one = jax.grad(lambda v, d: jnp.sum(W._warp_batched(v, d) ** 2), (0, 1))(vol, disp)  # pylint: disable=protected-access
  monkeypatch.setattr(W, '_ONE_GATHER_MAX_BYTES', 0)
  got = np.asarray(W._warp_batched(jnp.asarray(vol), jnp.asarray(disp)))  # pylint: disable=protected-access
  want = oracles.warp(vol[0], disp[0], coord_dtype=np.float32)
  for ch in range(2):
    np.testing.assert_allclose(got[0, ..., ch], want[..., ch], atol=1e-5)
  grad_loop = jax.grad(lambda v, d: jnp.sum(W._warp_batched(v, d) ** 2), (0, 1))(vol, disp)  # pylint: disable=protected-access
  for a, b in zip(grad_one, grad_loop):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_the_register_profile_prints_the_stages_of_its_batch(tmp_path, capsys):
  """bench/register_profile.py on two smoke pairs: its medians are those of the batch's
  summary.json (the second pair's report), and the write stage's parts are its whole."""
  from bench import register_profile
  out = tmp_path / 'prof'
  assert register_profile.main(['--smoke', '--pairs', '2', '--out', str(out)]) == 0
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = json.loads((out / 'runs' / 'summary.json').read_text())['rows']
  assert len(rows) == 2 and all(r['status'] == 'ok' for r in rows)
  second = rows[1]
  for k in register_profile.STAGES:
    assert res['median_s'][k] == pytest.approx(second[k])
  assert second['write_s'] == pytest.approx(
      second['write_resample_s'] + second['write_metrics_s'] + second['write_files_s'])
  assert res['total_s'] == pytest.approx(sum(second[k] for k in register_profile.STAGES))
  assert res['median_s']['head_s'] > 0 and res['route'] == 'head'



@pytest.mark.slow
def test_the_head_profile_times_pieces_that_are_the_forward(tmp_path, capsys):
  """bench/head_profile.py at smoke size: its pieces, run one after another, give the whole
  forward's field, and each convolution row's multiply-adds are the closed form
  27 x cin x cout per voxel (two volumes for the compressor)."""
  from bench import head_profile
  assert head_profile.main(['--smoke', '--set', 'cardiac', '--repeats', '1',
                            '--out', str(tmp_path)]) == 0
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert res['pieces_error_vox'] < 1e-4
  n, c, levels, start = res['n'], res['feature_channels'], res['levels'], res['finest_level']
  rows = {r['piece']: r for r in res['rows']}
  voxels = [int(np.prod(s)) for s in res['level_shapes']]
  assert res['level_shapes'][0] == res['shape']
  per_voxel = 27 * ((c + 1) * n + n * 2 * n + 2 * n * n)
  assert rows[f'compressor, level {start}, both volumes']['macs'] == \
      2 * per_voxel * voxels[start]
  blocks = [r for name, r in rows.items() if ': block ' in name]
  assert len(blocks) == levels - start          # the shipped head starts at level 1
  first = next(r for name, r in rows.items() if name.startswith(f'level {start}: block'))
  assert first['macs'] == 27 * (2 * n * 2 * n + 2 * n * 27 + 27 * 3) * voxels[start]
  assert all(r['s'] > 0 for r in res['rows'])


@pytest.mark.slow
def test_the_track_bench_scores_a_cine_against_the_phantoms_truth(tmp_path, capsys):
  """bench/track_bench.py at a tiny size: one row per route, the truth's EF the closed form
  of the phantom's own LV volumes (ED frame and the smallest), the tracked EF finite."""
  from bench import track_bench
  from feature_extract.synthetic import phantoms
  assert track_bench.main(['--shape', '32,32,8', '--patients', '1', '--routes', 'head',
                           '--out', str(tmp_path)]) == 0
  (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  p = phantoms.draw_acdc_phantom(101, 0, (112, 144))
  lv = track_bench.true_lv_ml(p)
  assert row['true_ef'] == pytest.approx(100 * (lv[p.ed_frame - 1] - lv.min())
                                         / lv[p.ed_frame - 1])
  assert row['frames'] == phantoms.n_frames(p) and row['true_es'] == p.es_frame
  assert 0 < row['ef'] < 100 and row['s_per_frame'] > 0
