"""Multi-host training with two JAX processes on this machine (CPU collectives over Gloo), as
a user launches it: `train.py --coordinator=... --num_processes=2 --process_id=I`.

- Two processes with two CPU devices each train like one process with four devices and the
  same global batch: the same loss at every step (float tolerance), one run.json, one PCA
  basis, one validation log, TensorBoard from process 0 only.
- Killing one process stops the other with JAX's error within the heartbeat timeout;
  starting both again resumes from the last checkpoint and ends with the losses of an
  uninterrupted two-process run.
- eval.py launched on both processes evaluates once (process 0) and writes once.
"""
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fmir_jax.evaluate import report
from tests.helpers import synthetic_stores

# End to end: launches several processes that train (the unit run leaves it out: -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _train_cmd(store, workdir, *extra):
  return [sys.executable, 'train.py', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--config.data.train_stores=("{store}",)', '--config.feature_channels=4',
          '--config.model.n=4', '--config.model.levels=2', '--config.model.integration_steps=2',
          '--config.loss.ncc_windows=(5,3)', f'--config.train.num_steps={STEPS}',
          '--config.train.log_every=1', '--config.train.checkpoint_every=2',
          f'--config.train.eval_every={STEPS}', '--config.train.eval_pairs=2',
          '--config.data.prefetch=1', '--config.train.batch_size=4', *extra]


# One persistent compilation cache for every process of this module: the restarts in the
# kill test load the two-process programs the fixture compiled (train.py's own start-up
# path, as a user's JAX_COMPILATION_CACHE_DIR gives it; saves ~20 s of compiling).
_CACHE = {}


def _start(cmd, devices, log):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), **_CACHE)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _two(cmd_of, tmp_path, tag, *extra):
  """Starts processes 0 and 1 of a two-process run; returns their Popen objects and logs."""
  port = _port()
  procs, logs = [], []
  for pid in (0, 1):
    path = tmp_path / f'{tag}{pid}.log'
    logs.append(path)
    procs.append(_start(cmd_of(f'--coordinator=localhost:{port}', '--num_processes=2',
                               f'--process_id={pid}', *extra), 2, open(path, 'w')))
  return procs, logs


def _wait(procs, timeout=400):
  return [p.wait(timeout=timeout) for p in procs]


def _losses(workdir):
  """train/loss per step from the run's TensorBoard files."""
  scalars = report.tensorboard_scalars(os.path.join(workdir, 'tb')).get('train/loss', {})
  return {step: value for step, (_, value) in scalars.items()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One process x 4 devices and two processes x 2 devices, same global batch of 4."""
  tmp = tmp_path_factory.mktemp('multihost')
  _CACHE.update(JAX_COMPILATION_CACHE_DIR=str(tmp / 'jax_cache'),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  store = synthetic_stores.write_store(str(tmp / 'features'))
  one = _start(_train_cmd(store, tmp / 'one'), 4, open(tmp / 'one.log', 'w'))
  procs, logs = _two(lambda *a: _train_cmd(store, tmp / 'two', *a), tmp, 'two')
  rcs = _wait([one] + procs)
  assert rcs == [0, 0, 0], [open(p).read()[-3000:] for p in [tmp / 'one.log'] + logs]
  return tmp, store


def test_two_processes_train_like_one_with_four_devices(runs):
  tmp, _ = runs
  one, two = _losses(tmp / 'one'), _losses(tmp / 'two')
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
  assert one[STEPS] < one[1]                                     # it learns
  # written once: one validation record per validation, one PCA basis, TensorBoard of
  # process 0 only; checkpoints of every saved step
  val = open(tmp / 'two' / 'val.jsonl').read().splitlines()
  assert len(val) == 1 and '"step": 6' in val[0]
  assert len(os.listdir(tmp / 'two' / 'pca')) == 1
  assert len(glob.glob(str(tmp / 'two' / 'tb' / '*'))) == 1
  assert sorted(os.listdir(tmp / 'two' / 'checkpoints')) == ['2', '4', '6']
  import json
  v1, v2 = (json.loads(open(tmp / r / 'val.jsonl').read()) for r in ('one', 'two'))
  np.testing.assert_allclose(v2['dice'], v1['dice'], rtol=1e-6)


def test_a_killed_process_stops_the_other_and_both_resume(runs, tmp_path):
  tmp, store = runs
  work = tmp_path / 'killed'
  procs, logs = _two(lambda *a: _train_cmd(store, work, *a), tmp_path, 'k',
                     '--heartbeat_timeout=10')
  deadline = time.time() + 300
  while not (work / 'checkpoints' / '4').is_dir():
    assert time.time() < deadline and procs[0].poll() is None, open(logs[0]).read()[-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  t_kill = time.time()
  rc0 = procs[0].wait(timeout=120)
  assert rc0 != 0 and time.time() - t_kill < 60
  assert 'another task died' in open(logs[0]).read()
  # restart both: resume from the last checkpoint, end like the uninterrupted run
  procs, logs = _two(lambda *a: _train_cmd(store, work, *a), tmp_path, 'r')
  assert _wait(procs) == [0, 0], open(logs[0]).read()[-3000:]
  assert 'resumed from step' in open(logs[0]).read()
  done, ref = _losses(work), _losses(tmp / 'two')
  for step in range(5, STEPS + 1):
    assert abs(done[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, done[step], ref[step])


def test_eval_on_two_processes_evaluates_once(runs):
  tmp, store = runs
  out = tmp / 'eval2'
  procs, logs = _two(lambda *a: [sys.executable, 'eval.py', f'--workdir={tmp / "two"}',
                                 f'--features={store}', '--split=val', '--figures=0',
                                 f'--out={out}', *a], tmp, 'e')
  assert _wait(procs) == [0, 0], [open(p).read()[-2000:] for p in logs]
  assert 'evaluation runs on process 0' in open(logs[1]).read()
  assert (out / 'summary.json').is_file() and (out / 'pairs.csv').is_file()
