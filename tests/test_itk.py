"""The ITK files (core/itk.py) read by SimpleITK, the independent oracle: its resampling of
the moving image through our affine file and displacement field equals our own warp."""
import numpy as np
import nibabel as nib
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from fmir_jax.core import itk
from fmir_jax.core import world


def _grid(shape, spacing, angle_deg, origin):
  a = np.eye(4)
  a[:3, :3] = Rotation.from_euler('z', angle_deg, degrees=True).as_matrix() @ np.diag(spacing)
  a[:3, 3] = origin
  return a


def test_simpleitk_applies_our_affine_and_field_as_we_do(tmp_path):
  rng = np.random.default_rng(0)
  f_shape, f_aff = (20, 18, 12), _grid((2.0, 2.2, 3.0), (2.0, 2.2, 3.0), 10.0, (-20, -15, -18))
  m_shape, m_aff = (24, 22, 14), _grid((1.8, 2.0, 3.0), (1.8, 2.0, 3.0), -5.0, (-22, -20, -20))
  moving = np.cumsum(np.cumsum(rng.random(m_shape), 0), 1).astype(np.float32)
  t_ras = np.eye(4)
  t_ras[:3, :3] = Rotation.from_euler('xyz', (4, -3, 6), degrees=True).as_matrix() @ np.diag(
      (1.04, 0.97, 1.02))
  t_ras[:3, 3] = (2.0, -3.0, 1.5)
  d_ras = (rng.normal(size=(*f_shape, 3)) * 0.8).astype(np.float32)   # mm, RAS
  ours = world.warp_to_fixed(moving, m_aff, f_shape, f_aff,
                             world.after_linear(d_ras, f_aff, t_ras), order=1)

  nib.save(nib.Nifti1Image(moving, m_aff), str(tmp_path / 'moving.nii.gz'))
  nib.save(nib.Nifti1Image(np.zeros(f_shape, np.float32), f_aff), str(tmp_path / 'fixed.nii.gz'))
  itk.save_affine_mat(str(tmp_path / 'itk_affine.mat'), t_ras)
  itk.save_displacement_lps(str(tmp_path / 'itk_warp.nii.gz'), d_ras, f_aff)

  affine = sitk.ReadTransform(str(tmp_path / 'itk_affine.mat'))
  field = sitk.ReadImage(str(tmp_path / 'itk_warp.nii.gz'), sitk.sitkVectorFloat64)
  assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == f_shape
  both = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])
  theirs = sitk.GetArrayFromImage(sitk.Resample(
      sitk.ReadImage(str(tmp_path / 'moving.nii.gz')), sitk.ReadImage(str(tmp_path / 'fixed.nii.gz')),
      both, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
  # away from the moving image's border, where the two edge rules differ
  inside = np.zeros(f_shape, bool)
  inside[2:-2, 2:-2, 2:-2] = True
  inside &= theirs != 0
  assert inside.sum() > 0.5 * np.prod([n - 4 for n in f_shape])
  np.testing.assert_allclose(theirs[inside], ours[inside], rtol=1e-4, atol=1e-3)

  # the affine alone: SimpleITK's point map is ours between LPS points
  p = np.array([3.0, -4.0, 5.0])
  flip = np.array([-1.0, -1.0, 1.0])
  np.testing.assert_allclose(np.asarray(affine.TransformPoint(tuple(p * flip))) * flip,
                             t_ras[:3, :3] @ p + t_ras[:3, 3], atol=1e-9)
