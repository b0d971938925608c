"""Evaluate a trained head on the pairs of a feature store (paper §3.1; Learn2Reg)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmir_jax.train import data as data_lib
from fmir_jax.ops import pyramid
from fmir_jax.core import files
from fmir_jax.core import pair_metrics
from fmir_jax.evaluate import report
from fmir_jax.evaluate.summary import EvalSummary
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import run_file
from fmir_jax.core import store as store_lib
from fmir_jax.model import inference
from fmir_jax.train import runs
from fmir_jax.ops import warp as W


@dataclasses.dataclass
class PairResult:
  ref: data_lib.PairRef
  metrics: pair_metrics.PairMetrics
  head_s: float          # head time (device, synchronised), seconds
  feature_s: float       # feature extraction of both volumes, seconds (from the store)
  disp_vox: np.ndarray | None = None


_warp_nearest = jax.jit(W.warp_nearest)


def warp_labels_nearest(labels: np.ndarray, disp_vox: np.ndarray) -> np.ndarray:
  """Host wrapper of the JAX nearest-neighbour label warp (H,W,D) x (H,W,D,3)."""
  return np.asarray(_warp_nearest(jnp.asarray(labels.astype(np.int32)),
                                  jnp.asarray(disp_vox, jnp.float32)))


def _feature_seconds(store, key: str) -> float:
  t = store.timing(key)
  if not t:
    return float('nan')
  return float(t.get('seconds', float('nan')))


def evaluate_pairs(predict: Callable, params, stores: Sequence, refs: Sequence[data_lib.PairRef],
                   pca, classes: Sequence[int], *, keep_disp: int = 0,
                   progress=None) -> list[PairResult]:
  """Registers every pair, scores it, and times the head (after one warm-up call).

  predict: ``inference.make_predict(...)``; params: model params; pca: device PCA dict.
  keep_disp: keep the displacement of the first N pairs (for figures).
  """
  results = []
  warm = set()
  it = progress(list(enumerate(refs))) if progress else enumerate(refs)
  for i, ref in it:
    st = stores[ref.store]
    item = data_lib.pair_item(stores, ref)
    moving = {k: jnp.asarray(v)[None] for k, v in inference.model_inputs(item['moving']).items()}
    fixed = {k: jnp.asarray(v)[None] for k, v in inference.model_inputs(item['fixed']).items()}
    shape_key = (ref.store, moving['image'].shape, moving['feat'].shape)
    if shape_key not in warm:       # compile outside the timed call
      jax.block_until_ready(predict(params, moving, fixed, pca))
      warm.add(shape_key)
    t0 = time.perf_counter()
    disp = jax.block_until_ready(predict(params, moving, fixed, pca))
    head_s = time.perf_counter() - t0
    disp = np.asarray(disp[0])
    feat_s = _feature_seconds(st, ref.moving) + _feature_seconds(st, ref.fixed)
    info = st.info(ref.fixed)
    if not (item['moving']['has_labels'] and item['fixed']['has_labels']):
      raise store_lib.StoreError(
          f'pair {ref.moving} -> {ref.fixed} in {st.path} has no labels: Dice and HD95 need '
          'labels for both volumes')
    m = pair_metrics.evaluate_pair(
        disp, item['moving']['labels'], item['fixed']['labels'], classes, info.spacing_mm,
        warp_labels_nearest, moving=ref.moving, fixed=ref.fixed, subject=info.subject,
        time_s=head_s + (feat_s if np.isfinite(feat_s) else 0.0))
    results.append(PairResult(ref, m, head_s, feat_s, disp if i < keep_disp else None))
  return results


# ------------------------------------------------------------------------------- whole runs

def is_bidirectional(refs: Sequence[data_lib.PairRef], stores) -> bool:
  """True when every pair's reverse is also listed within one subject (cardiac protocol)."""
  pairs = {(r.store, r.moving, r.fixed) for r in refs}
  if not all((r.store, r.fixed, r.moving) in pairs for r in refs):
    return False
  return all(stores[r.store].info(r.moving).subject == stores[r.store].info(r.fixed).subject
             for r in refs)


def pca_for_store(workdir: str, run_info: dict, store, pca_store_path: str = '',
                  progress=None):
  """The PCA basis that maps ``store``'s features to the head's c' channels.

  The run's own basis when the store comes from the training backbone; else a basis for
  this backbone saved in the run (``pca/``), or fitted now on the training split of
  ``pca_store_path`` (a store of the same backbone) and saved. Refuses otherwise.
  """
  c_prime = int(run_info['config']['feature_channels'])
  basis = run_file.load_pca(workdir, store.header)
  if basis is not None:
    return basis
  if not pca_store_path:
    raise ckpt.RunError(
        f'{store.path}: features of backbone {store.header.get("backbone")} (layer '
        f'{store.header.get("layer")}) have no PCA basis in {workdir}/pca. Pass '
        '--pca_store=PATH, a feature store of the same backbone on training data, to fit one '
        '(paper §2.4: each backbone gets its own basis).')
  src = store_lib.FeatureStore(pca_store_path)
  store_lib.check_compatible(store.header, src.header)
  if int(store.header['channels']) < c_prime:
    raise store_lib.StoreError(f'{store.path}: {store.header["channels"]} channels < '
                               f"c'={c_prime}, the channels the head {workdir} needs; "
                               'extract features with at least that many channels')
  basis = inference.fit_pca([src], c_prime, progress=progress,
                            fit=inference.channel_norm(run_info['config']).fit)
  run_file.save_pca(workdir, store.header, basis, source=pca_store_path)
  return basis


def settings_for_store(st, refs, trained_on: Sequence[str],
                       settings: Sequence[run_file.StoreSetting]) -> run_file.StoreSetting:
  """The factors and label count to run and score a store's pairs ``refs`` with.

  The run's training store of the same dataset (and, where the run recorded it, the same
  voxel spacing) lends its pyramid factors; any other store (cross-domain, or a "custom"
  pair list on another grid) gets factors from its voxel spacing
  (``pyramid.factors_for_spacing``, the rule of ``fmir register`` on a native grid). Labels:
  the store's own count (its reader's), else that training store's (not for "custom"
  lists), else every label the volumes hold. ``spacing_mm``: the store's.
  """
  name = store_lib.dataset_name(st.header)
  spacing = st.info(refs[0].fixed).spacing_mm if refs else None
  same = [s for d, s in zip(trained_on, settings) if d == name]
  if spacing is not None:
    same = [s for s in same if s.spacing_mm is None
            or np.allclose(s.spacing_mm, spacing, rtol=1e-3)]
  factors = (same or settings)[0].factors if same or not refs else \
      pyramid.factors_for_spacing(spacing)
  fallback = same[0].num_classes if same else settings[0].num_classes
  num_classes = int(st.header.get('num_classes', 0)) or (
      fallback if same and name != 'custom' else
      max((int(np.max(lab)) for r in refs for k in (r.moving, r.fixed)
           if (lab := st.labels(k)) is not None), default=fallback))
  return run_file.StoreSetting(
      factors, num_classes, blur_in_plane_only=bool(same and same[0].blur_in_plane_only),
      spacing_mm=None if spacing is None else tuple(float(v) for v in spacing))


def default_out_dir(workdir: str, store_path: str, split: str, channel_norm: str = '') -> str:
  """Where ``evaluate_run`` writes without an ``out_dir``: WORKDIR/eval/STORE_SPLIT[_NORM]."""
  tag = os.path.basename(os.path.normpath(store_path))
  return os.path.join(workdir, 'eval', f'{tag}_{split}'
                      + (f'_{channel_norm}' if channel_norm else ''))


def evaluate_run(workdir: str, store_path: str, *, split: str = 'test',
                 checkpoint: str = 'best', pca_store: str = '', out_dir: str = '',
                 figures: int = 3, limit: int = 0, factors=None, progress=None,
                 label_names: Sequence[str] | None = None, channel_norm: str = '',
                 overwrite: bool = False) -> EvalSummary:
  """Evaluates a run on a store's split; writes CSV, JSON, Markdown and figures.

  channel_norm: the inference normalisation to use instead of the run's own; it must share
    the run's PCA fit (``standardise`` and ``matched`` train identically, so either serves
    a run trained with the other).
  overwrite: replace an earlier evaluation in ``out_dir`` (files of other names, and files
    fmir-jax did not write, are never touched; ``files.check_replaceable``).

  Returns the summary (its JSON is ``out_dir/summary.json``). The files appear
  together when everything is computed (``files.publish_result``).
  """
  run_file.read_run_info(workdir)        # "not a run" before any complaint about the output path
  out_dir = out_dir or default_out_dir(workdir, store_path, split, channel_norm)
  why = run_file.unwritable_reason(out_dir)
  if why:                            # before the compile
    raise ckpt.RunError(f'cannot write the evaluation to {out_dir}: {why}; pass --out=DIR '
                        'naming a writable directory')
  files.check_result_dir(out_dir, EVAL_FILES, overwrite, '--out')
  run = runs.load_run(workdir, checkpoint, flag=None)
  config, info = run.config, run.info
  norm = inference.channel_norm(config, channel_norm, run=workdir)
  norm_name = channel_norm or config.get('channel_norm', 'paper')
  st = store_lib.FeatureStore(store_path)
  basis = pca_for_store(workdir, info, st, pca_store, progress)
  pca = inference.pca_to_device(basis, norm)
  settings = run.store_settings or [
      run_file.StoreSetting(None, int(config.data.num_classes))]
  refs = data_lib.eval_pairs([st], split, limit)
  chosen = settings_for_store(st, refs, info.get('store_datasets') or [], settings)
  factors = chosen.factors if factors is None else factors
  num_classes = chosen.num_classes
  classes = tuple(range(1, num_classes + 1))
  predict = inference.make_predict(run.graphdef, c_prime=run.model.feature_channels,
                                   factors=factors)
  results = evaluate_pairs(predict, run.params, [st], refs, pca, classes, keep_disp=figures,
                           progress=progress)
  per_pair = [r.metrics for r in results]
  bidir = is_bidirectional(refs, [st])
  scores = (pair_metrics.aggregate_bidirectional(per_pair) if bidir
            else pair_metrics.aggregate(per_pair))
  summary = EvalSummary(
      **scores, workdir=workdir, checkpoint_step=run.step, store=store_path, split=split,
      backbone=st.header.get('backbone'), mode=info['mode'], channel_norm=norm_name,
      bidirectional_average=bidir, n_directed_pairs=len(results), pyramid_factors=factors,
      pca_store=pca_store, head_s_mean=float(np.mean([r.head_s for r in results])),
      feature_s_mean=float(np.nanmean([r.feature_s for r in results]))
      if any(np.isfinite(r.feature_s) for r in results) else float('nan'))
  with files.disk_errors(out_dir, '--out'):
    summary.table1 = _write_evaluation(out_dir, summary, results, per_pair, st, info, classes,
                                       figures, label_names, overwrite)
  return summary


EVAL_FILES = ('pairs.csv', 'summary.json', 'table1.md', 'dice_boxplot.png')


def _write_evaluation(out_dir, summary, results, per_pair, st, info, classes, figures,
                      label_names, overwrite) -> str:
  """The evaluation's files, made in a temporary folder beside ``out_dir`` and published
  together; returns Table 1 (Markdown)."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  tmp = files.make_temp_dir(parent, os.path.basename(os.path.abspath(out_dir)))
  try:
    rows = []
    for r in results:
      row = r.metrics.to_row()
      row.update(head_s=r.head_s, feature_s=r.feature_s)
      rows.append(row)
    report.write_pair_csv(os.path.join(tmp, 'pairs.csv'), rows)
    name = f'FMIR ({info["mode"]}, {store_lib.backbone_name(st.header)})'
    table = report.markdown_table1({name: summary.metrics})
    with open(os.path.join(tmp, 'table1.md'), 'w') as f:
      f.write(table)
    figs = []
    for r in results[:figures]:
      item = data_lib.pair_item([st], r.ref)
      m, fx = item['moving'], item['fixed']
      disp = r.disp_vox
      warped = np.asarray(W.warp(jnp.asarray(m['image'])[..., None], jnp.asarray(disp)))[..., 0]
      warped_lab = warp_labels_nearest(m['labels'], disp)
      fig = f'pair_{r.ref.moving}_to_{r.ref.fixed}.png'
      report.pair_figure(os.path.join(tmp, fig), fx['image'], m['image'], warped, fx['labels'],
                         m['labels'], warped_lab, disp, title=f'{r.ref.moving} -> {r.ref.fixed}')
      figs.append(os.path.join(out_dir, fig))
    names = list(label_names) if label_names else [f'label {c}' for c in classes]
    report.dice_boxplot(os.path.join(tmp, 'dice_boxplot.png'),
                        {n: [p.dice[c] for p in per_pair] for n, c in zip(names, classes)})
    summary.files = {'pairs_csv': os.path.join(out_dir, 'pairs.csv'),
                     'summary_json': os.path.join(out_dir, 'summary.json'),
                     'table1_md': os.path.join(out_dir, 'table1.md'),
                     'figures': figs + [os.path.join(out_dir, 'dice_boxplot.png')]}
    report.write_summary_json(os.path.join(tmp, 'summary.json'), summary.to_json())
    earlier = set(EVAL_FILES) | {n for n in (os.listdir(out_dir) if os.path.isdir(out_dir)
                                             else []) if re.match(r'pair_.*\.png$', n)}
    files.publish_result(tmp, out_dir, 'summary.json', earlier, overwrite)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return table


def earlier_summary(workdir: str, store_path: str, out_dir: str, *, split: str = 'test',
                    checkpoint: str = 'best', limit: int = 0, channel_norm: str = '',
                    pca_store: str = '') -> EvalSummary | None:
  """The summary an earlier ``evaluate_run`` left in ``out_dir``, if it scored this very
  evaluation: same run folder and checkpoint step (and written after that checkpoint was
  saved), store, split, number of pairs, channel_norm and PCA store. Else None.

  Lets a long cross-domain table (``eval.py --reuse``) resume where it stopped.
  """
  path = os.path.join(out_dir, 'summary.json')
  try:
    with open(path) as f:
      s = json.load(f)
    with open(os.path.join(out_dir, 'table1.md')) as f:
      table = f.read()
  except (OSError, ValueError):
    return None
  mgr, step = ckpt.best_or_latest(workdir, checkpoint)
  norm = channel_norm or run_file.read_run_info(workdir).get('channel_norm', 'paper')
  refs = data_lib.eval_pairs([store_lib.FeatureStore(store_path)], split, limit)
  same = (isinstance(s, dict)
          and os.path.abspath(s.get('workdir', '')) == os.path.abspath(workdir)
          and os.path.abspath(s.get('store', '')) == os.path.abspath(store_path)
          and s.get('split') == split and s.get('checkpoint_step') == int(step)
          and s.get('channel_norm') == norm and s.get('pca_store', '') == pca_store
          and s.get('n_directed_pairs') == len(refs)
          and os.path.getmtime(path) > os.path.getmtime(ckpt.step_dir(mgr, step)))
  if not same:
    return None
  try:
    return EvalSummary.from_json(s, table)
  except TypeError:                  # a summary of another version: evaluate again
    return None
