"""Training: modes run, loss goes down, kill-and-resume equals an uninterrupted run (also
past a corrupt checkpoint), sharded (2 host devices) step equals the single-device step, NaN
stops cleanly, a killed run keeps its TensorBoard scalars; evaluation reads a run without
writing to it."""
import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import demo
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import runs
from fmir_jax.train import run_file
from fmir_jax.train import data as data_lib
from fmir_jax.evaluate import evaluation
from fmir_jax.evaluate import report
from fmir_jax.model import inference
from fmir_jax.train import state as state_lib
from fmir_jax.train import loop
from fmir_jax.train import plan as plan_lib
from tests.helpers import synthetic_stores
from tests.helpers.tiny_model import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def store_dir(tmp_path_factory):
  return synthetic_stores.write_store(str(tmp_path_factory.mktemp('store') / 'features'))


@pytest.fixture(scope='module')
def full_run(store_dir, tmp_path_factory):
  """An uninterrupted tiny run (6 steps, checkpoints 2, 4, 6, validated at 6); read only."""
  return loop.train_and_evaluate(tiny_config(store_dir),
                                    str(tmp_path_factory.mktemp('full') / 'run'), quiet=True)


def _params(workdir, step, cfg):
  _, state, _, _ = state_lib.create(cfg, 6, 6)
  last, _ = ckpt.managers(workdir, 3, read_only=True)
  return jax.tree.map(np.asarray, ckpt.restore(last, state, step).params)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(store_dir, full_run, tmp_path, caplog):
  """Killed after 4 steps while saving step 4: that checkpoint is corrupt. The resume warns,
  sets it aside, redoes steps 3-6 from step 2 and saves step 4 again, as the full run did."""
  from tests.test_checkpoint import corrupt
  cfg = tiny_config(store_dir)
  full = full_run
  assert sorted(full.losses) == [1, 2, 3, 4, 5, 6]
  assert full.val_dice and all(np.isfinite(list(full.val_dice.values())))
  cut = str(tmp_path / 'cut')
  part = loop.train_and_evaluate(cfg, cut, stop_after_steps=4, quiet=True)
  assert part.step == 4
  corrupt(os.path.join(cut, 'checkpoints', '4'))
  with caplog.at_level(logging.WARNING):
    resumed = loop.train_and_evaluate(cfg, cut, quiet=True)
  warned = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(warned) == 1 and os.path.join(cut, 'checkpoints', '4') in warned[0]
  assert 'resuming from step 2' in warned[0]
  assert sorted(resumed.losses) == [3, 4, 5, 6]
  for s in (3, 4, 5, 6):
    np.testing.assert_allclose(resumed.losses[s], full.losses[s], rtol=1e-5)
  for s in (3, 4):
    np.testing.assert_allclose(part.losses[s], full.losses[s], rtol=1e-5)
  # The corrupt folder is kept aside; steps 4 and 6 were saved again and restore.
  assert os.listdir(os.path.join(cut, ckpt.SET_ASIDE_DIR, '4', 'default'))
  assert sorted(os.listdir(os.path.join(cut, 'checkpoints'))) == ['2', '4', '6']
  for step in (4, 6):
    want = jax.tree.leaves(_params(full.workdir, step, cfg))
    for a, b in zip(jax.tree.leaves(_params(cut, step, cfg)), want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _walk(root):
  return sorted((os.path.relpath(d, root), sorted(ds), sorted(fs)) for d, ds, fs in os.walk(root))


@pytest.mark.slow
def test_evaluation_reads_a_run_without_writing_to_it(store_dir, full_run, tmp_path):
  """eval.py / fmir register on a run without best/ (never validated): nothing appears."""
  run = str(tmp_path / 'run')
  shutil.copytree(full_run.workdir, run,
                  ignore=lambda d, names: ['best'] if d == full_run.workdir else [])
  before = _walk(run)
  summary = evaluation.evaluate_run(run, store_dir, split='test', checkpoint='last',
                                    out_dir=str(tmp_path / 'out'), figures=0, limit=1)
  assert summary.checkpoint_step == 6
  assert _walk(run) == before                   # no empty best/ (nor checkpoints/) created
  assert runs.load_run(run, 'latest', flag=None).step == 6
  with pytest.raises(ckpt.RunError, match=r"'latest'\), or one of the saved steps \[2, 4, 6\]"):
    runs.load_run(run, 'foo', flag=None)
  assert _walk(run) == before


@pytest.mark.slow
def test_a_damaged_pca_file_is_refitted_by_the_command_its_error_gives(store_dir, full_run,
                                                                        tmp_path):
  run = str(tmp_path / 'run')
  shutil.copytree(full_run.workdir, run)
  st = plan_lib.open_stores([store_dir])[0]
  path = run_file.pca_path(run, st.header)
  want = dict(np.load(path))
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ckpt.RunError, match='--features=STORE --pca_store=TRAIN_STORE'):
    evaluation.pca_for_store(run, run_file.read_run_info(run), st)
  # The fix it names: delete the file, eval.py --pca_store=<the training store> refits it.
  os.remove(path)
  evaluation.pca_for_store(run, run_file.read_run_info(run), st, pca_store_path=store_dir)
  got = dict(np.load(path))
  for k in ('mean', 'components', 'explained_variance', 'n_samples'):
    np.testing.assert_array_equal(got[k], want[k])


def _tb_scalars(path):
  """{tag: {step: value}} of a TensorBoard event file (``report.tensorboard_scalars``)."""
  return {tag: {step: v for step, (_, v) in d.items()}
          for tag, d in report.tensorboard_scalars(path).items()}


@pytest.mark.slow
def test_a_killed_run_keeps_its_tensorboard_scalars(store_dir, full_run, tmp_path):
  """SIGKILL at the start of step 5 (as a preemption would): the event file holds the logged
  losses of the steps before (the newest log step may still be in tensorboardX's queue)."""
  workdir = str(tmp_path / 'killed')
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {ROOT!r})
      import jax
      jax.config.update('jax_compilation_cache_dir', {jax.config.jax_compilation_cache_dir!r})
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
      from tests.helpers.tiny_model import tiny_config
      from fmir_jax.train import data as data_lib, loop
      real = data_lib.train_batches
      def killed(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
          if kwargs['start_step'] + i == 4:
            os.kill(os.getpid(), signal.SIGKILL)
          yield batch
      data_lib.train_batches = killed
      loop.train_and_evaluate(tiny_config({store_dir!r}), {workdir!r}, quiet=True)
      """)
  r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  assert r.returncode == -9, r.stderr[-3000:]
  (events,) = glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  losses = _tb_scalars(events).get('train/loss', {})
  assert {1, 2, 3} <= set(losses), losses
  for step in (1, 2, 3):
    np.testing.assert_allclose(losses[step], full_run.losses[step], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['WS'])   # UN: the resume test; -CR: tests/test_demo.py
def test_modes_train_and_lower_the_loss(store_dir, tmp_path, mode):
  cfg = tiny_config(store_dir, num_steps=12, eval_every=12, checkpoint_every=12)
  cfg.mode = mode
  res = loop.train_and_evaluate(cfg, str(tmp_path / mode), quiet=True)
  first = np.mean([res.losses[s] for s in (1, 2, 3)])
  last = np.mean([res.losses[s] for s in (10, 11, 12)])
  assert last < first, (mode, res.losses)


@pytest.mark.slow
def test_non_finite_stops_with_last_good_state(store_dir, tmp_path, monkeypatch):
  cfg = tiny_config(store_dir)       # the same program as the resume test (compile cache)
  real = data_lib.train_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if kwargs['start_step'] + i == 2:          # the third step sees a NaN voxel
        batch['moving']['image'][0, 3, 3, 1] = np.nan
      yield batch

  monkeypatch.setattr(data_lib, 'train_batches', poisoned)
  with pytest.raises(FloatingPointError, match='last good state') as err:
    loop.train_and_evaluate(cfg, str(tmp_path / 'nan'), quiet=True)
  assert 'step 3' in str(err.value)
  graphdef, state, _, _ = state_lib.create(cfg, 6, 6)
  last, _ = ckpt.managers(str(tmp_path / 'nan'), 3)
  assert last.latest_step() == 2                  # the state after the last good step
  restored = ckpt.restore(last, state)
  assert int(restored.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.params))


@pytest.mark.slow
def test_sharded_step_equals_single_device(store_dir):
  script = textwrap.dedent(f"""
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
      import sys; sys.path.insert(0, {ROOT!r})
      import jax, numpy as np
      from tests.helpers.tiny_model import tiny_config
      from fmir_jax.train import data as data_lib, distributed, loop, plan as plan_lib, state as state_lib
      from fmir_jax.train import step as step_lib
      assert len(jax.devices()) == 2
      cfg = tiny_config({store_dir!r}, batch_size=2)
      stores = plan_lib.open_stores([{store_dir!r}])
      graphdef, state, tx, _ = state_lib.create(cfg, 6, 4)
      spec = step_lib.LossSpec.from_config(cfg, 'UN')
      batch = next(data_lib.train_batches(stores, batch_size=2, seed=0, start_step=0,
                                          num_steps=1, prefetch=1))
      assert int(batch.pop('store')) == 0
      out = {{}}
      for n in (1, 2):
        mesh = distributed.make_mesh(jax.devices()[:n])
        step = step_lib.make_train_step(graphdef, tx, spec, c_prime=4, mode='UN', mesh=mesh)
        s = jax.tree.map(lambda x: x.copy(), state)
        new, metrics, finite = step(s, step_lib.shard_batch(batch, mesh), None)
        out[n] = (float(metrics['loss']), jax.tree.map(np.asarray, new.params))
      assert abs(out[1][0] - out[2][0]) <= 1e-5 * abs(out[1][0]), out
      for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[2][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
      print('SHARDED_OK', out[1][0], out[2][0])
      """)
  r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                     cwd=ROOT, timeout=600)
  assert 'SHARDED_OK' in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_hybrid_stores_with_their_own_factors_and_labels(store_dir, tmp_path):
  """Hybrid training (configs/hybrid.py): a cardiac-like store with (2,2,1) and an
  abdomen-like store of another grid with (2,2,2), one compiled step per store."""
  other = synthetic_stores.write_store(str(tmp_path / 'abd'), shape=(12, 12, 8), seed=3)
  cfg = tiny_config(store_dir, num_steps=4, eval_every=4, checkpoint_every=4)
  cfg.data.train_stores = (store_dir, other)
  import ml_collections
  cfg.data.per_store = ml_collections.ConfigDict({
      'factors': ((2, 2, 1), (2, 2, 2)), 'num_classes': (3, 3),
      'blur_in_plane_only': (True, False)})
  res = loop.train_and_evaluate(cfg, str(tmp_path / 'hyb'), quiet=True)
  assert sorted(res.losses) == [1, 2, 3, 4] and all(np.isfinite(list(res.losses.values())))
  assert np.isfinite(res.val_dice[4])
  info = run_file.read_run_info(str(tmp_path / 'hyb'))
  assert [s['factors'] for s in info['store_settings']] == [[2, 2, 1], [2, 2, 2]]
  # eval.py's library call picks the (2,2,2) factors for the second store's grid.
  summary = evaluation.evaluate_run(str(tmp_path / 'hyb'), other, split='test', figures=0,
                                    checkpoint='last')
  assert summary.n_directed_pairs == 2 and np.isfinite(summary.metrics['dice_mean']['mean'])


def test_per_store_settings_must_match_the_stores(store_dir, tmp_path):
  import ml_collections
  cfg = tiny_config(store_dir)
  cfg.data.per_store = ml_collections.ConfigDict({
      'factors': ((2, 2, 1), (2, 2, 2)), 'num_classes': (3, 13),
      'blur_in_plane_only': (True, False)})
  with pytest.raises(ValueError, match='one per data.train_stores entry'):
    loop.train_and_evaluate(cfg, str(tmp_path / 'bad'), quiet=True)


def test_channel_norm_override_must_share_the_runs_pca_fit():
  from fmir_jax.model import channel_reg
  c = demo.get_config()
  c.channel_norm = 'matched'
  assert inference.channel_norm(c) == channel_reg.NORMS['matched']
  assert inference.channel_norm(c, 'standardise') == channel_reg.NORMS['standardise']
  with pytest.raises(ValueError, match=r"runs/x was trained with matched \(standardised\); "
                                       r"use one of \['matched', 'standardise'\]"):
    inference.channel_norm(c, 'paper', run='runs/x')
  with pytest.raises(ValueError, match='unknown channel_norm'):
    inference.channel_norm(c, 'whiten')
  del c['channel_norm']            # runs from before the field: 'paper'
  assert inference.channel_norm(c) == channel_reg.NORMS['paper']
