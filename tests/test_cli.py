"""train.py / eval.py as users run them: absl flags, config overrides, exit codes, outputs
(Table 1 and the cross-domain Table 2 driver)."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import synthetic_stores

# End to end: trains and evaluates through train.py / eval.py processes (the unit run leaves it out: -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.feature_channels=4', '--config.model.n=4', '--config.model.levels=2',
        '--config.model.integration_steps=2', '--config.loss.ncc_windows=(5,3)',
        '--config.train.num_steps=2', '--config.train.eval_every=2',
        '--config.train.checkpoint_every=2', '--config.train.eval_pairs=2',
        '--config.data.prefetch=1']


def _run(args, cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """(store, workdir, cache) of a 4-step run trained by train.py (checkpoints 2 and 4); tests
  copy it to change it."""
  tmp_path = tmp_path_factory.mktemp('cli')
  store = synthetic_stores.write_store(str(tmp_path / 'features'))
  cache = str(tmp_path / 'cache')
  workdir = str(tmp_path / 'run')
  r = _run(['train.py', '--config=configs/demo.py', f'--workdir={workdir}',
            f'--config.data.train_stores=("{store}",)'] + TINY + ['--config.train.num_steps=4'],
           cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'trained to step 4' in r.stdout
  return store, workdir, cache


def test_train_and_eval_cli(cli_run, tmp_path):
  store, workdir, cache = cli_run
  assert os.path.exists(os.path.join(workdir, 'run.json'))
  assert os.listdir(os.path.join(workdir, 'tb'))            # TensorBoard event files

  out = str(tmp_path / 'eval')
  table2 = str(tmp_path / 'table2.md')
  r = _run(['eval.py', f'--workdir={workdir}', f'--features={store}', '--split=test',
            f'--out={out}', '--figures=1', f'--table2={table2}'], cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '| Initial |' in r.stdout
  for name in ('pairs.csv', 'summary.json', 'table1.md', 'dice_boxplot.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  lines = open(table2).read().splitlines()
  assert lines[0].startswith('| Train Set | Mode | synthetic Dice (%)')
  assert lines[-1].startswith('| synthetic | -CR |')     # rows: the training store's dataset


def test_bad_store_and_unsupported_config_exit_2(tmp_path):
  r = _run(['train.py', '--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
            f'--config.data.train_stores=("{tmp_path / "missing"}",)'], str(tmp_path / 'c'))
  assert r.returncode == 2 and 'does not exist' in r.stderr
  r = _run(['train.py', '--config=configs/hybrid.py', f'--workdir={tmp_path / "h"}'],
           str(tmp_path / 'c'))
  assert r.returncode == 2 and 'no feature store given' in r.stderr
  r = _run(['eval.py', f'--workdir={tmp_path / "nothing"}', f'--features={tmp_path}'],
           str(tmp_path / 'c'))
  assert r.returncode == 2 and 'error:' in r.stderr


def _one_line_error(r, *parts):
  """Exit status 2, and stderr's last line is one 'error: ...' naming every part."""
  assert r.returncode == 2, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), r.stderr[-3000:]
  for p in parts:
    assert p in last, (p, last)
  return last


def test_user_errors_exit_2_with_one_line(cli_run, tmp_path):
  """Unusable output paths, a corrupt checkpoint: one line naming the path and the fix."""
  from tests.test_checkpoint import corrupt
  store, trained, cache = cli_run
  a_file = tmp_path / 'file.txt'
  a_file.write_text('not a directory')
  train = ['train.py', '--config=configs/demo.py', f'--config.data.train_stores=("{store}",)']
  r = _run(train + [f'--workdir={a_file}'] + TINY, cache)
  _one_line_error(r, f'--workdir={a_file}', 'is a file, not a directory')
  r = _run(['eval.py', f'--workdir={trained}', f'--features={store}', f'--out={a_file}/sub'],
           cache)
  _one_line_error(r, f'{a_file}/sub', 'is a file, not a directory', '--out=DIR')

  run = str(tmp_path / 'run')
  shutil.copytree(trained, run)
  corrupt(os.path.join(run, 'checkpoints', '4'))
  r = _run(['eval.py', f'--workdir={run}', f'--features={store}', '--checkpoint=latest',
            f'--out={tmp_path / "out"}'], cache)
  _one_line_error(r, os.path.join(run, 'checkpoints', '4'), 'cannot be restored',
                  '--checkpoint=STEP', 'one of [2]')
  # Resume with no checkpoint that restores: exit 2, the corrupt folders stay where they were.
  corrupt(os.path.join(run, 'checkpoints', '2'))
  r = _run(train + [f'--workdir={run}'] + TINY + ['--config.train.num_steps=4'], cache)
  _one_line_error(r, f'no checkpoint in {os.path.join(run, "checkpoints")} can be restored',
                  'new --workdir')
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['2', '4']
  assert not os.path.exists(os.path.join(run, 'corrupt_checkpoints'))
