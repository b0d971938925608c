"""NIfTI input/output (nibabel): headers, images, label maps, displacement fields, and the
Learn2Reg file names. Resampling between grids is ``fmir_jax.grids``.

Conventions: volumes are ``(H, W, D)`` arrays in NIfTI voxel order (i, j, k), the slice axis
is the last one and is never reoriented; ``affine`` is the 4x4 voxel -> world (RAS, mm) matrix.

This module must stay importable without jax or torch.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from fmir_jax import errors
from fmir_jax import files

_WHATS = ("image", "label")


class NiftiError(errors.UserError, ValueError):
  """A NIfTI file cannot be used: the message names the file, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
  """What the header of one NIfTI file says (no pixel data read).

  path: the file.
  shape: voxel shape (3 entries after validation, 4 when ``allow_4d``).
  affine: 4x4 voxel -> world (RAS, mm) matrix.
  spacing_mm: voxel size from the header zooms, per array axis (first 3 axes).
  dtype: on-disk data type name.
  """
  path: str
  shape: tuple[int, ...]
  affine: np.ndarray
  spacing_mm: tuple[float, float, float]
  dtype: str

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form."""
    return {
        "path": self.path,
        "shape": list(self.shape),
        "affine": np.asarray(self.affine, float).tolist(),
        "spacing_mm": list(self.spacing_mm),
        "dtype": self.dtype,
    }


def _check_what(what: str) -> None:
  if what not in _WHATS:
    raise ValueError(f"what={what!r}: expected one of {_WHATS}.")


def _open(path: str, what: str) -> nib.Nifti1Image:
  """Opens a NIfTI file lazily (header only) with clear errors."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise NiftiError(
        f"{path}: {what} file does not exist. Check the dataset root/layout or the path in "
        "the pair list.")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise NiftiError(
        f"{path}: cannot read the {what} NIfTI header ({type(e).__name__}: {e}). The file "
        "is corrupt or not NIfTI; re-export or re-download it.") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise NiftiError(
        f"{path}: {what} is a {type(img).__name__}, not NIfTI. Convert it to .nii/.nii.gz.")
  return img


def _header_of(path: str, img: nib.Nifti1Image, what: str, allow_4d: bool) -> NiftiHeader:
  """Validates dimensionality and spacing from the header."""
  shape = tuple(int(s) for s in img.shape)
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3 and not (allow_4d and len(shape) == 4):
    hint = (" (a 4D cine/time series: pass the single 3D frame file instead)"
            if len(shape) == 4 else "")
    raise NiftiError(
        f"{path}: {what} has shape {shape}, expected a 3D volume (H, W, D){hint}.")
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  raw = _raw_pixdim(path, img)  # nibabel silently "fixes" 0/negative pixdim on load.
  if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms + raw):
    zooms = raw if raw else zooms
    raise NiftiError(
        f"{path}: {what} has voxel spacing {zooms} mm; all three must be finite and > 0. "
        "Fix pixdim[1:4] in the header.")
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise NiftiError(
        f"{path}: {what} has a singular or non-finite affine {affine.tolist()}. Fix the "
        "sform/qform of the file.")
  return NiftiHeader(path=os.fspath(path), shape=shape, affine=affine,
                     spacing_mm=zooms, dtype=str(img.get_data_dtype()))


def _raw_pixdim(path: str, img: nib.Nifti1Image) -> tuple[float, ...]:
  """pixdim[1:4] exactly as stored in the file (before nibabel's automatic fixes)."""
  try:
    with nib.openers.ImageOpener(path) as f:
      raw = type(img.header).from_fileobj(f, check=False)
    return tuple(float(v) for v in raw["pixdim"][1:4])
  except Exception as e:
    raise NiftiError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e}). "
                     "The file is corrupt; re-export or re-download it.") from e


def read_header(path: str, *, what: str = "image", allow_4d: bool = False) -> NiftiHeader:
  """Reads and validates a NIfTI header without loading pixel data.

  Args:
    path: .nii or .nii.gz file.
    what: "image" or "label" (used in messages).
    allow_4d: accept a 4D file.

  Returns:
    The validated ``NiftiHeader``.

  Raises:
    NiftiError: missing/unreadable file, not 3D, bad spacing or affine.
  """
  _check_what(what)
  return _header_of(os.fspath(path), _open(path, what), what, allow_4d)


def load_nifti(path: str, *, what: str = "image", allow_4d: bool = False
               ) -> tuple[np.ndarray, np.ndarray, NiftiHeader]:
  """Loads a NIfTI volume and validates it.

  Args:
    path: .nii or .nii.gz file.
    what: "image" -> float32 data; "label" -> integer data (uint8 if the values fit,
      else int32), checked to be integer valued and >= 0.
    allow_4d: accept a 4D file (H, W, D, T).

  Returns:
    (data (H, W, D[, T]), affine 4x4 voxel -> world mm, header).

  Raises:
    NiftiError: missing/corrupt file, not 3D, NaN/inf voxels, bad spacing, non-integer or
      negative labels.
  """
  _check_what(what)
  path = os.fspath(path)
  img = _open(path, what)
  header = _header_of(path, img, what, allow_4d)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:
    raise NiftiError(
        f"{path}: cannot read the {what} voxel data ({type(e).__name__}: {e}). The file is "
        "truncated or corrupt; re-export or re-download it.") from e
  data = np.asarray(data).reshape(header.shape)
  if what == "image":
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
      raise NiftiError(
          f"{path}: image has {int(bad.sum())} NaN/inf voxels (first at voxel "
          f"{tuple(int(i) for i in np.argwhere(bad)[0])}). Clean the file (e.g. replace them "
          "with the background value) before use.")
  else:
    data = _as_label_array(data, path)
  return data, header.affine, header


def _as_label_array(data: np.ndarray, path: str) -> np.ndarray:
  """Checks that a label map is integer valued and >= 0; returns uint8 or int32."""
  if np.issubdtype(data.dtype, np.floating):
    if not np.all(np.isfinite(data)):
      raise NiftiError(f"{path}: label map has NaN/inf voxels. Re-export the segmentation.")
    if not np.array_equal(data, np.round(data)):
      raise NiftiError(
          f"{path}: label map has non-integer values (e.g. "
          f"{float(data[data != np.round(data)].flat[0])}); it looks like an image or an "
          "interpolated segmentation. Pass the integer label file.")
  if data.size and data.min() < 0:
    raise NiftiError(f"{path}: label map has negative values (min {data.min()}). Labels must "
                     "be 0 (background) or positive class ids.")
  out_dtype = np.uint8 if (data.size == 0 or data.max() <= 255) else np.int32
  return data.astype(out_dtype)


def check_same_grid(img_path: str, img_affine: np.ndarray, img_shape: Sequence[int],
                    lab_path: str, lab_affine: np.ndarray, lab_shape: Sequence[int], *,
                    atol_mm: float = 1e-3, rtol: float = 1e-4) -> None:
  """Raises NiftiError when a label map is not on the voxel grid of its image.

  Args:
    img_path, lab_path: files, named in the message.
    img_affine, lab_affine: 4x4 voxel -> world (mm) matrices.
    img_shape, lab_shape: voxel shapes.
    atol_mm, rtol: tolerance on the affine entries (mm).
  """
  if tuple(img_shape) != tuple(lab_shape):
    raise NiftiError(
        f"{lab_path}: label shape {tuple(lab_shape)} differs from its image {img_path} shape "
        f"{tuple(img_shape)}. Pass the segmentation of this very image (or resample it onto "
        "the image grid with nearest-neighbour first).")
  a, b = np.asarray(img_affine, float), np.asarray(lab_affine, float)
  if not np.allclose(a, b, atol=atol_mm, rtol=rtol):
    diff = float(np.abs(a - b).max())
    raise NiftiError(
        f"{lab_path}: label affine differs from its image {img_path} affine by up to "
        f"{diff:.4g} mm (tolerance {atol_mm} mm; image {a.round(4).tolist()}, label "
        f"{b.round(4).tolist()}). "
        "Fix the label header (copy the image's sform/qform) or resample it onto the image "
        "grid.")


_LABEL_DTYPES = (np.uint8, np.int16, np.uint16, np.int32)


def label_dtype(data: np.ndarray, path: str = "labels") -> type:
  """The smallest NIfTI integer type holding the values of ``data`` (e.g. uint8 for ACDC,
  int16 for FreeSurfer aseg ids up to 2035)."""
  lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
  for dt in _LABEL_DTYPES:
    if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
      return dt
  raise ValueError(f"save_nifti: {path}: integer range [{lo}, {hi}] does not fit int32.")


def save_nifti(path: str, data: np.ndarray, affine: np.ndarray, *,
               intent: str | None = None) -> str:
  """Writes a 3D (or 4D) volume atomically (temp file in the same folder + os.replace).

  Args:
    path: destination ending in .nii or .nii.gz.
    data: float arrays are written as float32, bool/integer arrays (labels) with the
      smallest NIfTI integer type that holds their range (uint8, int16, uint16, int32).
    affine: 4x4 voxel -> world (mm).
    intent: optional NIfTI intent name, e.g. "label" or "vector" (stored in the header).

  Returns:
    The path written.
  """
  path = os.fspath(path)
  if not (path.endswith(".nii") or path.endswith(".nii.gz")):
    raise ValueError(f"save_nifti: {path} must end in .nii or .nii.gz.")
  data = np.asarray(data)
  if np.issubdtype(data.dtype, np.floating):
    data = data.astype(np.float32)
  elif data.dtype == bool or np.issubdtype(data.dtype, np.integer):
    data = data.astype(label_dtype(data, path))
  else:
    raise ValueError(f"save_nifti: {path}: unsupported dtype {data.dtype}.")
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise ValueError(f"save_nifti: {path}: affine must be 4x4, got {affine.shape}.")
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  if intent is not None:
    img.header.set_intent(intent)
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path


DISPVECT_INTENT = 1006   # NIFTI_INTENT_DISPVECT


def save_dispvect(path: str, disp_mm: np.ndarray, affine: np.ndarray) -> str:
  """Writes a displacement field as NIfTI-1 (X, Y, Z, 1, 3) float32, intent DISPVECT, mm.

  ``disp_mm[i, j, k, 0, :]`` is a RAS vector (mm) such that, with p = affine @ (i, j, k, 1),
  warped(p) = moving(p + disp_mm); ITK/ANTs/SimpleITK (LPS) read it as
  (-d0, -d1, d2). Written atomically with the user's umask.
  """
  img = nib.Nifti1Image(np.asarray(disp_mm, np.float32)[:, :, :, None, :], affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_intent(DISPVECT_INTENT, name="disp_mm_RAS")
  img.header.set_xyzt_units("mm")
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path


def l2r_case(path: str, given: str | None, flag: str) -> tuple[str, str | None]:
  """(case id, modality id or None) of a scan for the Learn2Reg file names.

  ``given`` ("NNNN" or "NNNN_MMMM", from ``flag``) wins. Otherwise the name must be
  Learn2Reg's ``TASK_NNNN_MMMM.nii.gz`` or hold exactly one number (``img0001.nii.gz``);
  a name with several numbers (``patient101_frame10``) is ambiguous and refused.
  """
  if given is not None:
    m = re.fullmatch(r"(\d{1,4})(?:_(\d{1,4}))?", given)
    if not m:
      raise NiftiError(f"{flag} {given!r}: expected a case number NNNN or NNNN_MMMM "
                       "(case_modality).")
    return f"{int(m.group(1)):04d}", m.group(2) and f"{int(m.group(2)):04d}"
  name = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
  m = re.search(r"_(\d{4})_(\d{4})$", name)
  if m:
    return m.group(1), m.group(2)
  nums = re.findall(r"\d+", name)
  if len(nums) != 1:
    raise NiftiError(f"{path}: cannot tell the Learn2Reg case id from the file name "
                     f"({len(nums)} numbers in it); pass {flag} NNNN.")
  return f"{int(nums[0]):04d}", None


def l2r_names(fixed: tuple[str, str | None], moving: tuple[str, str | None]) -> list[str]:
  """File names under which the Learn2Reg evaluation code finds the field of this pair.

  It reads ``disp_FFFF_MMMM.nii.gz`` (fixed case first) when both scans share a modality
  (or are 0000 -> 0001), else ``disp_FFFF_fmod_MMMM_mmod.nii.gz``: the short name is written
  where it applies, the long one whenever both modality ids are known.
  """
  (f, fm), (m, mm) = fixed, moving
  names = []
  if fm is None or mm is None or fm == mm or (fm, mm) == ("0000", "0001"):
    names.append(f"disp_{f}_{m}.nii.gz")
  if fm is not None and mm is not None:
    names.append(f"disp_{f}_{fm}_{m}_{mm}.nii.gz")
  return names
