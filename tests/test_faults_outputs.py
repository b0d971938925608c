"""Fault injection on what the project writes: planted user files are never replaced, an
earlier result of ours only with --overwrite, a full disk is one line with nothing lost,
batches resume after Ctrl-C and go on after any per-pair error, bad flags exit 2 before any
work (issue "Nothing lost, nothing silent", items 1-3, 8-10, 12)."""
import csv
import errno
import glob
import json
import os

import pytest

from feature_extract.synthetic import phantoms
from fmir_jax import cli
from fmir_jax import demo
from fmir_jax.evaluate import evaluation
from fmir_jax.core import files
from fmir_jax.core import nifti
from fmir_jax.register import registrar as register_lib
from fmir_jax.register import batch as register_batch
from tests.helpers.snapshot import snapshot
from tests.helpers.tiny_run import INPLANE


# --------------------------------------------------------------------------- the rule


def test_a_file_we_did_not_write_is_never_replaced_ours_only_with_overwrite(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'table.md').write_text('the user\'s own table')
  with pytest.raises(files.OutputPathError, match='not written by fmir-jax'):
    files.write_result_file(str(out / 'table.md'), 'ours', True, '--table2')
  assert (out / 'table.md').read_text() == 'the user\'s own table'
  files.write_result_file(str(out / 'new.md'), 'ours 1', False, '--table2')
  assert files.is_ours(str(out / 'new.md'))
  with pytest.raises(files.OutputPathError, match='--overwrite'):
    files.write_result_file(str(out / 'new.md'), 'ours 2', False, '--table2')
  files.write_result_file(str(out / 'new.md'), 'ours 2', True, '--table2')
  assert (out / 'new.md').read_text() == 'ours 2'
  (out / 'new.md').write_text('edited by the user')          # ours, changed since: theirs
  assert not files.is_ours(str(out / 'new.md'))
  with pytest.raises(files.OutputPathError, match='changed since'):
    files.write_result_file(str(out / 'new.md'), 'ours 3', True, '--table2')
  assert (out / 'new.md').read_text() == 'edited by the user'


def test_publish_refuses_a_user_file_that_appeared_and_replaces_nothing(tmp_path):
  out, tmp = tmp_path / 'out', tmp_path / 'tmp'
  for d in (out, tmp):
    d.mkdir()
  (tmp / 'a.txt').write_text('new a')
  (tmp / 'report.json').write_text('{}')
  (out / 'report.json').write_text('the user\'s')
  before = snapshot(out)
  with pytest.raises(files.OutputPathError, match='report.json was not written by fmir-jax'):
    files.publish_result(str(tmp), str(out), 'report.json', ['a.txt', 'report.json'], True)
  assert snapshot(out) == before


def test_a_full_disk_is_one_line_naming_the_folder():
  with pytest.raises(files.OutputPathError) as e, files.disk_errors('/data/out', '--out'):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/data/out/x.nii.gz')
  msg = str(e.value)
  assert msg.startswith('--out /data/out: no space left on device') and '\n' not in msg
  assert 'x.nii.gz' in msg and 'Free space' in msg
  with pytest.raises(PermissionError), files.disk_errors('/data/out', '--out'):
    raise PermissionError(errno.EACCES, 'denied')       # not a disk fault: as it was


def test_a_dangling_link_as_out_is_refused_before_any_work(tmp_path):
  os.symlink(tmp_path / 'gone', tmp_path / 'link')
  with pytest.raises(files.OutputPathError, match='is a link to .*gone, which does not exist'):
    files.check_writable_dir(str(tmp_path / 'link'), '--out')


# --------------------------------------------------------------------------- the demo


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def test_demo_rerun_removes_only_the_files_the_demo_wrote(tmp_path):
  out = str(tmp_path / 'demo')
  demo.prepare_out(out)
  with demo._stage_writes(out, 'run'):                 # what the stages write
    _write(f'{out}/run/checkpoints/4/params', 'demo')
    _write(f'{out}/run/run.json', '{}')
  with demo._stage_writes(out, 'register'):
    _write(f'{out}/register/report.json', '{}')
  # The user adds files inside the demo's folders and edits one of the demo's files.
  _write(f'{out}/run/eval/test/summary.json', 'eval.py run by the user')
  _write(f'{out}/register/notes.txt', 'mine')
  _write(f'{out}/run/run.json', '{"edited": true}')
  _write(f'{out}/mine.txt', 'mine')
  try:                                                 # a stage killed half way
    with demo._stage_writes(out, 'features'):
      _write(f'{out}/features/shard_0.bin', 'half written')
      raise KeyboardInterrupt
  except KeyboardInterrupt:
    pass
  demo.prepare_out(out)
  left = {k: v for k, v in snapshot(out).items() if k != demo.MARKER}
  assert left == {'run': None, 'register': None, 'mine.txt': b'mine',
                  os.path.join('run', 'eval'): None,
                  os.path.join('run', 'eval', 'test'): None,
                  os.path.join('run', 'eval', 'test', 'summary.json'): b'eval.py run by the user',
                  os.path.join('run', 'run.json'): b'{"edited": true}',
                  os.path.join('register', 'notes.txt'): b'mine'}


def test_demo_refuses_a_marker_of_an_older_demo_that_listed_no_files(tmp_path, capsys):
  out = tmp_path / 'demo'
  (out / 'run').mkdir(parents=True)
  (out / 'run' / 'mine.txt').write_text('mine')
  (out / demo.MARKER).write_text(json.dumps({'entries': list(demo.ENTRIES)}))
  before = snapshot(tmp_path)
  assert demo.main(['--out', str(out), '--smoke']) == 2
  err = capsys.readouterr().err
  assert 'older demo' in err and len(err.strip().splitlines()) == 1
  assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize('flags,expect', [
    (['--spacing', 'nan,1,1'], '--spacing'), (['--spacing', '1,inf,1'], '--spacing'),
    (['--io-budget', 'inf'], '--io-budget inf'), (['--io-lr', 'inf'], '--io-lr inf'),
    (['--io-fold', 'inf'], '--io-fold inf'), (['--io-fold', 'nan'], '--io-fold nan'),
    (['--batch-size', '0'], '--batch-size 0'), (['--batch-size', '-1'], '--batch-size -1'),
    (['--cache-dir', 'FILE'], 'is a file'),
    (['--out', 'DANGLING'], 'does not exist'),
])
def test_bad_flags_exit_2_with_one_line_before_any_work(tmp_path, capsys, flags, expect):
  (tmp_path / 'file').write_text('x')
  os.symlink(tmp_path / 'gone', tmp_path / 'dangling')
  sub = {'FILE': str(tmp_path / 'file'), 'DANGLING': str(tmp_path / 'dangling')}
  flags = [sub.get(f, f) for f in flags]
  argv = ['register', '--fixed', 'f.nii.gz', '--moving', 'm.nii.gz',
          '--checkpoint', str(tmp_path / 'run')]
  argv += flags if '--out' in flags else flags + ['--out', str(tmp_path / 'out')]
  before = snapshot(tmp_path)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert expect in err and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
  assert snapshot(tmp_path) == before


def test_pairs_csv_bom_extra_fields_and_blank_lines(tmp_path):
  path = tmp_path / 'pairs.csv'
  path.write_bytes('\ufefffixed,moving\na.nii.gz,b.nii.gz\n\n,\nc.nii.gz,d.nii.gz\n'.encode())
  said = []
  rows = register_batch.read_pairs_csv(str(path), said.append)
  assert [(os.path.basename(r.fixed), os.path.basename(r.moving)) for r in rows] == [
      ('a.nii.gz', 'b.nii.gz'), ('c.nii.gz', 'd.nii.gz')]
  assert said == [f'--pairs {path}: skipped blank lines 3, 4']
  path.write_text('fixed,moving\na.nii.gz,b.nii.gz,c.nii.gz\n')
  with pytest.raises(register_lib.RegisterError, match='line 2: 3 fields, the header has 2'):
    register_batch.read_pairs_csv(str(path))
  path.write_text('fixed,moving\n\n')
  with pytest.raises(register_lib.RegisterError, match='at least one pair|no pairs'):
    register_batch.read_pairs_csv(str(path))


# --------------------------------------------------------------------------- with a run


@pytest.fixture(scope='module')
def frames(tmp_path_factory):
  """ED and ES frames (with labels) of two phantom patients."""
  root = str(tmp_path_factory.mktemp('frames'))
  out = []
  for pid in (101, 102):
    phantoms.write_acdc_phantoms(root, 1, seed=pid, first_id=pid, inplane_size=INPLANE)
    out.append(sorted(glob.glob(f'{root}/testing/patient{pid}/*frame??.nii.gz')))
  return out


def _pairs_csv(path, frames, extra=()):
  rows = [{'fixed': ed, 'moving': es} for ed, es in frames] + list(extra)
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['fixed', 'moving'])
    w.writeheader()
    w.writerows(rows)
  return str(path)


@pytest.mark.slow
def test_batch_refuses_the_users_summary_and_resumes_after_ctrl_c(run_dir, frames, tmp_path,
                                                                  capsys, monkeypatch):
  pairs = _pairs_csv(tmp_path / 'pairs.csv', frames)
  out = tmp_path / 'batch'
  out.mkdir()
  (out / 'summary.csv').write_text('mine')
  argv = ['register', '--pairs', pairs, '--checkpoint', run_dir, '--out', str(out)]
  assert cli.main(argv) == 2
  assert 'summary.csv was not written by fmir-jax' in capsys.readouterr().err
  assert snapshot(out) == {'summary.csv': b'mine'}
  (out / 'summary.csv').unlink()

  real = register_lib.Registrar.register
  calls = []

  def interrupted_at_the_second(self, paths, pair_out):
    calls.append(paths.moving)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(self, paths, pair_out)

  monkeypatch.setattr(register_lib.Registrar, 'register', interrupted_at_the_second)
  assert cli.main(argv) == 130
  err = capsys.readouterr().err
  assert '1 of 2 pairs done' in err and 'Run the same command again' in err
  first = json.loads((out / 'summary.json').read_text())
  assert [r['status'] for r in first['rows']] == ['ok', 'not run']
  monkeypatch.setattr(register_lib.Registrar, 'register', real)
  pair1 = sorted(glob.glob(str(out / '0001_*' / '*')))
  stamp = {p: os.stat(p).st_mtime_ns for p in pair1}
  assert cli.main(argv) == 0                             # resumes: pair 1 kept, pair 2 run
  assert '2 pairs, 0 failed, 1 kept from an earlier run' in capsys.readouterr().out
  assert {p: os.stat(p).st_mtime_ns for p in pair1} == stamp
  done = json.loads((out / 'summary.json').read_text())
  assert [r['status'] for r in done['rows']] == ['ok', 'ok'] and done['resumed'] == 1
  assert done['rows'][0]['dice_after'] == first['rows'][0]['dice_after']
  assert cli.main(argv + ['--io-steps', '2']) == 2       # other options: not this batch
  assert 'another batch' in capsys.readouterr().err


@pytest.mark.slow
def test_batch_records_an_unexpected_error_and_goes_on(run_dir, frames, tmp_path, capsys,
                                                       monkeypatch):
  pairs = _pairs_csv(tmp_path / 'pairs.csv', frames)
  real = nifti.load_nifti

  def rgb_bug(path, **kw):                # a bug of ours on one file: not a user error
    if path == frames[0][1]:
      raise TypeError('planted bug')
    return real(path, **kw)

  monkeypatch.setattr(nifti, 'load_nifti', rgb_bug)
  out = tmp_path / 'batch'
  rc = cli.main(['register', '--pairs', pairs, '--checkpoint', run_dir, '--out', str(out)])
  assert rc == 1
  summary = json.loads((out / 'summary.json').read_text())
  assert [r['status'] for r in summary['rows']] == ['failed', 'ok']
  assert summary['rows'][0]['error'] == 'TypeError: planted bug'
  assert 'Traceback' in summary['rows'][0]['traceback']
  assert "raise TypeError('planted bug')" in capsys.readouterr().err


@pytest.mark.slow
def test_a_full_disk_while_writing_keeps_the_earlier_result(run_dir, frames, tmp_path, capsys,
                                                            monkeypatch):
  out = tmp_path / 'out'
  argv = ['register', '--fixed', frames[0][0], '--moving', frames[0][1], '--checkpoint',
          run_dir, '--out', str(out), '--quiet']
  assert cli.main(argv) == 0
  before = snapshot(tmp_path)

  def full(path, *a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(nifti, 'save_dispvect', full)
  assert cli.main(argv + ['--overwrite']) == 2
  err = capsys.readouterr().err
  assert 'no space left on device' in err and str(out) in err
  assert len(err.strip().splitlines()) == 1
  assert snapshot(tmp_path) == before                    # nothing half written, nothing lost


@pytest.mark.slow
def test_l2r_export_never_replaces_a_users_field(run_dir, frames, tmp_path, capsys):
  l2r = tmp_path / 'l2r'
  l2r.mkdir()
  (l2r / 'disp_0101_0101.nii.gz').write_bytes(b'the user\'s field')
  argv = lambda out, *extra: ['register', '--fixed', frames[0][0], '--moving', frames[0][1],  # noqa: E731
                              '--checkpoint', run_dir, '--out', str(tmp_path / out), '--quiet',
                              '--l2r-export', str(l2r), '--l2r-fixed-id', '0101',
                              '--l2r-moving-id', '0101', *extra]
  before = snapshot(tmp_path)
  for extra in ([], ['--overwrite']):
    assert cli.main(argv('out', *extra)) == 2
    assert 'disp_0101_0101.nii.gz was not written by fmir-jax' in capsys.readouterr().err
    assert snapshot(tmp_path) == before
  (l2r / 'disp_0101_0101.nii.gz').unlink()
  assert cli.main(argv('out')) == 0
  assert files.is_ours(str(l2r / 'disp_0101_0101.nii.gz'))
  assert cli.main(argv('out2')) == 2                     # ours: only with --overwrite
  assert '--overwrite' in capsys.readouterr().err
  assert cli.main(argv('out2', '--overwrite')) == 0


@pytest.mark.slow
def test_evaluation_never_replaces_the_users_files(run_dir, tmp_path):
  store = json.load(open(os.path.join(run_dir, 'run.json')))['train_stores'][0]
  out = tmp_path / 'eval'
  out.mkdir()
  (out / 'summary.json').write_text('the user\'s')
  kw = dict(split='val', figures=0, out_dir=str(out))
  for overwrite in (False, True):
    with pytest.raises(files.OutputPathError, match='summary.json was not written'):
      evaluation.evaluate_run(run_dir, store, overwrite=overwrite, **kw)
  (out / 'summary.json').unlink()
  first = evaluation.evaluate_run(run_dir, store, **kw)
  assert files.is_ours(str(out / 'summary.json')) and files.is_ours(str(out / 'pairs.csv'))
  with pytest.raises(files.OutputPathError, match='--overwrite'):
    evaluation.evaluate_run(run_dir, store, **kw)
  again = evaluation.evaluate_run(run_dir, store, overwrite=True, **kw)
  assert again.metrics['dice_mean'] == first.metrics['dice_mean']
  written = json.loads((out / 'summary.json').read_text())['metrics']['time_s']['mean']
  assert written == pytest.approx(again.metrics['time_s']['mean'])      # replaced


def test_custom_pair_list_bom_extra_fields_and_line_numbers(tmp_path):
  from feature_extract.datasets import custom as custom_pairs
  from fmir_jax.core.errors import DatasetError
  path = tmp_path / 'list.csv'
  path.write_bytes('\ufeffmoving,fixed\na.nii.gz,b.nii.gz\n'.encode())
  assert [(r['moving'], r['fixed']) for r in custom_pairs.read_pair_table(str(path))] == [
      ('a.nii.gz', 'b.nii.gz')]
  path.write_text('moving,fixed\na.nii.gz,b.nii.gz\n\nc.nii.gz,d.nii.gz,e.nii.gz\n')
  with pytest.raises(DatasetError, match='list.csv line 4: 3 fields, the header has 2'):
    custom_pairs.read_pair_table(str(path))
