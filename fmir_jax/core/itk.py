"""Transforms as ITK files (what ANTs, SimpleITK and ITK-SNAP apply): an affine transform
in ITK's MATLAB format and a displacement field NIfTI, both in ITK's LPS world.

ITK maps points of the fixed (output) space to the moving (input) space, as our maps do,
but in LPS: x_lps = F x_ras with F = diag(-1, -1, 1). A result's ITK pair is the linear map
T and the deformable part d, applied to a fixed point p as T(p + d(p)): in SimpleITK a
``CompositeTransform([affine, field])`` (the last added runs first), in ANTs
``antsApplyTransforms -t itk_warp.nii.gz -t itk_affine.mat``.
"""
from __future__ import annotations

import numpy as np
import nibabel as nib
from scipy import io as scipy_io

from fmir_jax.core import files

_F = np.diag([-1.0, -1.0, 1.0])
AFFINE_NAME = 'AffineTransform_double_3_3'   # ITK's class name, the MATLAB variable ANTs writes


def ras_map_to_lps(t_ras: np.ndarray) -> np.ndarray:
  """4x4 RAS world map -> the same map between LPS points."""
  t = np.asarray(t_ras, np.float64)
  out = np.eye(4)
  out[:3, :3] = _F @ t[:3, :3] @ _F
  out[:3, 3] = _F @ t[:3, 3]
  return out


def save_affine_mat(path: str, t_ras: np.ndarray) -> str:
  """Writes a 4x4 fixed -> moving RAS map as ITK's MATLAB (v4) affine file: the 9 matrix
  entries row by row and the translation, about the centre (0, 0, 0), in LPS."""
  t = ras_map_to_lps(t_ras)
  params = np.concatenate([t[:3, :3].reshape(-1), t[:3, 3]])[:, None]
  with files.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      scipy_io.savemat(f, {AFFINE_NAME: params, 'fixed': np.zeros((3, 1))}, format='4')
  return path


def save_displacement_lps(path: str, disp_ras_mm: np.ndarray, affine: np.ndarray) -> str:
  """Writes an (X, Y, Z, 3) RAS mm displacement on the grid of ``affine`` as the NIfTI
  vector field ITK reads as a displacement field: (X, Y, Z, 1, 3) float32, LPS components
  (ITK takes the vectors as stored; it converts only the grid's affine)."""
  lps = np.asarray(disp_ras_mm, np.float32) * np.array([-1, -1, 1], np.float32)
  img = nib.Nifti1Image(lps[:, :, :, None, :], affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_intent('vector', name='disp_LPS')
  img.header.set_xyzt_units('mm')
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path
