"""`fmir register --pairs`: many pairs in one process (one restore, one encoder load, one
compile per grid shape), per-pair output folders and one summary CSV/JSON."""
from __future__ import annotations

import csv
import os
from typing import Any, Callable

from fmir_jax import files
from fmir_jax import register as register_lib
from fmir_jax.register import PairFiles, RegisterError


BATCH_COLUMNS = ('fixed', 'moving', 'fixed_labels', 'moving_labels')


def read_pairs_csv(path: str) -> list[PairFiles]:
  """Rows of a pairs CSV (header: fixed, moving[, fixed_labels, moving_labels]); relative
  paths are resolved against the CSV's folder."""
  try:
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise RegisterError(f'--pairs {path}: cannot read it ({e.strerror}).') from None
  if not rows or not {'fixed', 'moving'} <= set(rows[0]):
    raise RegisterError(f'--pairs {path}: needs a header row with columns fixed,moving '
                        '(optional fixed_labels,moving_labels) and at least one pair.')
  unknown = set(rows[0]) - set(BATCH_COLUMNS)
  if unknown:
    raise RegisterError(f'--pairs {path}: unknown columns {sorted(unknown)}; use '
                        f'{", ".join(BATCH_COLUMNS)}.')
  base = os.path.dirname(os.path.abspath(path))
  resolve = lambda p: os.path.join(base, p.strip()) if p and p.strip() else None  # noqa: E731
  out = []
  for i, r in enumerate(rows, start=2):
    if not (r.get('fixed') or '').strip() or not (r.get('moving') or '').strip():
      raise RegisterError(f'--pairs {path} line {i}: fixed and moving are required.')
    out.append(PairFiles(*(resolve(r.get(c)) for c in BATCH_COLUMNS)))
  return out


def pair_folder(index: int, paths: PairFiles) -> str:
  """OUT sub-folder of a batch pair: 0001_<moving stem>_to_<fixed stem>."""
  stem = lambda p: os.path.basename(p).split('.nii')[0]  # noqa: E731
  return f'{index:04d}_{stem(paths.moving)}_to_{stem(paths.fixed)}'


def batch_row(index: int, paths: PairFiles, report: dict | None, error: str | None) -> dict:
  """One summary row: files, status, Dice/HD95 before and after, folding, SDlogJ, times."""
  row: dict[str, Any] = {'index': index, 'fixed': paths.fixed, 'moving': paths.moving,
                         'status': 'failed' if error else 'ok', 'error': error or ''}
  if report:
    d = report['dice'] or {}
    row.update({'dice_before': d.get('mean_before'), 'dice_after': d.get('mean_after'),
                'hd95_before_mm': d.get('hd95_mean_before'),
                'hd95_after_mm': d.get('hd95_mean_after'),
                'folding_fraction': report['jacobian']['folding_fraction'],
                'sdlogj': report['jacobian']['sdlogj'], **report['times_s'],
                'out': os.path.dirname(report['files']['report'])})
  return row


def register_batch(pairs_csv: str, checkpoint: str | None, out: str, *,
                   options: register_lib.RegisterOptions = register_lib.RegisterOptions(),
                   log: Callable[[str], None] = lambda s: None,
                   errors: tuple[type, ...] = (ValueError,)) -> dict[str, Any]:
  """Registers every pair of ``pairs_csv`` in one process into OUT/<pair folder>/.

  The run is restored once, the encoder loaded once, one compile per grid shape. A pair
  that fails with one of ``errors`` is recorded and the others go on. Writes
  OUT/summary.csv and OUT/summary.json; returns the summary.
  """
  from fmir_jax import report as report_lib
  pairs = read_pairs_csv(pairs_csv)
  out = os.path.abspath(out)
  files.check_writable_dir(out, '--out')
  registrar = register_lib.Registrar(checkpoint, options, log)
  rows = []
  for i, paths in enumerate(pairs, start=1):
    log(f'pair {i}/{len(pairs)}: {paths.moving} -> {paths.fixed}')
    try:
      rep = registrar.register(paths, os.path.join(out, pair_folder(i, paths)))
      rows.append(batch_row(i, paths, rep, None))
    except errors as e:
      log(f'pair {i} failed: {e}')
      rows.append(batch_row(i, paths, None, str(e)))
  summary = {'checkpoint': registrar.checkpoint, 'pairs': len(rows),
             'failed': sum(r['status'] == 'failed' for r in rows),
             'setup_s': registrar.setup_s, 'rows': rows}
  report_lib.write_pair_csv(os.path.join(out, 'summary.csv'), rows)
  report_lib.write_summary_json(os.path.join(out, 'summary.json'), summary)
  return summary
