"""Records passed between the dataset readers and the feature stage.

numpy only. A reader's ``scan(root, ...)`` is cheap (it lists and validates files) and
returns ``VolumeSource`` records; ``source.load()`` reads and preprocesses one volume to the
model grid and returns a ``Volume``. ``pairs`` lists registration pairs by volume key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from fmir_jax.core.errors import DatasetError  # noqa: F401  (re-exported: its home is fmir_jax.core.errors)


@dataclasses.dataclass(frozen=True)
class Volume:
  """One preprocessed volume on the model grid.

  image: (H, W, D) float32 in [0, 1]; the slice axis is the last one.
  labels: (H, W, D) uint8, or None.
  spacing_mm: voxel size of the preprocessed grid, per array axis.
  affine: 4x4 voxel -> world (RAS, mm) matrix of the preprocessed grid.
  meta: JSON-serialisable provenance and everything needed to map back to the source grid
    (source file paths, source shape/affine, crop/pad offsets, centring rule used, ...).
  """
  key: str
  dataset: str
  subject: str
  frame: str
  split: str
  image: np.ndarray
  labels: np.ndarray | None
  spacing_mm: tuple[float, float, float]
  affine: np.ndarray
  meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VolumeSource:
  """A volume that can be loaded: ids plus a loader (no pixel data read yet)."""
  key: str            # unique within a dataset, e.g. "patient001_ed", "img0001"
  dataset: str        # "acdc" | "abdomen" | "custom" | ...
  subject: str
  frame: str          # "ed" / "es" for ACDC, "" otherwise
  split: str          # "train" | "val" | "test"
  files: tuple[str, ...]
  load: Callable[[], Volume] = dataclasses.field(compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Pair:
  moving: str   # volume key
  fixed: str    # volume key
  split: str
