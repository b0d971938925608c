"""Tests for fmir_jax.core.metrics and pair_metrics against closed forms and independent oracles."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from fmir_jax.core import metrics
from fmir_jax.core import pair_metrics
from tests.helpers import oracles

ACDC_SPACING = (1.8, 1.8, 10.0)


def _box(shape, lo, hi, value=1):
  out = np.zeros(shape, np.uint8)
  out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
  return out


def _identity_grid(shape):
  return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                              indexing="ij"), axis=-1)


# ----------------------------------------------------------------------------- Dice


def test_dice_of_offset_boxes_matches_closed_form():
  shape = (20, 18, 12)
  a = _box(shape, (2, 3, 1), (10, 11, 7))         # 8 x 8 x 6
  b = _box(shape, (5, 3, 2), (13, 11, 8))         # shifted by (3, 0, 1)
  overlap = 5 * 8 * 5
  expected = 2 * overlap / (8 * 8 * 6 + 8 * 8 * 6)
  got = metrics.dice_per_class(a, b, [1])
  assert got[1] == pytest.approx(expected, abs=1e-15)


def test_dice_nan_only_when_absent_from_both_and_mean_over_present():
  shape = (10, 10, 6)
  pred = _box(shape, (1, 1, 1), (5, 5, 3), 1) + _box(shape, (6, 6, 3), (9, 9, 5), 2)
  true = _box(shape, (1, 1, 1), (5, 5, 3), 1) + _box(shape, (0, 6, 0), (2, 9, 2), 3)
  got = metrics.dice_per_class(pred, true, [1, 2, 3, 4])
  assert got[1] == 1.0
  assert got[2] == 0.0          # only in pred
  assert got[3] == 0.0          # only in true
  assert math.isnan(got[4])     # in neither: not scored
  assert metrics.mean_dice(got) == pytest.approx(1.0 / 3.0)
  assert math.isnan(metrics.mean_dice({1: math.nan}))


def test_dice_rejects_mismatched_shapes_and_empty_classes():
  with pytest.raises(ValueError, match="same"):
    metrics.dice_per_class(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), [1])
  with pytest.raises(ValueError, match="classes is empty"):
    metrics.dice_per_class(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), [])


# ----------------------------------------------------------------------------- HD95


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["union", "max"])
def test_hd95_equals_brute_force_kdtree_oracle(seed, mode):
  rng = np.random.default_rng(seed)
  shape = (14, 12, 7)
  spacing = (1.8, 1.3, 10.0) if seed % 2 else (0.7, 2.0, 3.5)
  a = ndimage.binary_opening(rng.random(shape) < 0.55) | _box(shape, (3, 3, 2),
                                                               (6, 7, 4)).astype(bool)
  b = ndimage.binary_dilation(rng.random(shape) < 0.2)
  got = metrics.hd95(a, b, spacing, mode=mode)
  np.testing.assert_allclose(got, oracles.hd95(a, b, spacing, mode=mode), rtol=1e-12)
  assert got > 0


@pytest.mark.parametrize("mode", ["union", "max"])
def test_hd95_of_small_structures_anywhere_in_a_large_grid_equals_the_oracle(mode):
  """Structures far smaller than the grid, one inside, one across the grid's edge (whose
  voxels there are surface): the cropped computation equals the brute-force KD-tree."""
  rng = np.random.default_rng(7)
  shape, spacing = (60, 50, 30), (1.5, 1.2, 3.0)
  for corner_a, corner_b in (((20, 15, 10), (24, 18, 12)), ((0, 30, 20), (2, 33, 23)),
                             ((48, 0, 0), (50, 1, 3))):
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[tuple(slice(c, c + 10) for c in corner_a)] = True
    b[tuple(slice(c, c + 9) for c in corner_b)] = True
    a &= rng.random(shape) < 0.9
    b = ndimage.binary_closing(b | (a & (rng.random(shape) < 0.3)))
    got = metrics.hd95(a, b, spacing, mode=mode)
    np.testing.assert_allclose(got, oracles.hd95(a, b, spacing, mode=mode), rtol=1e-12)
    assert got > 0


def test_hd95_of_parallel_slabs_is_their_offset_in_mm_along_each_axis():
  shape = (9, 8, 7)
  for axis in range(3):
    for shift in (1, 3):
      a = np.zeros(shape, bool)
      b = np.zeros(shape, bool)
      np.moveaxis(a, axis, 0)[2] = True
      np.moveaxis(b, axis, 0)[2 + shift] = True
      got = metrics.hd95(a, b, ACDC_SPACING)
      assert got == pytest.approx(shift * ACDC_SPACING[axis], rel=1e-12)


@pytest.mark.parametrize("r_in,r_out", [(15.0, 27.0), (20.0, 40.0), (33.0, 61.0)])
def test_hd95_of_concentric_spheres_in_mm_under_anisotropic_spacing(r_in, r_out):
  # odd grid sizes: the common centre is a voxel centre, the outer sphere fits with margin
  shape = tuple(2 * math.ceil(r_out / s) + 3 for s in ACDC_SPACING)
  centre = (np.asarray(shape) - 1) / 2
  radius_mm = np.linalg.norm((_identity_grid(shape) - centre) * ACDC_SPACING, axis=-1)
  inner, outer = radius_mm <= r_in, radius_mm <= r_out
  # Every point of one sphere is exactly r_out - r_in from the other; voxelisation moves
  # surface voxels by less than a voxel. Allow two in-plane voxels (3.6 mm), well under
  # one slice (10 mm); ignoring the spacing is off by more than 5 mm on these shapes.
  for mode in ("union", "max"):
    got = metrics.hd95(inner, outer, ACDC_SPACING, mode=mode)
    assert abs(got - (r_out - r_in)) <= 2 * 1.8, (mode, got)
  assert abs(metrics.hd95(inner, outer, (1.0, 1.0, 1.0)) - (r_out - r_in)) > 5.0


def test_hd95_empty_mask_conventions():
  shape = (6, 5, 4)
  empty = np.zeros(shape, bool)
  full = _box(shape, (1, 1, 1), (3, 3, 3)).astype(bool)
  assert math.isnan(metrics.hd95(empty, empty, ACDC_SPACING))
  diagonal = math.sqrt((5 * 1.8) ** 2 + (4 * 1.8) ** 2 + (3 * 10.0) ** 2)
  assert metrics.hd95(full, empty, ACDC_SPACING) == pytest.approx(diagonal)
  assert metrics.hd95(empty, full, ACDC_SPACING) == pytest.approx(diagonal)
  assert metrics.hd95(full, full, ACDC_SPACING) == 0.0


def test_hd95_per_class_and_spacing_validation():
  shape = (12, 12, 6)
  a = _box(shape, (2, 2, 1), (6, 6, 3), 1) + _box(shape, (7, 7, 3), (10, 10, 5), 2)
  b = _box(shape, (3, 2, 1), (7, 6, 3), 1) + _box(shape, (7, 7, 3), (10, 10, 5), 2)
  got = metrics.hd95_per_class(a, b, [1, 2, 3], ACDC_SPACING)
  assert got[1] == pytest.approx(oracles.hd95(a == 1, b == 1, ACDC_SPACING), rel=1e-12)
  assert got[2] == 0.0
  assert math.isnan(got[3])
  with pytest.raises(ValueError, match="spacing_mm"):
    metrics.hd95_per_class(a, b, [1], (1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match="mode"):
    metrics.hd95(a == 1, b == 1, ACDC_SPACING, mode="mean")


# ----------------------------------------------------------------------------- Jacobian


def _affine_disp(shape, a):
  x = _identity_grid(shape)
  return x @ (np.asarray(a) - np.eye(3)).T          # u(x) = (A - I) x


def test_jacobian_of_affine_field_is_det_a_everywhere():
  a = np.array([[1.2, 0.3, -0.1], [0.05, 0.9, 0.2], [-0.2, 0.1, 1.1]])
  jac_det = metrics.jacobian_determinant(_affine_disp((9, 8, 7), a))
  assert jac_det.shape == (9, 8, 7)
  np.testing.assert_allclose(jac_det, np.linalg.det(a), rtol=1e-12)
  np.testing.assert_allclose(metrics.jacobian_matrix(_affine_disp((5, 5, 5), a)),
                             np.broadcast_to(a, (5, 5, 5, 3, 3)), rtol=1e-12, atol=1e-12)


def test_sdlogj_and_folding_of_affine_field_are_zero():
  a = np.diag([1.1, 0.95, 1.05])
  disp = _affine_disp((10, 9, 8), a)
  assert metrics.sdlogj(disp) == pytest.approx(0.0, abs=1e-12)
  assert metrics.std_log_jacdet(disp) == pytest.approx(0.0, abs=1e-12)
  assert metrics.folding_fraction(disp) == 0.0


def _quadratic_disp_and_jacobian(shape, c):
  """u quadratic in x: central differences are exact, so J is known in closed form."""
  x, y, z = np.moveaxis(_identity_grid(shape), -1, 0)
  u = np.stack([c[0] * y * y + c[1] * x * z,
                c[2] * x * y + c[3] * z * z,
                c[4] * x * x + c[5] * y * z], axis=-1)
  jac = np.empty(shape + (3, 3))
  jac[..., 0, :] = np.stack([1 + c[1] * z, 2 * c[0] * y, c[1] * x], -1)
  jac[..., 1, :] = np.stack([c[2] * y, 1 + c[2] * x, 2 * c[3] * z], -1)
  jac[..., 2, :] = np.stack([2 * c[4] * x, c[5] * z, 1 + c[5] * y], -1)
  return u, np.linalg.det(jac)


def test_sdlogj_of_nonuniform_field_matches_direct_computation():
  shape = (12, 11, 10)
  u, det_true = _quadratic_disp_and_jacobian(shape, [0.004, 0.006, -0.005, 0.003, 0.002,
                                                     -0.007])
  det = metrics.jacobian_determinant(u)
  np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], det_true[1:-1, 1:-1, 1:-1], rtol=1e-12)
  inner = det_true[2:-2, 2:-2, 2:-2]
  expected = np.std(np.log(np.clip(inner + 3.0, 1e-9, 1e9)))
  assert expected > 1e-3
  assert metrics.sdlogj(u) == pytest.approx(expected, rel=1e-10)
  assert metrics.std_log_jacdet(u) == pytest.approx(np.std(np.log(inner)), rel=1e-10)
  # the +3 of Learn2Reg shrinks the statistic about 4x near J = 1
  assert 3.0 < metrics.std_log_jacdet(u) / metrics.sdlogj(u) < 5.0


def test_jacobian_matches_learn2reg_style_correlate_oracle_after_crop():
  rng = np.random.default_rng(3)
  disp = ndimage.gaussian_filter(rng.normal(size=(12, 10, 9, 3)), (1, 1, 1, 0)) * 3
  det_oracle = oracles.jacobian_det(disp, edges="zero")[2:-2, 2:-2, 2:-2]
  got = metrics.crop_border(metrics.jacobian_determinant(disp))
  np.testing.assert_allclose(got, det_oracle, rtol=1e-10, atol=1e-12)
  expected = np.std(np.log(np.clip(det_oracle + 3, 1e-9, 1e9)))
  assert metrics.sdlogj(disp) == pytest.approx(expected, rel=1e-10)


def test_folding_fraction_of_a_known_folded_plane():
  shape = (16, 9, 8)
  disp = np.zeros(shape + (3,))
  disp[10, :, :, 0] = 3.0   # J[9] = 1 + 3/2, J[11] = 1 - 3/2 < 0: one folded plane
  det = metrics.jacobian_determinant(disp)
  assert np.all(det[11] == -0.5) and np.all(det[9] == 2.5)
  assert metrics.folding_fraction(disp) == pytest.approx(1 / (shape[0] - 4))
  assert metrics.folding_fraction(disp, crop=0) == pytest.approx(1 / shape[0])
  # log(clip(J)) of the folded plane is log(1e-9); log(J + 3) stays finite
  assert metrics.std_log_jacdet(disp) > 5.0 > 1.0 > metrics.sdlogj(disp)


def test_jacobian_input_validation():
  with pytest.raises(ValueError, match=r"\(H, W, D, 3\)"):
    metrics.jacobian_determinant(np.zeros((4, 4, 4, 2)))
  with pytest.raises(ValueError, match="crop"):
    metrics.sdlogj(np.zeros((4, 8, 8, 3)))
  with pytest.raises(ValueError, match="NaN"):
    metrics.sdlogj(np.full((6, 6, 6, 3), np.nan))


# ----------------------------------------------------------------------------- per pair


def test_evaluate_pair_with_a_shift_that_realigns_the_labels():
  shape = (16, 14, 10)
  fixed = _box(shape, (3, 3, 2), (9, 10, 6), 1) + _box(shape, (10, 3, 3), (13, 8, 7), 2)
  moving = np.zeros_like(fixed)
  moving[2:, :, :] = fixed[:-2, :, :]                 # moving(x + 2 e0) = fixed(x)
  moving[1, 1, 1] = 4                                 # class 4 absent from fixed
  disp = np.zeros(shape + (3,))
  disp[..., 0] = 2.0
  got = pair_metrics.evaluate_pair(disp, moving, fixed, [1, 2, 3, 4], ACDC_SPACING,
                              oracles.warp_nearest, moving="b", fixed="a", subject="s1",
                              time_s=0.5)
  assert got.dice[1] == 1.0 and got.dice[2] == 1.0
  assert math.isnan(got.dice[3]) and math.isnan(got.dice[4])
  assert got.dice_mean == 1.0 and got.hd95_mean == 0.0
  # identity: boxes of 6 and 3 voxels along axis 0 shifted by 2 voxels
  assert got.initial_dice[1] == pytest.approx(4 / 6)
  assert got.initial_dice[2] == pytest.approx(1 / 3)
  assert got.initial_dice_mean == pytest.approx((4 / 6 + 1 / 3) / 2)
  for c in (1, 2):
    assert got.initial_hd95[c] == pytest.approx(
        oracles.hd95(moving == c, fixed == c, ACDC_SPACING), rel=1e-12)
  assert got.sdlogj == 0.0 and got.folding_fraction == 0.0 and got.time_s == 0.5
  row = got.to_row()
  assert row["dice_1"] == 1.0 and row["initial_dice_2"] == pytest.approx(1 / 3)
  assert row["moving"] == "b" and math.isnan(row["hd95_4"])


def test_evaluate_pair_rejects_bad_warp_output_and_grid_mismatch():
  shape = (8, 8, 6)
  lab = _box(shape, (2, 2, 2), (5, 5, 4))
  disp = np.zeros(shape + (3,))
  with pytest.raises(ValueError, match="warp_labels_fn"):
    pair_metrics.evaluate_pair(disp, lab, lab, [1], ACDC_SPACING, lambda m, d: m[:-1])
  with pytest.raises(ValueError, match="fixed grid"):
    pair_metrics.evaluate_pair(disp[:-1], lab, lab, [1], ACDC_SPACING, oracles.warp_nearest)


def _fake(moving, fixed, subject, dice, hd, sdlogj, time_s=1.0):
  classes = (1, 2)
  return pair_metrics.PairMetrics(
      moving=moving, fixed=fixed, subject=subject, classes=classes,
      dice=dict(zip(classes, dice)), dice_mean=metrics.nanmean(dice),
      hd95=dict(zip(classes, hd)), hd95_mean=metrics.nanmean(hd),
      initial_dice=dict(zip(classes, dice)), initial_dice_mean=metrics.nanmean(dice),
      initial_hd95=dict(zip(classes, hd)), initial_hd95_mean=metrics.nanmean(hd),
      sdlogj=sdlogj, std_log_jacdet=4 * sdlogj, folding_fraction=0.0, time_s=time_s)


def test_aggregate_means_stds_and_per_class_nan_skipping():
  pairs = [_fake("a", "b", "s1", [0.8, 0.6], [3.0, 5.0], 0.04),
           _fake("c", "d", "s2", [0.9, math.nan], [2.0, math.nan], 0.05),
           _fake("e", "f", "s3", [0.5, 0.7], [6.0, 4.0], 0.06, time_s=math.nan)]
  summary = pair_metrics.aggregate(pairs)
  assert summary["n_pairs"] == 3 and summary["classes"] == [1, 2]
  means = [0.7, 0.9, 0.6]
  assert summary["metrics"]["dice_mean"]["mean"] == pytest.approx(np.mean(means))
  assert summary["metrics"]["dice_mean"]["std"] == pytest.approx(np.std(means, ddof=1))
  assert summary["metrics"]["sdlogj"]["mean"] == pytest.approx(0.05)
  assert summary["metrics"]["time_s"] == {"mean": 1.0, "std": 0.0, "n": 2}
  assert summary["per_class"]["dice"]["2"]["mean"] == pytest.approx(0.65)
  assert summary["per_class"]["dice"]["2"]["n"] == 2
  assert summary["per_class"]["hd95"]["1"]["std"] == pytest.approx(np.std([3, 2, 6],
                                                                          ddof=1))
  with pytest.raises(ValueError, match="no PairMetrics"):
    pair_metrics.aggregate([])


def test_bidirectional_average_per_subject_then_over_subjects():
  pairs = [_fake("p1_ed", "p1_es", "p1", [0.8, 0.6], [3.0, 5.0], 0.04),
           _fake("p2_ed", "p2_es", "p2", [0.9, 0.5], [2.0, 6.0], 0.02),
           _fake("p1_es", "p1_ed", "p1", [0.6, 0.4], [5.0, 7.0], 0.06),
           _fake("p2_es", "p2_ed", "p2", [0.7, 0.9], [4.0, 2.0], 0.08)]
  per_subject = pair_metrics.average_bidirectional(pairs)
  assert [m.subject for m in per_subject] == ["p1", "p2"]
  assert all(m.bidirectional for m in per_subject)
  assert per_subject[0].dice == {1: pytest.approx(0.7), 2: pytest.approx(0.5)}
  subject_means = [(0.7 + 0.5) / 2, (0.8 + 0.7) / 2]
  summary = pair_metrics.aggregate_bidirectional(pairs)
  assert summary["n_pairs"] == 2
  assert summary["metrics"]["dice_mean"]["mean"] == pytest.approx(np.mean(subject_means))
  assert summary["metrics"]["dice_mean"]["std"] == pytest.approx(
      np.std(subject_means, ddof=1))
  assert summary["metrics"]["sdlogj"]["mean"] == pytest.approx(0.05)
  with pytest.raises(ValueError, match="reverse"):
    pair_metrics.average_bidirectional(pairs[:3])


def test_metrics_module_imports_without_jax_or_torch():
  code = ("import sys, fmir_jax.core.metrics; "
          "bad = [m for m in ('jax', 'torch') if m in sys.modules]; "
          "sys.exit(1 if bad else 0)")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0
