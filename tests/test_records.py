"""The typed records at the seams serialise to the JSON files other tools read: report.json
(one registered pair), summary.json (an evaluation, a batch) and run.json's store settings."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fmir_jax.core import metrics
from fmir_jax.core import pair_metrics
from fmir_jax.evaluate import report
from fmir_jax.evaluate.summary import EvalSummary
from fmir_jax.register.records import BatchSummary, GridRecord, PairReport
from fmir_jax.train.run_file import StoreSetting

# The keys of report.json, in order: what users' scripts and docs/register.md read.
REPORT_KEYS = ['fixed', 'moving', 'fixed_labels', 'moving_labels', 'fixed_mask', 'moving_mask',
               'fixed_landmarks', 'moving_landmarks', 'checkpoint',
               'checkpoint_step', 'head', 'head_finest_level', 'backbone', 'layer',
               'encoder_input', 'grid', 'warnings', 'fixed_grid', 'dice', 'landmarks',
               'jacobian', 'linear',
               'instance_optimisation', 'convention', 'files', 'times_s']
GRID_KEYS = ['mode', 'reader', 'reader_options', 'shape', 'affine', 'spacing_mm',
             'pyramid_factors']


def _report():
  affine = np.diag([2.0, 2.0, 3.0, 1.0])
  return PairReport(
      fixed='/d/f.nii.gz', moving='/d/m.nii.gz', fixed_labels=None, moving_labels=None,
      fixed_mask='/d/fm.nii.gz', moving_mask=None, fixed_landmarks=None, moving_landmarks=None,
      checkpoint='/runs/a', checkpoint_step=12, head=None, head_finest_level=0,
      backbone={'name': 'dinov3'}, layer=-1, encoder_input={'size': [224, 224]},
      grid=GridRecord(mode='native', reader='custom', reader_options={}, shape=[8, 8, 4],
                      affine=affine.tolist(), spacing_mm=[2.0, 2.0, 3.0],
                      pyramid_factors=(2, 2, 1)),
      warnings=['f.nii.gz: pixdim says 4x4x4'],
      fixed_grid={'shape': [8, 8, 4], 'affine': affine.tolist()}, dice=None, landmarks=None,
      jacobian={'folding_fraction': np.float64(0.0), 'sdlogj': np.float32(0.25)},
      linear=None, instance_optimisation=None, convention='RAS mm', times_s={'head_s': 0.5})


def test_pair_report_json_has_the_report_keys_and_reads_back(tmp_path):
  rep = _report()
  path = tmp_path / 'report.json'
  report.write_summary_json(path, rep.to_json())
  back = json.loads(path.read_text())
  assert list(back) == REPORT_KEYS and list(back['grid']) == GRID_KEYS
  assert back['grid']['pyramid_factors'] == [2, 2, 1]
  assert back['jacobian']['sdlogj'] == pytest.approx(0.25)
  again = PairReport.from_json(back)
  assert again.grid.shape == [8, 8, 4] and again.warnings == rep.warnings
  assert again.to_json()['times_s'] == {'head_s': 0.5}
  new = ('linear', 'fixed_mask', 'moving_mask', 'fixed_landmarks', 'moving_landmarks',
         'landmarks')
  older = {k: v for k, v in back.items() if k not in new}   # before the linear stage
  assert all(getattr(PairReport.from_json(older), k) is None for k in new)
  with pytest.raises(TypeError):              # a report of another version is not read as ours
    PairReport.from_json({**back, 'surprise': 1})


def test_batch_summary_counts_its_rows():
  rows = [{'status': 'ok'}, {'status': 'failed'}, {'status': 'not run'}, {'status': 'ok'}]
  s = BatchSummary('/runs/a', '/d/pairs.csv', 'k', 4, 0, 4, 0, 1.5, rows)
  s.count()
  assert (s.failed, s.not_run) == (1, 1)
  assert list(s.to_json()) == ['checkpoint', 'pairs_csv', 'batch_key', 'pairs', 'failed',
                               'not_run', 'resumed', 'setup_s', 'rows']


def _pair(moving, dice):
  classes = (1, 2)
  return pair_metrics.PairMetrics(
      moving=moving, fixed='f', subject=moving, classes=classes,
      dice=dict(zip(classes, dice)), dice_mean=metrics.mean_dice(dict(zip(classes, dice))),
      hd95={1: 3.0, 2: 4.0}, hd95_mean=3.5, initial_dice={1: 0.5, 2: 0.6},
      initial_dice_mean=0.55, initial_hd95={1: 9.0, 2: 10.0}, initial_hd95_mean=9.5,
      sdlogj=0.05, std_log_jacdet=0.2, folding_fraction=0.0, time_s=math.nan)


def test_eval_summary_json_is_the_aggregate_plus_the_run_and_reads_back(tmp_path):
  scores = pair_metrics.aggregate([_pair('a', [0.8, 0.6]), _pair('b', [0.6, 0.4])])
  s = EvalSummary(**scores, workdir='/runs/a', checkpoint_step=6, store='/f/s', split='test',
                  backbone={'name': 'dinov3'}, mode='uni', channel_norm='paper',
                  bidirectional_average=False, n_directed_pairs=2, pyramid_factors=(2, 2, 1),
                  pca_store='', head_s_mean=0.1, feature_s_mean=math.nan,
                  files={'summary_json': '/o/summary.json'}, table1='| Model |')
  path = tmp_path / 'summary.json'
  report.write_summary_json(path, s.to_json())
  back = json.loads(path.read_text())
  assert list(back)[:4] == ['n_pairs', 'classes', 'metrics', 'per_class']
  assert 'table1' not in back and back['feature_s_mean'] is None     # NaN -> null
  assert back['metrics']['dice_mean']['mean'] == pytest.approx(np.mean([0.7, 0.5]))
  again = EvalSummary.from_json(back, '| Model |')
  assert again.metrics == back['metrics'] and again.table1 == '| Model |'
  assert again.per_class['dice']['2']['mean'] == pytest.approx(0.5)


def test_store_setting_reads_back_from_run_json():
  s = StoreSetting(((2, 2, 1), (2, 2, 2)), 3, True, (1.6, 1.6, 8.0))
  entry = json.loads(json.dumps(s.to_json()))      # as run.json holds it: lists
  assert entry['factors'] == [[2, 2, 1], [2, 2, 2]]
  assert StoreSetting.from_json(entry) == s
  old = StoreSetting.from_json({'factors': [2, 2, 1], 'num_classes': 3,
                                'blur_in_plane_only': False})   # a run without spacing
  assert old == StoreSetting((2, 2, 1), 3) and old.spacing_mm is None
