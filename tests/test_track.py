"""`fmir track` (issue: a whole cine series in one call): the inputs' checks (one-line errors,
exit 2, nothing written), the composition of maps against a closed form, the ejection
fraction from volumes, and end to end on a phantom cine with the shipped general head:
labels propagated by scipy from the written field equal the written labels, volumes from the
label maps, EF from the volumes, ED from Info.cfg, a kill and resume ending as an
uninterrupted run, and the sequential mode finding the phantom's true end-systolic frame.
"""
import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from feature_extract.synthetic import phantoms
from fmir_jax import cli
from fmir_jax.register import track


@pytest.fixture(scope='module')
def cine(tmp_path_factory):
  root = tmp_path_factory.mktemp('cine')
  (p,) = phantoms.write_acdc_phantoms(str(root), 1, seed=0, first_id=101,
                                      inplane_size=(48, 56), cine=True)
  folder = root / 'testing' / 'patient101'
  return p, folder


def _save(path, data, affine):
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return str(path)


def test_bad_series_labels_and_frames_are_one_line_errors(cine, tmp_path, capsys):
  p, folder = cine
  series = str(folder / 'patient101_4d.nii.gz')
  frame = str(folder / f'patient101_frame{p.ed_frame:02d}.nii.gz')
  one = _save(tmp_path / 'one.nii.gz', np.zeros(p.shape + (1,), np.int16), p.affine)
  other = _save(tmp_path / 'other.nii.gz', np.zeros((5, 5, 5), np.uint8), p.affine)
  empty = _save(tmp_path / 'empty.nii.gz', np.zeros(p.shape, np.uint8), p.affine)
  cases = [
      (['--series', frame], 'a 3D image'),
      (['--series', one], 'a series of one frame'),
      (['--series', series, '--reference-frame', '99'], '--reference-frame 99: the series has '
                                                         'frames 1..'),
      (['--series', series, '--labels', other], '--labels'),
      (['--series', series, '--frame-labels', f'3:{frame}'], 'add --labels'),
      (['--series', series, '--labels', str(folder / 'patient101_frame01_gt.nii.gz'),
        '--frame-labels', 'x'], 'expected FRAME:PATH'),
      (['--series', series, '--head-only', '--fast'], '--head-only runs no instance'),
      (['--series', series, '--labels', str(folder / 'patient101_frame01_gt.nii.gz'),
        '--frame-labels', f'2:{empty}'], 'shares no foreground label'),
  ]
  for args, says in cases:
    out = tmp_path / 'out'
    assert cli.main(['track', *args, '--out', str(out), '--no-cache']) == 2, args
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not out.exists()


def test_composition_of_two_linear_maps_is_the_closed_form():
  """compose_mm(step, total): p -> p + step(p) -> then total there; for linear maps
  step(p) = A p, total(p) = B p that is A p + B (p + A p) (inside the grid: no edge values)."""
  affine = np.diag([1.5, 1.5, 5.0, 1.0])
  affine[:3, 3] = [-10.0, 5.0, 3.0]
  shape = (20, 22, 8)
  pts = np.moveaxis(np.indices(shape, dtype=float), 0, -1) @ affine[:3, :3].T + affine[:3, 3]
  a = np.array([[0.01, 0.02, 0.0], [0.0, -0.01, 0.01], [0.005, 0.0, 0.02]])
  b = np.array([[-0.02, 0.01, 0.0], [0.01, 0.01, 0.0], [0.0, 0.01, -0.01]])
  step, total = (pts @ a.T).astype(np.float32), (pts @ b.T).astype(np.float32)
  got = track.compose_mm(step, total, affine)
  want = step + (pts + step) @ b.T
  inner = (slice(3, -3),) * 3
  np.testing.assert_allclose(got[inner], want[inner], atol=1e-4)


def test_ejection_fraction_is_the_volumes_closed_form():
  lv = [100.0, 90.0, 60.0, 40.0, 55.0, 95.0]
  rv = [80.0, 70.0, 50.0, 45.0, 60.0, 79.0]
  e = track._ejection({'1': rv, '2': [30.0] * 6, '3': lv}, [1, 2, 3], 1, 'ED of Info.cfg')
  assert e['lv'] == {'ed_frame': 1, 'es_frame': 4, 'edv_ml': 100.0, 'esv_ml': 40.0,
                     'ef_percent': 60.0}
  assert e['rv']['es_frame'] == 4 and e['rv']['ef_percent'] == pytest.approx(100 * 35 / 80)
  # not ACDC's ids: no ejection fraction
  assert track._ejection({'5': lv}, [5], 1, 'given') is None


def _labels_from_field(ref_labels, disp_mm, affine):
  """The reference labels at p + disp(p), nearest neighbour, 0 beyond half a voxel outside
  (scipy, no fmir_jax code)."""
  shape = ref_labels.shape
  pts = np.moveaxis(np.indices(shape, dtype=float), 0, -1) @ affine[:3, :3].T + affine[:3, 3]
  vox = (pts + disp_mm - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
  return ndimage.map_coordinates(ref_labels, np.moveaxis(vox, -1, 0), order=0,
                                 mode='grid-constant', cval=0)


def _true_volumes(p, label):
  """Voxels of a label in every frame's heart (phantoms.heart_at), the cine's truth."""
  nx, ny, nz = p.shape
  s, _, t = p.spacing_mm
  x = ((np.arange(nx) - (nx - 1) / 2) * s)[:, None, None]
  y = ((np.arange(ny) - (ny - 1) / 2) * s)[None, :, None]
  z = (np.arange(nz) * t)[None, None, :]
  return np.array([np.sum(phantoms.heart_labels(phantoms.heart_at(p, f), x, y, z) == label)
                   for f in range(1, phantoms.n_frames(p) + 1)], float)


@pytest.mark.slow
def test_track_propagates_labels_from_its_field_and_resumes(cine, tmp_path, capsys,
                                                            monkeypatch):
  p, folder = cine
  series = str(folder / 'patient101_4d.nii.gz')
  labels = str(folder / f'patient101_frame{p.ed_frame:02d}_gt.nii.gz')
  es_truth = str(folder / f'patient101_frame{p.es_frame:02d}_gt.nii.gz')
  args = ['track', '--series', series, '--labels', labels, '--no-cache',
          '--frame-labels', f'{p.es_frame}:{es_truth}']
  out = tmp_path / 'direct'
  assert cli.main(args + ['--out', str(out)]) == 0, capsys.readouterr().err
  rep = json.loads((out / 'track.json').read_text())
  n = phantoms.n_frames(p)
  assert rep['frames'] == n and rep['reference_frame'] == p.ed_frame
  assert rep['reference_from'] == 'ED of Info.cfg'
  disp_img = nib.load(str(out / 'disp_mm.nii.gz'))
  disp = np.asarray(disp_img.dataobj)
  assert disp.shape == p.shape + (n, 3) and disp_img.header.get_intent()[0] == 'displacement vector'
  assert np.abs(disp[..., p.ed_frame - 1, :]).max() == 0.0
  lab_series = np.asarray(nib.load(str(out / 'labels_series.nii.gz')).dataobj)
  ref_labels = np.asarray(nib.load(labels).dataobj)
  for t in range(n):                  # the written labels are the written field's
    want = _labels_from_field(ref_labels, disp[..., t, :], p.affine)
    assert np.mean(want != lab_series[..., t]) < 1e-3, t
  voxel_ml = abs(np.linalg.det(p.affine[:3, :3])) / 1000
  rows = list(csv.DictReader(open(out / 'volumes.csv')))
  assert len(rows) == 3 * n
  for row in rows:
    count = int(np.sum(lab_series[..., int(row['frame']) - 1] == int(row['label'])))
    assert int(row['voxels']) == count
    assert float(row['volume_ml']) == pytest.approx(count * voxel_ml)
  lv = np.asarray(rep['volumes_ml']['3'])
  e = rep['ejection']['lv']
  assert e['ed_frame'] == p.ed_frame and e['es_frame'] == int(np.argmin(lv)) + 1
  assert e['ef_percent'] == pytest.approx(100 * (lv[p.ed_frame - 1] - lv.min())
                                          / lv[p.ed_frame - 1])
  # The phantom's truth: the curve's minimum at its ES frame, the EF within 3 points.
  true_lv = _true_volumes(p, 3)
  assert e['es_frame'] == p.es_frame
  assert abs(e['ef_percent'] - 100 * (1 - true_lv.min() / true_lv[p.ed_frame - 1])) <= 3.0
  # ES labels as fmir register's ED -> ES pair with the same options scores them.
  direct = tmp_path / 'register'
  assert cli.main(['register', '--fixed', str(folder / f'patient101_frame{p.es_frame:02d}.nii.gz'),
                   '--moving', str(folder / f'patient101_frame{p.ed_frame:02d}.nii.gz'),
                   '--fixed-labels', es_truth, '--moving-labels', labels, '--linear', 'none',
                   '--io', '--out', str(direct), '--no-cache', '--quiet']) == 0
  want = json.loads((direct / 'report.json').read_text())['dice']['mean_after']
  assert abs(rep['dice'][str(p.es_frame)]['mean_after'] - want) <= 0.01
  assert os.path.getsize(out / 'volumes.png') > 0
  assert not (out / track.PARTIAL).exists()
  # Killed after three frames, then the same command: the frames done are kept, the rest
  # registered, and the result is the uninterrupted one.
  calls = {'n': 0}
  real = track._register

  def dying(*a):
    calls['n'] += 1
    if calls['n'] == 4:
      raise KeyboardInterrupt
    return real(*a)

  monkeypatch.setattr(track, '_register', dying)
  again = tmp_path / 'again'
  assert cli.main(args + ['--out', str(again)]) == 130
  assert len([f for f in os.listdir(again / track.PARTIAL) if f.endswith('.npz')]) == 3
  assert not (again / 'track.json').exists()
  calls['n'] = -100
  assert cli.main(args + ['--out', str(again)]) == 0
  assert calls['n'] == -100 + n - 1 - 3
  np.testing.assert_array_equal(np.asarray(nib.load(str(again / 'disp_mm.nii.gz')).dataobj),
                                disp)


@pytest.mark.slow
def test_sequential_mode_finds_the_true_end_systole(cine, tmp_path):
  """Frame to frame and composed (the head alone): the LV volume curve of the phantom is
  lowest at its ES frame (within one frame), and the drift against a direct registration
  is reported."""
  p, folder = cine
  out = tmp_path / 'seq'
  assert cli.main(['track', '--series', str(folder / 'patient101_4d.nii.gz'), '--labels',
                   str(folder / f'patient101_frame{p.ed_frame:02d}_gt.nii.gz'),
                   '--mode', 'sequential', '--head-only', '--out', str(out), '--no-cache',
                   '--quiet']) == 0
  rep = json.loads((out / 'track.json').read_text())
  assert abs(rep['ejection']['lv']['es_frame'] - p.es_frame) <= 1
  err = rep['composition_error_mm']
  assert err['frame'] == phantoms.n_frames(p) and err['p95_mm'] >= err['mean_mm'] >= 0
