"""The typed records ``fmir register`` returns and writes: one pair's report (report.json) and
a batch's summary (summary.json). Their JSON is ``to_json()``: the fields in order, nested
records as objects, so the files other tools read keep their keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class GridRecord:
  """The registration grid of a pair (``register.grid.Grid`` as JSON values)."""
  mode: str                       # "model" or "native"
  reader: str                     # the dataset reader that preprocessed both images
  reader_options: dict[str, Any]
  shape: list[int]                # (H, W, D) voxels
  affine: list[list[float]]       # 4x4 voxel -> RAS mm
  spacing_mm: list[float]
  pyramid_factors: Any            # one (sx, sy, sz) triple or one per level transition


@dataclasses.dataclass
class PairReport:
  """One registered pair (OUT/report.json). ``files`` and ``times_s['write_s']`` are filled
  in when the result files are written (``outputs.write_outputs``).

  dice: label overlap before/after (``pair_metrics.label_overlap_before_after``) or None
  without both label maps. jacobian: folding and SDlogJ on the registration grid.
  instance_optimisation: its options and losses per scale, or None when off.
  """
  fixed: str
  moving: str
  fixed_labels: str | None
  moving_labels: str | None
  checkpoint: str
  checkpoint_step: int
  head: str | None                # the shipped head's card 'what', else None
  head_finest_level: int
  backbone: dict[str, Any]
  layer: Any
  encoder_input: dict[str, Any]
  grid: GridRecord
  warnings: list[str]
  fixed_grid: dict[str, Any]      # {'shape', 'affine'} of the fixed image's own grid
  dice: dict[str, Any] | None
  jacobian: dict[str, Any]
  instance_optimisation: dict[str, Any] | None
  convention: str
  files: dict[str, Any] = dataclasses.field(default_factory=dict)
  times_s: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'PairReport':
    """The record of a report.json (keys it does not know are an error: another version)."""
    return cls(**{**d, 'grid': GridRecord(**d['grid'])})


@dataclasses.dataclass
class BatchSummary:
  """A batch of pairs (OUT/summary.json; ``rows`` is also OUT/summary.csv): one row per
  pair with its status ("ok", "failed" or "not run"), rewritten after each pair."""
  checkpoint: str
  pairs_csv: str
  batch_key: str                  # what makes two runs the same work (``batch.batch_key``)
  pairs: int
  failed: int
  not_run: int
  resumed: int                    # pairs kept from an earlier run of the same batch
  setup_s: float
  rows: list[dict[str, Any]]

  def count(self) -> None:
    """Recounts ``failed`` and ``not_run`` from the rows."""
    self.failed = sum(r['status'] == 'failed' for r in self.rows)
    self.not_run = sum(r['status'] == 'not run' for r in self.rows)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
