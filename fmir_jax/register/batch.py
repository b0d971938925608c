"""`fmir register --pairs`: many pairs in one process (one restore, one encoder load, one
compile per grid shape), per-pair output folders and one summary CSV/JSON."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import traceback
from typing import Any, Callable

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.evaluate import report as report_lib
from fmir_jax.register import registrar as register_lib
from fmir_jax.register.records import BatchSummary, PairReport
from fmir_jax.register.registrar import PairFiles, RegisterError


BATCH_COLUMNS = tuple(f.name for f in dataclasses.fields(PairFiles))   # fixed, moving, ...
SUMMARY_FILES = ('summary.csv', 'summary.json')


def read_pairs_csv(path: str, log: Callable[[str], None] = lambda s: None
                   ) -> list[PairFiles]:
  """Rows of a pairs CSV (header: fixed, moving and any of fixed_labels, moving_labels,
  fixed_mask, moving_mask, fixed_landmarks, moving_landmarks); relative
  paths are resolved against the CSV's folder. A UTF-8 byte-order mark is allowed; a row
  with more fields than the header is refused; blank lines are skipped and said."""
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      lines = list(csv.reader(f))
  except OSError as e:
    raise RegisterError(f'--pairs {path}: cannot read it ({e.strerror}).') from None
  except UnicodeDecodeError as e:
    raise RegisterError(f'--pairs {path}: not UTF-8 text ({e.reason} at byte {e.start}); '
                        'save it as UTF-8 CSV.') from None
  header = [c.strip() for c in lines[0]] if lines else []
  if not {'fixed', 'moving'} <= set(header) or len(lines) < 2:
    raise RegisterError(f'--pairs {path}: needs a header row with columns fixed,moving '
                        f'(optional {",".join(BATCH_COLUMNS[2:])}) and at least one pair.')
  unknown = set(header) - set(BATCH_COLUMNS)
  if unknown:
    raise RegisterError(f'--pairs {path}: unknown columns {sorted(unknown)}; use '
                        f'{", ".join(BATCH_COLUMNS)}.')
  base = os.path.dirname(os.path.abspath(path))
  resolve = lambda p: os.path.join(base, p.strip()) if p and p.strip() else None  # noqa: E731
  out, blank = [], []
  for i, fields in enumerate(lines[1:], start=2):
    if not any(v.strip() for v in fields):
      blank.append(i)
      continue
    if len(fields) > len(header):
      raise RegisterError(f'--pairs {path} line {i}: {len(fields)} fields, the header has '
                          f'{len(header)}; quote paths that contain commas.')
    r = dict(zip(header, fields))
    if not (r.get('fixed') or '').strip() or not (r.get('moving') or '').strip():
      raise RegisterError(f'--pairs {path} line {i}: fixed and moving are required.')
    out.append(PairFiles(**{c: resolve(r.get(c)) for c in BATCH_COLUMNS}))
  if blank:
    log(f'--pairs {path}: skipped blank line{"s" if len(blank) > 1 else ""} '
        f'{", ".join(map(str, blank))}')
  if not out:
    raise RegisterError(f'--pairs {path}: no pairs under the header row.')
  return out


def pair_folder(index: int, paths: PairFiles) -> str:
  """OUT sub-folder of a batch pair: 0001_<moving stem>_to_<fixed stem>."""
  stem = lambda p: os.path.basename(p).split('.nii')[0]  # noqa: E731
  return f'{index:04d}_{stem(paths.moving)}_to_{stem(paths.fixed)}'


def batch_row(index: int, paths: PairFiles, report: PairReport | None, error: str | None,
              status: str | None = None) -> dict:
  """One summary row: files, status, Dice/HD95 before and after, folding, SDlogJ, times."""
  row: dict[str, Any] = {'index': index, 'fixed': paths.fixed, 'moving': paths.moving,
                         'status': status or ('failed' if error else 'ok'),
                         'error': error or ''}
  if report:
    d = report.dice or {}
    tre = report.landmarks or {}
    row.update({'dice_before': d.get('mean_before'), 'dice_after': d.get('mean_after'),
                'tre_before_mm': (tre.get('before_mm') or {}).get('mean'),
                'tre_after_mm': (tre.get('after_mm') or {}).get('mean'),
                'hd95_before_mm': d.get('hd95_mean_before'),
                'hd95_after_mm': d.get('hd95_mean_after'),
                'folding_fraction': report.jacobian['folding_fraction'],
                'sdlogj': report.jacobian['sdlogj'], **report.times_s,
                'out': os.path.dirname(report.files['report'])})
  return row


def batch_key(pairs: list[PairFiles], checkpoint: str | None,
              options: register_lib.RegisterOptions) -> str:
  """What makes two batch runs the same work: the pairs, the run and every option (but
  --overwrite). A rerun with the same key resumes; another key needs --overwrite."""
  # the four first files as a list, then only the optional files given (earlier keys stay)
  what = {'pairs': [list(dataclasses.astuple(p)[:4]) + [
              [k, v] for k, v in dataclasses.asdict(p).items() if k in BATCH_COLUMNS[4:] and v]
                    for p in pairs],
          'checkpoint': checkpoint and os.path.abspath(checkpoint),
          'options': dataclasses.asdict(dataclasses.replace(options, overwrite=False))}
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()


def _earlier_batch(out: str, key: str, overwrite: bool) -> dict:
  """The rows of an earlier run of this very batch in OUT (by index), to resume from; {} when
  there is none. Refuses, before any work, summary files that are not ours, and our summary
  of other work unless ``overwrite``."""
  files.check_replaceable(out, SUMMARY_FILES, True, '--out')
  path = os.path.join(out, SUMMARY_FILES[1])
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      earlier = json.load(f)
  except (OSError, ValueError):
    earlier = {}
  if earlier.get('batch_key') != key:
    if not overwrite:
      raise files.OutputPathError(
          f'--out {out}: holds the summary of another batch (other pairs, run or options); '
          'pass --overwrite to redo every pair there or choose a new --out.')
    return {}
  return {} if overwrite else {r['index']: r for r in earlier.get('rows', [])
                               if isinstance(r, dict) and r.get('status') == 'ok'}


def _done_earlier(out: str, row: dict | None) -> PairReport | None:
  """The report of a pair an earlier run of this batch finished, if its folder is intact."""
  if not row or not row.get('out'):
    return None
  path = os.path.join(out, os.path.basename(row['out']), register_lib.OUT_FILES['report'])
  if not files.is_ours(path):
    return None
  try:
    with open(path) as f:
      return PairReport.from_json(json.load(f))
  except (OSError, ValueError, TypeError, KeyError):   # unreadable or another version: redo it
    return None


def write_summary(out: str, summary: BatchSummary) -> None:
  """OUT/summary.csv and summary.json, replaced together (only ever ours)."""
  with files.disk_errors(out, '--out'):
    files.remove_stale_temp_dirs(out, 'summary')
    tmp = files.make_temp_dir(out, 'summary')
    try:
      report_lib.write_pair_csv(os.path.join(tmp, SUMMARY_FILES[0]), summary.rows)
      report_lib.write_summary_json(os.path.join(tmp, SUMMARY_FILES[1]), summary.to_json())
      files.publish_result(tmp, out, SUMMARY_FILES[1], SUMMARY_FILES, True)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def register_batch(pairs_csv: str, checkpoint: str | None, out: str, *,
                   options: register_lib.RegisterOptions = register_lib.RegisterOptions(),
                   log: Callable[[str], None] = lambda s: None) -> BatchSummary:
  """Registers every pair of ``pairs_csv`` in one process into OUT/<pair folder>/.

  The run is restored once, the encoder loaded once, one compile per grid shape. A pair that
  fails, with any error, is recorded (a user error's message; a bug's traceback too) and the
  others go on. OUT/summary.csv and summary.json list every pair (``ok``, ``failed`` or
  ``not run``) and are rewritten after each pair, so a killed batch leaves the summary so
  far; the same command again skips the pairs already done (their folders are whole by the
  atomic rule) and registers the rest. Returns the summary.
  """
  pairs = read_pairs_csv(pairs_csv, log)
  out = os.path.abspath(out)
  files.check_writable_dir(out, '--out')
  key = batch_key(pairs, checkpoint, options)
  earlier = _earlier_batch(out, key, options.overwrite) if os.path.isdir(out) else {}
  registrar = register_lib.Registrar(checkpoint, options, log)
  rows = [batch_row(i, p, None, None, 'not run') for i, p in enumerate(pairs, start=1)]
  summary = BatchSummary(checkpoint=registrar.checkpoint,
                         pairs_csv=os.path.abspath(pairs_csv), batch_key=key, pairs=len(rows),
                         failed=0, not_run=len(rows), resumed=0, setup_s=registrar.setup_s,
                         rows=rows)

  def update():
    summary.count()
    write_summary(out, summary)

  os.makedirs(out, exist_ok=True)
  try:
    for i, paths in enumerate(pairs, start=1):
      rep = _done_earlier(out, earlier.get(i))
      if rep is not None:
        log(f'pair {i}/{len(pairs)}: done earlier, kept ({os.path.basename(earlier[i]["out"])})')
        rows[i - 1] = batch_row(i, paths, rep, None)
        summary.resumed += 1
        continue
      log(f'pair {i}/{len(pairs)}: {paths.moving} -> {paths.fixed}')
      try:
        rep = registrar.register(paths, os.path.join(out, pair_folder(i, paths)))
        rows[i - 1] = batch_row(i, paths, rep, None)
      except errors.UserError as e:
        log(f'pair {i} failed: {e}')
        rows[i - 1] = batch_row(i, paths, None, str(e))
      except Exception as e:     # a bug: recorded with its traceback, the batch goes on
        trace = traceback.format_exc()
        log(f'pair {i} failed with an unexpected error:\n{trace}')
        rows[i - 1] = {**batch_row(i, paths, None, f'{type(e).__name__}: {e}'),
                       'traceback': trace}
      update()
  except KeyboardInterrupt:
    update()
    raise BatchInterrupted(os.path.join(out, SUMMARY_FILES[0]), summary) from None
  update()
  return summary


class BatchInterrupted(KeyboardInterrupt):
  """Ctrl-C in a batch: the summary so far is written; the same command resumes."""

  def __init__(self, summary_csv: str, summary: BatchSummary):
    super().__init__(summary_csv)
    self.summary_csv, self.summary = summary_csv, summary
