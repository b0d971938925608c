"""Faults on the training side (issue 30, item 11): a misspelt config field, config values out
of range and flag errors are one line ``error: ...`` with exit status 2, before anything is
written or compiled; a genuine bug still raises with its traceback."""
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from fmir_jax.core import entry
from fmir_jax.core import errors
from fmir_jax.train import step as step_lib
from fmir_jax.train import checks
from fmir_jax.train import loop
from fmir_jax.train import plan as plan_lib
from tests.helpers import synthetic_stores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'configs', 'demo.py')


@pytest.fixture(scope='module')
def store_dir(tmp_path_factory):
  return synthetic_stores.write_store(str(tmp_path_factory.mktemp('store') / 'features'))


def _train(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'train.py', f'--config={DEMO}'] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(r, *parts):
  """Exit status 2 and stderr is exactly one line 'error: ...' naming every part."""
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
  for p in parts:
    assert p in lines[0], (p, lines[0])
  return lines[0]


# ------------------------------------------------------------------ train.py as users run it

@pytest.mark.slow
def test_a_misspelt_config_field_is_one_line_with_the_close_match(tmp_path):
  """ml_collections raised AttributeError with a 40-line traceback (exit 1)."""
  workdir = tmp_path / 'w'
  r = _train([f'--workdir={workdir}', '--config.train.nmu_steps=2'], tmp_path)
  _one_line_error(r, '--config.train.nmu_steps=2', 'no field train.nmu_steps',
                  'did you mean --config.train.num_steps?')
  assert not workdir.exists()


def test_a_config_value_out_of_range_stops_before_anything_is_written(store_dir, tmp_path):
  """num_steps=-5 trained nothing and exited 0; the store is fine, only the value is wrong."""
  workdir = tmp_path / 'w'
  r = _train([f'--workdir={workdir}', f'--config.data.train_stores=("{store_dir}",)',
              '--config.train.num_steps=-5'], tmp_path)
  _one_line_error(r, '--config.train.num_steps=-5', 'an integer >= 0')
  assert not workdir.exists()


@pytest.mark.slow
def test_a_genuine_bug_keeps_its_traceback(store_dir, tmp_path):
  """A plain ValueError from inside the training path is not a user error: train.main lets
  it through (traceback, exit 1), it does not turn it into 'error: ...' and exit 2."""
  workdir = tmp_path / 'w'
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {ROOT!r})
      sys.argv = ['train.py', '--config={DEMO}', '--workdir={workdir}',
                  '--config.data.train_stores=("{store_dir}",)']
      import train
      from fmir_jax.core import entry
      from fmir_jax.train import state as state_lib
      def planted(*args, **kwargs):
        raise ValueError('planted bug')
      state_lib.create = planted
      entry.run_absl(train.main)
      """)
  r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
  assert 'Traceback (most recent call last)' in r.stderr
  assert r.stderr.strip().splitlines()[-1] == 'ValueError: planted bug'
  assert 'error: ' not in r.stderr
  assert 'in train_and_evaluate' in r.stderr       # raised deep in the library, not in main


# ------------------------------------------------------------------- flag parsing (in process)

@pytest.fixture
def flag_values():
  """Fresh flags as train.py defines them (a config file flag, a required --workdir)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory', flag_values=fv)
  flags.DEFINE_integer('stop_after_steps', 0, 'steps', lower_bound=0, flag_values=fv)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=fv)
  return fv


def _parse(fv, argv, monkeypatch):
  monkeypatch.setattr(sys, 'argv', argv)     # ml_collections reads its overrides there
  return entry.parse_flags(argv, fv)


def _parse_fails(fv, args, capsys, monkeypatch):
  with pytest.raises(SystemExit) as exit_info:
    _parse(fv, ['train.py'] + args, monkeypatch)
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2, err
  assert len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


@pytest.mark.parametrize('args,parts', [
    (['--workdir=w', '--bogus'], ["Unknown command line flag 'bogus'"]),
    ([f'--config={DEMO}'], ['--workdir must have a value other than None']),
    ([f'--config={DEMO}', '--workdir=w', '--stop_after_steps=x'],
     ['--stop_after_steps=x', 'invalid literal']),
    ([f'--config={DEMO}', '--workdir=w', '--stop_after_steps=-1'],
     ['--stop_after_steps=-1', 'not a non-negative integer']),
    ([f'--config={DEMO}', '--workdir=w', '--config.train.num_steps=abc'],
     ['--config.train.num_steps=abc', 'invalid literal for int()']),
    (['--config=configs/nope.py', '--workdir=w'],
     ['--config=configs/nope.py: no such config file']),
    ([f'--config={DEMO}', '--workdir=w', '--config.trian.num_steps=2'],
     ['--config.trian.num_steps=2', 'no field trian', 'did you mean --config.train?']),
    ([f'--config={DEMO}', '--workdir=w', '--config.num_steps=2'],
     ['no field num_steps', 'did you mean --config.train.num_steps?']),
    ([f'--config={DEMO}', '--workdir=w', '--config.zzzz=1'],
     ['no field zzzz', 'its top-level fields are channel_norm, data,']),
    ([f'--config={DEMO}', '--workdir=w', '--config.train.num_steps.x=1'],
     ['train.num_steps is a value (100)', 'override --config.train.num_steps itself']),
])
def test_flag_errors_exit_2_with_one_line(flag_values, capsys, monkeypatch, args, parts):
  line = _parse_fails(flag_values, args, capsys, monkeypatch)
  for p in parts:
    assert p in line, (p, line)


def test_good_flags_parse_and_a_config_file_bug_is_not_a_flag_error(flag_values, tmp_path,
                                                                      monkeypatch):
  rest = _parse(flag_values, ['train.py', f'--config={DEMO}', '--workdir=w',
                              '--config.train.num_steps=7', 'extra'], monkeypatch)
  assert rest == ['train.py', 'extra']
  assert flag_values.config.train.num_steps == 7
  # A config file whose get_config() has a bug (KeyError): its own traceback, not exit 2,
  # even with an override of a field it may or may not have.
  buggy = tmp_path / 'buggy.py'
  buggy.write_text('def get_config():\n  return {}["missing"]\n')
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv)
  with pytest.raises(KeyError, match='missing'):
    _parse(fv, ['train.py', f'--config={buggy}', '--config.train.x=1'], monkeypatch)


# ------------------------------------------------------------------------- the config check

BAD_VALUES = [
    ('train.batch_size', 0, 'an integer >= 1'),
    ('train.batch_size', -3, 'an integer >= 1'),
    ('train.num_steps', -5, 'an integer >= 0'),
    ('train.epochs', -1, 'an integer >= 0'),
    ('train.eval_every', 0, 'an integer >= 1'),
    ('train.checkpoint_every', 0, 'an integer >= 1'),
    ('train.log_every', -1, 'an integer >= 1'),
    ('train.keep_checkpoints', 0, 'an integer >= 1'),
    ('train.eval_pairs', -1, 'an integer >= 0'),
    ('train.pca_max_volumes', -2, 'an integer >= 0'),
    ('train.seed', -1, 'an integer in [0, 2147483647]'),
    ('feature_channels', 0, 'an integer >= 1'),
    ('data.num_classes', 0, 'an integer >= 1'),
    ('data.prefetch', -1, 'an integer >= 0'),
    ('model.n', 0, 'an integer >= 1'),
    ('model.levels', 0, 'an integer >= 1'),
    ('model.integration_steps', -1, 'an integer >= 0'),
    ('optim.lr', -1.0, 'a finite number > 0'),
    ('optim.lr', 0.0, 'a finite number > 0'),
    ('optim.lr', float('nan'), 'a finite number > 0'),
    ('optim.lr', float('inf'), 'a finite number > 0'),
    ('optim.grad_clip', -1.0, 'a finite number >= 0'),
    ('optim.decay_power', float('nan'), 'a finite number >= 0'),
    ('loss.smooth', -0.5, 'a finite number >= 0'),
    ('loss.blur_sigma', float('inf'), 'a finite number >= 0'),
    ('mode', 'un', "use one of UN, WS, -CR (did you mean 'UN'?)"),
    ('channel_norm', 'papr', 'use one of matched, paper, release, standardise'),
    ('model.kernel_init', 'hee', 'use one of he, torch'),
    ('model.flow_init', 'zero', 'use one of small, torch'),
    ('model.activation', 'gelu', 'use one of leaky_relu, relu'),
    ('model.conv_impl', 'cudnn', 'use one of auto, split2d, xla'),
    ('model.factors', (2, 2), 'needs one triple of integers >= 1'),
    ('model.factors', (2, 0, 1), 'needs one triple of integers >= 1'),
    ('loss.ncc_windows', (9, 5), 'for each of the 4 pyramid levels'),
    ('loss.ncc_windows', (9, 4, 3, 3), 'an odd window size >= 1'),
]


def _config_with(path, value):
  c = demo.get_config()
  node = c
  *parents, leaf = path.split('.')
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  return c


@pytest.mark.parametrize('path,value,valid', BAD_VALUES)
def test_check_config_names_the_field_and_its_valid_range(path, value, valid):
  with pytest.raises(step_lib.ConfigError) as err:
    checks.check_config(_config_with(path, value))
  message = str(err.value)
  assert message.startswith(f'--config.{path}='), message
  assert valid in message and '\n' not in message, message
  assert isinstance(err.value, errors.UserError) and isinstance(err.value, ValueError)


def test_check_config_accepts_the_shipped_configs_and_catches_no_steps():
  import importlib
  for name in ('acdc', 'abdomen', 'hybrid', 'demo', 'general'):
    checks.check_config(importlib.import_module(f'configs.{name}').get_config())
  c = demo.get_config()
  c.train.num_steps, c.train.epochs = 0, 0
  with pytest.raises(step_lib.ConfigError, match='train no step'):
    checks.check_config(c)
  c = demo.get_config()
  c.data.per_store = ml_collections.ConfigDict({'factors': ((2, 2, 1), (2, 2)),
                                                'num_classes': (3, 3),
                                                'blur_in_plane_only': (True, True)})
  with pytest.raises(step_lib.ConfigError, match=r'data\.per_store\.factors\[1\]'):
    checks.check_config(c)


def _tiny(store_dir, **train):
  from tests.helpers.tiny_model import tiny_config
  return tiny_config(store_dir, **train)


def test_training_user_errors_are_user_errors_and_write_nothing(store_dir, tmp_path):
  """The conditions train.py used to catch as plain ValueError: each is a UserError now and
  is raised before the run folder is created."""
  other = synthetic_stores.write_store(str(tmp_path / 'other'), seed=1)
  no_val = synthetic_stores.write_store(str(tmp_path / 'noval'), val=(), test=(3, 4), seed=2)
  workdir = tmp_path / 'w'
  cases = [(_tiny(store_dir, batch_size=0), '--config.train.batch_size=0')]
  c = _tiny(store_dir)
  c.data.train_stores = ('',)
  cases.append((c, 'no feature store given'))
  c = _tiny(store_dir)
  c.feature_channels = 7
  cases.append((c, '--config.feature_channels<=6'))
  c = _tiny(store_dir, batch_size=2)
  c.data.train_stores = (store_dir, other)
  cases.append((c, 'with 2 training stores'))
  c = _tiny(store_dir)
  c.data.train_stores = (no_val,)
  cases.append((c, 'no validation pairs in'))
  c = _tiny(store_dir)
  c.data.per_store = ml_collections.ConfigDict({'factors': ((2, 2, 1),) * 2,
                                                'num_classes': (3, 3),
                                                'blur_in_plane_only': (True, True)})
  cases.append((c, 'data.per_store.factors has 2 entries for 1'))
  for config, expected in cases:
    with pytest.raises(errors.UserError, match=re.escape(expected)) as err:
      loop.train_and_evaluate(config, str(workdir), quiet=True)
    assert isinstance(err.value, ValueError)            # existing `except ValueError` callers
    assert not workdir.exists(), expected
  with pytest.raises(step_lib.ConfigError, match='must be >= 0'):
    loop.train_and_evaluate(_tiny(store_dir), str(workdir), stop_after_steps=-1)
  assert not workdir.exists()


def test_a_batch_that_does_not_split_over_the_devices_is_refused_up_front(store_dir):
  plan_lib._check_batch_split(_tiny(store_dir, batch_size=4), 2)
  plan_lib._check_batch_split(_tiny(store_dir, batch_size=1, bidirectional=True), 2)
  with pytest.raises(step_lib.ConfigError, match='3 pairs per step do not split over 2 '
                                                  'devices; set --config.train.batch_size to '
                                                  'a multiple of 2'):
    plan_lib._check_batch_split(_tiny(store_dir, batch_size=3), 2)
  with pytest.raises(step_lib.ConfigError, match='multiple of 2'):
    plan_lib._check_batch_split(_tiny(store_dir, batch_size=1, bidirectional=True), 4)
