"""ACDC cardiac cine MR reader (paper §3.1): ED and ES frames on a 128x128x16 grid.

Layouts (``layout="auto"`` picks one):

* "raw" (official release): ROOT/{training,testing}/patientNNN/{Info.cfg,
  patientNNN_frameFF.nii.gz, patientNNN_frameFF_gt.nii.gz}, or ROOT itself holding the
  patientNNN folders. The 4D ``patientNNN_4d.nii.gz`` (the whole cine) is listed as
  ``PatientFiles.series`` for ``fmir track``; the reader's volumes are the ED/ES frames.
* "flat" (preprocessed): ROOT/patientNNN_{ed,es}_{img,seg}.nii.gz.

Preprocessing: resample with the header spacing to 1.8x1.8x10 mm (linear image, nearest
labels) keeping the voxel axis order (slice axis last), crop in-plane to 128x128 centred on
the ED label centroid (image centre without labels), crop/pad the slice axis to 16 centred,
then clip to the [1, 99] percentiles of the source frame and scale to [0, 1]. Both frames of
a patient share the same world-space target grid. ``Volume.meta["grid"]`` is the ``GridMap``
back to the source file.

Splits: patients 1-100 train/val (val = 18-20, 38-40, 58-60, 78-80, 98-100), 101-150 test.
Labels: 1 RV, 2 myocardium, 3 LV.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from feature_extract import datasets as ds
from feature_extract.datasets.base import DatasetError, Pair, Volume, VolumeSource
from fmir_jax.core import resample
from fmir_jax.core import nifti

NAME = "acdc"
TARGET_SHAPE = (128, 128, 16)
TARGET_SPACING_MM = (1.8, 1.8, 10.0)
PERCENTILES = (1.0, 99.0)
NUM_CLASSES = 3  # 1 RV, 2 MYO, 3 LV
VAL_IDS = frozenset(i for b in (18, 38, 58, 78, 98) for i in range(b, b + 3))
FRAMES = ("ed", "es")
_PATIENT_DIR = re.compile(r"^patient(\d{3})$")
_FLAT_FILE = re.compile(r"^patient(\d{3})_(ed|es)_(img|seg)\.nii(\.gz)?$")


def split_of(patient_id: int) -> str:
  """The official split of an ACDC patient number (1-150)."""
  if 1 <= patient_id <= 100:
    return "val" if patient_id in VAL_IDS else "train"
  if 101 <= patient_id <= 150:
    return "test"
  raise DatasetError(f"ACDC patient number {patient_id} is outside 1-150; use the 'custom' "
                     "reader for other data.")


def parse_patient_id(subject: int | str) -> int:
  """12, "12", "patient012" -> 12."""
  if isinstance(subject, (int, np.integer)):
    return int(subject)
  m = re.fullmatch(r"(?:patient)?(\d{1,3})", str(subject).strip())
  if not m:
    raise DatasetError(f"ACDC subject {subject!r}: expected a number or 'patientNNN'.")
  return int(m.group(1))


def subject_name(patient_id: int) -> str:
  return f"patient{patient_id:03d}"


def parse_info_cfg(path: str) -> tuple[int, int]:
  """(ED, ES) frame numbers from an ACDC ``Info.cfg`` ("ED: 1", "ES: 12", "Group: DCM")."""
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: Info.cfg is missing; it gives the ED/ES frame numbers. "
                       "Restore it from the ACDC release.")
  fields = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      key, sep, value = line.partition(":")
      if sep:
        fields[key.strip().upper()] = value.strip()
  frames = []
  for key in ("ED", "ES"):
    if key not in fields:
      raise DatasetError(f"{path}: no '{key}: <frame number>' line (found keys "
                         f"{sorted(fields)}). Add it, e.g. 'ED: 1'.")
    try:
      frames.append(int(float(fields[key])))
    except ValueError:
      raise DatasetError(f"{path}: '{key}: {fields[key]}' is not a frame number.") from None
  return frames[0], frames[1]


@dataclasses.dataclass(frozen=True)
class PatientFiles:
  """Files of one patient: frame -> image path and label path (or None)."""
  patient_id: int
  images: dict[str, str]
  labels: dict[str, str | None]
  frame_numbers: dict[str, int | None]
  layout: str
  series: str | None = None        # raw layout: patientNNN_4d.nii.gz, when present


def _find_file(folder: str, stem: str) -> str | None:
  for ext in (".nii.gz", ".nii"):
    path = os.path.join(folder, stem + ext)
    if os.path.isfile(path):
      return path
  return None


def _patient_dirs(root: str) -> dict[int, str]:
  """patient id -> folder, from ROOT/{training,testing}/patientNNN or ROOT/patientNNN."""
  found: dict[int, str] = {}
  parents = [os.path.join(root, d) for d in ("training", "testing")
             if os.path.isdir(os.path.join(root, d))] or [root]
  for parent in parents:
    for name in sorted(os.listdir(parent)):
      m = _PATIENT_DIR.match(name)
      if m and os.path.isdir(os.path.join(parent, name)):
        pid = int(m.group(1))
        if pid in found:
          raise DatasetError(f"{name} appears twice: {found[pid]} and "
                             f"{os.path.join(parent, name)}. Keep one copy.")
        found[pid] = os.path.join(parent, name)
  return found


def _flat_files(root: str) -> dict[int, dict[tuple[str, str], str]]:
  found: dict[int, dict[tuple[str, str], str]] = {}
  for name in sorted(os.listdir(root)):
    m = _FLAT_FILE.match(name)
    if m:
      found.setdefault(int(m.group(1)), {})[(m.group(2), m.group(3))] = (
          os.path.join(root, name))
  return found


def detect_layout(root: str) -> str:
  """"raw" or "flat" from the folder contents."""
  has_raw, has_flat = bool(_patient_dirs(root)), bool(_flat_files(root))
  if has_raw and has_flat:
    raise DatasetError(f"{root}: holds both patientNNN folders and flat "
                       "patientNNN_{ed,es}_{img,seg} files; pass layout='raw' or 'flat'.")
  if not (has_raw or has_flat):
    raise DatasetError(
        f"{root}: no ACDC data found. Expected training/patientNNN/ folders (raw release), "
        "patientNNN/ folders, or patientNNN_{ed,es}_{img,seg}.nii.gz files (flat layout).")
  return "raw" if has_raw else "flat"


def _raw_patient(pid: int, folder: str, require_labels: bool) -> PatientFiles:
  ed, es = parse_info_cfg(os.path.join(folder, "Info.cfg"))
  images, labels = {}, {}
  for frame, number in zip(FRAMES, (ed, es)):
    stem = f"{subject_name(pid)}_frame{number:02d}"
    images[frame] = _find_file(folder, stem)
    if images[frame] is None:
      raise DatasetError(f"{os.path.join(folder, stem)}.nii.gz: {frame.upper()} frame image "
                         f"(frame {number} per Info.cfg) is missing. Restore the file or fix "
                         "Info.cfg.")
    labels[frame] = _find_file(folder, stem + "_gt")
    if labels[frame] is None and require_labels:
      raise DatasetError(f"{os.path.join(folder, stem)}_gt.nii.gz: {frame.upper()} label file "
                         "is missing. Restore it, or pass require_labels=False.")
  return PatientFiles(pid, images, labels, {"ed": ed, "es": es}, "raw",
                      _find_file(folder, f"{subject_name(pid)}_4d"))


def patient_files(folder: str, require_labels: bool = False) -> PatientFiles:
  """The files of one raw-layout patient folder (``patientNNN/`` with its Info.cfg): the ED/ES
  frames, their labels and the cine (``series``)."""
  return _raw_patient(parse_patient_id(os.path.basename(os.path.normpath(folder))), folder,
                      require_labels)


def _flat_patient(pid: int, files: dict[tuple[str, str], str], root: str,
                  require_labels: bool) -> PatientFiles:
  images, labels = {}, {}
  for frame in FRAMES:
    images[frame] = files.get((frame, "img"))
    if images[frame] is None:
      raise DatasetError(f"{os.path.join(root, subject_name(pid))}_{frame}_img.nii.gz: "
                         f"{frame.upper()} image is missing. Restore it.")
    labels[frame] = files.get((frame, "seg"))
    if labels[frame] is None and require_labels:
      raise DatasetError(f"{os.path.join(root, subject_name(pid))}_{frame}_seg.nii.gz: "
                         f"{frame.upper()} label file is missing. Restore it, or pass "
                         "require_labels=False.")
  return PatientFiles(pid, images, labels, {"ed": None, "es": None}, "flat")


def _check_headers(p: PatientFiles) -> PatientFiles:
  """Header-only checks: 3D files, labels on their image's grid."""
  for frame in FRAMES:
    hi = nifti.read_header(p.images[frame], what="image")
    if p.labels[frame] is not None:
      hl = nifti.read_header(p.labels[frame], what="label")
      nifti.check_same_grid(hi.path, hi.affine, hi.shape, hl.path, hl.affine, hl.shape)
  return p


def scan(root: str, *, layout: str = "auto", subjects: Iterable[int | str] | None = None,
         splits: Iterable[str] | None = None, strict: bool = True,
         require_labels: bool = True, shape: Sequence[int] = TARGET_SHAPE,
         spacing_mm: Sequence[float] = TARGET_SPACING_MM) -> list[VolumeSource]:
  """Lists and validates ACDC ED/ES volumes (headers only; no pixel data read).

  Args:
    root: dataset folder (see module docstring for the layouts).
    layout: "auto", "raw" or "flat".
    subjects: explicit patient numbers or names; each must be present under ``root``.
    splits: keep only these splits ("train", "val", "test"); each must be non-empty.
    strict: raise at the first bad patient; False checks all and raises one report.
    require_labels: a missing ``_gt`` / ``_seg`` file is an error (else labels=None).
    shape, spacing_mm: the target grid (default the paper's 128x128x16 at 1.8x1.8x10 mm;
      the offline demo uses a coarser grid to train in minutes on a CPU).

  Returns:
    Two sources per patient, keys "patientNNN_ed" and "patientNNN_es", sorted by patient.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetError(f"{root}: ACDC root folder does not exist.")
  target_shape = tuple(int(v) for v in shape)
  target_spacing = tuple(float(v) for v in spacing_mm)
  if len(target_shape) != 3 or min(target_shape) < 1 or len(target_spacing) != 3 \
      or min(target_spacing) <= 0:
    raise DatasetError(f"ACDC target grid shape={shape!r} spacing_mm={spacing_mm!r}: need "
                       "3 positive sizes and 3 positive spacings.")
  if layout == "auto":
    layout = detect_layout(root)
  if layout == "raw":
    present: dict[int, Any] = _patient_dirs(root)
  elif layout == "flat":
    present = _flat_files(root)
  else:
    raise DatasetError(f"layout={layout!r}: use 'auto', 'raw' or 'flat'.")
  if not present:
    raise DatasetError(f"{root}: no ACDC patients in the {layout!r} layout.")
  ids = ds.select_subjects(present, split_of, subjects, splits, parse_patient_id, NAME, root)

  def check(pid: int) -> PatientFiles:
    split_of(pid)
    if layout == "raw":
      p = _raw_patient(pid, present[pid], require_labels)
    else:
      p = _flat_patient(pid, present[pid], root, require_labels)
    return _check_headers(p)

  patients = ds.collect([(subject_name(i), functools.partial(check, i)) for i in ids],
                        strict, NAME, root)
  sources = []
  for p in patients:
    plan = _GridPlan(p, target_shape, target_spacing)
    for frame in FRAMES:
      files = (p.images[frame],) + ((p.labels[frame],) if p.labels[frame] else ())
      sources.append(VolumeSource(
          key=f"{subject_name(p.patient_id)}_{frame}", dataset=NAME,
          subject=subject_name(p.patient_id), frame=frame, split=split_of(p.patient_id),
          files=files, load=functools.partial(load_frame, p, frame, plan)))
  return sources


def pairs(sources: Iterable[VolumeSource]) -> list[Pair]:
  """ED->ES and ES->ED per patient (paper §3.1: 170/30/100 on the full dataset)."""
  by_subject: dict[str, dict[str, VolumeSource]] = {}
  for s in sources:
    by_subject.setdefault(s.subject, {})[s.frame] = s
  out = []
  for subject in sorted(by_subject):
    frames = by_subject[subject]
    if set(frames) != set(FRAMES):
      raise DatasetError(f"ACDC {subject}: pairs need both ED and ES sources, got "
                         f"{sorted(frames)}. Pass the full scan() result.")
    ed, es = frames["ed"], frames["es"]
    out += [Pair(ed.key, es.key, ed.split), Pair(es.key, ed.key, ed.split)]
  return out


class _GridPlan:
  """The target grid of one patient, computed once from the ED frame and shared by ES."""

  def __init__(self, patient: PatientFiles, shape: tuple[int, int, int],
               spacing_mm: tuple[float, float, float]):
    self._patient = patient
    self.shape, self.spacing_mm = shape, spacing_mm
    self._plan: tuple[np.ndarray, str, list[float]] | None = None

  def get(self) -> tuple[np.ndarray, str, list[float]]:
    """(target affine, centre rule, centre in ED source voxels)."""
    if self._plan is None:
      self._plan = self._compute()
    return self._plan

  def _compute(self) -> tuple[np.ndarray, str, list[float]]:
    p = self._patient
    hdr = nifti.read_header(p.images["ed"])
    centre = (np.asarray(hdr.shape, float) - 1) / 2
    rule = "image_centre"
    if _on_target_grid(hdr, self.shape, self.spacing_mm):
      return hdr.affine, "already_on_grid", centre.tolist()
    if p.labels["ed"] is not None:
      lab, _, _ = nifti.load_nifti(p.labels["ed"], what="label")
      heart = np.argwhere(lab > 0)
      if len(heart):
        centre[:2] = heart.mean(axis=0)[:2]
        rule = "ed_label_centroid"
    _, affine = model_grid(hdr, shape=self.shape, spacing_mm=self.spacing_mm,
                           centre_vox=centre)
    return affine, rule, centre.tolist()


def _on_target_grid(hdr: nifti.NiftiHeader, shape=TARGET_SHAPE, spacing_mm=TARGET_SPACING_MM
                    ) -> bool:
  return (tuple(hdr.shape) == tuple(shape)
          and np.allclose(hdr.spacing_mm, spacing_mm, rtol=1e-3))


def target_shape(*, shape: Sequence[int] = TARGET_SHAPE, **_: Any) -> tuple[int, int, int]:
  """The model grid's shape for these reader options."""
  return tuple(int(v) for v in shape)


def model_grid(header: nifti.NiftiHeader, *, shape: Sequence[int] = TARGET_SHAPE,
               spacing_mm: Sequence[float] = TARGET_SPACING_MM,
               centre_vox: Sequence[float] | None = None, **_: Any
               ) -> tuple[tuple[int, int, int], np.ndarray]:
  """(shape, affine) of the target grid for a frame: ``spacing_mm``, ``shape``, centred on
  ``centre_vox`` (source voxels; default the image centre). A frame already on such a grid
  keeps its own."""
  shape = tuple(int(v) for v in shape)
  if _on_target_grid(header, shape, spacing_mm):
    return shape, np.asarray(header.affine, float)
  centre = (np.asarray(header.shape, float) - 1) / 2 if centre_vox is None else centre_vox
  gm = resample.target_grid(header.shape, header.affine, header.spacing_mm, spacing_mm, shape,
                      centre)
  return gm.dst_shape, gm.dst_affine


def preprocess(image: np.ndarray, header: nifti.NiftiHeader, dst_shape: Sequence[int],
               dst_affine: np.ndarray, **_: Any
               ) -> tuple[np.ndarray, resample.GridMap, dict[str, Any]]:
  """The ACDC image rule on any target grid: linear resampling (0 outside the frame), then
  clip to the [1, 99] percentiles of the source frame and scale to [0, 1].

  Returns:
    (float32 (H, W, D) image in [0, 1], GridMap back to the source, intensity record).
  """
  gm = resample.GridMap(header.shape, header.affine, tuple(int(s) for s in dst_shape), dst_affine)
  scaled, info = ds.percentile_scale(gm.to_target(image, order=1, cval=0.0), image,
                                     *PERCENTILES, where=header.path)
  return scaled, gm, info


def load_frame(patient: PatientFiles, frame: str, plan: _GridPlan) -> Volume:
  """Reads and preprocesses one frame onto the patient's target grid."""
  image, affine, hdr = nifti.load_nifti(patient.images[frame], what="image")
  dst_affine, rule, centre = plan.get()
  scaled, gm, intensity = preprocess(image, hdr, plan.shape, dst_affine)
  labels = None
  if patient.labels[frame] is not None:
    lab, lab_affine, lab_hdr = nifti.load_nifti(patient.labels[frame], what="label")
    nifti.check_same_grid(hdr.path, affine, hdr.shape, lab_hdr.path, lab_affine, lab_hdr.shape)
    lab = ds.check_labels(lab, NUM_CLASSES, patient.labels[frame])
    labels = gm.to_target(lab, order=0, cval=0)
  meta = {
      "source_image": patient.images[frame],
      "source_label": patient.labels[frame],
      "layout": patient.layout,
      "frame_number": patient.frame_numbers[frame],
      "source_spacing_mm": list(hdr.spacing_mm),
      "grid": gm.to_dict(),
      "centre_rule": rule,
      "centre_ed_source_vox": centre,
      "resample": {"image": "linear", "labels": "nearest", "pad_value": 0.0},
      "intensity": intensity,
  }
  pid = patient.patient_id
  return Volume(key=f"{subject_name(pid)}_{frame}", dataset=NAME, subject=subject_name(pid),
                frame=frame, split=split_of(pid), image=scaled, labels=labels,
                spacing_mm=resample.voxel_spacing(dst_affine), affine=dst_affine, meta=meta)
