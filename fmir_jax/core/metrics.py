"""Registration metrics with Learn2Reg conventions (numpy + scipy only, no jax).

Conventions (paper §3.1; Learn2Reg):
  * Volumes are (H, W, D) in NIfTI voxel order; label volumes hold integer class ids,
    0 = background.
  * Displacements ``disp_vox`` are (H, W, D, 3) in voxels of the fixed grid, component k
    along array axis k; the warped moving image is ``moving(x + u(x))``.
  * ``spacing_mm`` is the voxel size of the fixed grid along each array axis, in mm.
  * Dice values are fractions in [0, 1] (reports multiply by 100), HD95 is in mm.

Per-class NaN means "not scored", never "zero": means over classes and over pairs skip
NaN ("mean over classes present", as the Learn2Reg evaluation script does with
``np.nanmean``).

Reference implementation followed: the Learn2Reg evaluation script
(github.com/MDL-UzL/L2R, ``evaluation/evaluation.py`` and ``evaluation/utils.py``):
  * a class is scored only when present in both the fixed and the moving labels
    (otherwise NaN), the score is computed between fixed and warped moving labels;
  * the Jacobian is built from central differences ([-0.5, 0, 0.5]) of the voxel
    displacement, a 2-voxel border is cropped, and
    SDlogJ = std(log(clip(J + 3, 1e-9, 1e9))).
Deliberate difference: that script calls DeepMind ``surface-distance`` with spacing
``np.ones(3)`` (HD95 in voxels); the paper and Learn2Reg report mm, so `hd95` takes
``spacing_mm`` (see `hd95` for the symmetric variant).

Per-pair records and their aggregation over pairs live in `fmir_jax.core.pair_metrics`; the
input checks below (``as_*``) are shared with it.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage

# Learn2Reg crops this many voxels from every face before SDlogJ statistics.
BORDER_CROP_VOX = 2
# Learn2Reg adds 3 to the Jacobian determinant before the log (keeps log finite for
# mildly folded fields; it also shrinks the statistic, see `sdlogj`).
L2R_JACDET_OFFSET = 3.0
LOG_CLIP = (1e-9, 1e9)

HdMode = Literal["union", "max"]


# --------------------------------------------------------------------------- checks


def as_labels(name: str, labels: np.ndarray) -> np.ndarray:
  """An (H, W, D) volume of integer class ids (any dtype holding whole numbers), or a
  ValueError naming ``name``."""
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"{name}: expected a label volume of shape (H, W, D), got shape "
                     f"{labels.shape}.")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(f"{name}: labels must be integer class ids, got non-integer values "
                       f"(dtype {labels.dtype}); round or cast the label volume first.")
  return labels


def check_same_shape(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
  """A ValueError naming both arrays unless they have one shape (the fixed grid)."""
  if a.shape != b.shape:
    raise ValueError(f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; "
                     "both must live on the same (fixed) grid.")


def as_spacing(spacing_mm: Sequence[float], ndim: int = 3) -> np.ndarray:
  """(ndim,) float64 positive finite voxel sizes in mm, one per array axis."""
  spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
  if spacing.shape != (ndim,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"spacing_mm must be {ndim} positive finite voxel sizes in mm (one per "
                     f"array axis), got {spacing_mm!r}.")
  return spacing


def as_classes(classes: Sequence[int]) -> tuple[int, ...]:
  """Foreground class ids as a non-empty tuple of distinct ints."""
  out = tuple(int(c) for c in classes)
  if not out:
    raise ValueError("classes is empty: pass the foreground class ids to score, "
                     "e.g. (1, 2, 3) for ACDC.")
  if len(set(out)) != len(out):
    raise ValueError(f"classes contains duplicates: {classes!r}.")
  return out


def as_disp(disp_vox: np.ndarray, name: str = "disp_vox") -> np.ndarray:
  """Validates a displacement field; ``name`` says in messages which field (which pair or
  file) it is."""
  disp = np.asarray(disp_vox)
  if disp.ndim != 4 or disp.shape[-1] != 3:
    raise ValueError(f"disp_vox: expected shape (H, W, D, 3) (voxels, component k along "
                     f"axis k), got {disp.shape}. Squeeze the batch axis / move the vector "
                     "axis last.")
  if min(disp.shape[:3]) < 2:
    raise ValueError(f"disp_vox: every spatial axis needs >= 2 voxels for finite "
                     f"differences, got {disp.shape[:3]}.")
  bad = ~np.isfinite(disp)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0][:3])
    raise ValueError(f"{name} contains NaN or inf ({int(bad.sum())} of {disp.size} values, "
                     f"first at voxel {first}).")
  return disp


def nanmean(values: Sequence[float] | np.ndarray) -> float:
  """Mean over finite entries; NaN (without a RuntimeWarning) when there are none."""
  arr = np.asarray(values, dtype=np.float64).reshape(-1)
  arr = arr[~np.isnan(arr)]
  return float(arr.mean()) if arr.size else math.nan


# --------------------------------------------------------------------------- Dice


def dice_score(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
  """Dice 2|A∩B| / (|A| + |B|) of two boolean masks; NaN when both are empty."""
  pred_mask = np.asarray(pred_mask, dtype=bool)
  true_mask = np.asarray(true_mask, dtype=bool)
  check_same_shape("pred_mask", pred_mask, "true_mask", true_mask)
  total = int(pred_mask.sum()) + int(true_mask.sum())
  if total == 0:
    return math.nan
  return 2.0 * int(np.logical_and(pred_mask, true_mask).sum()) / total


def dice_per_class(pred_labels: np.ndarray, true_labels: np.ndarray,
                   classes: Sequence[int]) -> dict[int, float]:
  """Dice per class between two (H, W, D) label volumes.

  Returns {class id: Dice in [0, 1]}. A class absent from both volumes gets NaN (not
  scored); a class present in only one gets 0.
  """
  pred = as_labels("pred_labels", pred_labels)
  true = as_labels("true_labels", true_labels)
  check_same_shape("pred_labels", pred, "true_labels", true)
  return {c: dice_score(pred == c, true == c) for c in as_classes(classes)}


def mean_dice(dice: Mapping[int, float]) -> float:
  """Mean over the classes present (NaN entries skipped); NaN if none is present."""
  return nanmean(list(dice.values()))


# --------------------------------------------------------------------------- HD95


def surface_mask(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
  """Surface voxels of a boolean mask: ``mask XOR erode(mask)``.

  The erosion uses ``generate_binary_structure(ndim, connectivity)``: connectivity 1 is
  the 6-neighbourhood in 3D (a voxel is on the surface when one of its 6 face
  neighbours is outside), 3 is the 26-neighbourhood. Outside the array counts as
  background, so mask voxels on the array border are surface voxels.
  """
  mask = np.asarray(mask, dtype=bool)
  structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def directed_surface_distances(from_surface: np.ndarray, to_surface: np.ndarray,
                               spacing_mm: Sequence[float]) -> np.ndarray:
  """Distance in mm from each voxel of ``from_surface`` to the nearest of ``to_surface``.

  Exact Euclidean distance transform (scipy ``distance_transform_edt``) with
  ``sampling=spacing_mm``. Returns a 1-D array with one entry per ``from_surface`` voxel
  (C order). ``to_surface`` must not be empty.
  """
  if not np.any(to_surface):
    raise ValueError("directed_surface_distances: to_surface is empty.")
  spacing = as_spacing(spacing_mm, np.ndim(to_surface))
  dist = ndimage.distance_transform_edt(~np.asarray(to_surface, dtype=bool),
                                        sampling=spacing)
  return dist[np.asarray(from_surface, dtype=bool)]


def grid_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
  """Largest distance between two voxel centres of the grid, in mm."""
  spacing = as_spacing(spacing_mm, len(shape))
  return float(np.linalg.norm((np.asarray(shape, dtype=np.float64) - 1.0) * spacing))


def hd95(pred_mask: np.ndarray, true_mask: np.ndarray, spacing_mm: Sequence[float], *,
         percentile: float = 95.0, connectivity: int = 1, mode: HdMode = "union") -> float:
  """Robust (95th percentile) symmetric Hausdorff distance between two masks, in mm.

  Surfaces come from `surface_mask` (6-connectivity by default), distances from the exact
  EDT with voxel ``spacing_mm`` (`directed_surface_distances`). Two symmetric variants:

  * ``mode="union"`` (default): percentile of the union of both directed distance sets.
    This is ``medpy.metric.binary.hd95`` (same surface definition, same EDT, connectivity
    1), the implementation used by most ACDC / abdomen registration papers.
  * ``mode="max"``: max of the two directed percentiles, as in MONAI
    ``compute_hausdorff_distance(percentile=95)`` and DeepMind ``surface-distance``
    ``compute_robust_hausdorff`` (which the Learn2Reg script calls; note it additionally
    weights surface elements by area, which we do not).

  Empty masks: NaN when both are empty (not scored); when exactly one is empty the
  distance is undefined, and we return the grid diagonal (`grid_diagonal_mm`), the
  largest distance possible on the grid, so that a class erased by the warp is penalised
  instead of dropped.
  """
  if mode not in ("union", "max"):
    raise ValueError(f"hd95: mode must be 'union' or 'max', got {mode!r}.")
  if not 0.0 <= percentile <= 100.0:
    raise ValueError(f"hd95: percentile must be in [0, 100], got {percentile}.")
  pred_mask = np.asarray(pred_mask, dtype=bool)
  true_mask = np.asarray(true_mask, dtype=bool)
  check_same_shape("pred_mask", pred_mask, "true_mask", true_mask)
  spacing = as_spacing(spacing_mm, pred_mask.ndim)
  has_pred, has_true = bool(pred_mask.any()), bool(true_mask.any())
  if not has_pred and not has_true:
    return math.nan
  if has_pred != has_true:
    return grid_diagonal_mm(pred_mask.shape, spacing)
  # Both masks cropped to their joint bounding box: the same surfaces (a voxel on the box's
  # face has no mask beyond it, so it is surface either way) and the same distances (every
  # surface voxel is in the box), at the cost of the structures' size, not the grid's.
  box = ndimage.find_objects((pred_mask | true_mask).astype(np.uint8))[0]
  pred_surf = surface_mask(pred_mask[box], connectivity)
  true_surf = surface_mask(true_mask[box], connectivity)
  d_pt = directed_surface_distances(pred_surf, true_surf, spacing)
  d_tp = directed_surface_distances(true_surf, pred_surf, spacing)
  if mode == "union":
    return float(np.percentile(np.concatenate([d_pt, d_tp]), percentile))
  return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def hd95_per_class(pred_labels: np.ndarray, true_labels: np.ndarray,
                   classes: Sequence[int], spacing_mm: Sequence[float], *,
                   connectivity: int = 1, mode: HdMode = "union") -> dict[int, float]:
  """`hd95` per class between two (H, W, D) label volumes: {class id: mm}."""
  pred = as_labels("pred_labels", pred_labels)
  true = as_labels("true_labels", true_labels)
  check_same_shape("pred_labels", pred, "true_labels", true)
  spacing = as_spacing(spacing_mm)
  return {c: hd95(pred == c, true == c, spacing, connectivity=connectivity, mode=mode)
          for c in as_classes(classes)}


# --------------------------------------------------------------------------- Jacobian


def jacobian_matrix(disp_vox: np.ndarray, name: str = "disp_vox") -> np.ndarray:
  """Jacobian of x -> x + u(x): (H, W, D, 3, 3), entry [..., i, j] = δij + ∂u_i/∂x_j.

  Derivatives per voxel (unit grid spacing) by ``np.gradient``: central differences
  inside, one-sided first-order differences on the outermost voxels. The determinant is
  the same in voxel or mm units (a diagonal rescaling cancels), so no spacing is needed.
  ``name`` names the field in error messages (e.g. the pair or file it belongs to).
  """
  disp = as_disp(disp_vox, name).astype(np.float64, copy=False)
  jac = np.empty(disp.shape[:3] + (3, 3), dtype=np.float64)
  for i in range(3):
    for j, grad in enumerate(np.gradient(disp[..., i], axis=(0, 1, 2))):
      jac[..., i, j] = grad + (1.0 if i == j else 0.0)
  return jac


def jacobian_determinant(disp_vox: np.ndarray, name: str = "disp_vox") -> np.ndarray:
  """det(I + ∇u) per voxel: (H, W, D, 3) voxel displacement -> (H, W, D) float64."""
  j = jacobian_matrix(disp_vox, name)
  return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
          - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
          + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def crop_border(volume: np.ndarray, crop: int = BORDER_CROP_VOX) -> np.ndarray:
  """Remove ``crop`` voxels from both ends of the three spatial (first) axes."""
  if crop < 0:
    raise ValueError(f"crop must be >= 0, got {crop}.")
  if crop == 0:
    return volume
  if min(volume.shape[:3]) <= 2 * crop:
    raise ValueError(f"Cannot crop {crop} voxels from each face of a volume of shape "
                     f"{volume.shape[:3]}: every axis needs more than {2 * crop} voxels "
                     "(pass a smaller crop).")
  return volume[crop:-crop, crop:-crop, crop:-crop]


def sdlogj(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX) -> float:
  """Learn2Reg SDlogJ: std(log(clip(J + 3, 1e-9, 1e9))) over the cropped volume.

  J is `jacobian_determinant`; ``crop`` voxels are removed from every face first (2 in
  Learn2Reg, where the border derivatives see zero padding). The +3 follows the Learn2Reg
  evaluation script; since d log(J + 3) = dJ / (J + 3), for J near 1 this is roughly 1/4
  of `std_log_jacdet`. Numbers comparable to the paper's Table 1 use this function.
  """
  return sdlogj_of_jacdet(crop_border(jacobian_determinant(disp_vox), crop))


def sdlogj_of_jacdet(jac_det: np.ndarray) -> float:
  """`sdlogj` of an already computed (and cropped) Jacobian determinant."""
  return float(np.std(np.log(np.clip(jac_det + L2R_JACDET_OFFSET, *LOG_CLIP))))


def std_log_of_jacdet(jac_det: np.ndarray) -> float:
  """`std_log_jacdet` of an already computed (and cropped) Jacobian determinant."""
  return float(np.std(np.log(np.clip(jac_det, *LOG_CLIP))))


def folding_of_jacdet(jac_det: np.ndarray) -> float:
  """`folding_fraction` of an already computed (and cropped) Jacobian determinant."""
  return float(np.mean(jac_det <= 0.0))


def std_log_jacdet(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX) -> float:
  """std(log(clip(J, 1e-9, 1e9))) over the cropped volume: SDlogJ without the +3.

  This is the textbook definition; folded voxels (J <= 0) are clipped to 1e-9 and so
  dominate it (log 1e-9 ≈ -20.7), unlike `sdlogj`.
  """
  return std_log_of_jacdet(crop_border(jacobian_determinant(disp_vox), crop))


def folding_fraction(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX) -> float:
  """Fraction (0..1) of voxels with J <= 0, over the same cropped volume as `sdlogj`.

  The crop is the Learn2Reg SDlogJ crop, so both regularity numbers describe the same
  voxels; pass ``crop=0`` to count the whole volume (border J from one-sided differences).
  """
  return folding_of_jacdet(crop_border(jacobian_determinant(disp_vox), crop))


def field_regularity(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX, *,
                     name: str = "disp_vox") -> dict[str, float]:
  """{'folding_fraction', 'sdlogj'} of one field from one Jacobian determinant (``name``
  names the field in error messages)."""
  jac_det = crop_border(jacobian_determinant(disp_vox, name), crop)
  return {'folding_fraction': folding_of_jacdet(jac_det), 'sdlogj': sdlogj_of_jacdet(jac_det)}
