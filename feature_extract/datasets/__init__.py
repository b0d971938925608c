"""Dataset readers: raw files -> preprocessed ``Volume`` records on the model grid.

numpy + nibabel + scipy only (no jax, no torch). ``get(name)`` returns a reader module
(``base.Reader`` spells out all it provides) with

* ``scan(root, **options) -> list[VolumeSource]``: lists and validates files (headers only);
  each source's ``load()`` reads and preprocesses one volume;
* ``pairs(sources) -> list[Pair]``: registration pairs by volume key, per split.

Readers: "acdc" (``layout``), "abdomen" (``resolution``, ``layout``), "custom" (root is the
pair-list CSV/JSON; ``shape``, ``spacing_mm``, ``intensity``). This file also holds the small
helpers the readers share (intensity scaling, split/subject selection, error collection).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from feature_extract.datasets.base import DatasetError
from feature_extract.datasets.base import Reader

NAMES = ("acdc", "abdomen", "custom")
_MODULES = {"acdc": "acdc", "abdomen": "abdomen", "custom": "custom"}
SPLITS = ("train", "val", "test")


def get(name: str) -> Reader:
  """The reader module for a dataset name ("acdc", "abdomen" or "custom").

  Raises:
    DatasetError: unknown name.
  """
  if name not in _MODULES:
    raise DatasetError(f"Unknown dataset {name!r}; choose one of {NAMES}.")
  return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def percentile_scale(image: np.ndarray, reference: np.ndarray, p_low: float = 1.0,
                     p_high: float = 99.0, *, where: str = "image"
                     ) -> tuple[np.ndarray, dict[str, Any]]:
  """Clips to the [p_low, p_high] percentiles of ``reference`` and scales to [0, 1].

  Args:
    image: volume to scale (any shape).
    reference: voxels the percentiles are computed on (e.g. the whole source volume).
    p_low, p_high: percentiles in [0, 100].
    where: file name for the error message.

  Returns:
    (float32 array in [0, 1], JSON-able record of the rule and the clip values).
  """
  lo, hi = (float(v) for v in np.percentile(reference, [p_low, p_high]))
  if not hi > lo:
    raise DatasetError(
        f"{where}: intensities are constant between the {p_low}th and {p_high}th "
        f"percentiles ({lo}); the image is blank or nearly so. Check the file.")
  out = (np.clip(image, lo, hi) - lo) / (hi - lo)
  info = {"rule": "percentile_clip", "p_low": p_low, "p_high": p_high, "low": lo,
          "high": hi, "computed_on": "source volume"}
  return out.astype(np.float32), info


# CT intensities (Hounsfield units): the soft-tissue window every CT reader clips to, and the
# value of air, used outside a scan when it is resampled.
CT_WINDOW_HU = (-500.0, 800.0)
AIR_HU = -1000.0


def window_scale(image: np.ndarray, low: float, high: float
                 ) -> tuple[np.ndarray, dict[str, Any]]:
  """Clips to a fixed window (e.g. CT [-500, 800] HU) and scales to [0, 1] (float32)."""
  if not high > low:
    raise DatasetError(f"Intensity window [{low}, {high}] is empty; need low < high.")
  out = (np.clip(image, low, high) - low) / (high - low)
  return out.astype(np.float32), {"rule": "window_clip", "low": float(low),
                                  "high": float(high)}


def check_labels(labels: np.ndarray, max_label: int, path: str) -> np.ndarray:
  """Checks label values are in [0, max_label]; returns them as uint8."""
  if labels.size and int(labels.max()) > max_label:
    bad = sorted(int(v) for v in np.unique(labels) if v > max_label)
    raise DatasetError(f"{path}: label values {bad[:10]} exceed {max_label}, the largest "
                       "class of this dataset. Pass the matching segmentation file.")
  return labels.astype(np.uint8)


def check_splits(splits: Iterable[str] | None) -> tuple[str, ...]:
  """Validates a split filter; None means all splits."""
  if splits is None:
    return SPLITS
  if isinstance(splits, str):
    splits = (splits,)
  splits = tuple(splits)
  bad = [s for s in splits if s not in SPLITS]
  if bad:
    raise DatasetError(f"splits={splits!r}: unknown split(s) {bad}; use {SPLITS}.")
  return splits


def select_subjects(present: dict[int, Any], split_of: Callable[[int], str],
                    subjects: Iterable[int | str] | None, splits: Iterable[str] | None,
                    parse_id: Callable[[int | str], int], dataset: str, root: str
                    ) -> list[int]:
  """Subject ids to use: explicit ``subjects`` (all must be present), filtered by split.

  Args:
    present: subject id -> files found under ``root``.
    split_of: subject id -> split.
    subjects: explicit subject ids/names, or None for all present ones.
    splits: split names to keep, or None for all.
    parse_id: subject name or number -> integer id (raises DatasetError if malformed).
    dataset, root: for messages.

  Raises:
    DatasetError: a requested subject is absent, or a requested split has no subjects.
  """
  wanted_splits = check_splits(splits)
  if subjects is None:
    ids = sorted(present)
  else:
    ids = sorted({parse_id(s) for s in subjects})
    absent = [i for i in ids if i not in present]
    if absent:
      raise DatasetError(
          f"{dataset}: subjects {absent} were requested but are not under {root} "
          f"({len(present)} found). Fix the subject list or the dataset root.")
  ids = [i for i in ids if split_of(i) in wanted_splits]
  if splits is not None:
    empty = [s for s in wanted_splits if not any(split_of(i) == s for i in ids)]
    if empty:
      raise DatasetError(
          f"{dataset}: split(s) {empty} requested but none of their subjects are under "
          f"{root}. Add the data or drop the split from the request.")
  return ids


def collect(checks: Sequence[tuple[str, Callable[[], Any]]], strict: bool, dataset: str,
            root: str) -> list[Any]:
  """Runs per-subject checks; strict: raise the first error, else report all at once.

  Args:
    checks: (subject name, zero-argument check returning a result).
    strict: raise the first failure as is; when False, run all checks and raise one
      DatasetError listing every failing subject (never a silent skip).

  Returns:
    The results, in order, when every check passes.
  """
  results, problems = [], []
  for name, check in checks:
    try:
      results.append(check())
    except ValueError as e:  # DatasetError and NiftiError.
      if strict:
        raise
      problems.append(f"  {name}: {e}")
  if problems:
    raise DatasetError(f"{dataset} under {root}: {len(problems)} bad subject(s):\n"
                       + "\n".join(problems))
  return results
