"""Fault injection, bad inputs (issue 30, items 4, 5, 7, 10, 12): header disagreements, files
with no world placement, pairs that do not overlap, label ids beyond int32, complex, colour
and float64 images, NaN fields, pyramid factors beyond the grid, registrations too large for
the memory available. Each case is refused with one line naming the file (or flag) and the
fix, or warned about; numbers are checked against nibabel, scipy or a closed form.
"""
import copy
import dataclasses
import os
import tracemalloc
import types
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy import optimize

from feature_extract.datasets import custom as custom_pairs
from fmir_jax.core import errors
from fmir_jax.ops import pyramid
from fmir_jax.core import resample
from fmir_jax.core import nifti
from fmir_jax.core import metrics
from fmir_jax.core import pair_metrics
from fmir_jax.register import registrar as register_lib
from fmir_jax.register import grid as register_grid
from fmir_jax.core import world
from tests.helpers import oracles


def _save(path, data, affine=np.eye(4), *, pixdim=None, codes=(1, 1)):
  """Writes a NIfTI with nibabel; ``pixdim`` overrides the header's voxel size after the
  affine is set (a careless resampling tool), ``codes`` are (qform_code, sform_code)."""
  img = nib.Nifti1Image(data, None, dtype=data.dtype)      # int64 too, as the data comes
  if codes[0]:
    img.set_qform(affine, code=codes[0])
  if codes[1]:
    img.set_sform(affine, code=codes[1])
  if pixdim is not None:
    img.header.set_zooms(pixdim)
  nib.save(img, str(path))
  return str(path)


def _one_line(e):
  text = str(e.value)
  assert '\n' not in text and text.strip() == text, text
  return text


# --------------------------------------------------------------------------- item 4: spacing


SFORM = np.diag([1.0, 1.5, 3.0, 1.0])
SFORM[:3, 3] = (-5.0, 7.0, 2.0)


def test_spacing_is_the_affine_column_norms_with_a_warning_when_pixdim_disagrees(tmp_path):
  path = _save(tmp_path / 'resampled.nii.gz', np.zeros((6, 5, 4), np.float32), SFORM,
               pixdim=(2.0, 2.0, 2.0), codes=(0, 2))
  oracle = np.linalg.norm(nib.load(path).affine[:3, :3], axis=0)     # nibabel's affine
  assert nib.load(path).header.get_zooms() == (2.0, 2.0, 2.0)       # the header says 2 mm
  with pytest.warns(nifti.NiftiWarning) as record:
    hdr = nifti.read_header(path)
  np.testing.assert_allclose(hdr.spacing_mm, oracle, rtol=1e-12)
  np.testing.assert_allclose(hdr.spacing_mm, (1.0, 1.5, 3.0))
  assert hdr.pixdim_mm == (2.0, 2.0, 2.0) and (hdr.qform_code, hdr.sform_code) == (0, 2)
  msg = str(record[0].message)
  assert len(record) == 1 and '\n' not in msg
  assert msg.startswith(path) and '2x2x2' in msg and '1x1.5x3' in msg and 'sform' in msg
  assert hdr.warnings == (msg,)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _, affine, quiet = nifti.load_nifti(path, warn=False)      # the caller reports it itself
    assert quiet.warnings == (msg,) and np.allclose(affine, SFORM)
    consistent = _save(tmp_path / 'ok.nii.gz', np.zeros((6, 5, 4), np.float32), SFORM)
    assert nifti.read_header(consistent).warnings == ()        # no warning when they agree


def test_grids_planned_from_such_a_file_have_the_affine_voxel_size(tmp_path):
  path = _save(tmp_path / 'f.nii.gz', np.zeros((12, 10, 8), np.float32), SFORM,
               pixdim=(2.0, 2.0, 2.0))
  hdr = nifti.read_header(path, warn=False)
  # The model grid of a dataset reader (the store's spacing, hence eval's HD95).
  shape, affine = custom_pairs.model_grid(hdr, shape=(8, 8, 4), spacing_mm=(2.0, 2.0, 6.0))
  np.testing.assert_allclose(resample.voxel_spacing(affine), (2.0, 2.0, 6.0), rtol=1e-12)
  # The native registration grid at the fixed image's own spacing is the fixed grid.
  opts = types.SimpleNamespace(grid='native', spacing_mm=None, pyramid_factors=None)
  grid = register_grid.plan_grid(hdr, None, {}, opts, (2, 2, 1), 2, [])
  assert grid.shape == (12, 10, 8)
  np.testing.assert_allclose(grid.affine, SFORM, atol=1e-12)
  # A source spacing that is not its affine's (the old pixdim path) is refused.
  with pytest.raises(ValueError, match='not the voxel size of its affine'):
    resample.spacing_grid(hdr.shape, hdr.affine, hdr.pixdim_mm, (2.0, 2.0, 6.0))


@pytest.mark.parametrize('axis, at, closed_form_mm', [(0, (2, 6), 4 * 1.0), (2, (1, 4), 3 * 3.0)])
def test_hd95_of_such_a_file_is_in_the_affine_mm(tmp_path, axis, at, closed_form_mm):
  """One-voxel slabs across the volume: every surface voxel is |i - j| voxels from the other
  slab, so HD95 = |i - j| x the voxel size along that axis (the sform's, not pixdim's)."""
  shape = (10, 6, 7)
  fixed, moved = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
  index = [slice(None)] * 3
  index[axis] = at[0]
  fixed[tuple(index)] = 1
  index[axis] = at[1]
  moved[tuple(index)] = 1
  path = _save(tmp_path / 'fixed_gt.nii.gz', fixed, SFORM, pixdim=(2.0, 2.0, 2.0))
  lab, _, hdr = nifti.load_nifti(path, what='label', warn=False)
  got = pair_metrics.label_overlap_before_after(moved, moved, lab, hdr.spacing_mm)
  spacing = np.linalg.norm(nib.load(path).affine[:3, :3], axis=0)
  assert got['hd95_after']['1'] == pytest.approx(closed_form_mm, abs=1e-9)
  assert got['hd95_after']['1'] == pytest.approx(oracles.hd95(moved > 0, lab > 0, spacing))
  assert got['hd95_after']['1'] != pytest.approx(oracles.hd95(moved > 0, lab > 0, (2, 2, 2)))


# --------------------------------------------------------------------------- item 5: placement


def test_a_file_with_neither_qform_nor_sform_is_refused_for_registration(tmp_path):
  img = np.random.default_rng(0).random((6, 6, 4)).astype(np.float32)
  bare = _save(tmp_path / 'bare.nii.gz', img, codes=(0, 0))
  placed = _save(tmp_path / 'placed.nii.gz', img, SFORM, codes=(1, 0))   # a qform is enough
  hdr = nifti.read_header(bare)                  # the dataset readers still accept it
  assert (hdr.qform_code, hdr.sform_code) == (0, 0)
  with pytest.raises(nifti.NiftiError) as e:
    nifti.require_world_placement(hdr)
  text = _one_line(e)
  assert text.startswith(bare) and 'neither a qform nor an sform' in text and 'set_sform' in text
  nifti.require_world_placement(nifti.read_header(placed))
  for fixed, moving in ((bare, placed), (placed, bare)):
    with pytest.raises(nifti.NiftiError, match='^' + bare + ': image has neither'):
      register_lib.load_pair(register_lib.PairFiles(fixed, moving))


def _lp_overlap(shape_a, aff_a, shape_b, aff_b):
  """Independent oracle (scipy linprog): the largest margin t such that a point lies t voxels
  inside both extents (voxel coordinates of A as unknowns); they overlap iff t > 0."""
  m = np.linalg.inv(aff_b) @ aff_a                   # A voxel -> B voxel
  lo_a, hi_a = -0.5 * np.ones(3), np.asarray(shape_a, float) - 0.5
  lo_b, hi_b = -0.5 * np.ones(3), np.asarray(shape_b, float) - 0.5
  a_ub, b_ub = [], []
  for k in range(3):                 # u_k - hi + t <= 0, lo - u_k + t <= 0 (A); same in B
    e = np.eye(3)[k]
    a_ub += [np.append(e, 1), np.append(-e, 1)]
    b_ub += [hi_a[k], -lo_a[k]]
    row = m[k, :3]
    a_ub += [np.append(row, 1), np.append(-row, 1)]
    b_ub += [hi_b[k] - m[k, 3], m[k, 3] - lo_b[k]]
  res = optimize.linprog(c=[0, 0, 0, -1], A_ub=np.array(a_ub), b_ub=np.array(b_ub),
                         bounds=[(None, None)] * 3 + [(None, 10)], method='highs')
  return res.status == 0 and -res.fun > 1e-6


def _random_affine(rng, spread):
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  a = np.eye(4)
  a[:3, :3] = q @ np.diag(rng.uniform(0.5, 3.0, 3)) @ (np.eye(3) + 0.2 * rng.normal(size=(3, 3)))
  a[:3, 3] = rng.uniform(-spread, spread, 3)
  return a


def test_world_overlap_matches_a_linear_programming_oracle():
  rng = np.random.default_rng(7)
  seen = set()
  for _ in range(150):
    sa, sb = tuple(rng.integers(2, 12, 3)), tuple(rng.integers(2, 12, 3))
    aa, ab = _random_affine(rng, 30.0), _random_affine(rng, 30.0)
    want = _lp_overlap(sa, aa, sb, ab)
    assert world.grids_overlap(sa, aa, sb, ab) == want, (sa, aa, sb, ab)
    assert world.grids_overlap(sb, ab, sa, aa) == want
    seen.add(want)
  assert seen == {True, False}
  # Rotated boxes whose axis-aligned bounding boxes intersect but which do not.
  rot = np.eye(4)
  c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
  rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
  # A 6 x 6 square turned 45 degrees (a diamond of L1 radius 3 sqrt 2) centred 3 mm beyond
  # the corner (9.5, 9.5) of the fixed square along both axes: 6 mm away in L1.
  rot[:3, 3] = np.array([12.5, 12.5, 0.0]) - rot[:3, :3] @ [2.5, 2.5, 0.0]
  fixed_box, moving_box = world.bounding_box((10, 10, 4), np.eye(4)), world.bounding_box(
      (6, 6, 4), rot)
  assert np.all(fixed_box[0] < moving_box[1]) and np.all(moving_box[0] < fixed_box[1])
  assert not _lp_overlap((10, 10, 4), np.eye(4), (6, 6, 4), rot)
  assert not world.grids_overlap((10, 10, 4), np.eye(4), (6, 6, 4), rot)


def _header(tmp_path, name, shape, affine):
  return nifti.read_header(_save(tmp_path / name, np.zeros(shape, np.float32), affine))


def test_inputs_that_do_not_overlap_are_refused_with_both_bounding_boxes(tmp_path):
  fixed = _header(tmp_path, 'f.nii.gz', (10, 8, 4), np.diag([2.0, 2.0, 5.0, 1.0]))
  far = np.diag([2.0, 2.0, 5.0, 1.0])
  far[:3, 3] = (0.0, 0.0, 200.0)
  moving = _header(tmp_path, 'm.nii.gz', (10, 8, 4), far)
  grid = register_grid.Grid((16, 16, 8), fixed.affine, 'native')
  with pytest.raises(errors.RegisterError) as e:
    register_grid.check_inputs(grid, fixed, moving, (2, 2, 1), 2)
  text = _one_line(e)
  # nibabel's corners of the extents (half a voxel beyond the outer voxel centres).
  corners = lambda h: nib.affines.apply_affine(h.affine, np.array(
      [[i, j, k] for i in (-0.5, h.shape[0] - 0.5) for j in (-0.5, h.shape[1] - 0.5)
       for k in (-0.5, h.shape[2] - 0.5)]))
  for h, word in ((fixed, 'fixed'), (moving, 'moving')):
    lo, hi = corners(h).min(0), corners(h).max(0)
    box = ' '.join(f'{k} [{a:.1f}, {b:.1f}]' for k, a, b in zip('xyz', lo, hi))
    assert f'{word} {box} mm' in text, (box, text)
  assert text.startswith(moving.path) and 'do not overlap' not in text
  assert 'does not overlap' in text and 'linear' in text and 'align the headers' in text
  near = np.diag([2.0, 2.0, 5.0, 1.0])
  near[:3, 3] = (0.0, 0.0, 19.0)               # one slab (the last half slice) in common
  out = register_grid.check_inputs(grid, fixed, _header(tmp_path, 'n.nii.gz', (10, 8, 4), near),
                                   (2, 2, 1), 2)
  assert out.shape == grid.shape


# --------------------------------------------------------------------------- item 7: voxel types


@pytest.mark.parametrize('dtype, value, shown', [(np.int64, 2**31, '2147483648'),
                                                 (np.uint32, 2**32 - 1, '4294967295'),
                                                 (np.float32, 3e9, '3000000000'),
                                                 (np.float64, 1e12, '1000000000000')])
def test_label_ids_beyond_int32_are_refused_not_wrapped(tmp_path, dtype, value, shown):
  lab = np.zeros((4, 4, 3), dtype)
  lab[1, 2, 0], lab[2, 2, 2] = 7, value
  path = _save(tmp_path / 'big_gt.nii.gz', lab)
  assert np.asarray(nib.load(path).dataobj).max() == value       # stored exactly
  with pytest.raises(nifti.NiftiError) as e:
    nifti.load_nifti(path, what='label')
  text = _one_line(e)
  assert text.startswith(path) and f'class id {shown}' in text and 'int32' in text


def test_the_largest_int32_label_id_is_kept_exact_and_fractional_ids_refused(tmp_path):
  lab = np.zeros((4, 4, 3), np.int64)
  lab[0, 0, 0], lab[3, 3, 2] = 2**31 - 1, 5
  path = _save(tmp_path / 'top_gt.nii.gz', lab)
  got, _, _ = nifti.load_nifti(path, what='label')
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.asarray(nib.load(path).dataobj))
  frac = _save(tmp_path / 'frac_gt.nii.gz', np.full((3, 3, 3), 2.5, np.float32))
  with pytest.raises(nifti.NiftiError, match='frac_gt.nii.gz.*non-integer'):
    nifti.load_nifti(frac, what='label')


def test_complex_and_colour_images_are_refused_before_reading_voxels(tmp_path):
  z = np.zeros((4, 4, 3), np.complex64)
  z.imag[1, 1, 1] = 5.0
  cplx = _save(tmp_path / 'phase.nii.gz', z)
  rgb = np.zeros((4, 4, 3), dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
  rgb['G'][2, 2, 2] = 200
  colour = _save(tmp_path / 'rgb.nii.gz', rgb)
  assert nib.load(colour).get_data_dtype().names == ('R', 'G', 'B')
  for path, what, words in ((cplx, 'image', ('complex', 'magnitude')),
                            (cplx, 'label', ('complex', 'magnitude')),
                            (colour, 'image', ('colour', 'greyscale'))):
    for read in (nifti.read_header, nifti.load_nifti):
      with pytest.raises(nifti.NiftiError) as e:
        read(path, what=what)
      text = _one_line(e)
      assert text.startswith(path) and all(w in text for w in words), text


def test_float64_beyond_float32_range_is_named_as_such(tmp_path):
  img = np.zeros((4, 4, 3), np.float64)
  img[1, 2, 0], img[3, 0, 1] = -2e39, 1e39
  path = _save(tmp_path / 'huge.nii.gz', img)
  with pytest.raises(nifti.NiftiError) as e:
    nifti.load_nifti(path)
  text = _one_line(e)
  assert text.startswith(path) and "2 voxel values beyond float32's range" in text
  assert '2e+39' in text and 'rescale' in text and 'NaN' not in text
  img = np.zeros((4, 4, 3), np.float64)
  img[0, 0, 0] = 3e38                                # within float32: loaded as is
  got, _, _ = nifti.load_nifti(_save(tmp_path / 'ok.nii.gz', img))
  assert got[0, 0, 0] == np.float32(3e38) and got.dtype == np.float32
  img[0, 0, 1] = np.inf                              # a real inf stays a NaN/inf error
  with pytest.raises(nifti.NiftiError, match=r'1 NaN/inf voxels \(first at voxel \(0, 0, 1\)\)'):
    nifti.load_nifti(_save(tmp_path / 'inf.nii.gz', img))


# --------------------------------------------------------------------------- item 12: names


def test_nan_fields_name_the_pair_or_file():
  disp = np.zeros((5, 5, 5, 3), np.float32)
  disp[1, 2, 3, 1] = np.nan
  disp[4, 4, 4, 0] = np.inf
  with pytest.raises(ValueError, match=r'^disp_vox contains NaN or inf \(2 of 375 values, '
                                       r'first at voxel \(1, 2, 3\)\)\.$'):
    metrics.field_regularity(disp)
  with pytest.raises(ValueError, match=r'^disp_mm.nii.gz contains NaN or inf'):
    metrics.field_regularity(disp, name='disp_mm.nii.gz')
  lab = np.zeros((5, 5, 5), np.uint8)
  lab[1:4, 1:4, 1:4] = 1
  with pytest.raises(ValueError, match=r'^disp_vox of pair case7_ES -> case7_ED contains NaN'):
    pair_metrics.evaluate_pair(disp, lab, lab, (1,), (1, 1, 1), lambda m, d: m,
                               moving='case7_ES', fixed='case7_ED')


# --------------------------------------------------------------------------- items 10, 12: size


def test_pyramid_factors_beyond_the_grid_are_refused_before_allocating(tmp_path):
  fixed = _header(tmp_path, 'f.nii.gz', (48, 40, 12), np.diag([1.0, 1.0, 3.0, 1.0]))
  opts = types.SimpleNamespace(grid='native', spacing_mm=None, pyramid_factors=(100, 100, 100))
  pyramid.factors_product((2, 2, 2), 4)        # imports the pyramid module first
  tracemalloc.start()
  with pytest.raises(errors.RegisterError) as e:
    register_grid.plan_grid(fixed, None, {}, opts, opts.pyramid_factors, 4, [])
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 1 << 20                          # nothing of the 10^18-voxel grid allocated
  text = _one_line(e)
  assert text.startswith('--pyramid-factors 100,100,100:')
  assert '(1000000, 1000000, 1000000)' in text and '(48, 40, 12)' in text
  # Per level: 2 x 2 x 2 over 3 transitions is 8 per axis: 12 slices hold it, 6 do not.
  ok = types.SimpleNamespace(grid='native', spacing_mm=None, pyramid_factors=((2, 2, 2),) * 3)
  assert register_grid.plan_grid(fixed, None, {}, ok, ok.pyramid_factors, 4, []).shape == \
      (48, 40, 16)
  thin = _header(tmp_path, 't.nii.gz', (48, 40, 6), np.diag([1.0, 1.0, 3.0, 1.0]))
  with pytest.raises(errors.RegisterError, match=r'^--pyramid-factors 2,2,2;2,2,2;2,2,2: .*'
                                                 r'\(8, 8, 8\).*\(48, 40, 6\)'):
    register_grid.plan_grid(thin, None, {}, ok, ok.pyramid_factors, 4, [])


def test_feature_term_of_the_memory_estimate_is_the_encoder_output(tmp_path):
  """The features' bytes per grid voxel in ``host_memory_bytes`` are those the encoder
  returns for both images at one encoder pixel per voxel (the real arrays as oracle)."""
  from feature_extract import backbones
  from feature_extract import pipeline
  bb = backbones.load('mind', device='cpu')
  image = np.random.default_rng(0).random((32, 32, 5)).astype(np.float32)
  feats, _ = pipeline.encode_volume(image, bb, input_size=32, resize='pad', pad_to=None,
                                    batch_size=5)
  assert feats.dtype == np.float32
  assert register_grid.feature_bytes_per_voxel(bb) == pytest.approx(2 * feats.nbytes /
                                                                    image.size)
  n = 64 * 64 * 32
  got = register_grid.host_memory_bytes((64, 64, 32), (100, 100, 40), 18.0)
  assert got == register_grid.RUNTIME_BYTES + n * (register_grid.HEAD_BYTES_PER_VOXEL + 8 + 18)
  big_fixed = register_grid.host_memory_bytes((8, 8, 8), (500, 500, 200))
  assert big_fixed == register_grid.RUNTIME_BYTES + 500 * 500 * 200 * 48   # output stage wins


def test_available_memory_is_meminfo_or_sysconf():
  with open('/proc/meminfo') as f:
    meminfo = {line.split(':')[0]: int(line.split()[1]) * 1024 for line in f}
  got = register_grid.available_memory_bytes()
  assert 0 < got <= meminfo['MemTotal']
  assert abs(got - meminfo['MemAvailable']) < 0.25 * meminfo['MemTotal'] or \
      got < meminfo['MemAvailable']               # a container limit may be lower


# --------------------------------------------------------------------------- fmir register


@pytest.fixture(scope='module')
def registrar():
  """The general head shipped with the package (no training, no download)."""
  return register_lib.Registrar(None)


def _blob_pair(root, shape=(24, 24, 16), affine=np.diag([2.0, 2.0, 2.0, 1.0]), shift=2,
               pixdim=None):
  """A sphere phantom and its copy shifted by ``shift`` voxels along axis 0, with labels."""
  c = (np.asarray(shape) - 1) / 2
  r = np.sqrt(sum((g - c_) ** 2 for g, c_ in zip(np.indices(shape), c)))
  lab = (r < min(shape) / 3).astype(np.uint8)
  img = ndimage.gaussian_filter(lab.astype(np.float32) * 100, 1.0)
  files = {}
  for name, im, la in (('fixed', img, lab), ('moving', np.roll(img, shift, 0),
                                             np.roll(lab, shift, 0))):
    files[name] = _save(f'{root}/{name}.nii.gz', im, affine, pixdim=pixdim)
    files[name + '_labels'] = _save(f'{root}/{name}_gt.nii.gz', la, affine, pixdim=pixdim)
  return files


@pytest.mark.slow
def test_register_reports_the_pixdim_warning_and_hd95_in_affine_mm(registrar, tmp_path):
  """A pair whose pixdim says 4 mm but whose sform says 2 mm: the registration grid is at
  2 mm, the warning is logged and reported, HD95 matches scipy at the sform's spacing."""
  files = _blob_pair(str(tmp_path), pixdim=(4.0, 4.0, 4.0))
  logged = []
  registrar.log = logged.append
  rep = registrar.register(register_lib.PairFiles(**files), str(tmp_path / 'out'))
  np.testing.assert_allclose(rep.grid.spacing_mm, (2.0, 2.0, 2.0))
  assert rep.grid.shape == [24, 24, 16]
  said = [w for w in rep.warnings if 'pixdim says 4x4x4' in w]
  assert [w.split(':')[0] for w in said] == [files['fixed'], files['moving']]
  assert all(any(w in line for line in logged) for w in said)
  warped = np.asarray(nib.load(str(tmp_path / 'out' / 'warped_moving_labels.nii.gz')).dataobj)
  fixed_img = nib.load(files['fixed_labels'])
  spacing = np.linalg.norm(fixed_img.affine[:3, :3], axis=0)
  fixed = np.asarray(fixed_img.dataobj) > 0
  assert rep.dice['hd95_after']['1'] == pytest.approx(oracles.hd95(warped > 0, fixed,
                                                                      spacing))
  moving = np.asarray(nib.load(files['moving_labels']).dataobj) > 0
  assert rep.dice['hd95_before']['1'] == pytest.approx(oracles.hd95(moving, fixed, spacing))
  assert rep.dice['hd95_before']['1'] != pytest.approx(oracles.hd95(moving, fixed, (4, 4, 4)))


@pytest.mark.parametrize('case', ['mask_without_stage', 'empty_mask', 'landmarks_alone',
                                  'landmarks_count'])
def test_masks_and_landmarks_are_checked_before_any_work(registrar, tmp_path, monkeypatch,
                                                          case):
  from fmir_jax.register import linear
  files = _blob_pair(str(tmp_path))
  reg = copy.copy(registrar)
  reg.aligner = linear.LinearAligner()           # built only: nothing runs before the refusal
  points = 'x_ras,y_ras,z_ras\n1,2,3\n4,5,6\n'
  (tmp_path / 'two.csv').write_text(points)
  (tmp_path / 'one.csv').write_text(points.rsplit('4', 1)[0])
  if case == 'mask_without_stage':
    reg.aligner = None                             # --linear none, no --io
    files['fixed_mask'] = _save(tmp_path / 'mask.nii.gz', np.ones((24, 24, 16), np.uint8),
                                np.diag([2.0, 2.0, 2.0, 1.0]))
    expect = 'drop --linear none, or add --io'
  elif case == 'empty_mask':
    files['moving_mask'] = _save(tmp_path / 'mask.nii.gz', np.zeros((24, 24, 16), np.uint8),
                                 np.diag([2.0, 2.0, 2.0, 1.0]))
    expect = f'--moving-mask {files["moving_mask"]}: the mask is empty'
  elif case == 'landmarks_alone':
    files['fixed_landmarks'] = str(tmp_path / 'two.csv')
    expect = '--fixed-landmarks and --moving-landmarks go together'
  else:
    files['fixed_landmarks'], files['moving_landmarks'] = (str(tmp_path / 'two.csv'),
                                                           str(tmp_path / 'one.csv'))
    expect = 'has 2 points, --moving-landmarks'
  monkeypatch.setattr(reg.reader, 'preprocess',
                      lambda *a, **k: pytest.fail('resampled before refusing'))
  with pytest.raises(errors.UserError) as e:
    reg.register(register_lib.PairFiles(**files), str(tmp_path / 'out'))
  assert expect in _one_line(e)
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('case', ['no_overlap', 'memory', 'pyramid_factors', 'bare'])
def test_register_refuses_before_any_heavy_work(registrar, tmp_path, monkeypatch, case):
  files = _blob_pair(str(tmp_path))
  reg, expect = registrar, ''
  if case == 'no_overlap':
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = (500.0, 0.0, 0.0)
    files['moving'] = _save(tmp_path / 'far.nii.gz', np.ones((24, 24, 16), np.float32), far)
    files['moving_labels'] = None
    expect = 'does not overlap the fixed image'
  elif case == 'memory':
    avail = register_grid.RUNTIME_BYTES + (2 << 20)    # the 24 x 24 x 16 grid needs ~4 MiB
    monkeypatch.setattr(register_grid, 'available_memory_bytes', lambda: avail)
    expect = 'of host memory, '
  elif case == 'pyramid_factors':
    reg = copy.copy(registrar)
    reg.options = dataclasses.replace(registrar.options, pyramid_factors=(100, 100, 100))
    expect = '--pyramid-factors 100,100,100: '
  elif case == 'bare':
    files['fixed'] = _save(tmp_path / 'bare.nii.gz', np.ones((24, 24, 16), np.float32),
                           codes=(0, 0))
    files['fixed_labels'] = None
    expect = 'neither a qform nor an sform'
  monkeypatch.setattr(reg.reader, 'preprocess',
                      lambda *a, **k: pytest.fail('resampled before refusing'))
  with pytest.raises(errors.UserError) as e:
    reg.register(register_lib.PairFiles(**files), str(tmp_path / 'out'))
  text = _one_line(e)
  assert expect in text, text
  assert not os.path.exists(tmp_path / 'out')
  if case == 'memory':
    # The --spacing it names fits: planned again at that spacing, the estimate is within
    # the memory available (and the estimate it quotes is the one planned first).
    spacing = tuple(float(v) for v in text.split('--spacing ')[1].split(' ')[0].split(','))
    hdr = nifti.read_header(files['fixed'])
    opts = dataclasses.replace(reg.options, spacing_mm=spacing)
    factors = reg.factors_for(spacing)
    grid = register_grid.plan_grid(hdr, reg.reader, reg.reader_options, opts, factors,
                                   reg.levels, reg.train_spacings_mm)
    fits = register_grid.host_memory_bytes(
        grid.shape, hdr.shape, register_grid.feature_bytes_per_voxel(reg.backbone))
    assert fits <= avail and min(spacing) > 2.0
    first = register_grid.host_memory_bytes(
        (24, 24, 16), hdr.shape, register_grid.feature_bytes_per_voxel(reg.backbone))
    assert f'about {first / (1 << 30):.1f} GiB' in text


def test_cli_refusal_is_one_line_and_exit_2(tmp_path, capsys):
  files = _blob_pair(str(tmp_path))
  far = np.diag([2.0, 2.0, 2.0, 1.0])
  far[:3, 3] = (0.0, -300.0, 0.0)
  moving = _save(tmp_path / 'far.nii.gz', np.ones((24, 24, 16), np.float32), far)
  from fmir_jax import cli
  rc = cli.main(['register', '--fixed', files['fixed'], '--moving', moving,
                 '--out', str(tmp_path / 'out'), '--quiet'])
  err = capsys.readouterr().err
  assert rc == 2 and 'does not overlap' in err and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / 'out')
