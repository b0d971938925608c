"""bench/register_bench.py --smoke end to end (a subprocess, as a user runs it) against a tiny
trained run, and its results.json: every method scored on every set with a Dice in [0, 1],
identity Dice equal to an independent numpy computation on the written NIfTI files, and the
known deformation applied (identity Dice < 1). ANTs runs when .venv-ants exists; when it does
not, the bench must say so.

The tiny run is conftest's ``run_dir`` (tests/helpers/tiny_run.py).
"""
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

# End to end: runs the register benchmark at smoke size (the unit run leaves it out: -m "not slow").
pytestmark = pytest.mark.slow


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench', 'register_bench.py')
ANTS_PYTHON = os.path.join(ROOT, '.venv-ants', 'bin', 'python')
# One set of each kind the bench writes: inverted contrast (its own similarity) and a
# misaligned variant (the moving header moved); the others run the same code.
SETS = ('inverted', 'abdomen_misaligned')


def _bench(*args, timeout=300):
  return subprocess.run([sys.executable, BENCH, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _ants_available() -> bool:
  if not os.path.isfile(ANTS_PYTHON):
    return False
  return subprocess.run([ANTS_PYTHON, '-c', 'import ants'], capture_output=True).returncode == 0


def _numpy_dice(fixed_path: str, moving_path: str) -> float:
  """Mean Dice over the foreground classes in both label files (no fmir_jax code)."""
  fixed = np.asarray(nib.load(fixed_path).dataobj).astype(int)
  moving = np.asarray(nib.load(moving_path).dataobj).astype(int)
  classes = sorted((set(np.unique(fixed)) & set(np.unique(moving))) - {0})
  return float(np.mean([2.0 * np.sum((fixed == c) & (moving == c))
                        / (np.sum(fixed == c) + np.sum(moving == c)) for c in classes]))


def test_smoke_bench_scores_every_method_on_every_set(run_dir, tmp_path):
  out = tmp_path / 'bench'
  r = _bench('--smoke', '--checkpoint', run_dir, '--out', str(out), '--sets', ','.join(SETS),
             '--methods',
             'identity,ants_syn,fmir_head_io,fmir_io_zero', '--io-curve', '1')
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.loads((out / 'results.json').read_text())
  methods = ['identity', 'fmir_head_io', 'fmir_io_zero']
  if _ants_available():
    methods.append('ants_syn')
  else:
    assert 'ANTs SyN SKIPPED' in r.stdout and 'bench/setup_ants.sh' in r.stdout
  assert set(res['sets']) == set(SETS)
  for name in SETS:
    s = res['sets'][name]
    assert set(s['methods']) == set(methods), (name, list(s['methods']))
    assert f'### {name}:' in r.stdout
    for method, m in s['methods'].items():
      assert len(m['pairs']) == 2
      for row in m['pairs']:
        assert math.isfinite(row['dice']) and 0.0 <= row['dice'] <= 1.0, (name, method, row)
        assert 0.0 <= row['folding_fraction'] <= 1.0 and math.isfinite(row['sdlogj'])
        if method != 'identity':
          assert row['seconds'] > 0
      if method.startswith('fmir'):
        assert m['summary']['compile_s_first_pair'] is not None
    # IO from zero runs no head; the IO curve at the full budget repeats the two IO methods
    # (same options, same results)
    assert all(row['times_s']['head_s'] == 0.0 for row in s['methods']['fmir_io_zero']['pairs'])
    (point,) = s['io_curve']
    for init, method in (('head', 'fmir_head_io'), ('zero', 'fmir_io_zero')):
      assert point[init]['dice'] == s['methods'][method]['summary']['dice']
    assert 'instance optimisation budget' in r.stdout
    # The known deformation was applied: identity does not match the fixed labels.
    identity = s['methods']['identity']['pairs']
    assert all(row['dice'] < 0.99 for row in identity), identity
    # Identity Dice = an independent computation on the NIfTI files the methods read.
    pair = s['pairs'][0]
    assert os.path.isfile(pair['fixed']) and os.path.isfile(pair['moving'])
    if not name.endswith('_misaligned'):      # voxel for voxel: the same world placement
      assert identity[0]['dice'] == pytest.approx(
          _numpy_dice(pair['fixed_labels'], pair['moving_labels']), abs=1e-9)
    else:                                       # the moving header was moved: far apart
      assert s['methods']['identity']['summary']['tre_mm']['mean'] > 5.0
  # The moving image of the inverted set is the contrast-inverted one.
  fixed = np.asarray(nib.load(res['sets']['inverted']['pairs'][0]['fixed']).dataobj)
  moving = np.asarray(nib.load(res['sets']['inverted']['pairs'][0]['moving']).dataobj)
  assert np.corrcoef(fixed.ravel(), moving.ravel())[0, 1] < -0.5


@pytest.mark.parametrize('interpreter', ['missing', 'without_antspyx'])
def test_missing_ants_is_reported_not_silent(tmp_path, interpreter):
  python = str(tmp_path / 'no-python')
  if interpreter == 'without_antspyx':       # a Python whose `import ants` fails
    (tmp_path / 'fake').mkdir()
    (tmp_path / 'fake' / 'ants.py').write_text("raise ImportError('no antspyx here')\n")
    (tmp_path / 'python').write_text(
        f'#!/bin/sh\nPYTHONPATH={tmp_path / "fake"} exec {sys.executable} "$@"\n')
    os.chmod(tmp_path / 'python', 0o755)
    python = str(tmp_path / 'python')
  r = _bench('--smoke', '--sets', 'cardiac', '--methods', 'identity,ants_syn',
             '--ants-python', python, '--out', str(tmp_path / 'b'), timeout=60)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'ANTs SyN SKIPPED' in r.stdout and 'bench/setup_ants.sh' in r.stdout
  res = json.loads((tmp_path / 'b' / 'results.json').read_text())
  assert list(res['sets']['cardiac']['methods']) == ['identity']
