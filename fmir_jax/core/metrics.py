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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage

# Learn2Reg crops this many voxels from every face before SDlogJ statistics.
BORDER_CROP_VOX = 2
# Learn2Reg adds 3 to the Jacobian determinant before the log (keeps log finite for
# mildly folded fields; it also shrinks the statistic, see `sdlogj`).
L2R_JACDET_OFFSET = 3.0
LOG_CLIP = (1e-9, 1e9)

HdMode = Literal["union", "max"]
WarpLabelsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- checks


def _as_labels(name: str, labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"{name}: expected a label volume of shape (H, W, D), got shape "
                     f"{labels.shape}.")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(f"{name}: labels must be integer class ids, got non-integer values "
                       f"(dtype {labels.dtype}); round or cast the label volume first.")
  return labels


def _same_shape(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; "
                     "both must live on the same (fixed) grid.")


def _as_spacing(spacing_mm: Sequence[float], ndim: int = 3) -> np.ndarray:
  spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
  if spacing.shape != (ndim,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"spacing_mm must be {ndim} positive finite voxel sizes in mm (one per "
                     f"array axis), got {spacing_mm!r}.")
  return spacing


def _as_classes(classes: Sequence[int]) -> tuple[int, ...]:
  out = tuple(int(c) for c in classes)
  if not out:
    raise ValueError("classes is empty: pass the foreground class ids to score, "
                     "e.g. (1, 2, 3) for ACDC.")
  if len(set(out)) != len(out):
    raise ValueError(f"classes contains duplicates: {classes!r}.")
  return out


def _as_disp(disp_vox: np.ndarray, name: str = "disp_vox") -> np.ndarray:
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


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
  """Mean over finite entries; NaN (without a RuntimeWarning) when there are none."""
  arr = np.asarray(values, dtype=np.float64).reshape(-1)
  arr = arr[~np.isnan(arr)]
  return float(arr.mean()) if arr.size else math.nan


# --------------------------------------------------------------------------- Dice


def dice_score(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
  """Dice 2|A∩B| / (|A| + |B|) of two boolean masks; NaN when both are empty."""
  pred_mask = np.asarray(pred_mask, dtype=bool)
  true_mask = np.asarray(true_mask, dtype=bool)
  _same_shape("pred_mask", pred_mask, "true_mask", true_mask)
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
  pred = _as_labels("pred_labels", pred_labels)
  true = _as_labels("true_labels", true_labels)
  _same_shape("pred_labels", pred, "true_labels", true)
  return {c: dice_score(pred == c, true == c) for c in _as_classes(classes)}


def mean_dice(dice: Mapping[int, float]) -> float:
  """Mean over the classes present (NaN entries skipped); NaN if none is present."""
  return _nanmean(list(dice.values()))


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
  spacing = _as_spacing(spacing_mm, np.ndim(to_surface))
  dist = ndimage.distance_transform_edt(~np.asarray(to_surface, dtype=bool),
                                        sampling=spacing)
  return dist[np.asarray(from_surface, dtype=bool)]


def grid_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
  """Largest distance between two voxel centres of the grid, in mm."""
  spacing = _as_spacing(spacing_mm, len(shape))
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
  _same_shape("pred_mask", pred_mask, "true_mask", true_mask)
  spacing = _as_spacing(spacing_mm, pred_mask.ndim)
  has_pred, has_true = bool(pred_mask.any()), bool(true_mask.any())
  if not has_pred and not has_true:
    return math.nan
  if has_pred != has_true:
    return grid_diagonal_mm(pred_mask.shape, spacing)
  pred_surf = surface_mask(pred_mask, connectivity)
  true_surf = surface_mask(true_mask, connectivity)
  d_pt = directed_surface_distances(pred_surf, true_surf, spacing)
  d_tp = directed_surface_distances(true_surf, pred_surf, spacing)
  if mode == "union":
    return float(np.percentile(np.concatenate([d_pt, d_tp]), percentile))
  return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def hd95_per_class(pred_labels: np.ndarray, true_labels: np.ndarray,
                   classes: Sequence[int], spacing_mm: Sequence[float], *,
                   connectivity: int = 1, mode: HdMode = "union") -> dict[int, float]:
  """`hd95` per class between two (H, W, D) label volumes: {class id: mm}."""
  pred = _as_labels("pred_labels", pred_labels)
  true = _as_labels("true_labels", true_labels)
  _same_shape("pred_labels", pred, "true_labels", true)
  spacing = _as_spacing(spacing_mm)
  return {c: hd95(pred == c, true == c, spacing, connectivity=connectivity, mode=mode)
          for c in _as_classes(classes)}


# --------------------------------------------------------------------------- Jacobian


def jacobian_matrix(disp_vox: np.ndarray, name: str = "disp_vox") -> np.ndarray:
  """Jacobian of x -> x + u(x): (H, W, D, 3, 3), entry [..., i, j] = δij + ∂u_i/∂x_j.

  Derivatives per voxel (unit grid spacing) by ``np.gradient``: central differences
  inside, one-sided first-order differences on the outermost voxels. The determinant is
  the same in voxel or mm units (a diagonal rescaling cancels), so no spacing is needed.
  ``name`` names the field in error messages (e.g. the pair or file it belongs to).
  """
  disp = _as_disp(disp_vox, name).astype(np.float64, copy=False)
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
  return _sdlogj_of(crop_border(jacobian_determinant(disp_vox), crop))


def _sdlogj_of(jac_det: np.ndarray) -> float:
  return float(np.std(np.log(np.clip(jac_det + L2R_JACDET_OFFSET, *LOG_CLIP))))


def _std_log_of(jac_det: np.ndarray) -> float:
  return float(np.std(np.log(np.clip(jac_det, *LOG_CLIP))))


def _folding_of(jac_det: np.ndarray) -> float:
  return float(np.mean(jac_det <= 0.0))


def std_log_jacdet(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX) -> float:
  """std(log(clip(J, 1e-9, 1e9))) over the cropped volume: SDlogJ without the +3.

  This is the textbook definition; folded voxels (J <= 0) are clipped to 1e-9 and so
  dominate it (log 1e-9 ≈ -20.7), unlike `sdlogj`.
  """
  return _std_log_of(crop_border(jacobian_determinant(disp_vox), crop))


def folding_fraction(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX) -> float:
  """Fraction (0..1) of voxels with J <= 0, over the same cropped volume as `sdlogj`.

  The crop is the Learn2Reg SDlogJ crop, so both regularity numbers describe the same
  voxels; pass ``crop=0`` to count the whole volume (border J from one-sided differences).
  """
  return _folding_of(crop_border(jacobian_determinant(disp_vox), crop))


def field_regularity(disp_vox: np.ndarray, crop: int = BORDER_CROP_VOX, *,
                     name: str = "disp_vox") -> dict[str, float]:
  """{'folding_fraction', 'sdlogj'} of one field from one Jacobian determinant (``name``
  names the field in error messages)."""
  jac_det = crop_border(jacobian_determinant(disp_vox, name), crop)
  return {'folding_fraction': _folding_of(jac_det), 'sdlogj': _sdlogj_of(jac_det)}


# --------------------------------------------------------------------------- per pair


@dataclasses.dataclass(frozen=True)
class PairMetrics:
  """All metrics of one registered pair (moving -> fixed).

  Dice values are fractions in [0, 1], HD95 in mm; per-class dicts map class id -> value,
  NaN where the class is not scored (absent from the fixed or the moving labels).
  ``initial_*`` compare the unwarped moving labels with the fixed labels (identity
  transform). ``*_mean`` are means over the classes present. ``bidirectional`` marks an
  average of A->B and B->A (`average_bidirectional`).
  """
  moving: str
  fixed: str
  subject: str
  classes: tuple[int, ...]
  dice: dict[int, float]
  dice_mean: float
  hd95: dict[int, float]
  hd95_mean: float
  initial_dice: dict[int, float]
  initial_dice_mean: float
  initial_hd95: dict[int, float]
  initial_hd95_mean: float
  sdlogj: float
  std_log_jacdet: float
  folding_fraction: float
  time_s: float = math.nan
  bidirectional: bool = False

  def to_row(self) -> dict[str, str | float | bool]:
    """Flat record for CSV: ids, scalar metrics, then ``<metric>_<class>`` columns."""
    row: dict[str, str | float | bool] = {
        "moving": self.moving, "fixed": self.fixed, "subject": self.subject,
        "bidirectional": self.bidirectional}
    for name in SCALAR_METRICS:
      row[name] = getattr(self, name)
    for name in PER_CLASS_METRICS:
      for c, value in getattr(self, name).items():
        row[f"{name}_{c}"] = value
    return row


SCALAR_METRICS = ("dice_mean", "hd95_mean", "sdlogj", "std_log_jacdet",
                  "folding_fraction", "initial_dice_mean", "initial_hd95_mean", "time_s")
PER_CLASS_METRICS = ("dice", "hd95", "initial_dice", "initial_hd95")


def _score_labels(pred: np.ndarray, true: np.ndarray, scored: Sequence[int],
                  classes: Sequence[int], spacing: np.ndarray, connectivity: int,
                  hd_mode: HdMode) -> tuple[dict[int, float], dict[int, float]]:
  """Dice and HD95 for the classes in ``scored``; NaN for the other ``classes``."""
  dice = {c: math.nan for c in classes}
  hd = {c: math.nan for c in classes}
  if scored:
    dice.update(dice_per_class(pred, true, scored))
    hd.update(hd95_per_class(pred, true, scored, spacing, connectivity=connectivity,
                             mode=hd_mode))
  return dice, hd


def evaluate_pair(disp_vox: np.ndarray, moving_labels: np.ndarray,
                  fixed_labels: np.ndarray, classes: Sequence[int],
                  spacing_mm: Sequence[float], warp_labels_fn: WarpLabelsFn, *,
                  moving: str = "", fixed: str = "", subject: str = "",
                  time_s: float = math.nan, connectivity: int = 1,
                  hd_mode: HdMode = "union", crop: int = BORDER_CROP_VOX) -> PairMetrics:
  """Scores one registration result.

  Args:
    disp_vox: (H, W, D, 3) displacement on the fixed grid, voxels, component k along
      axis k; the warped moving volume is moving(x + u(x)).
    moving_labels: (H, W, D) integer labels of the moving image (same grid as fixed).
    fixed_labels: (H, W, D) integer labels of the fixed image.
    classes: foreground class ids to score, e.g. (1, 2, 3).
    spacing_mm: voxel size of the fixed grid per array axis (mm), for HD95.
    warp_labels_fn: ``(moving_labels (H, W, D), disp_vox (H, W, D, 3)) -> (H, W, D)``
      nearest-neighbour label warp (eval passes the JAX warp, tests a scipy oracle).
    moving, fixed, subject: ids recorded in the result (subject is needed by
      `average_bidirectional`).
    time_s: registration time of this pair in seconds (feature extraction included).
    connectivity, hd_mode: see `hd95`. crop: see `sdlogj`.

  A class is scored only when present in both the fixed and the moving labels
  (Learn2Reg ``compute_dice``/``compute_hd95``); otherwise its entries are NaN, before
  and after registration alike.
  """
  pair = f" of pair {moving} -> {fixed}" if (moving or fixed) else ""
  disp = _as_disp(disp_vox, f"disp_vox{pair}")
  mov = _as_labels("moving_labels", moving_labels)
  fix = _as_labels("fixed_labels", fixed_labels)
  _same_shape("moving_labels", mov, "fixed_labels", fix)
  if disp.shape[:3] != fix.shape:
    raise ValueError(f"disp_vox has spatial shape {disp.shape[:3]} but fixed_labels has "
                     f"shape {fix.shape}; the displacement must be on the fixed grid.")
  classes = _as_classes(classes)
  spacing = _as_spacing(spacing_mm)
  warped = np.asarray(warp_labels_fn(mov, disp))
  if warped.shape != fix.shape:
    raise ValueError(f"warp_labels_fn returned shape {warped.shape}, expected "
                     f"{fix.shape} (the fixed grid).")
  warped = _as_labels("warp_labels_fn output", warped)
  scored = [c for c in classes if np.any(fix == c) and np.any(mov == c)]
  dice, hd = _score_labels(warped, fix, scored, classes, spacing, connectivity, hd_mode)
  dice0, hd0 = _score_labels(mov, fix, scored, classes, spacing, connectivity, hd_mode)
  jac_det = crop_border(jacobian_determinant(disp), crop)
  return PairMetrics(
      moving=moving, fixed=fixed, subject=subject, classes=classes,
      dice=dice, dice_mean=mean_dice(dice), hd95=hd, hd95_mean=_nanmean(list(hd.values())),
      initial_dice=dice0, initial_dice_mean=mean_dice(dice0),
      initial_hd95=hd0, initial_hd95_mean=_nanmean(list(hd0.values())),
      sdlogj=_sdlogj_of(jac_det), std_log_jacdet=_std_log_of(jac_det),
      folding_fraction=_folding_of(jac_det), time_s=float(time_s))


def label_overlap_before_after(warped: np.ndarray, initial: np.ndarray, fixed: np.ndarray,
                               spacing_mm: Sequence[float]) -> dict[str, Any]:
  """Dice and HD95 (mm) of the fixed labels vs the warped (after) and the unwarped (before)
  moving labels, all on the fixed grid, for the classes present in both maps (Learn2Reg).

  Returns a JSON-able dict: classes, before/after and hd95_before/hd95_after per class
  (keys str), and their means (mean_before, mean_after, hd95_mean_before, ...).
  """
  fix = _as_labels("fixed", fixed)
  classes = sorted((set(np.unique(fix).tolist()) & set(np.unique(initial).tolist())) - {0})
  if not classes:
    raise ValueError("the fixed and moving label maps share no foreground class; Dice "
                     "cannot be computed (are these the segmentations of these images?).")
  spacing = _as_spacing(spacing_mm)
  out: dict[str, Any] = {"classes": classes}
  for name, pred in (("before", initial), ("after", warped)):
    dice, hd = _score_labels(_as_labels(name, pred), fix, classes, classes, spacing, 1,
                             "union")
    out[name] = {str(c): dice[c] for c in classes}
    out[f"hd95_{name}"] = {str(c): hd[c] for c in classes}
    out[f"mean_{name}"] = mean_dice(dice)
    out[f"hd95_mean_{name}"] = _nanmean(list(hd.values()))
  return out


# --------------------------------------------------------------------------- aggregation


def _stats(values: Sequence[float]) -> dict[str, float | int]:
  """mean, std (ddof=1, as pandas/Learn2Reg) and count n over non-NaN values."""
  arr = np.asarray(values, dtype=np.float64).reshape(-1)
  arr = arr[~np.isnan(arr)]
  n = int(arr.size)
  return {"mean": float(arr.mean()) if n else math.nan,
          "std": float(arr.std(ddof=1)) if n > 1 else math.nan,
          "n": n}


def _check_same_classes(metrics: Sequence[PairMetrics]) -> tuple[int, ...]:
  if not metrics:
    raise ValueError("aggregate: no PairMetrics given.")
  classes = metrics[0].classes
  for m in metrics:
    if m.classes != classes:
      raise ValueError(f"aggregate: pair {m.moving}->{m.fixed} was scored on classes "
                       f"{m.classes}, others on {classes}; evaluate all pairs with the "
                       "same classes.")
  return classes


def aggregate(metrics: Sequence[PairMetrics]) -> dict:
  """Mean / std over pairs, overall and per class.

  Returns a JSON-ready dict::

    {"n_pairs": int, "classes": [int, ...],
     "metrics": {name: {"mean", "std", "n"}} for name in SCALAR_METRICS,
     "per_class": {name: {str(class): {"mean", "std", "n"}}} for name in PER_CLASS_METRICS}

  Pair-level NaN (class not scored, time not measured) is skipped, ``n`` counts the
  values used; std uses ddof=1 (pandas' default, as in the Learn2Reg script), NaN for n<2.
  """
  classes = _check_same_classes(metrics)
  return {
      "n_pairs": len(metrics),
      "classes": list(classes),
      "metrics": {name: _stats([getattr(m, name) for m in metrics])
                  for name in SCALAR_METRICS},
      "per_class": {name: {str(c): _stats([getattr(m, name)[c] for m in metrics])
                           for c in classes}
                    for name in PER_CLASS_METRICS},
  }


def _average_two(a: PairMetrics, b: PairMetrics) -> PairMetrics:
  fields = {name: _nanmean([getattr(a, name), getattr(b, name)]) for name in SCALAR_METRICS}
  for name in PER_CLASS_METRICS:
    fields[name] = {c: _nanmean([getattr(a, name)[c], getattr(b, name)[c]])
                    for c in a.classes}
  return PairMetrics(moving=a.moving, fixed=a.fixed, subject=a.subject, classes=a.classes,
                     bidirectional=True, **fields)


def average_bidirectional(metrics: Sequence[PairMetrics]) -> list[PairMetrics]:
  """Cardiac protocol: average A->B and B->A of each subject into one record.

  Pairs are grouped by ``subject``; each group must be exactly one pair and its reverse
  (e.g. ED->ES and ES->ED). Every scalar and per-class value is the mean of the two
  directions (a per-pair mean such as ``dice_mean`` is the mean of the two directions'
  means). The result has one record per subject (ids of the first direction seen,
  ``bidirectional=True``), in first-seen order; `aggregate` of it gives the
  mean/std over subjects.
  """
  _check_same_classes(metrics)
  groups: dict[str, list[PairMetrics]] = {}
  for m in metrics:
    if not m.subject:
      raise ValueError(f"average_bidirectional: pair {m.moving}->{m.fixed} has no subject; "
                       "pass subject=... to evaluate_pair.")
    groups.setdefault(m.subject, []).append(m)
  out = []
  for subject, group in groups.items():
    ok = (len(group) == 2 and group[0].moving == group[1].fixed
          and group[0].fixed == group[1].moving and group[0].moving != group[0].fixed)
    if not ok:
      dirs = [f"{m.moving}->{m.fixed}" for m in group]
      raise ValueError(f"average_bidirectional: subject {subject!r} has pairs {dirs}; "
                       "expected exactly one pair and its reverse.")
    out.append(_average_two(*group))
  return out


def aggregate_bidirectional(metrics: Sequence[PairMetrics]) -> dict:
  """`aggregate` over subjects of `average_bidirectional` (ACDC Table 1 protocol)."""
  return aggregate(average_bidirectional(metrics))
