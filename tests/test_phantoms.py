"""Tests for the synthetic ACDC and abdomen CT phantoms."""
import os

import numpy as np
import pytest
from scipy import ndimage

from feature_extract.datasets import abdomen, acdc
from feature_extract.synthetic import phantoms
from fmir_jax.core import nifti

_SMALL = (128, 150)


def _dice(a, b, classes):
  out = []
  for c in classes:
    den = np.sum(a == c) + np.sum(b == c)
    if den:
      out.append(2 * np.sum((a == c) & (b == c)) / den)
  return float(np.mean(out))


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("acdc_ph")
  phantoms.write_acdc_phantoms(root, 4, seed=7, first_id=17, inplane_size=_SMALL)
  return root


def test_acdc_phantom_files_and_ranges(acdc_root):
  for pid in range(17, 21):
    folder = acdc_root / "training" / f"patient{pid:03d}"
    ed, es = acdc.parse_info_cfg(str(folder / "Info.cfg"))
    assert es > ed >= 1
    img, aff, hdr = nifti.load_nifti(folder / f"patient{pid:03d}_frame{es:02d}.nii.gz")
    lab, laff, _ = nifti.load_nifti(folder / f"patient{pid:03d}_frame{ed:02d}_gt.nii.gz",
                                 what="label")
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    np.testing.assert_allclose(aff, laff, atol=1e-4)
    sx, sy, sz = hdr.spacing_mm
    assert 1.2 <= sx <= 1.9 and sx == pytest.approx(sy) and 5 <= sz <= 10
    assert _SMALL[0] <= img.shape[0] <= _SMALL[1] and 6 <= img.shape[2] <= 12
    assert img.min() >= 0 and img.std() > 0
    # Myocardium surrounds the LV: dilating the LV by the wall reaches mostly MYO first.
    ring = ndimage.binary_dilation(lab == 3, np.ones((3, 3, 1))) & (lab != 3)
    assert np.mean(lab[ring] == 2) > 0.9
    # The LV blood pool is brighter than the myocardium.
    ed_img, _, _ = nifti.load_nifti(folder / f"patient{pid:03d}_frame{ed:02d}.nii.gz")
    assert ed_img[lab == 3].mean() > 2 * ed_img[lab == 2].mean()


def test_acdc_phantoms_deterministic_and_varied(tmp_path):
  a = phantoms.write_acdc_phantoms(tmp_path / "a", 2, seed=3, first_id=5,
                                   inplane_size=_SMALL)
  b = phantoms.write_acdc_phantoms(tmp_path / "b", 1, seed=3, first_id=6,
                                   inplane_size=_SMALL)
  assert a[1].ed == b[0].ed and a[1].es == b[0].es and a[1].shape == b[0].shape
  np.testing.assert_array_equal(a[1].affine, b[0].affine)
  name = "training/patient006/patient006_frame{:02d}.nii.gz".format(b[0].ed_frame)
  x, _, _ = nifti.load_nifti(tmp_path / "a" / name)
  y, _, _ = nifti.load_nifti(tmp_path / "b" / name)
  np.testing.assert_array_equal(x, y)
  assert a[0].shape != a[1].shape or a[0].spacing_mm != a[1].spacing_mm
  dets = [np.linalg.det(phantoms.draw_acdc_phantom(i, 0).affine[:3, :3]) for i in range(12)]
  assert min(dets) < 0 < max(dets)  # some orientations are flipped
  with pytest.raises(ValueError, match="1..150"):
    phantoms.write_acdc_phantoms(tmp_path / "c", 3, seed=0, first_id=149)


def _radial_warp(labels, centre_from, centre_to, amp, sigma_vox):
  """Samples ``labels`` at c_from + (p - c_to) * (1 + amp * exp(-r^2 / 2 sigma^2))."""
  h, w, d = labels.shape
  i, j, k = np.meshgrid(np.arange(h), np.arange(w), np.arange(d), indexing="ij")
  di, dj = i - centre_to[0], j - centre_to[1]
  m = 1 + amp * np.exp(-(di ** 2 + dj ** 2) / (2 * sigma_vox ** 2))
  coords = np.stack([centre_from[0] + di * m, centre_from[1] + dj * m, k])
  return ndimage.map_coordinates(labels, coords, order=0, mode="constant")


def test_acdc_pairs_misaligned_but_registrable(acdc_root):
  sources = {s.key: s for s in acdc.scan(str(acdc_root))}
  initial, registered = [], []
  for pid in range(17, 21):
    ed = sources[f"patient{pid:03d}_ed"].load().labels
    es = sources[f"patient{pid:03d}_es"].load().labels
    initial.append(_dice(ed, es, (1, 2, 3)))
    # A smooth radial contraction about the LV (centres from the label maps).
    c_ed = np.argwhere(ed == 3).mean(axis=0)
    c_es = np.argwhere(es == 3).mean(axis=0)
    best = max(_dice(_radial_warp(ed, c_ed, c_es, a, s), es, (1, 2, 3))
               for a in (0.2, 0.35, 0.5, 0.65) for s in (8, 14, 20))
    registered.append(best)
  initial, registered = np.array(initial), np.array(registered)
  assert 0.45 < initial.mean() < 0.72, initial
  assert np.all(registered > initial + 0.1), (initial, registered)
  assert registered.mean() > 0.75, registered


def test_abdomen_phantoms(tmp_path):
  shape = (64, 56, 80)
  paths = phantoms.write_abdomen_phantoms(tmp_path, 2, seed=1, shape=shape)
  assert [os.path.basename(p) for p in paths] == ["img0001.nii.gz", "img0002.nii.gz"]
  imgs, labs = [], []
  for n in (1, 2):
    img, aff, hdr = nifti.load_nifti(tmp_path / f"img/img{n:04d}.nii.gz")
    lab, _, _ = nifti.load_nifti(tmp_path / f"label/label{n:04d}.nii.gz", what="label")
    assert img.shape == shape and hdr.spacing_mm == pytest.approx((2.0, 2.0, 2.0))
    assert img.min() < -950 and img.max() > 600        # air and bone
    assert np.median(img[lab == 6]) == pytest.approx(60, abs=25)  # liver HU
    assert np.median(img[0:3, 0:3, :]) < -950           # corner is air
    assert lab.max() == 13 and len(np.unique(lab)) >= 12
    imgs.append(img)
    labs.append(lab)
  inter = _dice(labs[0], labs[1], range(1, 14))
  assert 0.1 < inter < 0.8  # inter-subject misalignment
  # Reader round trip at half resolution of the phantom grid.
  v = abdomen.scan(str(tmp_path), resolution="half")[0].load()
  assert v.image.shape == (96, 80, 128) and v.labels.max() <= 13
  with pytest.raises(ValueError, match="layout='nii'"):
    phantoms.write_abdomen_phantoms(tmp_path, 1, seed=0, layout="nii")


def test_acdc_cine_holds_the_cycle_with_the_frame_files_at_ed_and_es(tmp_path):
  """cine=True: patientNNN_4d.nii.gz has NbFrame frames on the frames' grid; its ED and ES
  frames are the frame files voxel for voxel, and those files are the same as without the
  cine; the LV cavity (label 3 of each frame's heart, counted in voxels) is largest at ED
  and smallest at ES, and every other frame lies between."""
  import nibabel as nib
  plain, with_cine = tmp_path / 'plain', tmp_path / 'cine'
  phantoms.write_acdc_phantoms(str(plain), 1, seed=3, first_id=7, inplane_size=(40, 48))
  (p,) = phantoms.write_acdc_phantoms(str(with_cine), 1, seed=3, first_id=7,
                                      inplane_size=(40, 48), cine=True)
  folder = with_cine / 'training' / 'patient007'
  series = nib.load(str(folder / 'patient007_4d.nii.gz'))
  data = np.asarray(series.dataobj)
  info = open(folder / 'Info.cfg').read()
  assert f'NbFrame: {phantoms.n_frames(p)}\n' in info
  assert data.shape == p.shape + (phantoms.n_frames(p),) and data.dtype == np.int16
  for number in (p.ed_frame, p.es_frame):
    name = f'patient007_frame{number:02d}.nii.gz'
    frame = np.asarray(nib.load(str(folder / name)).dataobj)
    np.testing.assert_array_equal(data[..., number - 1], frame)
    np.testing.assert_array_equal(
        frame, np.asarray(nib.load(str(plain / 'training' / 'patient007' / name)).dataobj))
  np.testing.assert_allclose(series.affine, p.affine)
  # the ACDC reader lists the cine with the patient's files (and none without it)
  files = acdc.patient_files(str(folder))
  assert files.series == str(folder / 'patient007_4d.nii.gz')
  assert files.frame_numbers == {'ed': p.ed_frame, 'es': p.es_frame}
  assert acdc.patient_files(str(plain / 'training' / 'patient007')).series is None
  assert phantoms.contraction(p, p.ed_frame) == 0.0
  assert phantoms.contraction(p, p.es_frame) == 1.0
  nx, ny, nz = p.shape
  s, _, t = p.spacing_mm
  x = ((np.arange(nx) - (nx - 1) / 2) * s)[:, None, None]
  y = ((np.arange(ny) - (ny - 1) / 2) * s)[None, :, None]
  z = (np.arange(nz) * t)[None, None, :]
  lv = [int(np.sum(phantoms.heart_labels(phantoms.heart_at(p, f), x, y, z) == 3))
        for f in range(1, phantoms.n_frames(p) + 1)]
  assert int(np.argmax(lv)) + 1 == p.ed_frame and int(np.argmin(lv)) + 1 == p.es_frame
  assert lv[p.es_frame - 1] < 0.8 * lv[p.ed_frame - 1]
  assert not np.array_equal(data[..., p.ed_frame], data[..., p.ed_frame - 1])
