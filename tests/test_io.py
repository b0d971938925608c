"""Tests for fmir_jax.core.nifti: NIfTI read/write, validation and resampling."""
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fmir_jax.core import resample
from fmir_jax.core import nifti
from fmir_jax.core import world
from tests.helpers import oracles


def _affine(spacing, origin=(0.0, 0.0, 0.0), rot_deg=0.0, flip=False):
  c, s = np.cos(np.deg2rad(rot_deg)), np.sin(np.deg2rad(rot_deg))
  r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
  if flip:
    r = r @ np.diag([-1.0, 1, 1])
  a = np.eye(4)
  a[:3, :3] = r @ np.diag(spacing)
  a[:3, 3] = origin
  return a


def _sphere(shape, spacing, radius_mm, center_mm):
  grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
  d2 = sum((g - c) ** 2 for g, c in zip(grids, center_mm))
  return (d2 <= radius_mm ** 2).astype(np.uint8)


def test_resample_to_spacing_preserves_sphere_volume_and_extent():
  src_sp, dst_sp, r = (0.9, 1.1, 1.5), (1.8, 1.6, 2.5), 14.0
  shape = (60, 50, 40)
  center = (27.0, 26.0, 31.0)
  lab = _sphere(shape, src_sp, r, center)
  aff = _affine(src_sp, origin=(-10, 5, 3), rot_deg=30, flip=True)
  true_vol = 4 / 3 * np.pi * r ** 3
  out, out_aff = resample.resample_to_spacing(lab, aff, dst_sp, order=0)
  img, img_aff = resample.resample_to_spacing(lab.astype(np.float32), aff, dst_sp, order=1)
  assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
  np.testing.assert_allclose(resample.voxel_spacing(out_aff), dst_sp, rtol=1e-9)
  np.testing.assert_allclose(out_aff, img_aff)
  vox = np.prod(dst_sp)
  assert abs(out.sum() * vox / true_vol - 1) < 0.04
  assert abs(img.sum() * vox / true_vol - 1) < 0.02  # linear: partial volumes sum up
  # Same physical extent (within one target voxel) and same centre in world space.
  ext_in = np.array(shape) * src_sp
  ext_out = np.array(out.shape) * dst_sp
  assert np.all(np.abs(ext_out - ext_in) <= np.array(dst_sp) / 2 + 1e-9)
  c_in = aff @ np.append((np.array(shape) - 1) / 2, 1)
  c_out = out_aff @ np.append((np.array(out.shape) - 1) / 2, 1)
  np.testing.assert_allclose(c_in, c_out, atol=1e-9)
  # Voxel axis order kept: the long axis stays first.
  assert out.shape == (30, 34, 24)


def test_resample_to_grid_matches_map_coordinates_oracle():
  rng = np.random.default_rng(0)
  data = rng.normal(size=(12, 10, 8)).astype(np.float32)
  src = _affine((1.0, 1.2, 2.0), origin=(3, -2, 1), rot_deg=20)
  dst = _affine((0.8, 0.9, 1.7), origin=(4, 0, 2.5), rot_deg=-35, flip=True)
  dst_shape = (14, 13, 9)
  out = resample.resample_to_grid(data, src, dst, dst_shape, order=1, cval=-7.0)
  idx = np.indices(dst_shape).reshape(3, -1)
  world = dst @ np.vstack([idx, np.ones(idx.shape[1])])
  src_vox = (np.linalg.inv(src) @ world)[:3]
  ref, inside = oracles.resample_at(data, src_vox, order=1, cval=-7.0)
  assert 0 < inside.sum() < inside.size  # both cases exercised
  np.testing.assert_allclose(out.reshape(-1), ref, atol=1e-5)
  np.testing.assert_array_equal(resample.inside_grid(data.shape, src, dst_shape, dst),
                                inside.reshape(dst_shape))


def test_fill_nearest_gives_each_unknown_voxel_its_nearest_known_value():
  """Brute force over the known voxels: the ramp's values name their voxel, so the copied
  one's distance must be the least (ties on the integer grid may take either voxel)."""
  idx = np.indices((9, 8, 7)).astype(float)
  image = (idx[0] * 100 + idx[1] * 10 + idx[2]).astype(np.float32)
  known = np.linalg.norm(idx - np.array([4.3, 3.6, 2.8])[:, None, None, None], axis=0) < 2.7
  out = resample.fill_nearest(image, known)
  src = np.stack([out // 100, out // 10 % 10, out % 10], -1).reshape(-1, 3)
  assert known[tuple(src.astype(int).T)].all()
  pts, ref_pts = idx.reshape(3, -1).T, idx[:, known].T
  least = np.sqrt(((pts[:, None] - ref_pts[None]) ** 2).sum(-1).min(1))
  np.testing.assert_allclose(np.linalg.norm(pts - src, axis=1), least, atol=1e-9)
  np.testing.assert_array_equal(out[known], image[known])
  # A slab known on x < 5 extends its last row: a closed form.
  slab = np.zeros(image.shape, bool)
  slab[:5] = True
  np.testing.assert_array_equal(resample.fill_nearest(image, slab)[5:],
                                np.broadcast_to(image[4], image[5:].shape))
  assert resample.fill_nearest(image, np.zeros_like(known)) is image


def test_label_upsample_round_trip_is_exact():
  rng = np.random.default_rng(1)
  lab = rng.integers(0, 4, size=(7, 6, 5)).astype(np.uint8)
  aff = _affine((1.5, 1.5, 4.0), rot_deg=90)
  shape, up_aff = resample.spacing_grid(lab.shape, aff, (1.5, 1.5, 4.0), (0.75, 0.5, 2.0))
  gm = resample.GridMap(lab.shape, aff, shape, up_aff)
  up = gm.to_target(lab, order=0)
  assert up.shape == (14, 18, 10) and up.dtype == np.uint8
  np.testing.assert_array_equal(gm.to_source(up, order=0), lab)


def test_crop_or_pad_matches_numpy_padding():
  rng = np.random.default_rng(2)
  data = rng.normal(size=(9, 6, 5))
  out, start = resample.crop_or_pad(data, (2.2, 4.6, 2.0), (6, 10, 3), cval=-1)
  assert start == (-1, 0, 1)
  padded = np.pad(data, [(1, 0), (0, 4), (0, 0)], constant_values=-1)
  np.testing.assert_array_equal(out, padded[0:6, 0:10, 1:4])
  # Centred identity.
  same, st = resample.crop_or_pad(data, (4.0, 2.5, 2.0), data.shape)
  assert st == (0, 0, 0)
  np.testing.assert_array_equal(same, data)


def test_target_grid_equals_resample_then_crop():
  rng = np.random.default_rng(3)
  img = ndimage.gaussian_filter(rng.normal(size=(40, 36, 9)), 2).astype(np.float32)
  sp = (1.3, 1.3, 7.0)
  aff = _affine(sp, origin=(-20, 10, 5), rot_deg=180, flip=True)
  centre = (17.3, 21.8, 4.0)
  gm = resample.target_grid(img.shape, aff, sp, (1.8, 1.8, 10.0), (24, 20, 8), centre)
  direct = gm.to_target(img, order=1)
  res, res_aff = resample.resample_to_spacing(img, aff, (1.8, 1.8, 10.0), order=1)
  centre_res = (np.linalg.inv(res_aff) @ aff @ np.append(centre, 1))[:3]
  ref, start = resample.crop_or_pad(res, centre_res, (24, 20, 8))
  np.testing.assert_allclose(direct, ref, atol=1e-5)
  np.testing.assert_allclose(gm.dst_affine, resample.translate_affine(res_aff, start))
  # JSON round trip of the grid map.
  back = resample.GridMap.from_dict(json.loads(json.dumps(gm.to_dict())))
  assert back == gm
  with pytest.raises(ValueError, match="malformed"):
    resample.GridMap.from_dict({"src_shape": [1, 2, 3]})


def test_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(4)
  img = rng.normal(size=(5, 4, 3))
  lab = rng.integers(0, 14, size=(5, 4, 3))
  aff = _affine((1.0, 2.0, 3.0), origin=(1, 2, 3), rot_deg=10)
  nifti.save_nifti(tmp_path / "img.nii.gz", img, aff)
  nifti.save_nifti(tmp_path / "lab.nii.gz", lab, aff, intent="label")
  assert sorted(os.listdir(tmp_path)) == ["img.nii.gz", "lab.nii.gz"]  # no temp files left
  data, a, hdr = nifti.load_nifti(tmp_path / "img.nii.gz")
  assert data.dtype == np.float32
  np.testing.assert_allclose(data, img.astype(np.float32))
  np.testing.assert_allclose(a, aff, atol=1e-5)
  np.testing.assert_allclose(hdr.spacing_mm, (1.0, 2.0, 3.0), rtol=1e-6)
  labd, _, lh = nifti.load_nifti(tmp_path / "lab.nii.gz", what="label")
  assert labd.dtype == np.uint8 and lh.dtype == "uint8"
  np.testing.assert_array_equal(labd, lab)
  with pytest.raises(ValueError, match="does not fit int32"):
    nifti.save_nifti(tmp_path / "x.nii.gz", lab.astype(np.int64) * 2**31, aff)


def _write(path, data, affine=None, zooms=None):
  img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
  if zooms is not None:
    img.header.set_zooms(zooms)
  nib.save(img, str(path))
  return str(path)


def test_load_errors(tmp_path):
  with pytest.raises(nifti.NiftiError, match="does not exist"):
    nifti.load_nifti(tmp_path / "missing.nii.gz")
  bad = tmp_path / "garbage.nii.gz"
  bad.write_bytes(b"not a nifti at all" * 10)
  with pytest.raises(nifti.NiftiError, match="garbage.nii.gz.*corrupt"):
    nifti.load_nifti(bad)
  # Valid header, truncated voxel data: header reads, data load fails clearly.
  full = _write(tmp_path / "full.nii", np.ones((20, 20, 20), np.float32))
  raw = open(full, "rb").read()
  trunc = tmp_path / "trunc.nii.gz"
  trunc.write_bytes(gzip.compress(raw[:2000]))
  assert nifti.read_header(trunc).shape == (20, 20, 20)
  with pytest.raises(nifti.NiftiError, match="(?s)trunc.nii.gz.*truncated"):
    nifti.load_nifti(trunc)
  with pytest.raises(nifti.NiftiError, match="flat.nii.gz.*expected a 3D"):
    nifti.load_nifti(_write(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32)))
  four = _write(tmp_path / "cine_4d.nii.gz", np.zeros((4, 4, 3, 5), np.float32))
  with pytest.raises(nifti.NiftiError, match="cine_4d.nii.gz.*4D"):
    nifti.load_nifti(four)
  assert nifti.load_nifti(four, allow_4d=True)[0].shape == (4, 4, 3, 5)
  nan = np.zeros((3, 3, 3), np.float32)
  nan[1, 2, 0] = np.nan
  with pytest.raises(nifti.NiftiError, match=r"nan.nii.gz.*1 NaN/inf.*\(1, 2, 0\)"):
    nifti.load_nifti(_write(tmp_path / "nan.nii.gz", nan))
  with pytest.raises(nifti.NiftiError, match="zero.nii.gz.*spacing"):
    nifti.load_nifti(_write(tmp_path / "zero.nii.gz", np.zeros((3, 3, 3), np.float32),
                         zooms=(1.0, 0.0, 1.0)))
  frac = _write(tmp_path / "frac.nii.gz", np.full((3, 3, 3), 0.5, np.float32))
  with pytest.raises(nifti.NiftiError, match="frac.nii.gz.*non-integer"):
    nifti.load_nifti(frac, what="label")
  neg = _write(tmp_path / "neg.nii.gz", np.full((3, 3, 3), -1, np.int16))
  with pytest.raises(nifti.NiftiError, match="neg.nii.gz.*negative"):
    nifti.load_nifti(neg, what="label")


def test_check_same_grid():
  a = _affine((1.0, 1.0, 5.0))
  nifti.check_same_grid("i.nii", a, (4, 4, 2), "l.nii", a + 1e-6, (4, 4, 2))
  with pytest.raises(nifti.NiftiError, match="l.nii: label shape .*differs.*i.nii"):
    nifti.check_same_grid("i.nii", a, (4, 4, 2), "l.nii", a, (4, 4, 3))
  b = a.copy()
  b[0, 3] += 0.5
  with pytest.raises(nifti.NiftiError, match="l.nii: label affine differs .* by up to 0.5 mm"):
    nifti.check_same_grid("i.nii", a, (4, 4, 2), "l.nii", b, (4, 4, 2))


def test_displacement_units_round_trip():
  aff = _affine((1.8, 1.8, 10.0), origin=(5, 6, 7), rot_deg=90, flip=True)
  disp_vox = np.zeros((2, 2, 1, 3), np.float32)
  disp_vox[..., 0] = 1.0  # one voxel along array axis 0
  disp_vox[1, 1, 0] = (0.0, 0.0, 0.5)  # half a slice
  mm = world.disp_vox_to_mm(disp_vox, aff)
  # Closed form: a one-voxel step along axis 0 moves by the affine's first column.
  np.testing.assert_allclose(mm[0, 0, 0], aff[:3, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(mm[0, 0, 0]), 1.8, rtol=1e-6)
  np.testing.assert_allclose(mm[1, 1, 0], (0.0, 0.0, 5.0), atol=1e-6)
  back = mm.astype(np.float64) @ np.linalg.inv(aff[:3, :3]).T
  np.testing.assert_allclose(back, disp_vox, atol=1e-6)


@pytest.mark.parametrize('top, dtype', [(3, np.uint8), (2035, np.int16), (40000, np.uint16),
                                        (70000, np.int32)])
def test_labels_above_255_are_written_with_a_type_that_holds_them(tmp_path, top, dtype):
  """FreeSurfer aseg ids (up to 2035) and larger: nibabel reads back the exact ids."""
  lab = np.zeros((5, 4, 3), np.int64)
  lab[1, 1, 1], lab[2, 3, 0], lab[4, 0, 2] = 1, top // 2, top
  path = nifti.save_nifti(str(tmp_path / 'aseg.nii.gz'), lab, np.eye(4), intent='label')
  img = nib.load(path)
  assert img.get_data_dtype() == dtype
  np.testing.assert_array_equal(np.asarray(img.dataobj), lab)
  back, _, _ = nifti.load_nifti(path, what='label')
  np.testing.assert_array_equal(back, lab)
