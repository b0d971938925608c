"""`fmir apply` (register/apply.py) on a result folder whose map is a known affine one: the
image and labels it warps equal scipy's ``affine_transform``, the points it maps equal the
closed form, and bad input is one line with exit 2 that leaves the user's files alone."""
import csv

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from fmir_jax import cli
from fmir_jax.core import nifti
from fmir_jax.core import world

F_SHAPE = (22, 20, 12)
F_AFF = np.array([[2.0, 0, 0, -22], [0, 2.0, 0, -20], [0, 0, 3.0, -18], [0, 0, 0, 1]])
M_AFF = np.array([[1.8, 0.2, 0, -25], [-0.2, 1.8, 0, -21], [0, 0, 2.5, -20], [0, 0, 0, 1]])
M_SHAPE = (26, 24, 16)


def _t_mm():
  t = np.eye(4)
  t[:3, :3] = Rotation.from_euler('xyz', (3, -4, 7), degrees=True).as_matrix() * 1.03
  t[:3, 3] = (2.5, -1.5, 3.0)
  return t


@pytest.fixture
def result(tmp_path):
  """A result folder holding only disp_mm.nii.gz of the map p -> T(p)."""
  out = tmp_path / 'result'
  out.mkdir()
  t = _t_mm()
  p = world.voxel_world(F_SHAPE, F_AFF)
  nifti.save_dispvect(str(out / 'disp_mm.nii.gz'), (p @ t[:3, :3].T + t[:3, 3] - p), F_AFF)
  return out


def _scipy(moving, order):
  """Oracle: the moving volume at inv(A_m) T A_f v for every fixed voxel v."""
  vox = np.linalg.inv(M_AFF) @ _t_mm() @ F_AFF
  return ndimage.affine_transform(moving, vox[:3, :3], vox[:3, 3], output_shape=F_SHAPE,
                                  order=order, mode='constant', cval=0)


def test_apply_warps_images_and_labels_as_scipy(result, tmp_path, capsys):
  rng = np.random.default_rng(0)
  img = ndimage.gaussian_filter(rng.random(M_SHAPE), 1.5).astype(np.float32)
  lab = (ndimage.gaussian_filter(rng.random(M_SHAPE), 2.0) * 10).astype(np.uint8) % 4
  nifti.save_nifti(str(tmp_path / 'img.nii.gz'), img, M_AFF)
  nifti.save_nifti(str(tmp_path / 'lab.nii.gz'), lab, M_AFF)
  assert cli.main(['apply', '--transform', str(result), '--moving', str(tmp_path / 'img.nii.gz'),
                   '--out', str(tmp_path / 'w.nii.gz')]) == 0
  assert cli.main(['apply', '--transform', str(result), '--moving', str(tmp_path / 'lab.nii.gz'),
                   '--labels', '--out', str(tmp_path / 'wl.nii.gz')]) == 0
  warped, aff, _ = nifti.load_nifti(str(tmp_path / 'w.nii.gz'))
  np.testing.assert_allclose(aff, F_AFF)
  want = _scipy(img, 1)
  inside = want != 0
  inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False   # edge rules differ
  assert inside.sum() > 1000
  np.testing.assert_allclose(warped[inside], want[inside], atol=1e-4)
  labels, _, _ = nifti.load_nifti(str(tmp_path / 'wl.nii.gz'), what='label')
  assert np.mean(labels[inside] == _scipy(lab, 0)[inside]) > 0.99
  assert str(tmp_path / 'w.nii.gz') in capsys.readouterr().out


@pytest.mark.parametrize('space', ['ras', 'lps'])
def test_apply_maps_points_by_the_closed_form(result, tmp_path, capsys, space):
  flip = np.array([-1.0, -1.0, 1.0]) if space == 'lps' else np.ones(3)
  pts_ras = np.array([[1.0, 2.0, 3.0], [-10.5, 6.25, -4.0], [200.0, 0.0, 0.0]])
  cols = [f'{a}_{space}' for a in 'xyz']
  with open(tmp_path / 'p.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['name'] + cols)
    for i, p in enumerate(pts_ras * flip):
      w.writerow([f'landmark {i}'] + list(p))
  assert cli.main(['apply', '--transform', str(result), '--points', str(tmp_path / 'p.csv'),
                   '--out', str(tmp_path / 'q.csv')]) == 0
  assert '1 outside the fixed grid' in capsys.readouterr().out
  with open(tmp_path / 'q.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['name'] for r in rows] == ['landmark 0', 'landmark 1', 'landmark 2']
  t = _t_mm()
  for r, p in zip(rows[:2], pts_ras):
    got = np.array([float(r[f'{a}_moving']) for a in 'xyz']) * flip
    np.testing.assert_allclose(got, t[:3, :3] @ p + t[:3, 3], atol=1e-4)
  assert rows[2]['x_moving'] == ''                       # outside the fixed grid


def test_apply_refusals_are_one_line_and_keep_the_users_files(result, tmp_path, capsys):
  mine = tmp_path / 'mine.nii.gz'
  mine.write_bytes(b'the user\'s')
  nifti.save_nifti(str(tmp_path / 'img.nii.gz'), np.ones(M_SHAPE, np.float32), M_AFF)
  cases = [
      (['--transform', str(tmp_path), '--moving', str(tmp_path / 'img.nii.gz'), '--out',
        str(tmp_path / 'x.nii.gz')], 'no disp_mm.nii.gz'),
      (['--transform', str(result), '--moving', str(tmp_path / 'img.nii.gz'), '--out',
        str(mine)], 'not written by fmir-jax'),
      (['--transform', str(result), '--points', str(tmp_path / 'img.nii.gz'), '--labels',
        '--out', str(tmp_path / 'q.csv')], '--labels goes with --moving'),
      (['--transform', str(result), '--moving', str(tmp_path / 'img.nii.gz'), '--out',
        str(tmp_path / 'x.txt')], 'name a .nii or .nii.gz file'),
  ]
  for argv, said in cases:
    assert cli.main(['apply', *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count('\n') == 1 and err.startswith('fmir apply: error:'), err
  assert mine.read_bytes() == b'the user\'s' and not (tmp_path / 'x.nii.gz').exists()


def test_invert_of_an_affine_map_is_its_inverse_and_apply_takes_it_back(result, tmp_path,
                                                                        capsys):
  ref = tmp_path / 'moving_grid.nii.gz'
  nifti.save_nifti(str(ref), np.zeros(M_SHAPE, np.float32), M_AFF)
  inv = tmp_path / 'inverse'
  assert cli.main(['invert', '--transform', str(result), '--reference', str(ref),
                   '--out', str(inv)]) == 0
  assert 'inverse-consistency error' in capsys.readouterr().out
  disp, aff, _ = _dispvect(inv / 'disp_mm.nii.gz')
  np.testing.assert_allclose(aff, M_AFF)
  q = world.voxel_world(M_SHAPE, M_AFF)
  t_inv = np.linalg.inv(_t_mm())
  want = q @ t_inv[:3, :3].T + t_inv[:3, 3] - q            # closed form
  # where the inverse lands inside the fixed grid (minus a voxel: its edge rule)
  p = q + want
  vox = (p - F_AFF[:3, 3]) / np.diag(F_AFF)[:3]
  inside = np.all((vox > 1) & (vox < np.array(F_SHAPE) - 2), axis=-1)
  assert inside.sum() > 1000
  np.testing.assert_allclose(disp[inside], want[inside], atol=1e-3)
  import json
  stats = json.loads((inv / 'inverse.json').read_text())
  assert stats['inverse_consistency_mm']['p95'] < 1e-3 and stats['outside_fixed_grid'] > 0
  assert stats['inverse_consistency_mm']['over_tenth_voxel_fraction'] < 0.01
  # a smooth non-linear map: the fixed point iteration still inverts it
  rng = np.random.default_rng(1)
  bumpy = tmp_path / 'bumpy'
  bumpy.mkdir()
  u = np.stack([ndimage.gaussian_filter(rng.normal(size=F_SHAPE), 3) * 25 for _ in range(3)], -1)
  nifti.save_dispvect(str(bumpy / 'disp_mm.nii.gz'), u.astype(np.float32), F_AFF)
  assert np.abs(u).max() > 1.0
  assert cli.main(['invert', '--transform', str(bumpy), '--reference', str(ref),
                   '--out', str(tmp_path / 'bumpy_inv')]) == 0
  stats = json.loads((tmp_path / 'bumpy_inv' / 'inverse.json').read_text())
  assert stats['inverse_consistency_mm']['median'] < 0.01, stats
  # too steep a map (|grad u| > 1 in places): the share of points where the iteration did
  # not settle, above a tenth of a voxel, as scipy finds it from the written inverse
  u = u * 8
  nifti.save_dispvect(str(bumpy / 'disp_mm.nii.gz'), u.astype(np.float32), F_AFF)
  assert cli.main(['invert', '--transform', str(bumpy), '--reference', str(ref),
                   '--out', str(tmp_path / 'bumpy_inv'), '--overwrite']) == 0
  stats = json.loads((tmp_path / 'bumpy_inv' / 'inverse.json').read_text())
  v, _, _ = _dispvect(tmp_path / 'bumpy_inv' / 'disp_mm.nii.gz')
  vox = np.moveaxis((q + v - F_AFF[:3, 3]) / np.diag(F_AFF)[:3], -1, 0)
  u_at = np.stack([ndimage.map_coordinates(u[..., k], vox, order=1, mode='nearest')
                   for k in range(3)], -1)
  inside = np.all((vox >= -0.5) & (vox <= np.array(F_SHAPE)[:, None, None, None] - 0.5), 0)
  inside &= np.abs(v).sum(-1) > 0
  over = np.linalg.norm(v + u_at, axis=-1)[inside] > 0.1 * np.diag(F_AFF)[:3].min()
  assert 0.01 < over.mean() < 0.99
  assert stats['inverse_consistency_mm']['over_tenth_voxel_fraction'] == pytest.approx(
      over.mean(), abs=2e-3)


def _dispvect(path):
  import nibabel as nib
  img = nib.load(str(path))
  return np.asarray(img.dataobj)[:, :, :, 0, :], img.affine, img


def test_invert_without_a_reference_needs_the_reports_moving_scan(result, tmp_path, capsys):
  assert cli.main(['invert', '--transform', str(result), '--out', str(tmp_path / 'i')]) == 2
  err = capsys.readouterr().err
  assert '--reference IMAGE' in err and err.count('\n') == 1
  assert not (tmp_path / 'i').exists()


def test_the_jacobian_map_is_det_of_an_affine_map_and_slabs_stitch(monkeypatch):
  t = _t_mm()
  p = world.voxel_world(F_SHAPE, M_AFF)                  # a sheared, rotated grid
  disp = (p @ t[:3, :3].T + t[:3, 3] - p).astype(np.float32)
  det = world.jacobian_det_mm(disp, M_AFF)
  np.testing.assert_allclose(det, np.linalg.det(t[:3, :3]), rtol=1e-5)
  from fmir_jax.core import metrics
  rng = np.random.default_rng(2)
  bumpy = np.stack([ndimage.gaussian_filter(rng.normal(size=F_SHAPE), 2) * 6 for _ in range(3)],
                   -1)
  whole = metrics.jacobian_determinant(bumpy @ np.linalg.inv(M_AFF[:3, :3]).T)
  monkeypatch.setattr(world, '_CHUNK_VOXELS', F_SHAPE[0] * F_SHAPE[1] * 3)   # slabs of 3
  np.testing.assert_allclose(world.jacobian_det_mm(bumpy, M_AFF), whole, rtol=1e-5, atol=1e-5)
