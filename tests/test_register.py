"""`fmir register`: outputs on the fixed grid, world-space displacement checked with an
independent scipy resampler, Learn2Reg export, instance optimisation raising Dice on a pair
with a known world translation, bad input -> exit 2 with nothing written.

A tiny run is built once per module: ACDC-style phantoms (write_acdc_phantoms) on a small
"custom" model grid, offline `mind` features (feature_extract.pipeline.extract), a few training
steps (trainer.train_and_evaluate). Fixed and moving differ in shape, spacing and
orientation.
"""
import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from feature_extract.synthetic import phantoms
from fmir_jax import cli
from fmir_jax.core import files
from fmir_jax.core import resample
from fmir_jax.core import nifti
from fmir_jax.register import refine
from fmir_jax.register import registrar as register_lib
from fmir_jax.register import grid as register_grid
from fmir_jax.core import world
from tests.helpers import oracles
from tests.helpers.snapshot import snapshot
from tests.helpers.tiny_run import GRID, INPLANE



def _rot_z(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def other_grid(shape_f, affine_f, shape_m, angle, zoom):
  """A grid rotated in-plane by `angle` and scaled by `zoom`, sharing the fixed centre."""
  m3 = affine_f[:3, :3] @ _rot_z(angle) @ np.diag([zoom, zoom, 1.0])
  centre = affine_f[:3, :3] @ ((np.asarray(shape_f) - 1) / 2) + affine_f[:3, 3]
  a = np.eye(4)
  a[:3, :3] = m3
  a[:3, 3] = centre - m3 @ ((np.asarray(shape_m) - 1) / 2)
  return a


def translate(t_mm):
  a = np.eye(4)
  a[:3, 3] = t_mm
  return a


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  """Fixed: phantom 101 ED as written. Moving: its ES frame, and the ED frame translated by
  a known world vector, both resampled onto a rotated, rescaled, differently shaped grid."""
  root = str(tmp_path_factory.mktemp('pair'))
  phantoms.write_acdc_phantoms(root, 1, seed=3, first_id=101, inplane_size=INPLANE)
  ed, es = sorted(glob.glob(f'{root}/testing/patient101/*frame??.nii.gz'))
  img_f, aff_f, hdr_f = nifti.load_nifti(ed)
  shape_m = (hdr_f.shape[0] - 7, hdr_f.shape[1] + 5, hdr_f.shape[2])
  aff_m = other_grid(hdr_f.shape, aff_f, shape_m, np.deg2rad(17.0), 1.15)
  out = {'fixed': ed, 'fixed_labels': ed.replace('.nii.gz', '_gt.nii.gz'), 'root': root}
  shift_vox = np.array([2.5, -2.0, 0.0])                 # in-plane, fixed voxel axes
  out['t_mm'] = aff_f[:3, :3] @ shift_vox
  for name, src, src_aff in (('es', es, aff_f), ('shift', ed, translate(out['t_mm']) @ aff_f)):
    img, _, _ = nifti.load_nifti(src)
    lab, _, _ = nifti.load_nifti(src.replace('.nii.gz', '_gt.nii.gz'), what='label')
    out[name] = nifti.save_nifti(f'{root}/{name}.nii.gz',
                              resample.resample_to_grid(img, src_aff, aff_m, shape_m, 1), aff_m)
    out[name + '_labels'] = nifti.save_nifti(
        f'{root}/{name}_gt.nii.gz', resample.resample_to_grid(lab, src_aff, aff_m, shape_m, 0), aff_m)
  return out


def _load(path):
  img = nib.load(path)
  return np.asarray(img.dataobj), img.affine


# --------------------------------------------------------------------------- pure parts


def test_disp_to_fixed_world_is_the_affine_image_of_the_voxel_field():
  reg_aff = other_grid((20, 20, 6), np.diag([2.0, 2.0, 8.0, 1.0]), (20, 20, 6), 0.3, 1.0)
  u = np.broadcast_to(np.array([1.5, -0.5, 0.25], np.float32), (20, 20, 6, 3))
  fixed_aff = np.diag([-1.5, 1.7, 8.0, 1.0])
  centre = reg_aff[:3, :3] @ [9.5, 9.5, 2.5] + reg_aff[:3, 3]
  fixed_aff[:3, 3] = centre + [7.0, -8.0, -8.0]        # (10, 9, 3) voxels fit inside
  d = world.disp_to_fixed_world(u, reg_aff, (10, 9, 3), fixed_aff)
  np.testing.assert_allclose(d, np.broadcast_to(reg_aff[:3, :3] @ u[0, 0, 0], d.shape),
                             atol=1e-5)
  # On the registration grid itself the field is only rotated into mm: the same numbers as
  # resampling it at its own voxel centres (scipy, order 1).
  v = np.random.default_rng(0).normal(size=(20, 20, 6, 3)).astype(np.float32)
  same = world.disp_to_fixed_world(v, reg_aff, (20, 20, 6), reg_aff)
  v_mm = v.astype(np.float64) @ reg_aff[:3, :3].T
  np.testing.assert_allclose(same, v_mm, rtol=0, atol=1e-5)
  idx = np.indices((20, 20, 6)).astype(float)
  np.testing.assert_allclose(same, np.stack([ndimage.map_coordinates(v_mm[..., k], idx, order=1)
                                             for k in range(3)], -1), rtol=0, atol=1e-5)


def test_fast_sets_a_quarter_io_budget_and_head_level_1():
  parse = lambda *a: cli.register_options(cli.build_parser().parse_args(
      ['register', '--fixed', 'f', '--moving', 'm', '--out', 'o', *a]))
  default = refine.RefineOptions()
  fast = parse('--fast')
  assert fast.head_finest_level == 1 and fast.refine.steps == (25, 20, 10, 2)
  assert parse('--fast', '--head-finest-level', '0').head_finest_level == 0
  assert parse('--fast', '--io-budget', '0.5').refine.steps == (50, 40, 20, 5)
  assert parse('--io-budget', '0.1').refine.steps == (10, 8, 4, 1)
  assert parse('--io').refine == default and parse('--io').head_finest_level == 0
  assert parse().refine is None and parse().head_finest_level == 0
  assert parse('--io-budget', '0.1', '--io-steps', '7').refine.steps == (10, 8, 4, 7)


@pytest.mark.parametrize('name, given, expect', [
    ('AbdomenCTCT_0012_0000.nii.gz', None, ('0012', '0000')),
    ('img0007.nii.gz', None, ('0007', None)),
    ('case_3.nii', None, ('0003', None)),
    ('patient101_frame10.nii.gz', '101', ('0101', None)),
    ('whatever.nii.gz', '5_1', ('0005', '0001'))])
def test_l2r_case_ids(name, given, expect):
  assert nifti.l2r_case(f'/d/{name}', given, '--l2r-fixed-id') == expect


def test_l2r_ambiguous_names_are_refused_and_names_follow_the_evaluation_code():
  with pytest.raises(nifti.NiftiError, match='pass --l2r-moving-id'):
    nifti.l2r_case('/d/patient101_frame10.nii.gz', None, '--l2r-moving-id')
  with pytest.raises(nifti.NiftiError, match='NNNN'):
    nifti.l2r_case('/d/x.nii.gz', 'abc', '--l2r-fixed-id')
  # The Learn2Reg evaluation code (evaluation.py): short name for one modality (or
  # 0000 -> 0001), the long one otherwise.
  assert nifti.l2r_names(('0001', '0000'), ('0002', '0000')) == [
      'disp_0001_0002.nii.gz', 'disp_0001_0000_0002_0000.nii.gz']
  assert nifti.l2r_names(('0001', '0001'), ('0002', '0000')) == [
      'disp_0001_0001_0002_0000.nii.gz']
  assert nifti.l2r_names(('0001', None), ('0002', None)) == ['disp_0001_0002.nii.gz']


def test_native_grid_is_padded_to_pyramid_multiples_and_keeps_the_centre():
  aff = np.diag([1.3, 1.3, 7.0, 1.0])
  shape, new = register_grid.native_grid((101, 90, 9), aff, (1.3, 1.3, 7.0), (2.0, 2.0, 7.0),
                                    (4, 4, 1))
  assert shape == (68, 60, 9) and all(n % m == 0 for n, m in zip(shape, (4, 4, 1)))
  centre = lambda s, a: a[:3, :3] @ ((np.asarray(s) - 1) / 2) + a[:3, 3]  # noqa: E731
  # An odd padding cannot be split evenly: the centre moves by at most half a voxel.
  shift = np.linalg.solve(new[:3, :3], centre(shape, new) - centre((101, 90, 9), aff))
  np.testing.assert_allclose(np.abs(shift), [0.0, 0.5, 0.0], atol=1e-9)
  np.testing.assert_allclose(resample.voxel_spacing(new), (2.0, 2.0, 7.0))


def test_warp_to_fixed_follows_the_half_voxel_edge_rule():
  """Identity between identical grids returns the image everywhere (no border of zeros from
  rounding), a moving image stored flipped gives the same result, and shifted samples match
  a scipy oracle with resample_to_grid's rule (edge value within half a voxel, then cval)."""
  rng = np.random.default_rng(1)
  img = (rng.random((9, 7, 5)) + 1).astype(np.float32)
  lab = rng.integers(1, 4, size=(9, 7, 5)).astype(np.uint8)
  aff = other_grid((9, 7, 5), np.diag([1.3, 0.7, 4.0, 1.0]), (9, 7, 5), 0.3, 1.0)
  zero = np.zeros((9, 7, 5, 3))
  np.testing.assert_allclose(world.warp_to_fixed(img, aff, img.shape, aff, zero, 1), img,
                             rtol=1e-6)
  np.testing.assert_array_equal(world.warp_to_fixed(lab, aff, lab.shape, aff, zero, 0), lab)
  flip = np.diag([-1.0, 1, 1, 1])
  flip[0, 3] = img.shape[0] - 1
  shift = np.zeros_like(zero)
  shift[..., :] = aff[:3, :3] @ [0.4, -0.45, 0.2]       # world mm, <= half a voxel
  for disp in (zero, shift):
    a = world.warp_to_fixed(img, aff, img.shape, aff, disp, 1)
    b = world.warp_to_fixed(img[::-1].copy(), aff @ flip, img.shape, aff, disp, 1)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    a = world.warp_to_fixed(lab, aff, lab.shape, aff, disp, 0)
    b = world.warp_to_fixed(lab[::-1].copy(), aff @ flip, lab.shape, aff, disp, 0)
    assert np.mean(a == b) > 0.99 and a.min() > 0        # ties may round either way
  far = np.zeros_like(zero)
  far[..., :] = aff[:3, :3] @ [2.0, 0.0, 0.0]
  out = world.warp_to_fixed(img, aff, img.shape, aff, far, 1, cval=-3.0)
  coords = np.indices(img.shape).astype(float)
  coords[0] += 2.0
  ref, _ = oracles.resample_at(img, coords, order=1, cval=-3.0)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  assert (out == -3.0).sum() == 2 * 7 * 5


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_native_grid_outputs_match_independent_resampler_and_l2r(run_dir, pair, tmp_path,
                                                                      capsys):
  out, l2r = tmp_path / 'out', tmp_path / 'l2r'
  rc = cli.main(['register', '--fixed', pair['fixed'], '--moving', pair['es'],
                 '--fixed-labels', pair['fixed_labels'], '--moving-labels',
                 pair['es_labels'], '--checkpoint', run_dir, '--out', str(out),
                 '--grid', 'native', '--spacing', '3,3,10', '--pyramid-factors', '2,2,1',
                 '--l2r-export', str(l2r), '--l2r-fixed-id', '0101', '--l2r-moving-id', '0102'])
  assert rc == 0, capsys.readouterr().err
  assert 'Dice: before' in capsys.readouterr().out
  fixed, aff_f = _load(pair['fixed'])
  moving, aff_m = _load(pair['es'])
  moving_lab, _ = _load(pair['es_labels'])
  report = json.loads((out / 'report.json').read_text())
  assert all(n % m == 0 for n, m in zip(report['grid']['shape'], (2, 2, 1)))
  assert set(report['times_s']) == {'load_preprocess_s', 'linear_s', 'features_s', 'compile_s',
                                    'head_s', 'refine_s', 'write_s', 'write_resample_s',
                                    'write_metrics_s', 'write_files_s'}
  t = report['times_s']                  # the write stage's three parts make up its whole
  assert min(t['write_resample_s'], t['write_metrics_s'], t['write_files_s']) > 0
  assert t['write_s'] == pytest.approx(t['write_resample_s'] + t['write_metrics_s']
                                       + t['write_files_s'], rel=1e-9, abs=1e-9)
  assert 0.0 <= report['dice']['mean_before'] <= 1.0
  assert np.isfinite(report['jacobian']['sdlogj'])
  # Output grids are the fixed image's.
  warped, aff_w = _load(out / 'warped_moving.nii.gz')
  warped_lab, aff_wl = _load(out / 'warped_moving_labels.nii.gz')
  disp_img = nib.load(out / 'disp_mm.nii.gz')
  disp = np.asarray(disp_img.dataobj)
  assert warped.shape == warped_lab.shape == fixed.shape
  assert disp.shape == fixed.shape + (1, 3)
  assert int(disp_img.header['intent_code']) == 1006
  for a in (aff_w, aff_wl, disp_img.affine):
    np.testing.assert_allclose(a, aff_f, atol=1e-4)
  assert np.abs(disp).max() > 1e-3      # the network moved something
  # Independent resampler: moving(p + disp_mm(p)) from the saved files and affines only.
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.shape], indexing='ij'), -1)
  p = idx @ aff_f[:3, :3].T + aff_f[:3, 3] + disp[:, :, :, 0, :]
  inv = np.linalg.inv(aff_m)
  coords = np.moveaxis(p @ inv[:3, :3].T + inv[:3, 3], -1, 0)
  # Edge rule: within half a voxel outside the moving grid the edge value, farther out 0.
  expect, inside = oracles.resample_at(moving.astype(np.float64), coords, order=1, cval=0.0)
  assert 0 < (~inside).mean() < 0.5
  np.testing.assert_allclose(warped, expect, atol=1e-3 * np.abs(moving).max())
  expect_lab, _ = oracles.resample_at(moving_lab, coords, order=0, cval=0)
  assert np.mean(expect_lab == warped_lab) > 0.999
  # Learn2Reg export: the challenge script's warp (identity + disp, in moving voxels).
  l2r_img = nib.load(l2r / 'disp_0101_0102.nii.gz')
  field = np.asarray(l2r_img.dataobj)
  assert field.shape == fixed.shape + (3,) and field.dtype == np.float32
  l2r_lab = oracles.warp_nearest(moving_lab, field.astype(float))
  assert np.mean(l2r_lab == warped_lab) > 0.995


@pytest.mark.slow
def test_instance_optimisation_recovers_a_known_translation(run_dir, pair, tmp_path):
  out = tmp_path / 'out'
  rep = register_lib.register(
      pair['fixed'], pair['shift'], run_dir, str(out), fixed_labels=pair['fixed_labels'],
      moving_labels=pair['shift_labels'],
      options=register_lib.RegisterOptions(refine=refine.RefineOptions()))
  assert rep.grid.shape == list(GRID['shape'])          # the run's model grid
  io_r = rep.instance_optimisation
  assert all(a < b for a, b in zip(io_r['loss_after'], io_r['loss_before']))
  assert rep.dice['mean_after'] > rep.dice['mean_before'] + 0.05, rep.dice
  # Closed form: moving(q) = fixed(q - t), so disp_mm = t; check it in the heart.
  disp = np.asarray(nib.load(out / 'disp_mm.nii.gz').dataobj)[:, :, :, 0, :]
  heart = _load(pair['fixed_labels'])[0] > 0
  err = np.linalg.norm(np.median(disp[heart], axis=0) - pair['t_mm'])
  assert err < 0.35 * np.linalg.norm(pair['t_mm']), (np.median(disp[heart], 0), pair['t_mm'])


@pytest.mark.slow
def test_the_registrar_hands_each_mask_on_its_grid_to_both_stages(run_dir, pair, tmp_path,
                                                                   monkeypatch):
  """Each mask is a ball in world mm written on its own grid (1.5 mm, the world's axes); the
  linear stage and instance optimisation receive it as weights on the registration grid,
  the moving one carried through the linear map for the latter. Oracle: the ball evaluated
  at the grid's voxel centres, away from its surface by more than a mask voxel (where linear
  interpolation of the mask is exactly 0 or 1)."""
  def ball(name, image, radius_mm):
    img, aff, _ = nifti.load_nifti(image)
    corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0] - 1)
                        for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)])
    lo, hi = (corners @ aff.T)[:, :3].min(0) - 5.0, (corners @ aff.T)[:, :3].max(0) + 5.0
    own = np.diag([1.5, 1.5, 1.5, 1.0])    # its own grid: 1.5 mm, world axes, not the image's
    own[:3, 3] = lo
    shape = tuple(int(n) for n in np.ceil((hi - lo) / 1.5))
    centre = (aff @ np.r_[(np.array(img.shape) - 1) / 2.0, 1.0])[:3]
    idx = np.indices(shape).reshape(3, -1)
    world = (own[:3, :3] @ idx).T + own[:3, 3]
    inside = (np.linalg.norm(world - centre, axis=1) < radius_mm).reshape(shape)
    path = nifti.save_nifti(str(tmp_path / name), inside.astype(np.uint8), own)
    return path, centre, 1.5 * np.sqrt(3), (own, shape)

  fmask, f_centre, f_tol, f_grid = ball('fmask.nii.gz', pair['fixed'], 40.0)
  mmask, m_centre, m_tol, m_grid = ball('mmask.nii.gz', pair['shift'], 45.0)
  reg = register_lib.Registrar(run_dir, register_lib.RegisterOptions(
      refine=refine.RefineOptions(), linear='affine'))
  seen = {}
  align, refine_ = reg.aligner.align, reg.refiner.refine

  def spy_align(moving, fixed, grid_affine, fixed_w, moving_w):
    seen['align'] = (grid_affine, fixed_w, moving_w)
    seen['t_mm'], rec = align(moving, fixed, grid_affine, fixed_w, moving_w)
    return seen['t_mm'], rec

  def spy_refine(moving, fixed, spacing, init, fixed_w, moving_w):
    seen['refine'] = (fixed_w, moving_w)
    return refine_(moving, fixed, spacing, init, fixed_w, moving_w)

  monkeypatch.setattr(reg.aligner, 'align', spy_align)
  monkeypatch.setattr(reg.refiner, 'refine', spy_refine)
  reg.register(register_lib.PairFiles(pair['fixed'], pair['shift'], fixed_mask=fmask,
                                      moving_mask=mmask), str(tmp_path / 'out'))
  grid_affine, f_lin, m_lin = seen['align']
  f_io, m_io = seen['refine']
  idx = np.indices(f_io.shape).reshape(3, -1)
  world = (grid_affine[:3, :3] @ idx).T + grid_affine[:3, 3]
  t = seen['t_mm']
  for got, pts, centre, radius, tol, (mask_affine, mask_shape) in (
      (f_io, world, f_centre, 40.0, f_tol, f_grid),
      (m_io, world @ t[:3, :3].T + t[:3, 3], m_centre, 45.0, m_tol, m_grid),
      (f_lin, world, f_centre, 40.0, f_tol, f_grid), (m_lin, world, m_centre, 45.0, m_tol, m_grid)):
    dist = np.linalg.norm(pts - centre, axis=1)
    vox = (pts - mask_affine[:3, 3]) @ np.linalg.inv(mask_affine[:3, :3]).T
    inside_grid = np.all((vox >= -0.5) & (vox <= np.array(mask_shape) - 0.5), 1)
    edge = np.min(np.minimum(vox + 0.5, np.array(mask_shape) - 0.5 - vox), 1)
    far = (np.abs(dist - radius) > tol) & (np.abs(edge) > 1.0)
    ref = (dist < radius) & inside_grid
    assert ref[far].sum() > 200 and (~ref[far]).sum() > 200
    if got is f_lin or got is m_lin:    # the stage's field-of-view weights also apply there
      np.testing.assert_array_equal(got.reshape(-1)[far] > 0.5, ref[far] & (
          got.reshape(-1)[far] > 0))
    else:
      np.testing.assert_array_equal(got.reshape(-1)[far], ref[far].astype(np.float32))
  assert not np.allclose(t, np.eye(4))   # the moving check above used a real map


@pytest.mark.slow
def test_the_linear_stage_finds_a_moved_header_and_warps_once(run_dir, pair, tmp_path):
  """The moving scan is the fixed one placed elsewhere in world space (its header moved by a
  known rigid map T, its voxels untouched, so moving(T(y)) = fixed(y) exactly): --linear
  rigid finds T, disp_mm is the whole map, and warped_moving is one sampling of the
  original moving image through it."""
  img, aff, _ = nifti.load_nifti(pair['fixed'])
  lab, _, _ = nifti.load_nifti(pair['fixed_labels'], what='label')
  centre = aff[:3, :3] @ (np.array(img.shape) - 1) / 2 + aff[:3, 3]
  a = np.deg2rad(8.0)
  t_mm = np.eye(4)
  t_mm[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
  t_mm[:3, 3] = centre + [6.0, -5.0, 0.0] - t_mm[:3, :3] @ centre
  moved = t_mm @ aff            # voxel v at T(y) for the fixed voxel v at y
  moving = nifti.save_nifti(str(tmp_path / 'moved.nii.gz'), img, moved)
  moving_lab = nifti.save_nifti(str(tmp_path / 'moved_gt.nii.gz'), lab, moved)
  # landmarks: heart voxels p and their known partners T(p) (LPS on one side, RAS on the other)
  p_ras = (np.argwhere(lab > 0)[::37] @ aff[:3, :3].T + aff[:3, 3])[:12]
  q_ras = p_ras @ t_mm[:3, :3].T + t_mm[:3, 3]
  (tmp_path / 'f.csv').write_text('name,x_ras,y_ras,z_ras\n' + ''.join(
      f'p{i},{x},{y},{z}\n' for i, (x, y, z) in enumerate(p_ras)))
  (tmp_path / 'm.csv').write_text('x_lps,y_lps,z_lps\n' + ''.join(
      f'{-x},{-y},{z}\n' for x, y, z in q_ras))
  # a fixed mask leaving out one corner block of the image (its own grid: any grid works)
  body = np.ones(img.shape, np.uint8)
  body[:4, :4] = 0
  fmask = nifti.save_nifti(str(tmp_path / 'fmask.nii.gz'), body, aff)
  out = tmp_path / 'out'
  assert cli.main(['register', '--fixed', pair['fixed'], '--moving', moving, '--fixed-labels',
                   pair['fixed_labels'], '--moving-labels', moving_lab, '--checkpoint', run_dir,
                   '--out', str(out), '--linear', 'rigid', '--quiet', '--no-cache',
                   '--fixed-mask', fmask, '--fixed-landmarks', str(tmp_path / 'f.csv'),
                   '--moving-landmarks', str(tmp_path / 'm.csv')]) == 0
  rep = register_lib.PairReport.from_json(json.loads((out / 'report.json').read_text()))
  assert rep.fixed_mask == fmask and rep.moving_mask is None
  lm = rep.landmarks
  assert lm['points'] == 12 and lm['outside_fixed_grid'] == 0
  assert lm['before_mm']['mean'] == pytest.approx(
      np.linalg.norm(p_ras - q_ras, axis=1).mean(), rel=1e-6)
  assert lm['after_linear_mm']['mean'] < 1.0 < lm['before_mm']['mean']
  # after: p + disp_mm(p) from the written field (scipy, trilinear) against T(p)
  d5, _ = _load(out / 'disp_mm.nii.gz')
  vox = (p_ras @ np.linalg.inv(aff)[:3, :3].T + np.linalg.inv(aff)[:3, 3]).T
  mapped = p_ras + np.stack([ndimage.map_coordinates(d5[:, :, :, 0, k], vox, order=1)
                             for k in range(3)], -1)
  np.testing.assert_allclose(lm['after_mm_per_point'],
                             np.linalg.norm(mapped - q_ras, axis=1), atol=1e-3)
  found = np.asarray(rep.linear['matrix_mm'])
  heart = np.argwhere(lab > 0) @ aff[:3, :3].T + aff[:3, 3]
  err = (heart @ found[:3, :3].T + found[:3, 3]) - (heart @ t_mm[:3, :3].T + t_mm[:3, 3])
  assert np.sqrt((err ** 2).sum(-1).mean()) < 1.0, (found, t_mm)
  # (the tiny head, trained 4 steps, adds a rough field of its own on top)
  assert rep.dice['mean_after'] > rep.dice['mean_before'] + 0.05, rep.dice
  disp, _ = _load(out / 'disp_mm.nii.gz')
  disp = disp[:, :, :, 0, :]
  warped = world.warp_to_fixed(img, moved, img.shape, aff, disp, order=1)
  np.testing.assert_allclose(_load(out / 'warped_moving.nii.gz')[0], warped, rtol=1e-4, atol=1e-3)
  # SimpleITK applies the ITK pair (the deformable part, then the affine) to the original
  import SimpleITK as sitk
  both = sitk.CompositeTransform([
      sitk.ReadTransform(str(out / 'itk_affine.mat')), sitk.DisplacementFieldTransform(
          sitk.ReadImage(str(out / 'itk_warp.nii.gz'), sitk.sitkVectorFloat64))])
  theirs = sitk.GetArrayFromImage(sitk.Resample(
      sitk.ReadImage(moving, sitk.sitkFloat32), sitk.ReadImage(pair['fixed'], sitk.sitkFloat32),
      both, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
  assert np.corrcoef(theirs.ravel(), warped.ravel())[0, 1] >= 0.999
  # fmir apply with the saved result warps the original as register did
  assert cli.main(['apply', '--transform', str(out), '--moving', moving, '--out',
                   str(tmp_path / 'again.nii.gz')]) == 0
  np.testing.assert_array_equal(_load(tmp_path / 'again.nii.gz')[0],
                                _load(out / 'warped_moving.nii.gz')[0])


# --------------------------------------------------------------------------- bad input


def _write(path, data, affine=np.diag([1.5, 1.5, 8.0, 1.0])):
  nib.save(nib.Nifti1Image(data, affine), path)
  return str(path)


@pytest.mark.parametrize('case', ['missing', 'corrupt', '2d', 'single_slice', 'nan',
                                  'label_shape', 'label_affine', 'no_run', 'out_not_empty',
                                  'bad_spacing', 'out_is_file', 'out_under_file',
                                  'native_too_coarse', 'l2r_under_file', 'io_budget',
                                  'finest_level'])
@pytest.mark.slow
def test_bad_input_exits_2_and_writes_nothing(run_dir, pair, tmp_path, capsys, case):
  img = np.random.default_rng(0).random((12, 12, 4)).astype(np.float32)
  good = _write(tmp_path / 'good.nii.gz', img)
  args = {'--fixed': good, '--moving': pair['es'], '--checkpoint': run_dir}
  extra = []
  expect = ''
  if case == 'missing':
    args['--fixed'], expect = str(tmp_path / 'nope.nii.gz'), 'does not exist'
  elif case == 'corrupt':
    (tmp_path / 'bad.nii.gz').write_bytes(b'not a nifti file at all')
    args['--moving'], expect = str(tmp_path / 'bad.nii.gz'), 'cannot read'
  elif case == '2d':
    args['--fixed'], expect = _write(tmp_path / 'flat.nii.gz', img[:, :, 0]), '3D'
  elif case == 'single_slice':
    args['--fixed'], expect = _write(tmp_path / 'one.nii.gz', img[:, :, :1]), '2D image'
  elif case == 'nan':
    bad = img.copy()
    bad[3, 4, 1] = np.nan
    args['--fixed'], expect = _write(tmp_path / 'nan.nii.gz', bad), 'NaN'
  elif case == 'label_shape':
    extra = ['--fixed-labels', _write(tmp_path / 'l.nii.gz', np.zeros((12, 11, 4), np.uint8))]
    expect = 'label shape'
  elif case == 'label_affine':
    extra = ['--fixed-labels', _write(tmp_path / 'l.nii.gz', np.zeros((12, 12, 4), np.uint8),
                                      np.diag([1.5, 1.5, 9.0, 1.0]))]
    expect = 'label affine'
  elif case == 'no_run':
    args['--checkpoint'], expect = str(tmp_path / 'no_run'), '--checkpoint'
  elif case == 'out_not_empty':         # an earlier result: refused without --overwrite
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('x')
    (tmp_path / 'out' / 'report.json').write_text('{"files": {}}')   # the user's own file
    expect = 'report.json was not written by fmir-jax'
  elif case == 'bad_spacing':
    extra, expect = ['--grid', 'native', '--spacing', '2,0,3'], '--spacing'
  elif case == 'out_is_file':
    (tmp_path / 'out').write_text('user data')
    expect = 'is a file'
  elif case == 'out_under_file':
    (tmp_path / 'notes.txt').write_text('user data')
    argv_out = str(tmp_path / 'notes.txt' / 'out')
    expect = 'no folder can be made under it'
  elif case == 'native_too_coarse':   # fixed: 12x12x4 voxels of 1.5x1.5x8 mm
    extra, expect = ['--grid', 'native', '--spacing', '50,50,50'], 'finer --spacing'
  elif case == 'l2r_under_file':
    (tmp_path / 'notes.txt').write_text('user data')
    extra, expect = ['--l2r-export', str(tmp_path / 'notes.txt' / 'l2r')], '--l2r-export'
  elif case == 'io_budget':
    extra, expect = ['--io-budget', '0'], '--io-budget 0'
  elif case == 'finest_level':                   # the test run's head has fewer levels
    extra, expect = ['--head-finest-level', '9'], '--head-finest-level 9'
  argv = ['register', '--out', locals().get('argv_out', str(tmp_path / 'out'))] + extra
  for k, v in args.items():
    argv += [k, v]
  before = snapshot(tmp_path)
  rc = cli.main(argv)
  err = capsys.readouterr().err
  assert rc == 2 and expect in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  assert snapshot(tmp_path) == before   # nothing written, changed or left behind


@pytest.mark.slow
def test_overwrite_replaces_only_register_files_with_the_users_umask(run_dir, pair, tmp_path):
  """--overwrite into a folder with the user's files: they stay byte for byte; the earlier
  result is replaced (its warped labels, not written again, removed); modes follow the
  umask; a temp folder of a killed run is removed, one of a live run kept."""
  import subprocess
  import sys
  out = tmp_path / 'out'
  base = ['register', '--fixed', pair['fixed'], '--moving', pair['es'],
          '--checkpoint', run_dir, '--out', str(out), '--quiet']
  assert cli.main(base + ['--moving-labels', pair['es_labels']]) == 0
  assert (out / 'warped_moving_labels.nii.gz').exists()
  (out / 'notes.txt').write_text('my notes')
  (out / 'sub').mkdir()
  (out / 'sub' / 'data.csv').write_bytes(b'a,b\n1,2\n')
  (out / 'disp_mm.nii.gz.bak').write_bytes(b'user copy')
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  (tmp_path / f'.out.tmp-{dead}-abc12').mkdir()            # left by a killed run
  (tmp_path / f'.out.tmp-{os.getpid()}-live9').mkdir()     # a live run's
  old_report = (out / 'report.json').read_bytes()
  user = {k: v for k, v in snapshot(out).items()
          if k in ('notes.txt', 'sub', os.path.join('sub', 'data.csv'), 'disp_mm.nii.gz.bak')}
  old_mask = os.umask(0o027)
  try:
    assert cli.main(base) == 2                              # earlier result: refused
    assert (out / 'report.json').read_bytes() == old_report
    assert cli.main(base + ['--overwrite']) == 0
  finally:
    os.umask(old_mask)
  after = snapshot(out)
  assert {k: after.get(k, 'gone') for k in user} == user
  ours = ('warped_moving.nii.gz', 'disp_mm.nii.gz', 'jacobian_det.nii.gz', 'report.json',
          'itk_affine.mat', 'itk_warp.nii.gz')          # the last two: the linear stage's
  assert set(after) == set(user) | set(ours) | {files.MANIFEST}
  assert after['report.json'] != old_report
  for name in ours:
    assert os.stat(out / name).st_mode & 0o777 == 0o640, name
  assert not (tmp_path / f'.out.tmp-{dead}-abc12').exists()
  assert (tmp_path / f'.out.tmp-{os.getpid()}-live9').exists()
  # A new OUT is created whole with the umask's folder mode.
  old_mask = os.umask(0o022)
  try:
    assert cli.main(base[:-3] + ['--out', str(tmp_path / 'new'), '--quiet']) == 0
  finally:
    os.umask(old_mask)
  assert os.stat(tmp_path / 'new').st_mode & 0o777 == 0o755
  assert os.stat(tmp_path / 'new' / 'warped_moving.nii.gz').st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_other_backbone_without_pca_basis_is_refused(run_dir, pair, tmp_path, capsys):
  import transformers
  cfg = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, patch_size=4, image_size=32)
  weights = str(tmp_path / 'tiny_dinov2')
  transformers.Dinov2Model(cfg).save_pretrained(weights)
  rc = cli.main(['register', '--fixed', pair['fixed'], '--moving', pair['es'],
                 '--checkpoint', run_dir, '--out', str(tmp_path / 'out'),
                 '--backbone', 'dinov2', '--weights', weights])
  err = capsys.readouterr().err
  assert rc == 2 and 'no PCA basis for backbone dinov2' in err and '--pca_store' in err, err
  # The command it advises uses flags eval.py defines.
  import re
  defined = set(re.findall(r"DEFINE_\w+\('(\w+)'", open(os.path.join(
      os.path.dirname(os.path.dirname(__file__)), 'eval.py')).read()))
  advised = set(re.findall(r'--(\w+)=', err.split('python eval.py', 1)[1]))
  assert advised and advised <= defined, (advised, defined)
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_batch_mode_equals_single_calls_and_goes_on_after_a_failed_pair(run_dir, pair, tmp_path,
                                                                         capsys):
  """--pairs: one process, one compile per grid shape, per-pair folders equal to single
  calls, a failed pair reported in the summary while the others go on, exit code 1."""
  import csv
  rows = [{'fixed': pair['fixed'], 'moving': pair['es'], 'fixed_labels': pair['fixed_labels'],
           'moving_labels': pair['es_labels']},
          {'fixed': pair['fixed'], 'moving': 'missing.nii.gz', 'fixed_labels': '',
           'moving_labels': ''},
          {'fixed': pair['fixed'], 'moving': pair['shift'], 'fixed_labels': '',
           'moving_labels': ''}]
  with open(tmp_path / 'pairs.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  out = tmp_path / 'batch'
  rc = cli.main(['register', '--pairs', str(tmp_path / 'pairs.csv'), '--checkpoint', run_dir,
                 '--out', str(out), '--no-cache'])
  captured = capsys.readouterr()
  assert rc == 1 and '3 pairs, 1 failed' in captured.out, captured
  summary = json.loads((out / 'summary.json').read_text())
  status = [r['status'] for r in summary['rows']]
  assert status == ['ok', 'failed', 'ok']
  assert 'missing.nii.gz' in summary['rows'][1]['error']
  assert summary['rows'][2]['compile_s'] == 0.0           # same grid shape: compiled once
  with open(out / 'summary.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['status'] for r in table] == status
  assert float(table[0]['dice_after']) == pytest.approx(summary['rows'][0]['dice_after'])
  for i, moving, labels in ((0, 'es', True), (2, 'shift', False)):
    single = tmp_path / f'single{i}'
    extra = ['--fixed-labels', pair['fixed_labels'], '--moving-labels',
             pair['es_labels']] if labels else []
    assert cli.main(['register', '--fixed', pair['fixed'], '--moving', pair[moving],
                     '--checkpoint', run_dir, '--out', str(single), '--quiet', '--no-cache']
                    + extra) == 0
    folder = out / os.path.basename(summary['rows'][i]['out'])
    a, _ = _load(folder / 'disp_mm.nii.gz')
    b, _ = _load(single / 'disp_mm.nii.gz')
    np.testing.assert_allclose(a, b, atol=1e-5)
    if labels:
      rep = json.loads((single / 'report.json').read_text())
      assert summary['rows'][0]['dice_after'] == pytest.approx(rep['dice']['mean_after'])
