"""Fault injection on runs, checkpoints, the shipped head and the feature CLI (issue 30, items
6, 7, 10 and 13): bit flips in checkpoint files and in the shipped head (sha256 recorded at
save, checked on restore), a deleted best/ checkpoint, run.json edited (unknown keys, wrong
types, another shape: one line, no asyncio tracebacks), pickled encoder weights, --help
defaults, and the entry points catching the user-error family only."""
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import run_file
from fmir_jax.train import digests
from fmir_jax.train import distributed
from fmir_jax.core import errors
from fmir_jax import general
from fmir_jax.train import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step):
  rng = np.random.default_rng(step)
  return {'step': np.asarray(step, np.int32),
          'params': {'w': rng.normal(size=(16, 32)).astype(np.float32),
                     'b': np.full((32,), step, np.float32)}}


def _assert_equal(a, b):
  assert int(a['step']) == int(b['step'])
  for k in ('w', 'b'):
    np.testing.assert_array_equal(np.asarray(a['params'][k]), b['params'][k])


def _saved_run(workdir, steps=(2, 4), keep=3, validated=()):
  last, best = ckpt.managers(workdir, keep=keep)
  for s in steps:
    ckpt.save(last, s, _state(s))
    if s in validated:
      ckpt.save(best, s, _state(s), metrics={'val_dice': 0.5 + s / 100})
      with open(os.path.join(workdir, run_file.VAL_LOG), 'a') as f:
        f.write(json.dumps({'step': s, 'dice': 0.5 + s / 100}) + '\n')
  last.wait_until_finished()
  best.wait_until_finished()
  return workdir


def _flip_bits(path, n=3, seed=0):
  data = bytearray(open(path, 'rb').read())
  rng = np.random.default_rng(seed)
  for pos in rng.choice(len(data), size=n, replace=False):
    data[pos] ^= 1 << int(rng.integers(8))
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _largest_data_file(step_folder):
  files = glob.glob(os.path.join(step_folder, 'default', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _one_line(msg):
  assert '\n' not in msg, msg
  return msg


# ------------------------------------------------------------------- checkpoint digests (#6)

def test_digests_are_recorded_for_every_checkpoint_file_when_orbax_has_finished(tmp_path):
  run = _saved_run(str(tmp_path / 'run'), steps=(2, 4, 6, 8), keep=2, validated=(4,))
  for folder in ('checkpoints/6', 'checkpoints/8', 'best/4'):
    step = os.path.join(run, folder)
    record = json.load(open(os.path.join(step, digests.DIGESTS_FILE)))['sha256']
    on_disk = sorted(os.path.relpath(os.path.join(d, f), step)
                     for d, _, fs in os.walk(step) for f in fs if f != digests.DIGESTS_FILE)
    assert sorted(record) == on_disk and any(p.startswith('default/') for p in on_disk)
    for rel, sha in record.items():                 # oracle: hashlib on the bytes
      assert sha == hashlib.sha256(open(os.path.join(step, rel), 'rb').read()).hexdigest()
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['6', '8']   # 2, 4 removed


def test_bit_flips_in_a_parameter_file_are_refused_naming_the_file(tmp_path):
  run = _saved_run(str(tmp_path / 'run'), steps=(2, 4))
  mgr, step = ckpt.best_or_latest(run, 'last')
  _assert_equal(ckpt.restore_chosen(run, mgr, step, _state(0)), _state(4))   # intact: equal
  victim = _largest_data_file(os.path.join(run, 'checkpoints', '4'))
  _flip_bits(victim)
  with pytest.raises(ckpt.RunError) as err:
    ckpt.restore_chosen(run, mgr, step, _state(0))
  msg = _one_line(str(err.value))
  assert victim in msg and 'does not match its sha256' in msg
  assert '--checkpoint-step=STEP' in msg and 'one of [2]' in msg and 'train the run again' in msg
  _assert_equal(ckpt.restore_chosen(run, mgr, 2, _state(0)), _state(2))     # the other step
  # Resuming sets the damaged step aside and goes on from the last sound one.
  last, _ = ckpt.managers(run, keep=3)
  _assert_equal(ckpt.restore_for_resume(last, _state(0), run), _state(2))
  assert os.path.isdir(os.path.join(run, ckpt.SET_ASIDE_DIR, '4'))


def test_a_missing_checkpoint_file_or_digest_record_is_named(tmp_path):
  run = _saved_run(str(tmp_path / 'run'), steps=(2,))
  mgr, _ = ckpt.best_or_latest(run, 'last')
  step = os.path.join(run, 'checkpoints', '2')
  record = os.path.join(step, digests.DIGESTS_FILE)
  saved = open(record).read()
  open(record, 'w').write('{"sha256": ')
  with pytest.raises(ckpt.RunError, match='is not a readable digest record'):
    ckpt.restore(mgr, _state(0), 2)
  open(record, 'w').write(saved)
  victim = _largest_data_file(step)
  os.remove(victim)
  with pytest.raises(ckpt.RunError) as err:
    ckpt.restore(mgr, _state(0), 2)
  assert f'{victim} is missing' in _one_line(str(err.value))


def test_a_checkpoint_written_before_digests_still_loads_without_a_warning(tmp_path, caplog):
  run = _saved_run(str(tmp_path / 'run'), steps=(2,))
  os.remove(os.path.join(run, 'checkpoints', '2', digests.DIGESTS_FILE))
  mgr, step = ckpt.best_or_latest(run, 'last')
  with caplog.at_level(logging.INFO):
    _assert_equal(ckpt.restore_chosen(run, mgr, step, _state(0)), _state(2))
  assert not [r for r in caplog.records if r.levelno >= logging.INFO
              and digests.DIGESTS_FILE in r.getMessage()]


def test_only_process_0_records_digests(tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, 'is_primary', lambda: False)
  run = _saved_run(str(tmp_path / 'run'), steps=(2,))
  assert not os.path.exists(os.path.join(run, 'checkpoints', '2', digests.DIGESTS_FILE))
  mgr, step = ckpt.best_or_latest(run, 'last')
  _assert_equal(ckpt.restore_chosen(run, mgr, step, _state(0)), _state(2))


# ----------------------------------------------------------------- the shipped head (#6)

def test_the_shipped_head_records_the_sha256_of_every_file_and_they_match():
  card = json.load(open(os.path.join(general.SHIPPED, general.CARD)))
  assert general.CARD == digests.HEAD_CARD
  files = sorted(os.path.relpath(os.path.join(d, f), general.SHIPPED)
                 for d, _, fs in os.walk(general.SHIPPED) for f in fs
                 if f != general.CARD and not f.startswith('.'))
  assert sorted(card['sha256']) == files
  for rel, sha in card['sha256'].items():
    assert sha == hashlib.sha256(open(os.path.join(general.SHIPPED, rel), 'rb').read()
                                 ).hexdigest(), rel
  assert digests.shipped_head_problem(general.SHIPPED) is None
  step = os.path.join(general.SHIPPED, 'best', str(card['checkpoint_step']))
  assert digests.digest_problem(step) is None and os.path.exists(
      os.path.join(step, digests.DIGESTS_FILE))


@pytest.mark.parametrize('victim', ['run.json', 'pca', 'params'])
def test_a_damaged_shipped_head_is_refused_naming_the_file(tmp_path, victim):
  head = str(tmp_path / 'head')
  shutil.copytree(general.SHIPPED, head)
  path = {'run.json': os.path.join(head, 'run.json'),
          'pca': glob.glob(os.path.join(head, 'pca', '*.npz'))[0],
          'params': _largest_data_file(glob.glob(os.path.join(head, 'best', '*'))[0])}[victim]
  _flip_bits(path, n=1)
  with pytest.raises(ckpt.RunError) as err:
    runs.load_run(head)
  msg = _one_line(str(err.value))
  assert path in msg and 'does not match its sha256' in msg and 'Reinstall fmir-jax' in msg


def test_ship_seals_the_copy(tmp_path):
  run = _saved_run(str(tmp_path / 'run'), steps=(2, 4), validated=(2, 4))
  os.remove(os.path.join(run, 'best', '4', digests.DIGESTS_FILE))   # as a run from before
  run_file.write_run_info(run, {'note': 'run.json'})
  os.makedirs(os.path.join(run, 'pca'))
  open(os.path.join(run, 'pca', 'x.npz'), 'wb').write(b'pca')
  dest = str(tmp_path / 'dest')
  card = json.load(open(general.ship(run, dest, ['cmd'], seed=0)))
  listed = sorted(card['sha256'])
  assert listed == sorted(['run.json', 'val.jsonl', 'pca/x.npz',
                           f'best/4/{digests.DIGESTS_FILE}'] + [
      f'best/4/{p}' for p in json.load(open(os.path.join(
          dest, 'best', '4', digests.DIGESTS_FILE)))['sha256']])
  assert digests.shipped_head_problem(dest) is None
  _flip_bits(os.path.join(dest, 'val.jsonl'), n=1)
  assert 'val.jsonl does not match' in digests.shipped_head_problem(dest)


# --------------------------------------------------------------- a deleted best/ (#7)

def test_a_deleted_best_checkpoint_is_refused_when_the_run_validated(tmp_path):
  run = _saved_run(str(tmp_path / 'run'), steps=(2, 4, 6), validated=(2, 4))
  mgr, step = ckpt.best_or_latest(run, 'best')
  assert step == 4 and str(mgr.directory).endswith('best')
  shutil.rmtree(os.path.join(run, 'best', '4'))
  with pytest.raises(ckpt.RunError) as err:
    ckpt.best_or_latest(run, 'best')
  msg = _one_line(str(err.value))
  assert os.path.join(run, 'best') in msg and '(2 records in ' in msg
  assert 'the last at step 4)' in msg and 'deleted or moved' in msg
  assert '--checkpoint-step=last' in msg and '[2, 4, 6]' in msg
  assert ckpt.best_or_latest(run, 'last')[1] == 6


def test_the_validation_log_is_the_trainers():
  from fmir_jax.train import loop
  assert run_file.VAL_LOG == loop.VAL_LOG


def test_best_of_a_run_that_never_validated_is_the_last_one_and_says_so(tmp_path, caplog):
  run = _saved_run(str(tmp_path / 'run'), steps=(2, 4))
  with caplog.at_level(logging.WARNING):
    _, step = ckpt.best_or_latest(run, 'best')
  assert step == 4
  said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(said) == 1 and 'has not validated yet' in said[0] and 'step 4' in said[0]


# ------------------------------------------------------------------ run.json edited (#10)

def _shipped_info():
  return json.load(open(os.path.join(general.SHIPPED, 'run.json')))


def test_run_json_of_the_trainer_and_of_the_shipped_head_pass():
  import dataclasses
  from configs import demo
  from fmir_jax.train import state as state_lib
  run_file.check_run_info('run', _shipped_info())
  c = demo.get_config()         # what loop.train_and_evaluate writes
  info = json.loads(json.dumps({'config': c.to_dict(), 'model': dataclasses.asdict(
      state_lib.model_config(c, 24)), 'store_header': {'channels': 24}, 'total_steps': 10}))
  run_file.check_run_info('run', info)


@pytest.mark.parametrize('edit,says', [
    (lambda d: d['model'].update(bogus=1), "unknown key 'bogus' under 'model'"),
    (lambda d: d['config']['model'].update(bogus=1), "unknown key 'bogus' under 'config.model'"),
    (lambda d: d['config']['model'].update(n='eight'), "config.model.n is 'eight'"),
    (lambda d: d['model'].update(levels=2.5), 'model.levels is 2.5'),
    (lambda d: d['model'].update(factors=[2, 2]), 'model.factors is [2, 2]'),
    (lambda d: d['model'].update(activation='gelu'), "must be one of ['leaky_relu', 'relu']"),
    (lambda d: d['model'].update(n=16), 'model.n is 16 but config.model.n is 8'),
    (lambda d: d['config']['model'].pop('levels'), "no key 'levels' under 'config.model'"),
    (lambda d: d['store_header'].update(channels='36'), "store_header.channels is '36'"),
    (lambda d: d.pop('total_steps'), "'total_steps' is missing"),
])
def test_an_edited_run_json_is_one_line_naming_the_file_and_the_key(edit, says):
  info = _shipped_info()
  edit(info)
  with pytest.raises(ckpt.RunError) as err:
    run_file.check_run_info('/some/run', info)
  msg = _one_line(str(err.value))
  assert msg.startswith('/some/run/run.json: ') and says in msg, msg
  assert 'put back the run.json that train.py wrote' in msg


def test_a_checkpoint_of_another_shape_names_the_array_and_moves_nothing(tmp_path):
  run = _saved_run(str(tmp_path / 'run'), steps=(2, 4))
  other = _state(0)
  other['params']['w'] = np.zeros((16, 8), np.float32)
  mgr, step = ckpt.best_or_latest(run, 'last')
  with pytest.raises(ckpt.CheckpointMismatchError) as err:
    ckpt.restore_chosen(run, mgr, step, other)
  msg = _one_line(str(err.value))
  assert 'array params/w: (16, 32) in the checkpoint, the model needs (16, 8)' in msg
  assert os.path.join(run, 'run.json') in msg and 'corrupt' not in msg
  last, _ = ckpt.managers(run, keep=3)
  with pytest.raises(ckpt.CheckpointMismatchError):
    ckpt.restore_for_resume(last, other, run)
  assert not os.path.exists(os.path.join(run, ckpt.SET_ASIDE_DIR))
  assert last.all_steps() == [2, 4]


def test_the_filter_drops_reports_of_aborted_orbax_reads_only():
  import orbax.checkpoint as ocp
  seen = []
  hook = ckpt._without_aborted_reads(seen.append)
  orbax_file = os.path.join(os.path.dirname(os.path.abspath(ocp.__file__)), '_src', 'x.py')
  report = lambda exc, obj: types.SimpleNamespace(exc_value=exc, object=obj)  # noqa: E731
  coro = lambda f: types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=f))  # noqa
  hook(report(RuntimeError('Event loop is closed'), None))
  hook(report(Exception('Encountered error while reading array index'), coro(orbax_file)))
  mine = report(Exception('mine'), coro(__file__))
  hook(mine)
  hook(report(RuntimeError('other'), None))
  assert [u.exc_value.args[0] for u in seen] == ['mine', 'other']


def _register(tmp_path, head, extra=()):
  import nibabel as nib
  rng = np.random.default_rng(0)
  for name in ('f', 'm'):
    nib.save(nib.Nifti1Image(rng.random((24, 24, 8)).astype(np.float32),
                             np.diag([2., 2., 4., 1.])), str(tmp_path / f'{name}.nii.gz'))
  return subprocess.run(
      [sys.executable, '-m', 'fmir_jax.cli', 'register', '--fixed', str(tmp_path / 'f.nii.gz'),
       '--moving', str(tmp_path / 'm.nii.gz'), '--out', str(tmp_path / 'out'),
       '--checkpoint', head, '--no-cache', *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('edit,says', [
    ("d['config']['model']['n'] = 16; d['model']['n'] = 16",
     'does not fit the model that'),
    ("d['model']['bogus'] = 1", "unknown key 'bogus' under 'model'"),
])
@pytest.mark.slow
def test_fmir_register_with_an_edited_run_json_prints_one_line_and_exits_2(tmp_path, edit,
                                                                         says):
  head = str(tmp_path / 'head')
  shutil.copytree(general.SHIPPED, head)
  os.remove(os.path.join(head, general.CARD))       # a training run: no card
  d = json.load(open(os.path.join(head, 'run.json')))
  exec(edit)  # pylint: disable=exec-used
  json.dump(d, open(os.path.join(head, 'run.json'), 'w'))
  r = _register(tmp_path, head)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('fmir register: error: --checkpoint'), lines
  assert says in lines[0] and 'Traceback' not in r.stderr
  assert not (tmp_path / 'out').exists()


# --------------------------------------------------------------- pickled weights (#10)

@pytest.fixture(scope='module')
def pickled_weights(tmp_path_factory):
  """A Dinov2 directory whose only weights are a pickle that would create a file if loaded,
  and the bare pickle file."""
  import pickle
  import transformers
  folder = tmp_path_factory.mktemp('pickled')
  cfg = transformers.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, patch_size=8, image_size=32)
  cfg.save_pretrained(folder)
  marker = folder / 'pwned'

  class Evil:
    def __reduce__(self):
      return (open, (str(marker), 'w'))

  with open(folder / 'pytorch_model.bin', 'wb') as f:
    pickle.dump({'embeddings.cls_token': Evil()}, f)
  return str(folder), marker


def test_a_pickled_weights_directory_is_one_backbone_error_and_nothing_runs(pickled_weights):
  from feature_extract import backbones
  folder, marker = pickled_weights
  with pytest.raises(errors.BackboneError) as err:
    backbones.load('dinov2', folder, device='cpu')
  msg = _one_line(str(err.value))
  assert msg.startswith(f'--weights {folder}: ') and 'pickle' in msg and 'safetensors' in msg
  assert not marker.exists()


def test_a_weights_file_is_refused_saying_what_to_pass(pickled_weights, tmp_path):
  from feature_extract import backbones
  folder, marker = pickled_weights
  path = os.path.join(folder, 'pytorch_model.bin')
  with pytest.raises(errors.BackboneError) as err:
    backbones.load('dinov2', path, device='cpu')
  msg = _one_line(str(err.value))
  assert 'a pickled file' in msg and 'safetensors' in msg and not marker.exists()
  plain = tmp_path / 'model.safetensors'
  plain.write_bytes(b'{}')
  with pytest.raises(errors.BackboneError, match='a file, not a model directory'):
    backbones.load('dinov2', str(plain), device='cpu')


# ------------------------------------------------------------------- --help defaults (#13)

def _help_entries(parser):
  """{option: its help text} as --help prints it, for every option but -h."""
  text = parser.format_help()
  entries, current = {}, None
  for line in text.split('options:', 1)[1].splitlines():
    stripped = line.strip()
    if line.startswith('  -') and not line.startswith('   '):
      current = stripped.split()[0].rstrip(',')
      entries[current] = stripped
    elif current and stripped:
      entries[current] += ' ' + stripped
  entries.pop('-h', None)
  return entries


def _parsers():
  from feature_extract import run as extract_run
  return {'general': general.build_parser(), 'extract': extract_run.build_parser()}


@pytest.mark.parametrize('name', ['general', 'extract'])
def test_every_option_help_shows_its_default(name):
  parser = _parsers()[name]
  entries = _help_entries(parser)
  options = [a for a in parser._actions if a.option_strings and a.dest != 'help']
  assert sorted(entries) == sorted(a.option_strings[0] for a in options)
  for a in options:
    text = ' '.join(entries[a.option_strings[0]].split())
    if a.required:
      assert '(required)' in text, text
      continue
    assert 'default' in text, text
    if a.default not in (None, '') and not isinstance(a.default, list):
      assert f'default: {a.default}' in text, text


def test_general_help_exits_0_and_shows_defaults(capsys):
  with pytest.raises(SystemExit) as exit_info:
    general.main(['--help'])
  assert exit_info.value.code == 0
  out = ' '.join(capsys.readouterr().out.split())
  assert '(default: 200)' in out and '(default: general_out)' in out


# ------------------------------------------------- entry points catch UserError only (#5)

def test_feature_cli_prints_any_user_error_and_lets_bugs_raise(monkeypatch, tmp_path, capsys):
  from feature_extract import pipeline
  from feature_extract import run as extract_run
  assert pipeline.USER_ERRORS == (errors.UserError,)

  def user(**kw):
    raise ckpt.RunError('a user error outside the old tuple')

  monkeypatch.setattr(pipeline, 'extract_dataset', user)
  assert extract_run.main(['--out', str(tmp_path / 's'), '--backbone', 'mind']) == 2
  assert capsys.readouterr().err.strip() == 'error: a user error outside the old tuple'

  def bug(**kw):
    raise KeyError('a bug')

  monkeypatch.setattr(pipeline, 'extract_dataset', bug)
  with pytest.raises(KeyError):
    extract_run.main(['--out', str(tmp_path / 's'), '--backbone', 'mind'])


def test_general_cli_prints_user_errors_and_lets_bugs_raise(monkeypatch, tmp_path, capsys):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep')
  assert general.main(['--out', str(tmp_path / 'mine')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'was not made by this command' in err[0]
  monkeypatch.setattr(general, 'write_data', lambda *a, **k: {}['bug'])
  with pytest.raises(KeyError):
    general.main(['--out', str(tmp_path / 'new')])
