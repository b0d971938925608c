"""Run directories against files on disk: checkpoint choice, read-only opening, corrupt
checkpoints (resume falls back, evaluation names the folder), corrupt PCA files, unusable
output paths. Tiny pytrees instead of a model: no training here (tests/test_train.py trains)."""
import glob
import logging
import os
import pickle

import numpy as np
import pytest

from fmir_jax.model import channel_reg
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import run_file

HEADER = {'backbone': {'name': 'synthetic', 'weights_sha256': 'none'}, 'layer': 0,
          'channels': 6, 'patch_size': 2}


def _state(step):
  return {'step': np.asarray(step, np.int32), 'w': np.full((3, 4), step, np.float32)}


def _walk(root):
  return sorted((os.path.relpath(d, root), sorted(ds), sorted(fs)) for d, ds, fs in os.walk(root))


def corrupt(step_folder):
  """Overwrites the data files of an Orbax step folder (its OCDBT ``d/`` files) with garbage."""
  files = glob.glob(os.path.join(step_folder, 'default', '**', 'd', '*'), recursive=True)
  assert files
  for f in files:
    with open(f, 'wb') as fh:
      fh.write(b'not an array')


@pytest.fixture
def run(tmp_path):
  """A run directory with checkpoints/{2,4,6} and no best/ (no validation ran)."""
  workdir = str(tmp_path / 'run')
  last, _ = ckpt.managers(workdir, keep=3)
  for s in (2, 4, 6):
    ckpt.save(last, s, _state(s))
  last.wait_until_finished()
  os.rmdir(os.path.join(workdir, 'best'))        # empty: as in a run that never validated
  return workdir


def test_checkpoint_choice_accepts_latest_and_lists_the_valid_values(run):
  for which in ('latest', 'last', 'LATEST', 'best'):
    _, step = ckpt.best_or_latest(run, which)
    assert step == 6, which
  _, step = ckpt.best_or_latest(run, '4')
  assert step == 4
  for bad in ('foo', '5', '-1'):
    with pytest.raises(ckpt.RunError) as err:
      ckpt.best_or_latest(run, bad)
    assert "'best', 'last' (or 'latest'), or one of the saved steps [2, 4, 6]" in str(err.value)
  assert isinstance(err.value, ValueError)      # register and the CLIs map it to exit 2


def test_reading_a_run_creates_nothing_in_it(run):
  before = _walk(run)
  mgr, step = ckpt.best_or_latest(run, 'best')
  restored = ckpt.restore_chosen(run, mgr, step, _state(0))
  assert int(restored['step']) == 6
  assert _walk(run) == before                   # no empty best/ (Orbax's create=True did that)


def test_evaluating_a_corrupt_checkpoint_names_it_and_the_other_steps(run):
  corrupt(os.path.join(run, 'checkpoints', '6'))
  mgr, step = ckpt.best_or_latest(run, 'latest')
  with pytest.raises(ckpt.RunError) as err:
    ckpt.restore_chosen(run, mgr, step, _state(0))
  msg = str(err.value)
  assert os.path.join(run, 'checkpoints', '6') in msg and '\n' not in msg
  assert '--checkpoint=STEP' in msg and 'one of [2, 4]' in msg
  mgr, step = ckpt.best_or_latest(run, '4')
  assert int(ckpt.restore_chosen(run, mgr, step, _state(0))['step']) == 4


def test_resume_sets_a_corrupt_latest_aside_and_saves_that_step_again(run, caplog):
  corrupt(os.path.join(run, 'checkpoints', '6'))
  garbage = sorted(glob.glob(os.path.join(run, 'checkpoints', '6', '**'), recursive=True))
  last, _ = ckpt.managers(run, keep=3)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_for_resume(last, _state(0), run)
  assert int(restored['step']) == 4
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and 'cannot be restored' in r.getMessage()]
  assert len(warnings) == 1 and os.path.join(run, 'checkpoints', '6') in warnings[0]
  assert 'resuming from step 4' in warnings[0] and '\n' not in warnings[0]
  # Kept for the user, out of Orbax's way: the resumed run saves step 6 again.
  aside = os.path.join(run, ckpt.SET_ASIDE_DIR, '6')
  assert sorted(os.path.relpath(p, aside) for p in glob.glob(aside + '/**', recursive=True)) \
      == sorted(os.path.relpath(p, os.path.join(run, 'checkpoints', '6')) for p in garbage)
  assert last.all_steps() == [2, 4]
  ckpt.save(last, 6, _state(66))
  last.wait_until_finished()
  again, _ = ckpt.managers(run, keep=3)
  assert again.all_steps() == [2, 4, 6]
  assert int(ckpt.restore(again, _state(0))['step']) == 66


def test_resume_with_no_restorable_checkpoint_moves_nothing_and_says_what_to_do(run):
  for s in (2, 4, 6):
    corrupt(os.path.join(run, 'checkpoints', str(s)))
  last, _ = ckpt.managers(run, keep=3)
  before = _walk(run)
  with pytest.raises(ckpt.RunError) as err:
    ckpt.restore_for_resume(last, _state(0), run)
  msg = str(err.value)
  assert 'no checkpoint in' in msg and os.path.join(run, 'checkpoints') in msg
  assert 'steps [2, 4, 6]' in msg and 'new --workdir' in msg and '\n' not in msg
  assert _walk(run) == before


def _basis():
  rng = np.random.default_rng(0)
  acc = channel_reg.PCAAccumulator(6)
  acc.update(rng.normal(size=(50, 6)))
  return acc.finalize(4)


@pytest.mark.parametrize('damage', ['truncated', 'pickled', 'object_array', 'garbage'])
def test_a_damaged_pca_file_names_the_file_and_the_refit_command(tmp_path, damage):
  workdir = str(tmp_path / 'run')
  path = run_file.save_pca(workdir, HEADER, _basis(), source='train_store')
  np.testing.assert_allclose(run_file.load_pca(workdir, HEADER).components, _basis().components)
  if damage == 'truncated':
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
  elif damage == 'pickled':
    with open(path, 'wb') as f:
      pickle.dump(_basis().to_dict(), f)
  elif damage == 'object_array':
    np.savez(path[:-len('.npz')], mean=np.asarray([{'a': 1}], dtype=object),
             components=np.zeros((6, 4)), explained_variance=np.zeros(4), n_samples=3)
  else:
    open(path, 'wb').write(b'\x00garbage' * 10)
  with pytest.raises(ckpt.RunError) as err:
    run_file.load_pca(workdir, HEADER)
  msg = str(err.value)
  assert msg.startswith(f'{path} is not a readable PCA basis') and '\n' not in msg
  assert f'python eval.py --workdir={workdir} --features=STORE --pca_store=TRAIN_STORE' in msg
  assert os.path.exists(path)                   # left for the user to delete


def test_unwritable_reason_for_files_and_paths_below_files(tmp_path):
  f = tmp_path / 'file.txt'
  f.write_text('x')
  assert run_file.unwritable_reason(str(f)) == f'{f} is a file, not a directory'
  assert run_file.unwritable_reason(str(f / 'sub' / 'deeper')) == f'{f} is a file, not a directory'
  assert run_file.unwritable_reason(str(tmp_path)) is None
  assert run_file.unwritable_reason(str(tmp_path / 'new' / 'run')) is None
  assert not os.path.exists(tmp_path / 'new')   # a check, not a mkdir
