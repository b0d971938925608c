"""bench/learning.py --smoke end to end (a subprocess, as a user runs it): phantoms of both
datasets, `mind` features, one UN run (cardiac, its own learning rate) validated with PCA
and with the training draw, the curves (CSV equal to the trainer's own val.jsonl, PNG) and
the cross-domain table on three test stores, two of them the cardiac phantoms on two grids
(values equal to eval.py's own summary.json files). A second call trains nothing and
reuses every evaluation.
"""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

# End to end: trains and evaluates through the bench (the unit run leaves it out: -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench', 'learning.py')


def _bench(out, *args):
  return subprocess.run([sys.executable, BENCH, '--out', str(out), '--smoke', '--plan',
                         'cardiac:UN:matched:1e-3', '--test-datasets',
                         'cardiac,cardiac_wide,abdomen', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


def test_learning_smoke_curves_and_cross_domain_table(tmp_path):
  out = tmp_path / 'learning'
  r = _bench(out)
  assert r.returncode == 0, r.stderr[-3000:]
  runs = ['cardiac_UN_matched_lr0.001']   # the plan's own learning rate names the run
  with open(out / 'curves.csv') as f:
    rows = list(csv.DictReader(f))
  assert sorted({row['run'] for row in rows}) == sorted(runs)
  for run in runs:
    logged = [json.loads(line) for line in open(out / 'runs' / run / 'val.jsonl')]
    mine = [row for row in rows if row['run'] == run]
    assert [int(row['step']) for row in mine] == [rec['step'] for rec in logged] == [2]
    for row, rec in zip(mine, logged):
      for key in ('dice', 'dice_draw', 'initial_dice', 'folding_fraction'):
        assert 0.0 <= rec[key] <= 1.0
        np.testing.assert_allclose(float(row[key]), rec[key], rtol=1e-12)
      assert row['mode'] == 'UN' and row['channel_norm'] == 'matched'
      assert float(row['lr']) == 1e-3
    with open(out / 'runs' / run / 'run.json') as f:
      assert json.load(f)['config']['optim']['lr'] == 1e-3
  png = (out / 'learning_curves.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000

  table = (out / 'table2.md').read_text().splitlines()
  # one phantom set on two grids: two columns, told apart by the store's folder name
  tests = [h.strip().rsplit(' Dice (%)', 1)[0] for h in table[0].strip('|').split('|')[2:]
           if h.strip()]
  assert tests == ['abdomen', 'acdc [cardiac]', 'acdc [cardiac_wide]']
  assert table[3].startswith('| Initial')
  body = {tuple(c.strip() for c in line.strip('|').split('|'))[0]: line for line in table[4:]}
  assert set(body) == {'acdc'}
  # each cell is eval.py's mean Dice of that run on that test store (its summary.json)
  for run in runs:
    train = {'cardiac': 'acdc', 'abdomen': 'abdomen'}[run.split('_')[0]]
    cells = [c.strip() for c in body[train].strip('|').split('|')]
    assert cells[1] == 'UN (matched)'
    for test, cell in zip(tests, cells[2:]):
      folder = test.split('[')[-1].rstrip(']') if '[' in test else test
      with open(out / 'eval' / run / folder / 'summary.json') as f:
        s = json.load(f)
      assert s['n_directed_pairs'] == 2
      assert cell == f"{100 * s['metrics']['dice_mean']['mean']:.2f}"
      # cross-domain on the isotropic abdomen grid halves every axis; cardiac keeps z
      want = [2, 2, 2] if test == 'abdomen' else [2, 2, 1]
      assert np.asarray(s['pyramid_factors']).reshape(-1, 3).tolist()[0] == want

  again = _bench(out)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count(': done') == 1 and 'training to step' not in again.stdout
  assert again.stdout.count('(reused: ') == 3 and 'eval ' not in again.stderr
  assert (out / 'table2.md').read_text().splitlines() == table
  # reused only for the same evaluation: other pairs, or a checkpoint saved after it, redo it
  from fmir_jax.train import checkpoint as ckpt
  from fmir_jax.evaluate import evaluation
  run, store = str(out / 'runs' / runs[0]), str(out / 'features' / 'cardiac')
  done = str(out / 'eval' / runs[0] / 'cardiac')
  kept = evaluation.earlier_summary(run, store, done, limit=2)
  assert kept.n_directed_pairs == 2 and kept.table1.startswith('| Model')
  assert evaluation.earlier_summary(run, store, done, limit=1) is None
  assert evaluation.earlier_summary(run, store, done, limit=2, channel_norm='standardise') is None
  mgr, step = ckpt.best_or_latest(run, 'best')
  later = os.path.getmtime(os.path.join(done, 'summary.json')) + 10
  os.utime(ckpt.step_dir(mgr, step), (later, later))
  assert evaluation.earlier_summary(run, store, done, limit=2) is None

  # eval.py --channel_norm: the matched run seen through the whitened PCA (the same fit,
  # trained alike) goes to its own folder and says so; a norm of another fit is refused
  # (eval.py prints it as one line, exit 2: ValueError is one of its USER_ERRORS)
  other = evaluation.evaluate_run(run, store, split='test', figures=0, limit=2,
                                  channel_norm='standardise')
  assert other.channel_norm == 'standardise' and other.n_directed_pairs == 2
  assert os.path.exists(os.path.join(run, 'eval', 'cardiac_test_standardise', 'summary.json'))
  with pytest.raises(ValueError, match=re.escape("use one of ['matched', 'standardise']")):
    evaluation.evaluate_run(run, store, split='test', figures=0, limit=2, channel_norm='paper')


def test_learning_plan_parsing(tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import learning
  budget = learning.Budget(steps=7, eval_every=1, dataset_steps=(('abdomen', 3),))
  assert [budget.steps_for(d) for d in ('cardiac', 'cardiac_wide', 'abdomen')] == [7, 7, 3]
  for bad in ('brain=10', 'cardiac=0', 'cardiac=x', 'cardiac'):
    with pytest.raises(SystemExit) as e:
      learning.main(['--out', str(tmp_path / 'o'), '--dataset-steps', bad])
    assert e.value.code == 2 and 'is not NAME=STEPS' in capsys.readouterr().err
  assert not (tmp_path / 'o').exists()
  assert learning.parse_run('cardiac:-CR:paper').name == 'cardiac_noCR_paper'
  run = learning.parse_run('abdomen:WS:matched:1e-3')
  assert (run.lr, run.name) == (1e-3, 'abdomen_WS_matched_lr0.001')
  for bad, why in (('cardiac:UN', 'not dataset:mode:norm'), ('brain:UN:paper', 'not dataset'),
                   ('cardiac:XX:paper', 'not dataset'), ('cardiac:UN:paper:fast', 'positive'),
                   ('cardiac:UN:paper:-1', 'positive'), ('cardiac:UN:paper:0', 'positive'),
                   ('cardiac:UN:paper:inf', 'positive'), ('cardiac:UN:paper:nan', 'positive')):
    with pytest.raises(ValueError, match=why):
      learning.parse_run(bad)


def test_table2_rows_keep_runs_that_share_a_mode_apart(tmp_path):
  """Two runs of one mode and norm (two learning rates) get a row each in Table 2."""
  from fmir_jax.evaluate import tables
  runs = {'ws_a': ('WS', 'matched'), 'ws_lr0.001': ('WS', 'matched'), 'un': ('UN', 'paper'),
          'cr': ('-CR', 'paper')}
  for name, (mode, norm) in runs.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'run.json').write_text(json.dumps(
        {'mode': mode, 'channel_norm': norm, 'store_datasets': ['acdc'],
         'config': {'name': 'x'}}))
  wds = [str(tmp_path / n) for n in runs]
  rows = tables.table2_rows(wds)
  assert [rows[w] for w in wds] == [('acdc', 'WS (matched) [ws_a]'),
                                    ('acdc', 'WS (matched) [ws_lr0.001]'),
                                    ('acdc', 'UN'), ('acdc', '-CR')]
  # an inference override relabels every run; the -CR run now shares nothing either
  rows = tables.table2_rows(wds[2:], channel_norm='matched')
  assert [rows[w] for w in wds[2:]] == [('acdc', 'UN (matched)'), ('acdc', '-CR (matched)')]
