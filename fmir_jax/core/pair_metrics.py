"""Per-pair registration scores and their aggregation over pairs (numpy + scipy only).

`evaluate_pair` scores one registered pair into a `PairMetrics` record (Dice, HD95 before and
after, Jacobian regularity, time), `aggregate` gives mean / std over pairs (the summary.json
"metrics" and "per_class" blocks), `average_bidirectional` is the cardiac protocol (A->B and
B->A averaged per subject) and `label_overlap_before_after` the overlap block of a single
registration's report. The per-measure functions and the conventions (axis order, units,
NaN = not scored, Learn2Reg rules) are those of `fmir_jax.core.metrics`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from fmir_jax.core import metrics as metrics_lib

WarpLabelsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


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
                  hd_mode: metrics_lib.HdMode) -> tuple[dict[int, float], dict[int, float]]:
  """Dice and HD95 for the classes in ``scored``; NaN for the other ``classes``."""
  dice = {c: math.nan for c in classes}
  hd = {c: math.nan for c in classes}
  if scored:
    dice.update(metrics_lib.dice_per_class(pred, true, scored))
    hd.update(metrics_lib.hd95_per_class(pred, true, scored, spacing,
                                         connectivity=connectivity, mode=hd_mode))
  return dice, hd


def evaluate_pair(disp_vox: np.ndarray, moving_labels: np.ndarray,
                  fixed_labels: np.ndarray, classes: Sequence[int],
                  spacing_mm: Sequence[float], warp_labels_fn: WarpLabelsFn, *,
                  moving: str = "", fixed: str = "", subject: str = "",
                  time_s: float = math.nan, connectivity: int = 1,
                  hd_mode: metrics_lib.HdMode = "union",
                  crop: int = metrics_lib.BORDER_CROP_VOX) -> PairMetrics:
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
    connectivity, hd_mode: see `metrics.hd95`. crop: see `metrics.sdlogj`.

  A class is scored only when present in both the fixed and the moving labels
  (Learn2Reg ``compute_dice``/``compute_hd95``); otherwise its entries are NaN, before
  and after registration alike.
  """
  pair = f" of pair {moving} -> {fixed}" if (moving or fixed) else ""
  disp = metrics_lib.as_disp(disp_vox, f"disp_vox{pair}")
  mov = metrics_lib.as_labels("moving_labels", moving_labels)
  fix = metrics_lib.as_labels("fixed_labels", fixed_labels)
  metrics_lib.check_same_shape("moving_labels", mov, "fixed_labels", fix)
  if disp.shape[:3] != fix.shape:
    raise ValueError(f"disp_vox has spatial shape {disp.shape[:3]} but fixed_labels has "
                     f"shape {fix.shape}; the displacement must be on the fixed grid.")
  classes = metrics_lib.as_classes(classes)
  spacing = metrics_lib.as_spacing(spacing_mm)
  warped = np.asarray(warp_labels_fn(mov, disp))
  if warped.shape != fix.shape:
    raise ValueError(f"warp_labels_fn returned shape {warped.shape}, expected "
                     f"{fix.shape} (the fixed grid).")
  warped = metrics_lib.as_labels("warp_labels_fn output", warped)
  scored = [c for c in classes if np.any(fix == c) and np.any(mov == c)]
  dice, hd = _score_labels(warped, fix, scored, classes, spacing, connectivity, hd_mode)
  dice0, hd0 = _score_labels(mov, fix, scored, classes, spacing, connectivity, hd_mode)
  jac_det = metrics_lib.crop_border(metrics_lib.jacobian_determinant(disp), crop)
  return PairMetrics(
      moving=moving, fixed=fixed, subject=subject, classes=classes,
      dice=dice, dice_mean=metrics_lib.mean_dice(dice),
      hd95=hd, hd95_mean=metrics_lib.nanmean(list(hd.values())),
      initial_dice=dice0, initial_dice_mean=metrics_lib.mean_dice(dice0),
      initial_hd95=hd0, initial_hd95_mean=metrics_lib.nanmean(list(hd0.values())),
      sdlogj=metrics_lib.sdlogj_of_jacdet(jac_det),
      std_log_jacdet=metrics_lib.std_log_of_jacdet(jac_det),
      folding_fraction=metrics_lib.folding_of_jacdet(jac_det), time_s=float(time_s))


def label_overlap_before_after(warped: np.ndarray, initial: np.ndarray, fixed: np.ndarray,
                               spacing_mm: Sequence[float]) -> dict[str, Any]:
  """Dice and HD95 (mm) of the fixed labels vs the warped (after) and the unwarped (before)
  moving labels, all on the fixed grid, for the classes present in both maps (Learn2Reg).

  Returns a JSON-able dict: classes, before/after and hd95_before/hd95_after per class
  (keys str), and their means (mean_before, mean_after, hd95_mean_before, ...).
  """
  fix = metrics_lib.as_labels("fixed", fixed)
  classes = sorted((set(np.unique(fix).tolist()) & set(np.unique(initial).tolist())) - {0})
  if not classes:
    raise ValueError("the fixed and moving label maps share no foreground class; Dice "
                     "cannot be computed (are these the segmentations of these images?).")
  spacing = metrics_lib.as_spacing(spacing_mm)
  out: dict[str, Any] = {"classes": classes}
  for name, pred in (("before", initial), ("after", warped)):
    dice, hd = _score_labels(metrics_lib.as_labels(name, pred), fix, classes, classes,
                             spacing, 1, "union")
    out[name] = {str(c): dice[c] for c in classes}
    out[f"hd95_{name}"] = {str(c): hd[c] for c in classes}
    out[f"mean_{name}"] = metrics_lib.mean_dice(dice)
    out[f"hd95_mean_{name}"] = metrics_lib.nanmean(list(hd.values()))
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
  fields = {name: metrics_lib.nanmean([getattr(a, name), getattr(b, name)])
            for name in SCALAR_METRICS}
  for name in PER_CLASS_METRICS:
    fields[name] = {c: metrics_lib.nanmean([getattr(a, name)[c], getattr(b, name)[c]])
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
