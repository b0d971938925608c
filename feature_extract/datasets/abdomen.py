"""Learn2Reg 2020 abdomen CT reader (paper §3.1): 30 scans, 13 organs, inter-subject.

Layouts (``layout="auto"`` picks one):

* "img": ROOT/img/imgNNNN.nii.gz + ROOT/label/labelNNNN.nii.gz;
* "imagesTr": ROOT/imagesTr/AbdomenCTCT_NNNN_0000.nii.gz +
  ROOT/labelsTr/AbdomenCTCT_NNNN.nii.gz (+ ROOT/AbdomenCTCT_dataset.json).

Preprocessing: the "full" grid is 192x160x256 at 2 mm (the release already is; other data
is resampled with the header spacing, keeping the voxel axis order, and centre cropped or
padded with air). "half" is that grid downsampled by 2 per axis: 96x80x128 at 4 mm, voxel
j at full-grid position 2j + 0.5 (linear for images = 2x2x2 mean, nearest for labels);
"quarter" (48x40x64 at 8 mm, position 4j + 1.5) is for CPU learning curves only.
Intensities: clip to [-500, 800] HU, scale to [0, 1]. Splits: scans 1-20 train, 21-23 val,
24-30 test; pairs are all ordered pairs within a split (380/6/42). Keys "imgNNNN".
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from feature_extract import datasets as ds
from feature_extract.datasets.base import DatasetError, Pair, Volume, VolumeSource
from fmir_jax.core import resample
from fmir_jax.core import nifti

NAME = "abdomen"
FULL_SHAPE = (192, 160, 256)
FULL_SPACING_MM = (2.0, 2.0, 2.0)
HALF_SHAPE = (96, 80, 128)
RESOLUTIONS = {"full": 1, "half": 2, "quarter": 4}     # name -> downsampling per axis
NUM_CLASSES = 13
_LAYOUTS = {
    "img": ("img", re.compile(r"^img(\d{4})\.nii(\.gz)?$"), "label", "label{:04d}"),
    "imagesTr": ("imagesTr", re.compile(r"^AbdomenCTCT_(\d{4})_0000\.nii(\.gz)?$"),
                 "labelsTr", "AbdomenCTCT_{:04d}"),
}


def split_of(scan_id: int) -> str:
  """The Learn2Reg split of a scan number (1-30)."""
  if 1 <= scan_id <= 20:
    return "train"
  if 21 <= scan_id <= 23:
    return "val"
  if 24 <= scan_id <= 30:
    return "test"
  raise DatasetError(f"Abdomen CT scan number {scan_id} is outside 1-30; use the 'custom' "
                     "reader for other data.")


def parse_scan_id(subject: int | str) -> int:
  """3, "3", "img0003", "AbdomenCTCT_0003" -> 3."""
  if isinstance(subject, (int, np.integer)):
    return int(subject)
  m = re.fullmatch(r"(?:img|AbdomenCTCT_)?(\d{1,4})", str(subject).strip())
  if not m:
    raise DatasetError(f"Abdomen subject {subject!r}: expected a number, 'imgNNNN' or "
                       "'AbdomenCTCT_NNNN'.")
  return int(m.group(1))


def scan_key(scan_id: int) -> str:
  return f"img{scan_id:04d}"


def detect_layout(root: str) -> str:
  """"img" or "imagesTr" from the folders present."""
  found = [name for name, (d, *_) in _LAYOUTS.items() if os.path.isdir(os.path.join(root, d))]
  if len(found) != 1:
    what = "both img/ and imagesTr/" if found else "neither img/ nor imagesTr/"
    raise DatasetError(f"{root}: holds {what}; expected img/ + label/ or imagesTr/ + "
                       "labelsTr/ (+ AbdomenCTCT_dataset.json). Pass layout= explicitly.")
  return found[0]


@dataclasses.dataclass(frozen=True)
class ScanFiles:
  scan_id: int
  image: str
  label: str | None
  layout: str


def _list_scans(root: str, layout: str) -> dict[int, str]:
  img_dir, pattern, *_ = _LAYOUTS[layout]
  folder = os.path.join(root, img_dir)
  if not os.path.isdir(folder):
    raise DatasetError(f"{folder}: image folder of the {layout!r} layout does not exist.")
  found = {}
  for name in sorted(os.listdir(folder)):
    m = pattern.match(name)
    if m:
      found[int(m.group(1))] = os.path.join(folder, name)
  if layout == "imagesTr":
    _check_dataset_json(root)
  return found


def _check_dataset_json(root: str) -> None:
  path = os.path.join(root, "AbdomenCTCT_dataset.json")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      raise DatasetError(f"{path}: not valid JSON ({e}). Restore it from the release or "
                         "delete it.") from e


def _label_path(root: str, layout: str, scan_id: int) -> str | None:
  _, _, lab_dir, stem = _LAYOUTS[layout]
  for ext in (".nii.gz", ".nii"):
    path = os.path.join(root, lab_dir, stem.format(scan_id) + ext)
    if os.path.isfile(path):
      return path
  return None


def _check_scan(root: str, layout: str, scan_id: int, image: str, require_labels: bool
                ) -> ScanFiles:
  split_of(scan_id)
  label = _label_path(root, layout, scan_id)
  if label is None and require_labels:
    _, _, lab_dir, stem = _LAYOUTS[layout]
    raise DatasetError(f"{os.path.join(root, lab_dir, stem.format(scan_id))}.nii.gz: label "
                       f"file of {image} is missing. Restore it, or pass "
                       "require_labels=False.")
  hi = nifti.read_header(image, what="image")
  if label is not None:
    hl = nifti.read_header(label, what="label")
    nifti.check_same_grid(hi.path, hi.affine, hi.shape, hl.path, hl.affine, hl.shape)
  return ScanFiles(scan_id, image, label, layout)


def scan(root: str, *, resolution: str = "half", layout: str = "auto",
         subjects: Iterable[int | str] | None = None, splits: Iterable[str] | None = None,
         strict: bool = True, require_labels: bool = True) -> list[VolumeSource]:
  """Lists and validates abdomen CT scans (headers only; no pixel data read).

  Args:
    root: dataset folder (see module docstring).
    resolution: "half" (96x80x128, 4 mm), "full" (192x160x256, 2 mm) or "quarter"
      (48x40x64, 8 mm; CPU learning curves).
    layout: "auto", "img" or "imagesTr".
    subjects: explicit scan numbers/names; each must be present.
    splits: keep only these splits; each must be non-empty.
    strict: raise at the first bad scan; False checks all and raises one report.
    require_labels: a missing label file is an error (else labels=None).

  Returns:
    One source per scan, key "imgNNNN", sorted by scan number.
  """
  root = os.fspath(root)
  if resolution not in RESOLUTIONS:
    raise DatasetError(f"resolution={resolution!r}: use 'half', 'full' or 'quarter'.")
  if not os.path.isdir(root):
    raise DatasetError(f"{root}: abdomen CT root folder does not exist.")
  if layout == "auto":
    layout = detect_layout(root)
  if layout not in _LAYOUTS:
    raise DatasetError(f"layout={layout!r}: use 'auto', 'img' or 'imagesTr'.")
  present = _list_scans(root, layout)
  if not present:
    raise DatasetError(f"{root}: no abdomen CT scans in the {layout!r} layout.")
  ids = ds.select_subjects(present, split_of, subjects, splits, parse_scan_id, NAME, root)
  checks = [(scan_key(i), functools.partial(_check_scan, root, layout, i, present[i],
                                            require_labels)) for i in ids]
  sources = []
  for f in ds.collect(checks, strict, NAME, root):
    key = scan_key(f.scan_id)
    sources.append(VolumeSource(
        key=key, dataset=NAME, subject=key, frame="", split=split_of(f.scan_id),
        files=(f.image,) + ((f.label,) if f.label else ()),
        load=functools.partial(load_scan, f, resolution)))
  return sources


def pairs(sources: Iterable[VolumeSource]) -> list[Pair]:
  """All ordered pairs of distinct scans within each split."""
  by_split: dict[str, list[str]] = {}
  for s in sources:
    by_split.setdefault(s.split, []).append(s.key)
  out = []
  for split in ds.SPLITS:
    keys = sorted(by_split.get(split, []))
    out += [Pair(m, f, split) for m, f in itertools.permutations(keys, 2)]
  return out


def full_grid(hdr: nifti.NiftiHeader) -> tuple[np.ndarray, str]:
  """(affine of the 192x160x256 2 mm grid for this scan, rule used)."""
  if (tuple(hdr.shape) == FULL_SHAPE
      and np.allclose(hdr.spacing_mm, FULL_SPACING_MM, rtol=1e-3)):
    return hdr.affine, "already_on_grid"
  centre = (np.asarray(hdr.shape, float) - 1) / 2
  gm = resample.target_grid(hdr.shape, hdr.affine, hdr.spacing_mm, FULL_SPACING_MM, FULL_SHAPE,
                      centre)
  return gm.dst_affine, "image_centre"


def coarse_affine(full_affine: np.ndarray, factor: int) -> np.ndarray:
  """A grid ``factor`` times coarser: voxel j sits at full-grid position
  factor * j + (factor - 1) / 2 per axis (factor 2: 2j + 0.5)."""
  t = np.diag([float(factor)] * 3 + [1.0])
  t[:3, 3] = (factor - 1) / 2
  return np.asarray(full_affine, float) @ t


def target_shape(*, resolution: str = "half", **_: Any) -> tuple[int, int, int]:
  """The model grid's shape for these reader options."""
  f = RESOLUTIONS[resolution]
  return tuple(n // f for n in FULL_SHAPE)


def model_grid(header: nifti.NiftiHeader, *, resolution: str = "half", **_: Any
               ) -> tuple[tuple[int, int, int], np.ndarray]:
  """(shape, affine) of the scan's 2 mm 192x160x256 grid (image centre), made coarser for
  ``resolution`` "half" or "quarter"."""
  full_affine, _ = full_grid(header)
  return (target_shape(resolution=resolution),
          coarse_affine(full_affine, RESOLUTIONS[resolution]))


def _same_grid(gm: resample.GridMap) -> bool:
  return gm.src_shape == gm.dst_shape and np.array_equal(gm.src_affine, gm.dst_affine)


def preprocess(image: np.ndarray, header: nifti.NiftiHeader, dst_shape: Sequence[int],
               dst_affine: np.ndarray, **_: Any
               ) -> tuple[np.ndarray, resample.GridMap, dict[str, Any]]:
  """The CT rule on any target grid: linear resampling (air, -1000 HU, outside the scan),
  clip to [-500, 800] HU and scale to [0, 1].

  Returns:
    (float32 (H, W, D) image in [0, 1], GridMap back to the source, intensity record).
  """
  gm = resample.GridMap(header.shape, header.affine, tuple(int(s) for s in dst_shape), dst_affine)
  hu = image if _same_grid(gm) else gm.to_target(image, order=1, cval=ds.AIR_HU)
  scaled, info = ds.window_scale(hu, *ds.CT_WINDOW_HU)
  return scaled, gm, info


def load_scan(f: ScanFiles, resolution: str) -> Volume:
  """Reads and preprocesses one scan onto the full, half or quarter grid."""
  image, affine, hdr = nifti.load_nifti(f.image, what="image")
  _, rule = full_grid(hdr)
  shape, dst_affine = model_grid(hdr, resolution=resolution)
  scaled, gm, intensity = preprocess(image, hdr, shape, dst_affine)
  labels = None
  if f.label is not None:
    lab, lab_affine, lab_hdr = nifti.load_nifti(f.label, what="label")
    nifti.check_same_grid(hdr.path, affine, hdr.shape, lab_hdr.path, lab_affine, lab_hdr.shape)
    lab = ds.check_labels(lab, NUM_CLASSES, f.label)
    labels = lab if _same_grid(gm) else gm.to_target(lab, order=0, cval=0)
  meta = {
      "source_image": f.image,
      "source_label": f.label,
      "layout": f.layout,
      "resolution": resolution,
      "source_spacing_mm": list(hdr.spacing_mm),
      "grid": gm.to_dict(),
      "centre_rule": rule,
      "resample": {"image": "linear", "labels": "nearest", "pad_value_hu": ds.AIR_HU},
      "intensity": intensity,
  }
  key = scan_key(f.scan_id)
  return Volume(key=key, dataset=NAME, subject=key, frame="", split=split_of(f.scan_id),
                image=scaled, labels=labels, spacing_mm=resample.voxel_spacing(dst_affine),
                affine=dst_affine, meta=meta)
