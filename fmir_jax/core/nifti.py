"""NIfTI input/output (nibabel): headers, images, label maps, displacement fields, and the
Learn2Reg file names. Resampling between grids is ``fmir_jax.core.resample``.

Conventions: volumes are ``(H, W, D)`` arrays in NIfTI voxel order (i, j, k), the slice axis
is the last one and is never reoriented; ``affine`` is the 4x4 voxel -> world (RAS, mm) matrix.

This module must stay importable without jax or torch.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.core import resample

_WHATS = ("image", "label")


class NiftiError(errors.UserError, ValueError):
  """A NIfTI file cannot be used: the message names the file, the problem and the fix."""


class NiftiWarning(UserWarning):
  """A NIfTI file is usable but its header contradicts itself (the message names the file)."""


# pixdim and the affine's column norms may differ by float32 rounding of the header fields;
# beyond this relative difference they describe different voxel sizes.
PIXDIM_RTOL = 1e-3
LABEL_ID_MAX = int(np.iinfo(np.int32).max)   # label ids must fit int32 (io.label_dtype)


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
  """What the header of one NIfTI file says (no pixel data read).

  path: the file.
  shape: voxel shape (3 entries after validation, 4 when ``allow_4d``).
  affine: 4x4 voxel -> world (RAS, mm) matrix (nibabel's ``img.affine``: the sform, else
    the qform, else pixdim alone).
  spacing_mm: voxel size per array axis: the norms of the affine's first three columns
    (``resample.voxel_spacing``), the one source of truth for voxel size everywhere; pixdim is
    only compared with it (``warnings``).
  dtype: on-disk data type name.
  pixdim_mm: pixdim[1:4] as the header stores it (None when unknown).
  qform_code, sform_code: the header's codes (0: not set; None when unknown).
  warnings: one line per header inconsistency found (e.g. pixdim vs affine), also issued
    as a ``NiftiWarning`` unless the reader asked not to (``warn=False``).
  """
  path: str
  shape: tuple[int, ...]
  affine: np.ndarray
  spacing_mm: tuple[float, float, float]
  dtype: str
  pixdim_mm: tuple[float, float, float] | None = None
  qform_code: int | None = None
  sform_code: int | None = None
  warnings: tuple[str, ...] = ()

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


def _check_dtype(path: str, img: nib.Nifti1Image, what: str) -> None:
  """Refuses voxel types that have no one real value per voxel (before reading any data)."""
  dtype = img.get_data_dtype()
  if dtype.names is not None or dtype.kind == "V":
    raise NiftiError(
        f"{path}: {what} is a colour image (voxel type {dtype.descr}); registration needs "
        "one intensity per voxel: convert it to greyscale (e.g. the mean of the channels) "
        "and save it as a 3D NIfTI.")
  if dtype.kind == "c":
    raise NiftiError(
        f"{path}: {what} is complex-valued ({dtype}); its imaginary part would be lost: "
        "save the magnitude (np.abs) as a real-valued NIfTI instead.")
  if dtype.kind not in "biuf":
    raise NiftiError(f"{path}: {what} has voxel type {dtype}, not a number; re-export it "
                     "as an integer or float NIfTI.")


def _header_of(path: str, img: nib.Nifti1Image, what: str, allow_4d: bool,
               warn: bool = True) -> NiftiHeader:
  """Validates voxel type, dimensionality, spacing and affine from the header."""
  _check_dtype(path, img, what)
  shape = tuple(int(s) for s in img.shape)
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3 and not (allow_4d and len(shape) == 4):
    hint = (" (a 4D cine/time series: pass the single 3D frame file instead)"
            if len(shape) == 4 else
            " (a vector/multi-component image: pass one 3D intensity volume)"
            if len(shape) == 5 else "")
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
  spacing = resample.voxel_spacing(affine)
  codes = tuple(int(img.header[k]) for k in ("qform_code", "sform_code"))
  notes = ()
  if any(abs(z - s) > PIXDIM_RTOL * s for z, s in zip(zooms, spacing)):
    form = "sform" if codes[1] else "qform"
    notes = (f"{path}: pixdim says {_fmt(zooms)} mm per voxel but the {form} (the affine "
             f"that places the voxels in world space) says {_fmt(spacing)} mm; using "
             f"{_fmt(spacing)} mm. Set pixdim to match the {form} (or fix the {form}) to "
             "silence this.",)
    if warn:
      warnings.warn(notes[0], NiftiWarning, stacklevel=3)
  return NiftiHeader(path=os.fspath(path), shape=shape, affine=affine,
                     spacing_mm=spacing, dtype=str(img.get_data_dtype()),
                     pixdim_mm=zooms, qform_code=codes[0], sform_code=codes[1],
                     warnings=notes)


def _fmt(values: Sequence[float]) -> str:
  return "x".join(f"{float(v):.4g}" for v in values)


def require_world_placement(header: NiftiHeader, what: str = "image") -> None:
  """Refuses a file whose header sets neither a qform nor an sform (both codes 0).

  nibabel then places the voxels at an arbitrary origin with pixdim alone, so where the
  volume lies in world space is unknown. Registration (``fmir register``) resamples both
  images through world coordinates and needs it; the dataset readers do not (they centre
  each volume on its own model grid), so they accept such files.

  Raises:
    NiftiError: both codes are 0.
  """
  if header.qform_code == 0 and header.sform_code == 0:
    raise NiftiError(
        f"{header.path}: {what} has neither a qform nor an sform (both codes 0), so its "
        "position in world space is unknown; set one, e.g. with nibabel: "
        "img.set_sform(affine, code=1); nib.save(img, path).")


def _raw_pixdim(path: str, img: nib.Nifti1Image) -> tuple[float, ...]:
  """pixdim[1:4] exactly as stored in the file (before nibabel's automatic fixes)."""
  try:
    with nib.openers.ImageOpener(path) as f:
      raw = type(img.header).from_fileobj(f, check=False)
    return tuple(float(v) for v in raw["pixdim"][1:4])
  except Exception as e:
    raise NiftiError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e}). "
                     "The file is corrupt; re-export or re-download it.") from e


def read_header(path: str, *, what: str = "image", allow_4d: bool = False,
                warn: bool = True) -> NiftiHeader:
  """Reads and validates a NIfTI header without loading pixel data.

  Args:
    path: .nii or .nii.gz file.
    what: "image" or "label" (used in messages).
    allow_4d: accept a 4D file.
    warn: issue ``header.warnings`` as ``NiftiWarning`` (False: the caller reports them).

  Returns:
    The validated ``NiftiHeader``.

  Raises:
    NiftiError: missing/unreadable file, colour or complex voxels, not 3D, bad spacing or
      affine.
  """
  _check_what(what)
  return _header_of(os.fspath(path), _open(path, what), what, allow_4d, warn)


def load_nifti(path: str, *, what: str = "image", allow_4d: bool = False, warn: bool = True
               ) -> tuple[np.ndarray, np.ndarray, NiftiHeader]:
  """Loads a NIfTI volume and validates it.

  Args:
    path: .nii or .nii.gz file.
    what: "image" -> float32 data; "label" -> integer data (uint8 if the values fit,
      else int32), checked to be integer valued, >= 0 and at most ``LABEL_ID_MAX``.
    allow_4d: accept a 4D file (H, W, D, T).
    warn: as in ``read_header``.

  Returns:
    (data (H, W, D[, T]), affine 4x4 voxel -> world mm, header).

  Raises:
    NiftiError: missing/corrupt file, colour or complex voxels, not 3D, NaN/inf voxels or
      values beyond float32, bad spacing, non-integer, negative or too large label ids.
  """
  _check_what(what)
  path = os.fspath(path)
  img = _open(path, what)
  header = _header_of(path, img, what, allow_4d, warn)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:
    raise NiftiError(
        f"{path}: cannot read the {what} voxel data ({type(e).__name__}: {e}). The file is "
        "truncated or corrupt; re-export or re-download it.") from e
  data = np.asarray(data).reshape(header.shape)
  if what == "image":
    _check_float32_range(data, path)
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


def _check_float32_range(data: np.ndarray, path: str) -> None:
  """Refuses finite values that float32 cannot hold (they would turn into inf)."""
  if data.dtype.kind != "f" or data.dtype.itemsize <= 4:
    return
  big = np.isfinite(data) & (np.abs(data) > np.finfo(np.float32).max)
  if big.any():
    top = float(np.abs(data[big]).max())
    raise NiftiError(
        f"{path}: image has {int(big.sum())} voxel values beyond float32's range (largest "
        f"|value| {top:.4g}, float32 holds up to {float(np.finfo(np.float32).max):.4g}); "
        "rescale the image (e.g. divide by a constant) and save it again.")


def _as_label_array(data: np.ndarray, path: str) -> np.ndarray:
  """Checks that a label map is integer valued, >= 0 and fits int32; returns uint8 or
  int32 (ids are kept exact: a larger id is refused, never wrapped)."""
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
  if data.size and data.max() > LABEL_ID_MAX:
    top = int(data.max())                  # whole (checked above): exact as an int
    raise NiftiError(f"{path}: label map has class id {top}, larger than {LABEL_ID_MAX} "
                     "(int32), the largest id supported; renumber the labels (e.g. "
                     "consecutive ids 1, 2, ...).")
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
  """Writes a displacement field as NIfTI-1 (X, Y, Z, 1, 3) float32, intent DISPVECT, mm;
  a series of fields (X, Y, Z, T, 3) keeps its time axis (``fmir track``).

  ``disp_mm[i, j, k, t, :]`` is a RAS vector (mm) such that, with p = affine @ (i, j, k, 1),
  warped(p) = moving(p + disp_mm); ITK/ANTs/SimpleITK (LPS) read it as
  (-d0, -d1, d2). Written atomically with the user's umask.
  """
  disp_mm = np.asarray(disp_mm, np.float32)
  img = nib.Nifti1Image(disp_mm if disp_mm.ndim == 5 else disp_mm[:, :, :, None, :], affine)
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
