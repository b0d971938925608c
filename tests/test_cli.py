"""train.py / eval.py as users run them: absl flags, config overrides, exit codes, outputs
(Table 1 and the cross-domain Table 2 driver)."""
import os
import subprocess
import sys

from tests import synth

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


def test_train_and_eval_cli(tmp_path):
  store = synth.write_store(str(tmp_path / 'features'))
  cache = str(tmp_path / 'cache')
  workdir = str(tmp_path / 'run')
  r = _run(['train.py', '--config=configs/demo.py', f'--workdir={workdir}',
            f'--config.data.train_stores=("{store}",)'] + TINY, cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'trained to step 2' in r.stdout
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
  assert lines[-1].startswith('| demo | -CR |')          # configs/demo.py trains in -CR mode


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
