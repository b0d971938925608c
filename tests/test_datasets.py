"""Tests for the dataset readers (acdc, abdomen, custom pairs) and their bad-input errors."""
import collections
import json
import os

import nibabel as nib
import numpy as np
import pytest

from feature_extract import datasets
from feature_extract.datasets import abdomen, acdc
from feature_extract.synthetic import phantoms
from feature_extract.datasets import base
from feature_extract.datasets import custom
from feature_extract.datasets.base import DatasetError
from fmir_jax.core import resample
from fmir_jax.core import nifti

_AFF = np.diag([1.5, 1.5, 8.0, 1.0])


def _save(path, data, affine=_AFF):
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return str(path)


def _tiny_acdc_patient(root, pid, ed=1, es=9, shape=(8, 8, 4)):
  folder = root / ("training" if pid <= 100 else "testing") / f"patient{pid:03d}"
  folder.mkdir(parents=True)
  (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\n")
  img = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  lab = np.zeros(shape, np.uint8)
  lab[2:5, 3:6, 1:3] = 3
  for f in (ed, es):
    _save(folder / f"patient{pid:03d}_frame{f:02d}.nii.gz", img)
    _save(folder / f"patient{pid:03d}_frame{f:02d}_gt.nii.gz", lab)
  return folder


@pytest.fixture(scope="module")
def acdc150(tmp_path_factory):
  root = tmp_path_factory.mktemp("acdc150")
  for pid in range(1, 151):
    _tiny_acdc_patient(root, pid)
  # A 4D cine file, as in the real release, must be ignored.
  _save(root / "training/patient001/patient001_4d.nii.gz", np.zeros((8, 8, 4, 3), np.float32))
  return root


def test_get_registry():
  assert datasets.get("acdc") is acdc
  assert datasets.get("abdomen") is abdomen
  assert datasets.get("custom") is custom
  with pytest.raises(DatasetError, match="Unknown dataset 'brain'"):
    datasets.get("brain")


@pytest.mark.parametrize("name", datasets.NAMES)
def test_every_reader_provides_the_reader_protocol(name):
  reader = datasets.get(name)
  assert isinstance(reader, base.Reader) and reader.NAME == name
  for member in ("scan", "pairs", "target_shape", "model_grid", "preprocess"):
    assert callable(getattr(reader, member)), member


def test_acdc_splits_and_pair_counts_without_loading_pixels(acdc150, monkeypatch):
  def no_pixels(*a, **k):
    raise AssertionError("scan() must not load pixel data")
  monkeypatch.setattr(nifti, "load_nifti", no_pixels)
  sources = acdc.scan(str(acdc150))
  assert len(sources) == 300
  per_split = collections.Counter(s.split for s in sources)
  assert per_split == {"train": 170, "val": 30, "test": 100}
  val = sorted({int(s.subject[7:]) for s in sources if s.split == "val"})
  assert val == [18, 19, 20, 38, 39, 40, 58, 59, 60, 78, 79, 80, 98, 99, 100]
  assert sources[0].key == "patient001_ed" and sources[1].key == "patient001_es"
  assert sources[0].files[0].endswith("patient001_frame01.nii.gz")
  assert sources[1].files[1].endswith("patient001_frame09_gt.nii.gz")
  prs = acdc.pairs(sources)
  assert collections.Counter(p.split for p in prs) == {"train": 170, "val": 30, "test": 100}
  assert (prs[0].moving, prs[0].fixed) == ("patient001_ed", "patient001_es")
  assert (prs[1].moving, prs[1].fixed) == ("patient001_es", "patient001_ed")
  # Split filter and explicit subjects.
  assert len(acdc.scan(str(acdc150), splits=["val"])) == 30
  sub = acdc.scan(str(acdc150 / "training"), subjects=[18, "patient002"])
  assert [s.key for s in sub] == ["patient002_ed", "patient002_es", "patient018_ed",
                                  "patient018_es"]
  # Root pointing at a plain folder of patient dirs: only those present are listed.
  assert len(acdc.scan(str(acdc150 / "testing"))) == 100


def test_acdc_absent_subjects_named(acdc150, tmp_path):
  with pytest.raises(DatasetError, match=r"subjects \[151, 160\] were requested"):
    acdc.scan(str(acdc150), subjects=[3, 151, 160])
  root = tmp_path / "few"
  for pid in (1, 2):
    _tiny_acdc_patient(root, pid)
  with pytest.raises(DatasetError, match=r"split\(s\) \['val'\] requested"):
    acdc.scan(str(root), splits=["train", "val"])


def test_abdomen_splits_and_pair_counts(tmp_path, monkeypatch):
  for layout in ("img", "imagesTr"):
    phantoms.write_abdomen_phantoms(tmp_path / layout, 30, seed=0, layout=layout,
                                    shape=(8, 8, 8))
  monkeypatch.setattr(nifti, "load_nifti", lambda *a, **k: pytest.fail("loaded pixels"))
  for layout in ("img", "imagesTr"):
    sources = abdomen.scan(str(tmp_path / layout))
    assert [s.key for s in sources] == [f"img{i:04d}" for i in range(1, 31)]
    assert collections.Counter(s.split for s in sources) == {"train": 20, "val": 3,
                                                             "test": 7}
    prs = abdomen.pairs(sources)
    assert collections.Counter(p.split for p in prs) == {"train": 380, "val": 6, "test": 42}
    assert all(p.moving != p.fixed for p in prs)
    assert len(set(prs)) == len(prs)
  assert sources[0].files[1].endswith("labelsTr/AbdomenCTCT_0001.nii.gz")


def test_abdomen_half_is_block_mean_of_full(tmp_path):
  # A scan already on the released grid: "full" is identity, "half" the 2x2x2 mean.
  rng = np.random.default_rng(0)
  hu = rng.integers(-400, 700, size=abdomen.FULL_SHAPE).astype(np.int16)
  lab = np.zeros(abdomen.FULL_SHAPE, np.uint8)
  lab[40:80, 30:70, 100:140] = 6
  lab[120:140, 90:100, 10:50] = 13
  aff = np.diag([-2.0, -2.0, 2.0, 1.0])
  (tmp_path / "img").mkdir()
  (tmp_path / "label").mkdir()
  _save(tmp_path / "img/img0005.nii.gz", hu, aff)
  _save(tmp_path / "label/label0005.nii.gz", lab, aff)
  full = abdomen.scan(str(tmp_path), resolution="full")[0].load()
  np.testing.assert_allclose(full.image, (hu + 500.0) / 1300.0, atol=1e-6)
  np.testing.assert_array_equal(full.labels, lab)
  assert full.meta["centre_rule"] == "already_on_grid"
  half = abdomen.scan(str(tmp_path), resolution="half")[0].load()
  assert half.image.shape == abdomen.HALF_SHAPE and half.labels.dtype == np.uint8
  block = hu.reshape(96, 2, 80, 2, 128, 2).mean(axis=(1, 3, 5))
  np.testing.assert_allclose(half.image, (block + 500.0) / 1300.0, atol=1e-5)
  np.testing.assert_allclose(half.spacing_mm, (4.0, 4.0, 4.0), rtol=1e-6)
  assert set(np.unique(half.labels)) == {0, 6, 13}
  assert abs((half.labels == 6).sum() * 8 - (lab == 6).sum()) / (lab == 6).sum() < 0.05
  # quarter: voxel j at full position 4j + 1.5, i.e. the mean of the central 2x2x2 block
  quarter = abdomen.scan(str(tmp_path), resolution="quarter")[0].load()
  assert quarter.image.shape == (48, 40, 64)
  core = hu.reshape(48, 4, 40, 4, 64, 4)[:, 1:3, :, 1:3, :, 1:3].mean(axis=(1, 3, 5))
  np.testing.assert_allclose(quarter.image, (core + 500.0) / 1300.0, atol=1e-5)
  np.testing.assert_allclose(quarter.spacing_mm, (8.0, 8.0, 8.0), rtol=1e-6)
  gm = resample.GridMap.from_dict(half.meta["grid"])
  back = gm.to_source(half.labels, order=0)
  assert np.mean(back[lab == 6] == 6) > 0.9


def test_abdomen_resampled_from_other_spacing(tmp_path):
  phantoms.write_abdomen_phantoms(tmp_path, 1, seed=3, shape=(60, 50, 40), spacing_mm=5.0,
                                  first_id=24)
  v = abdomen.scan(str(tmp_path))[0].load()
  assert v.split == "test" and v.image.shape == (96, 80, 128)
  assert v.image.dtype == np.float32 and 0 <= v.image.min() and v.image.max() <= 1
  assert v.labels.max() <= 13 and v.labels.max() >= 6
  assert v.meta["centre_rule"] == "image_centre"
  # Physical extent: 60*5 = 300 mm along x -> 75 voxels of 4 mm inside the 96 grid.
  body_x = np.flatnonzero(v.image.max(axis=(1, 2)) > 0)
  assert 60 <= len(body_x) <= 76


def test_acdc_round_trip_from_phantoms(tmp_path):
  ph = phantoms.write_acdc_phantoms(tmp_path, 2, seed=5, first_id=19,
                                    inplane_size=(128, 150))
  sources = acdc.scan(str(tmp_path))
  assert [s.split for s in sources] == ["val"] * 2 + ["val"] * 2
  vols = [s.load() for s in sources]
  for v, p in zip(vols, [ph[0], ph[0], ph[1], ph[1]]):
    assert v.image.shape == (128, 128, 16) and v.image.dtype == np.float32
    assert v.image.min() == 0.0 and v.image.max() == 1.0
    assert v.labels.dtype == np.uint8 and set(np.unique(v.labels)) == {0, 1, 2, 3}
    np.testing.assert_allclose(v.spacing_mm, (1.8, 1.8, 10.0), rtol=1e-5)
    assert v.meta["centre_rule"] == "ed_label_centroid"
    src, _, _ = nifti.load_nifti(v.meta["source_image"])
    lo, hi = np.percentile(src, [1, 99])
    assert v.meta["intensity"]["low"] == pytest.approx(lo)
    assert v.meta["intensity"]["high"] == pytest.approx(hi)
    # Slice axis kept: source slices * spacing / 10 mm of data, centred in the 16.
    n_data = round(p.shape[2] * p.spacing_mm[2] / 10.0)
    has_data = np.flatnonzero(v.image.max(axis=(0, 1)) > 0)
    assert len(has_data) == n_data and has_data[0] == 8 - n_data // 2
    # The labels map back onto the source grid.
    gm = resample.GridMap.from_dict(json.loads(json.dumps(v.meta["grid"])))
    src_lab, _, _ = nifti.load_nifti(v.meta["source_label"], what="label")
    back = gm.to_source(v.labels, order=0)
    for c in (1, 2, 3):
      d = 2 * np.sum((back == c) & (src_lab == c)) / (np.sum(back == c) + np.sum(src_lab == c))
      assert d > 0.85
  ed, es = vols[0], vols[1]
  np.testing.assert_array_equal(ed.affine, es.affine)  # same crop for both frames
  # ED heart centroid sits at the in-plane centre of the crop.
  centroid = np.argwhere(ed.labels > 0).mean(axis=0)
  assert np.all(np.abs(centroid[:2] - 63.5) < 1.0)


def test_acdc_flat_layout_and_image_centre_rule(tmp_path):
  rng = np.random.default_rng(1)
  img = rng.normal(100, 10, size=(128, 128, 16)).astype(np.float32)
  aff = np.diag([1.8, 1.8, 10.0, 1.0])
  for frame in ("ed", "es"):
    _save(tmp_path / f"patient101_{frame}_img.nii.gz", img, aff)
  sources = acdc.scan(str(tmp_path), require_labels=False)
  v = sources[0].load()
  assert v.labels is None and v.split == "test"
  assert v.meta["centre_rule"] == "already_on_grid"
  lo, hi = np.percentile(img, [1, 99])
  np.testing.assert_allclose(v.image, (np.clip(img, lo, hi) - lo) / (hi - lo), atol=1e-5)
  # Off-grid without labels: image centre.
  other = tmp_path / "other"
  other.mkdir()
  _save(other / "patient102_ed_img.nii.gz", img[:, :, :8], np.diag([1.5, 1.5, 8.0, 1.0]))
  _save(other / "patient102_es_img.nii.gz", img[:, :, :8], np.diag([1.5, 1.5, 8.0, 1.0]))
  v = acdc.scan(str(other), layout="flat", require_labels=False)[1].load()
  assert v.meta["centre_rule"] == "image_centre" and v.frame == "es"
  with pytest.raises(DatasetError, match="patient102_ed_seg.nii.gz: ED label file is missing"):
    acdc.scan(str(other))


def _fresh(tmp_path, pid=1):
  root = tmp_path / f"acdc{pid}"
  folder = _tiny_acdc_patient(root, pid)
  return root, folder


def test_acdc_bad_inputs(tmp_path):
  root, folder = _fresh(tmp_path, 1)
  os.remove(folder / "patient001_frame09.nii.gz")
  with pytest.raises(DatasetError, match="patient001_frame09.nii.gz: ES frame image"):
    acdc.scan(str(root))

  root, folder = _fresh(tmp_path, 2)
  os.remove(folder / "patient002_frame01_gt.nii.gz")
  with pytest.raises(DatasetError, match="patient002_frame01_gt.nii.gz: ED label file"):
    acdc.scan(str(root))

  root, folder = _fresh(tmp_path, 3)
  (folder / "Info.cfg").write_text("ED: 1\nGroup: DCM\n")
  with pytest.raises(DatasetError, match=r"Info.cfg: no 'ES: <frame number>' line"):
    acdc.scan(str(root))

  root, folder = _fresh(tmp_path, 4)
  _save(folder / "patient004_frame01_gt.nii.gz", np.zeros((8, 8, 5), np.uint8))
  with pytest.raises(nifti.NiftiError, match="patient004_frame01_gt.nii.gz: label shape"):
    acdc.scan(str(root))

  root, folder = _fresh(tmp_path, 5)
  shifted = _AFF.copy()
  shifted[1, 3] = 3.0
  _save(folder / "patient005_frame09_gt.nii.gz", np.zeros((8, 8, 4), np.uint8), shifted)
  with pytest.raises(nifti.NiftiError, match="patient005_frame09_gt.nii.gz: label affine"):
    acdc.scan(str(root))

  root, folder = _fresh(tmp_path, 6)
  _save(folder / "patient006_frame01.nii.gz", np.zeros((8, 8, 4, 2), np.float32))
  with pytest.raises(nifti.NiftiError, match="patient006_frame01.nii.gz: image .*4D"):
    acdc.scan(str(root))

  root, folder = _fresh(tmp_path, 7)
  bad = np.ones((8, 8, 4), np.float32)
  bad[0, 0, 0] = np.inf
  _save(folder / "patient007_frame09.nii.gz", bad)
  sources = acdc.scan(str(root))  # headers are fine ...
  with pytest.raises(nifti.NiftiError, match="patient007_frame09.nii.gz: image has 1 NaN/inf"):
    sources[1].load()  # ... the pixels are not.

  root, folder = _fresh(tmp_path, 8)
  _save(folder / "patient008_frame01_gt.nii.gz", np.full((8, 8, 4), 4, np.uint8))
  with pytest.raises(DatasetError, match=r"patient008_frame01_gt.nii.gz: label values \[4\]"):
    acdc.scan(str(root))[0].load()

  with pytest.raises(DatasetError, match="no ACDC data found"):
    acdc.scan(str(tmp_path / "acdc1" / "training" / "patient001"))


def test_acdc_non_strict_reports_all_bad_subjects(tmp_path):
  root = tmp_path / "mixed"
  for pid in (1, 2, 3):
    _tiny_acdc_patient(root, pid)
  os.remove(root / "training/patient001/Info.cfg")
  os.remove(root / "training/patient003/patient003_frame09_gt.nii.gz")
  with pytest.raises(DatasetError, match="patient001.*Info.cfg is missing"):
    acdc.scan(str(root))  # strict: the first problem
  with pytest.raises(DatasetError) as e:
    acdc.scan(str(root), strict=False)
  msg = str(e.value)
  assert "2 bad subject(s)" in msg and "patient001:" in msg and "patient003:" in msg
  assert "patient002" not in msg


def test_abdomen_bad_inputs(tmp_path):
  phantoms.write_abdomen_phantoms(tmp_path, 2, seed=0, shape=(8, 8, 8))
  os.remove(tmp_path / "label/label0002.nii.gz")
  with pytest.raises(DatasetError, match=r"label0002.nii.gz: label file of .*img0002"):
    abdomen.scan(str(tmp_path))
  assert len(abdomen.scan(str(tmp_path), require_labels=False)) == 2
  with pytest.raises(DatasetError, match=r"subjects \[29\]"):
    abdomen.scan(str(tmp_path), subjects=["img0001", 29], require_labels=False)
  with pytest.raises(DatasetError, match="resolution='eighth'"):
    abdomen.scan(str(tmp_path), resolution="eighth")
  (tmp_path / "imagesTr").mkdir()
  with pytest.raises(DatasetError, match="both img/ and imagesTr/"):
    abdomen.scan(str(tmp_path))


def test_custom_pairs_csv_and_json(tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  rng = np.random.default_rng(2)
  for name in ("a", "b", "c"):
    _save(data / f"{name}.nii.gz", rng.normal(size=(20, 18, 6)).astype(np.float32),
          np.diag([2.0, 2.0, 5.0, 1.0]))
  lab = np.zeros((20, 18, 6), np.uint8)
  lab[5:10, 5:10, 2:4] = 7
  _save(data / "a_seg.nii.gz", lab, np.diag([2.0, 2.0, 5.0, 1.0]))
  csv_path = tmp_path / "pairs.csv"
  csv_path.write_text("moving,fixed,moving_label,fixed_label,split\n"
                      "data/a.nii.gz,data/b.nii.gz,data/a_seg.nii.gz,,train\n"
                      "data/b.nii.gz,data/a.nii.gz,,,train\n"
                      "data/c.nii.gz,data/c.nii.gz,,,val\n")
  sources = datasets.get("custom").scan(str(csv_path), shape=(16, 16, 8),
                                         spacing_mm=(2.5, 2.5, 5.0))
  assert len(sources) == 3
  keys = {os.path.basename(s.files[0]): s.key for s in sources}
  assert keys["a.nii.gz"].startswith("a_") and len(keys["a.nii.gz"]) == 10
  prs = custom.pairs(sources)
  assert [(p.moving, p.fixed, p.split) for p in prs] == [
      (keys["a.nii.gz"], keys["b.nii.gz"], "train"),
      (keys["b.nii.gz"], keys["a.nii.gz"], "train"),
      (keys["c.nii.gz"], keys["c.nii.gz"], "val")]
  va = next(s for s in sources if s.key == keys["a.nii.gz"]).load()
  assert va.image.shape == (16, 16, 8) and va.labels is not None
  np.testing.assert_allclose(va.spacing_mm, (2.5, 2.5, 5.0))
  assert abs((va.labels == 7).sum() * 2.5 * 2.5 * 5 - (lab == 7).sum() * 20) <= 0.2 * 1000
  # Same list as JSON, from another working directory: same keys (stable ids).
  json_path = tmp_path / "pairs.json"
  json_path.write_text(json.dumps([{"moving": "data/a.nii.gz", "fixed": "data/b.nii.gz"}]))
  monkeypatch.chdir(data)
  js = custom.scan(str(json_path), shape=(16, 16, 8), spacing_mm=(2.5, 2.5, 5.0),
                   intensity="ct")
  assert {s.key for s in js} == {keys["a.nii.gz"], keys["b.nii.gz"]}
  assert js[0].split == "test" and custom.pairs(js)[0].split == "test"
  v = js[0].load()
  assert v.meta["intensity"]["rule"] == "window_clip"
  with pytest.raises(DatasetError, match="needs the list returned by scan"):
    custom.pairs(list(js))


def test_custom_pairs_bad_inputs(tmp_path):
  _save(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.float32))
  opts = {"shape": (4, 4, 4), "spacing_mm": (1.0, 1.0, 1.0)}
  p = tmp_path / "l.csv"
  p.write_text("src,dst\na.nii.gz,a.nii.gz\n")
  with pytest.raises(DatasetError, match="l.csv: CSV header"):
    custom.scan(str(p), **opts)
  p.write_text("moving,fixed\na.nii.gz,missing.nii.gz\n")
  with pytest.raises(nifti.NiftiError, match="missing.nii.gz: image file does not exist"):
    custom.scan(str(p), **opts)
  p.write_text("moving,fixed,split\na.nii.gz,a.nii.gz,dev\n")
  with pytest.raises(DatasetError, match="l.csv line 2: split 'dev'"):
    custom.scan(str(p), **opts)
  with pytest.raises(DatasetError, match="pass the target grid"):
    custom.scan(str(p))
  with pytest.raises(DatasetError, match="nope.csv: pair list file does not exist"):
    custom.scan(str(tmp_path / "nope.csv"), **opts)


def _truncated_source(tmp_path, reader):
  """A scanned source of `reader` whose image file is cut in half after the scan."""
  if reader == "acdc":
    phantoms.write_acdc_phantoms(tmp_path, 1, seed=0, first_id=19, inplane_size=(40, 60))
    source = acdc.scan(str(tmp_path))[0]
  elif reader == "abdomen":
    phantoms.write_abdomen_phantoms(tmp_path, 1, seed=0, shape=(20, 16, 12), first_id=24)
    source = abdomen.scan(str(tmp_path))[0]
  else:
    _save(tmp_path / "a.nii.gz", np.ones((20, 18, 6), np.float32))
    (tmp_path / "pairs.csv").write_text("moving,fixed\na.nii.gz,a.nii.gz\n")
    source = custom.scan(str(tmp_path / "pairs.csv"), shape=(16, 16, 8),
                         spacing_mm=(2.5, 2.5, 5.0))[0]
  image = source.files[0]
  with open(image, "rb") as f:
    data = f.read()
  with open(image, "wb") as f:
    f.write(data[:len(data) // 2])
  return source, image


@pytest.mark.parametrize("reader", ["acdc", "abdomen", "custom"])
def test_truncated_nifti_fails_load_with_one_line_naming_file_and_fix(tmp_path, reader):
  # feature_extract/run.py turns exactly these errors (nifti.NiftiError, DatasetError) into exit 2.
  source, image = _truncated_source(tmp_path, reader)
  with pytest.raises((nifti.NiftiError, DatasetError)) as err:
    source.load()
  msg = str(err.value)
  assert msg.startswith(f"{image}: cannot read the image ") and "\n" not in msg, msg
  assert "re-download" in msg
