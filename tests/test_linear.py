"""The linear stage (register/linear.py) against closed forms and scipy: a moving image made
by ``scipy.ndimage.affine_transform`` from the fixed one under a known map is aligned back
to within half a millimetre over the body."""
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

import jax.numpy as jnp

from fmir_jax.register import linear

SHAPE = (40, 36, 32)
AFFINE = np.array([[2.0, 0, 0, -40], [0, 2.2, 0, -38], [0, 0, 2.5, -30], [0, 0, 0, 1]])


def _phantom():
  """A body (ellipsoid) holding three blobs of other brightness, nothing symmetric."""
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij'), -1)
  p = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
  body = ((p / [26.0, 22.0, 20.0]) ** 2).sum(-1) < 1
  img = 0.4 * body
  for c, r, v in (((8, -6, 4), 7.0, 0.5), ((-10, 8, -5), 5.0, 0.35), ((2, 10, 8), 4.0, -0.3)):
    img = img + v * np.exp(-((p - c) ** 2).sum(-1) / (2 * r ** 2))
  return ndimage.gaussian_filter(np.clip(img, 0, 1), 0.7).astype(np.float32), body


def _known_map(angles_deg, shift_mm, scales=(1, 1, 1)):
  """4x4 fixed -> moving world map about the grid's centre."""
  m = Rotation.from_euler('xyz', angles_deg, degrees=True).as_matrix() @ np.diag(scales)
  c = AFFINE[:3, :3] @ (np.array(SHAPE) - 1) / 2 + AFFINE[:3, 3]
  out = np.eye(4)
  out[:3, :3], out[:3, 3] = m, c + np.asarray(shift_mm) - m @ c
  return out


def _moving(fixed, t_mm):
  """moving(z) = fixed(T^-1 z): scipy's affine_transform in the grid's voxels."""
  vox = np.linalg.inv(AFFINE) @ np.linalg.inv(t_mm) @ AFFINE
  return ndimage.affine_transform(fixed, vox[:3, :3], vox[:3, 3], order=3).astype(np.float32)


def _rms_mm(a, b, mask):
  idx = np.argwhere(mask)
  p = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
  d = (p @ a[:3, :3].T + a[:3, 3]) - (p @ b[:3, :3].T + b[:3, 3])
  return float(np.sqrt((d ** 2).sum(-1).mean()))


def test_the_map_of_its_parameters_is_closed_form():
  centre = jnp.array([3.0, -2.0, 5.0])
  assert np.allclose(linear.matrix_mm(jnp.zeros(12), centre, jnp.eye(3)), np.eye(4), atol=1e-6)
  params = np.zeros(12, np.float32)
  params[:3], params[3:6] = (1.0, 2.0, -3.0), np.radians([5.0, -7.0, 9.0])
  t = np.asarray(linear.matrix_mm(jnp.asarray(params), centre, jnp.eye(3)))
  want = Rotation.from_euler('xyz', [5.0, -7.0, 9.0], degrees=True).as_matrix()
  np.testing.assert_allclose(t[:3, :3], want, atol=1e-6)
  np.testing.assert_allclose(t[:3, :3] @ centre + t[:3, 3], centre + params[:3], atol=1e-5)
  assert np.allclose(linear._euler_deg(want), (5.0, -7.0, 9.0), atol=1e-4)


def test_start_rotations_are_proper_and_take_axes_onto_axes():
  rng = np.random.default_rng(0)
  a = np.linalg.qr(rng.normal(size=(3, 3)))[0]
  b = Rotation.from_euler('z', 40, degrees=True).as_matrix() @ a
  rots = linear.start_rotations(a, b)
  assert rots.shape == (5, 3, 3) and np.allclose(rots[0], np.eye(3))
  for r in rots[1:]:
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-5) and np.linalg.det(r) == pytest.approx(1, abs=1e-5)
    assert np.allclose(np.abs(r @ a), np.abs(b), atol=1e-5)   # each axis onto one, up to sign


@pytest.mark.parametrize('kind, angles, shift, scales', [
    ('affine', (6.0, -8.0, 10.0), (5.0, -7.0, 4.0), (1.06, 0.95, 1.03)),
    ('rigid', (-9.0, 5.0, -7.0), (-8.0, 6.0, -5.0), (1.0, 1.0, 1.0)),
])
def test_a_known_map_is_recovered_to_half_a_millimetre(kind, angles, shift, scales):
  fixed, body = _phantom()
  truth = _known_map(angles, shift, scales)
  moving = _moving(fixed, truth)
  aligner = linear.LinearAligner(linear.LinearOptions(kind=kind))
  found, rec = aligner.align(moving, fixed, AFFINE)
  before = _rms_mm(np.eye(4), truth, body)
  after = _rms_mm(found, truth, body)
  assert before > 8.0 and after < 0.5, (before, after, rec)
  assert rec.loss_after[0] < rec.loss_start and rec.loss_after[-1] <= rec.loss_before[-1]
  if kind == 'rigid':
    np.testing.assert_allclose(rec.scale, 1.0)
    np.testing.assert_allclose(rec.shear, 0.0)
  # a second pair of the same grid runs the compiled programs again
  compiles = aligner.compiles
  aligner.align(fixed, moving, AFFINE)
  assert aligner.compiles == compiles


def test_mutual_information_is_numpys_histogram_where_the_bins_are_hard():
  from fmir_jax.ops import losses
  rng = np.random.default_rng(3)
  a = rng.integers(0, 8, 4000).astype(np.float32)           # values on the 8 bin centres
  b = np.where(rng.random(4000) < 0.7, (a * 3) % 8, rng.integers(0, 8, 4000)).astype(np.float32)
  w = rng.random(4000).astype(np.float32)
  joint = np.histogram2d(a, b, bins=8, range=[[-0.5, 7.5]] * 2, weights=w)[0]
  p = joint / joint.sum()
  pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
  want = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / (pa * pb)), 0))
  got = float(losses.mutual_information(a, b, w, bins=8, sigma_bins=0.05))
  assert got == pytest.approx(want, rel=1e-4) and want > 0.3
  # an intensity map that is invertible keeps it (a relabelling of b's bins)
  assert float(losses.mutual_information(a, 7 - b, w, bins=8, sigma_bins=0.05)) == \
      pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_mutual_information_aligns_a_contrast_correlation_cannot():
  fixed, body = _phantom()
  truth = _known_map((5.0, -6.0, 7.0), (4.0, -5.0, 3.0), (1.04, 0.96, 1.02))
  moving = _moving(np.square(fixed - 0.4), truth)          # not monotone: tissue goes dark
  found = {}
  for sim in linear.SIMILARITIES:                   # the moving grid's edge weighted out, as
    aligner = linear.LinearAligner(linear.LinearOptions(similarity=sim))   # the registrar
    fov = aligner.field_of_view(np.ones(SHAPE, np.float32), (2.0, 2.2, 2.5), moving=True)
    found[sim] = aligner.align(moving, fixed, AFFINE, moving_mask=fov)[0]
  errors = {k: _rms_mm(v, truth, body) for k, v in found.items()}
  assert errors['mi'] < 1.5 and errors['correlation'] > 5.0, errors


def test_the_field_of_view_weight_leaves_out_one_coarsest_voxel_of_its_edge():
  aligner = linear.LinearAligner()
  fov = np.zeros(SHAPE, np.float32)
  fov[5:35, :, 4:] = 1.0
  fov[4] = 0.5                                               # a soft edge counts as outside
  shapes = aligner._plan(SHAPE, (2.0, 2.2, 2.5))[0]
  r = [int(np.ceil(n / c)) for n, c in zip(SHAPE, shapes[-1])]
  want = np.zeros(SHAPE, bool)
  want[5 + r[0]:35 - r[0], r[1]:SHAPE[1] - r[1], 4 + r[2]:SHAPE[2] - r[2]] = True
  got = aligner.field_of_view(fov, (2.0, 2.2, 2.5), moving=True)
  assert max(r) > 1 and np.array_equal(got > 0, want)
  want = np.zeros(SHAPE, bool)                              # the fixed grid's faces stay
  want[5 + r[0]:35 - r[0], :, 4 + r[2]:] = True
  got = aligner.field_of_view(fov, (2.0, 2.2, 2.5), moving=False)
  assert np.array_equal(got > 0, want)


@pytest.mark.slow
def test_masks_keep_a_static_table_out_of_the_alignment():
  """A bright table that does not move with the body (the same in both scans) pulls the
  unmasked alignment off; a body mask on either side (or both) recovers the known map."""
  fixed, body = _phantom()
  truth = _known_map((5.0, -6.0, 8.0), (4.0, 5.0, -3.0), (1.04, 0.97, 1.02))
  moving = _moving(fixed, truth)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij'), -1)
  y_mm = (idx @ AFFINE[:3, :3].T + AFFINE[:3, 3])[..., 1]
  table = ndimage.gaussian_filter(((y_mm > -37) & (y_mm < -30)).astype(np.float32), 0.7)
  fixed_t, moving_t = np.maximum(fixed, table), np.maximum(moving, table)
  fmask = ndimage.binary_dilation(body, iterations=3).astype(np.float32)
  mmask = ndimage.binary_dilation(_moving(body.astype(np.float32), truth) > 0.5,
                                  iterations=3).astype(np.float32)
  aligner = linear.LinearAligner()
  assert _rms_mm(aligner.align(moving_t, fixed_t, AFFINE)[0], truth, body) > 2.0
  for masks in ({'fixed_mask': fmask}, {'moving_mask': mmask},
                {'fixed_mask': fmask, 'moving_mask': mmask}):
    found = aligner.align(moving_t, fixed_t, AFFINE, **masks)[0]
    assert _rms_mm(found, truth, body) < 0.5, masks
  with pytest.raises(ValueError, match='moving_mask'):
    aligner.align(moving_t, fixed_t, AFFINE, moving_mask=fmask[:-1])


def test_the_bench_prints_its_figures(capsys):
  import json
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'bench'))
  import linear_bench
  assert linear_bench.main(['--pairs', '1', '--shape', '24,28,24', '--spacing', '4',
                            '--kind', 'rigid']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['pairs'] == 1 and out['error_mm_max'] < 1.0 < out['rows'][0]['before_mm']


def test_each_scale_takes_at_most_its_share_of_voxel_steps():
  """The plan of an 80x96x80 grid at 2 mm: the full grid is over max_voxels (left out);
  the two coarser scales keep min(steps, max_voxel_steps // voxels) Adam steps."""
  aligner = linear.LinearAligner()
  shapes, _, steps, lrs = aligner._plan((80, 96, 80), (2.0, 2.0, 2.0))
  assert shapes == ((80, 96, 80), (40, 48, 40), (20, 24, 20))
  opts = aligner.options
  assert steps == (min(opts.steps[0], opts.max_voxel_steps // (20 * 24 * 20)),
                   min(opts.steps[1], opts.max_voxel_steps // (40 * 48 * 40)))
  assert steps[1] < opts.steps[1] and lrs == opts.lr[:2]


@pytest.mark.slow
def test_the_shape_penalty_pulls_a_true_anisotropic_scale_towards_a_common_one():
  """A known affine with per-axis scales 1.08, 0.93, 1.0: a weight of 0 recovers it; the
  default weight recovers scales closer to their common value."""
  fixed, body = _phantom()
  scales = np.array([1.08, 0.93, 1.0])
  truth = _known_map((3.0, -2.0, 4.0), (2.0, -3.0, 1.0), scales)
  moving = _moving(fixed, truth)
  spread = {}
  for w in (0.0, 1.0):
    found, rec = linear.LinearAligner(linear.LinearOptions(shape_weight=w)).align(
        moving, fixed, AFFINE)
    spread[w] = np.ptp(np.log(rec.scale))
    assert rec.shape_weight == w                   # report.json's linear record says it
    if w == 0.0:
      assert _rms_mm(found, truth, body) < 0.3
      np.testing.assert_allclose(rec.scale, scales, atol=0.01)
  assert spread[1.0] < 0.8 * spread[0.0], spread


def test_fmir_register_parses_linear_shape_weight_and_refuses_a_negative_one():
  from fmir_jax import cli
  from fmir_jax.core.errors import RegisterError
  from fmir_jax.register import registrar
  args = cli.build_parser().parse_args(['register', '--fixed', 'f.nii.gz', '--moving',
                                        'm.nii.gz', '--out', 'o', '--linear-shape-weight',
                                        '0.1'])
  assert cli.register_options(args).linear_shape_weight == 0.1
  with pytest.raises(RegisterError, match='--linear-shape-weight -1.0: use a number >= 0'):
    registrar.Registrar('no_such_run', registrar.RegisterOptions(linear_shape_weight=-1.0))
