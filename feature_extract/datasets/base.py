"""Records passed between the dataset readers and the feature stage, and the ``Reader`` protocol.

numpy only. A reader's ``scan(root, ...)`` is cheap (it lists and validates files) and
returns ``VolumeSource`` records; ``source.load()`` reads and preprocesses one volume to the
model grid and returns a ``Volume``. ``pairs`` lists registration pairs by volume key.
``Reader`` is what a reader module (acdc, abdomen, custom) provides.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from fmir_jax.core.errors import DatasetError  # re-exported: its home is fmir_jax.core.errors

__all__ = ["DatasetError", "Pair", "Reader", "Volume", "VolumeSource"]

if TYPE_CHECKING:  # annotations only: this module stays numpy-only at import
  from fmir_jax.core import nifti
  from fmir_jax.core import resample


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


@runtime_checkable
class Reader(Protocol):
  """What a dataset reader module provides (``datasets.get(name)`` returns one).

  A module satisfies it by defining these names. ``**options`` are the reader options
  (``--dataset-option KEY=VALUE``; e.g. acdc ``layout``, abdomen ``resolution``, custom
  ``shape``/``spacing_mm``/``intensity``); each function ignores the options it does not use,
  except ``scan``, which refuses unknown ones (TypeError). Optional module constants read
  with ``getattr``: ``NUM_CLASSES`` (a fixed label set: acdc 3, abdomen 13) and
  ``TARGET_SPACING_MM`` (acdc's model-grid voxel size).
  """

  NAME: str  # the dataset name ("acdc", "abdomen", "custom"), as in Volume.dataset

  def scan(self, root: str, **options: Any) -> list[VolumeSource]:
    """Lists and validates the volumes under ``root`` (headers only), sorted by key."""

  def pairs(self, sources: Iterable[VolumeSource]) -> list[Pair]:
    """Registration pairs (by volume key, per split) among ``sources`` from ``scan``."""

  def target_shape(self, **options: Any) -> tuple[int, int, int] | None:
    """The model grid's (H, W, D) for these options; None when they give none (custom)."""

  def model_grid(self, header: nifti.NiftiHeader, **options: Any
                 ) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape (H, W, D), 4x4 voxel -> world RAS mm affine) of the model grid for a volume."""

  def preprocess(self, image: np.ndarray, header: nifti.NiftiHeader,
                 dst_shape: Sequence[int], dst_affine: np.ndarray, **options: Any
                 ) -> tuple[np.ndarray, resample.GridMap, dict[str, Any]]:
    """(H, W, D) source image -> (float32 (H', W', D') in [0, 1] on the target grid, GridMap
    back to the source, JSON-able intensity record)."""
