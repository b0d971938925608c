"""Table 2 (cross-domain): every run evaluated on every store, the scores arranged by
(train set, mode, test set, backbone); ``report.markdown_table2`` renders it.

eval.py's ``--workdir`` and ``--features`` lists are the rows and the columns.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from fmir_jax.core import store as store_lib
from fmir_jax.evaluate import evaluation
from fmir_jax.evaluate import report
from fmir_jax.train import run_file


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """How each (run, store) cell is evaluated (eval.py's flags)."""
  split: str = 'test'
  checkpoint: str = 'best'
  limit: int = 0
  pca_stores: Sequence[str] = ()   # none, one for every store, or one per store
  channel_norm: str = ''
  figures: int = 0
  overwrite: bool = False
  reuse: bool = False
  out: str = ''                    # one run and one store: OUT itself; else OUT/<run>/<store>


@dataclasses.dataclass
class Grid:
  """The cells' metrics: ``scores[(train set, mode, test set, backbone)]``, and the initial
  (identity) scores per test set; ``markdown()`` is Table 2."""
  scores: dict[tuple[str, str, str, str], Any] = dataclasses.field(default_factory=dict)
  initial: dict[str, Any] = dataclasses.field(default_factory=dict)

  def markdown(self) -> str:
    return report.markdown_table2(self.scores, self.initial)


def cell_out_dir(spec: GridSpec, workdir: str, store_path: str, n_runs: int,
                 n_stores: int) -> str:
  """Where one cell's evaluation is written."""
  out = spec.out
  if out and (n_runs > 1 or n_stores > 1):
    out = os.path.join(out, os.path.basename(os.path.normpath(workdir)),
                       os.path.basename(os.path.normpath(store_path)))
  return out or evaluation.default_out_dir(workdir, store_path, spec.split, spec.channel_norm)


def evaluate_grid(workdirs: Sequence[str], store_paths: Sequence[str], spec: GridSpec, *,
                  progress: Callable[[str], Callable] | None = None,
                  log: Callable[[str], None] = print) -> Grid:
  """Evaluates every run on every store (``evaluation.evaluate_run``; with ``spec.reuse`` an
  up-to-date earlier summary is reused) and arranges the scores for Table 2."""
  pca = list(spec.pca_stores)
  rows, columns = table2_rows(workdirs, spec.channel_norm), table2_columns(store_paths)
  grid = Grid()
  for workdir in workdirs:
    for i, store_path in enumerate(store_paths):
      out = cell_out_dir(spec, workdir, store_path, len(workdirs), len(store_paths))
      how = dict(split=spec.split, checkpoint=spec.checkpoint, limit=spec.limit,
                 pca_store=(pca[i] if len(pca) > 1 else (pca[0] if pca else '')),
                 channel_norm=spec.channel_norm)
      summary = spec.reuse and evaluation.earlier_summary(workdir, store_path, out, **how)
      log(f'\n{workdir} on {store_path} [{spec.split}]'
          + (f' (reused: {out})' if summary else ''))
      summary = summary or evaluation.evaluate_run(
          workdir, store_path, out_dir=out, figures=spec.figures,
          progress=progress and progress(store_path), overwrite=spec.overwrite, **how)
      log(summary.table1)
      log(f"head {summary.head_s_mean:.3f} s/pair, features "
          f"{summary.feature_s_mean:.3f} s/pair; files in "
          f"{os.path.dirname(summary.files['summary_json'])}")
      header = store_lib.FeatureStore(store_path).header
      key = (*rows[workdir], columns[store_path], store_lib.backbone_name(header))
      grid.scores[key] = summary.metrics
      grid.initial[key[2]] = summary.metrics
  return grid


def table2_columns(store_paths: Sequence[str]) -> dict[str, str]:
  """store path -> its Table 2 column: the store's dataset name, with the folder name added
  when two stores share a dataset (e.g. one phantom set on two grids), so that neither
  overwrites the other's cells."""
  names = {p: store_lib.dataset_name(store_lib.FeatureStore(p).header) or '?'
           for p in store_paths}
  shared = _shared(names)
  return {p: _with_folder(n, p) if p in shared else n for p, n in names.items()}


def table2_rows(workdirs: Sequence[str], channel_norm: str = '') -> dict[str, tuple[str, str]]:
  """workdir -> (train set, mode label): the Table 2 row each run's scores go to.

  The label is the mode, with the inference channel_norm when it is not the paper's
  (``channel_norm`` overrides every run's own, as in ``evaluate_run``). Runs that would share
  a row (same training data, mode and norm: e.g. two learning rates) are told apart by their
  folder names, so no run's scores overwrite another's.
  """
  rows = {}
  for wd in workdirs:
    run = run_file.read_run_info(wd)
    norm = channel_norm or run.get('channel_norm', 'paper')
    mode = run['mode'] + ('' if norm == 'paper' else f' ({norm})')
    trained_on = '+'.join(run.get('store_datasets') or []) or run['config']['name']
    rows[wd] = (trained_on, mode)
  shared = _shared(rows)
  return {wd: (t, _with_folder(m, wd) if wd in shared else m) for wd, (t, m) in rows.items()}


def _shared(keys: dict) -> set:
  """The paths (dict keys) whose value another path has too."""
  values = list(keys.values())
  return {p for p, k in keys.items() if values.count(k) > 1}


def _with_folder(label: str, path: str) -> str:
  """'label [folder]': a Table 2 label told apart by the folder name of its run or store."""
  return f'{label} [{os.path.basename(os.path.normpath(path))}]'
