"""Custom registration pairs from a CSV or JSON list ("custom" reader).

The list file (the ``root`` argument of ``scan``) is either

* CSV with a header ``moving,fixed[,moving_label,fixed_label][,split]``, or
* JSON: a list of objects with the same keys (or ``{"pairs": [...]}``).

Relative paths are resolved against the list file's folder. ``split`` defaults to "test".
Each distinct image becomes one volume, keyed by its file name stem plus a short hash of its
path relative to the list file (stable when the whole folder moves). Preprocessing: resample
with the header spacing to ``spacing_mm`` and centre crop/pad to ``shape`` (voxel axis order
kept); intensities clipped to [p_low, p_high] percentiles ("percentile") or a CT window
("ct", default [-500, 800] HU), scaled to [0, 1].
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from feature_extract import datasets as ds
from feature_extract.datasets.base import DatasetError, Pair, Volume, VolumeSource
from fmir_jax.core import resample
from fmir_jax.core import nifti

NAME = "custom"
_COLUMNS = ("moving", "fixed", "moving_label", "fixed_label", "split")


class CustomSources(list):
  """The ``scan`` result: a list of VolumeSource that also carries the pair table."""

  def __init__(self, sources: Iterable[VolumeSource], pair_list: Sequence[Pair]):
    super().__init__(sources)
    self.pair_list = tuple(pair_list)


@dataclasses.dataclass(frozen=True)
class _Entry:
  image: str
  label: str | None
  split: str
  where: str  # "list.csv line 3", for messages


def volume_key(path: str, list_dir: str) -> str:
  """Stable id of an image: sanitised file stem + 8 hex digits of its relative path."""
  rel = os.path.relpath(os.path.abspath(path), os.path.abspath(list_dir)).replace(os.sep, "/")
  stem = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
  stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "vol"
  return f"{stem}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def read_pair_table(path: str) -> list[dict[str, Any]]:
  """Rows of the pair list as dicts with a "where" entry naming file and row."""
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: pair list file does not exist (the custom reader takes the "
                       "CSV/JSON pair list as its root).")
  if path.lower().endswith(".json"):
    try:
      with open(path) as f:
        data = json.load(f)
    except ValueError as e:
      raise DatasetError(f"{path}: invalid JSON ({e}).") from e
    if isinstance(data, dict) and "pairs" in data:
      data = data["pairs"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
      raise DatasetError(f"{path}: expected a JSON list of objects with keys "
                         f"{_COLUMNS[:2]} (optional {_COLUMNS[2:]}).")
    rows = [dict(r, where=f"{path} entry {i}") for i, r in enumerate(data)]
  else:
    with open(path, newline="", encoding="utf-8-sig") as f:     # a byte-order mark is fine
      reader = csv.DictReader(f)
      header = [h.strip() for h in (reader.fieldnames or [])]
      if "moving" not in header or "fixed" not in header:
        raise DatasetError(f"{path}: CSV header {header} must contain 'moving' and 'fixed' "
                           f"(optional {_COLUMNS[2:]}).")
      rows = []
      for r in reader:                  # line_num: the file's line, blank lines counted
        where = f"{path} line {reader.line_num}"
        if r.get(None):
          raise DatasetError(f"{where}: {len(header) + len(r[None])} fields, the header has "
                             f"{len(header)}; quote paths that contain commas.")
        rows.append(dict({k.strip(): (v or "").strip() for k, v in r.items() if k},
                         where=where))
  if not rows:
    raise DatasetError(f"{path}: the pair list is empty.")
  for r in rows:
    unknown = sorted(set(r) - set(_COLUMNS) - {"where"})
    if unknown:
      raise DatasetError(f"{r['where']}: unknown field(s) {unknown}; allowed {_COLUMNS}.")
    for k in ("moving", "fixed"):
      if not isinstance(r.get(k), str) or not r[k]:
        raise DatasetError(f"{r['where']}: '{k}' path is missing.")
  return rows


def _resolve(value: Any, list_dir: str) -> str | None:
  if value in (None, ""):
    return None
  return os.path.normpath(os.path.join(list_dir, os.path.expanduser(str(value))))


def _entries(rows: list[dict[str, Any]], list_dir: str
             ) -> tuple[dict[str, _Entry], list[Pair]]:
  """Unique volumes by key (consistent label and split) and the pair list."""
  entries: dict[str, _Entry] = {}
  pair_list, seen = [], {}
  for r in rows:
    split = r.get("split") or "test"
    if split not in ds.SPLITS:
      raise DatasetError(f"{r['where']}: split {split!r} is not one of {ds.SPLITS}.")
    keys = []
    for role in ("moving", "fixed"):
      image = _resolve(r[role], list_dir)
      label = _resolve(r.get(f"{role}_label"), list_dir)
      key = volume_key(image, list_dir)
      new = _Entry(image, label, split, r["where"])
      old = entries.get(key)
      if old is not None:
        if old.split != split:
          raise DatasetError(f"{r['where']}: {image} is in split {split!r} here but "
                             f"{old.split!r} at {old.where}; a volume has one split.")
        if label and old.label and label != old.label:
          raise DatasetError(f"{r['where']}: {image} has label {label} here but "
                             f"{old.label} at {old.where}.")
        new = dataclasses.replace(old, label=old.label or label)
      entries[key] = new
      keys.append(key)
    pair = Pair(keys[0], keys[1], split)
    if pair in seen:
      raise DatasetError(f"{r['where']}: duplicate of the pair at {seen[pair]}.")
    seen[pair] = r["where"]
    pair_list.append(pair)
  return entries, pair_list


def _check_entry(e: _Entry) -> _Entry:
  hi = nifti.read_header(e.image, what="image")
  if e.label is not None:
    hl = nifti.read_header(e.label, what="label")
    nifti.check_same_grid(hi.path, hi.affine, hi.shape, hl.path, hl.affine, hl.shape)
  return e


def scan(root: str, *, shape: Sequence[int] | None = None,
         spacing_mm: Sequence[float] | None = None, intensity: str = "percentile",
         percentiles: tuple[float, float] = (1.0, 99.0),
         ct_window: tuple[float, float] = ds.CT_WINDOW_HU, strict: bool = True,
         pairs_file: str | None = None) -> CustomSources:
  """Lists and validates the volumes of a custom pair list (headers only).

  Args:
    root: the pair list file (CSV or JSON). ``pairs_file`` is accepted as an alias.
    shape: target grid shape (H, W, D).
    spacing_mm: target voxel size per axis (mm).
    intensity: "percentile" (clip to ``percentiles`` of the source, scale to [0, 1]) or
      "ct" (clip to ``ct_window`` HU, scale to [0, 1]).
    strict: raise at the first bad volume; False checks all and raises one report.

  Returns:
    A ``CustomSources`` list (one source per distinct image, sorted by key) carrying the
    pair table for ``pairs``.
  """
  path = os.fspath(pairs_file if pairs_file is not None else root)
  if shape is None or spacing_mm is None:
    raise DatasetError(f"custom pairs {path}: pass the target grid, shape=(H, W, D) and "
                       "spacing_mm=(sx, sy, sz).")
  shape = tuple(int(s) for s in shape)
  spacing = tuple(float(s) for s in spacing_mm)
  if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or min(spacing) <= 0:
    raise DatasetError(f"custom pairs: shape={shape} / spacing_mm={spacing} must be three "
                       "positive numbers each.")
  if intensity not in ("percentile", "ct"):
    raise DatasetError(f"intensity={intensity!r}: use 'percentile' or 'ct'.")
  list_dir = os.path.dirname(os.path.abspath(path))
  entries, pair_list = _entries(read_pair_table(path), list_dir)
  keys = sorted(entries)
  checked = ds.collect([(k, functools.partial(_check_entry, entries[k])) for k in keys],
                       strict, NAME, path)
  norm = {"rule": intensity, "percentiles": tuple(percentiles), "ct_window": tuple(ct_window)}
  sources = [VolumeSource(
      key=k, dataset=NAME, subject=k, frame="", split=e.split,
      files=(e.image,) + ((e.label,) if e.label else ()),
      load=functools.partial(load_volume, k, e, shape, spacing, norm))
      for k, e in zip(keys, checked)]
  return CustomSources(sources, pair_list)


def pairs(sources: Iterable[VolumeSource]) -> list[Pair]:
  """The listed pairs whose two volumes are among ``sources``, in list order."""
  table = getattr(sources, "pair_list", None)
  if table is None:
    raise DatasetError("custom pairs: pairs() needs the list returned by scan() (it carries "
                       "the pair table); got a plain list.")
  keys = {s.key for s in sources}
  return [p for p in table if p.moving in keys and p.fixed in keys]


def target_shape(*, shape: Sequence[int] | None = None, **_: Any
                 ) -> tuple[int, int, int] | None:
  """The model grid's shape for these reader options (None when they give none)."""
  return None if shape is None else tuple(int(v) for v in shape)


def model_grid(header: nifti.NiftiHeader, *, shape: Sequence[int], spacing_mm: Sequence[float],
               **_: Any) -> tuple[tuple[int, int, int], np.ndarray]:
  """(shape, affine) of the target grid: ``spacing_mm``, ``shape``, centred on the image."""
  centre = (np.asarray(header.shape, float) - 1) / 2
  gm = resample.target_grid(header.shape, header.affine, header.spacing_mm, spacing_mm,
                      tuple(int(s) for s in shape), centre)
  return gm.dst_shape, gm.dst_affine


def preprocess(image: np.ndarray, header: nifti.NiftiHeader, dst_shape: Sequence[int],
               dst_affine: np.ndarray, *, intensity: str = "percentile",
               percentiles: Sequence[float] = (1.0, 99.0),
               ct_window: Sequence[float] = ds.CT_WINDOW_HU, **_: Any
               ) -> tuple[np.ndarray, resample.GridMap, dict[str, Any]]:
  """The custom rule on any target grid: linear resampling, then "ct" (air outside, clip to
  ``ct_window`` HU) or "percentile" (the image minimum outside, clip to ``percentiles`` of
  the source image), scaled to [0, 1].

  Returns:
    (float32 (H, W, D) image in [0, 1], GridMap back to the source, intensity record).
  """
  gm = resample.GridMap(header.shape, header.affine, tuple(int(s) for s in dst_shape), dst_affine)
  if intensity == "ct":
    scaled, info = ds.window_scale(gm.to_target(image, order=1, cval=ds.AIR_HU), *ct_window)
  else:
    resampled = gm.to_target(image, order=1, cval=float(image.min()))
    scaled, info = ds.percentile_scale(resampled, image, *percentiles, where=header.path)
  return scaled, gm, info


def load_volume(key: str, e: _Entry, shape: tuple[int, int, int],
                spacing_mm: tuple[float, float, float], norm: dict[str, Any]) -> Volume:
  """Reads one image (+ label) and preprocesses it onto the centred target grid."""
  image, affine, hdr = nifti.load_nifti(e.image, what="image")
  scaled, gm, info = preprocess(image, hdr, *model_grid(hdr, shape=shape, spacing_mm=spacing_mm),
                                intensity=norm["rule"], percentiles=norm["percentiles"],
                                ct_window=norm["ct_window"])
  labels = None
  if e.label is not None:
    lab, lab_affine, lab_hdr = nifti.load_nifti(e.label, what="label")
    nifti.check_same_grid(hdr.path, affine, hdr.shape, lab_hdr.path, lab_affine, lab_hdr.shape)
    labels = ds.check_labels(lab, 255, e.label)
    labels = gm.to_target(labels, order=0, cval=0)
  meta = {
      "source_image": e.image, "source_label": e.label,
      "source_spacing_mm": list(hdr.spacing_mm), "grid": gm.to_dict(),
      "centre_rule": "image_centre",
      "resample": {"image": "linear", "labels": "nearest"}, "intensity": info,
  }
  return Volume(key=key, dataset=NAME, subject=key, frame="", split=e.split, image=scaled,
                labels=labels, spacing_mm=resample.voxel_spacing(gm.dst_affine),
                affine=gm.dst_affine, meta=meta)
