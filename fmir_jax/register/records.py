"""The typed records ``fmir register`` takes, returns and writes: its options
(``RegisterOptions``), one pair's report (report.json) and a batch's summary (summary.json). Their JSON is ``to_json()``: the fields in order, nested
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
  without both label maps. landmarks: the target registration error before, after the linear
  stage and after, or None without landmarks. jacobian: folding and SDlogJ of the deformable part on the
  registration grid (the linear part's Jacobian is det(matrix_mm), constant).
  instance_optimisation: its options and losses per scale, or None when off.
  """
  fixed: str
  moving: str
  fixed_labels: str | None
  moving_labels: str | None
  fixed_mask: str | None
  moving_mask: str | None
  fixed_landmarks: str | None
  moving_landmarks: str | None
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
  landmarks: dict[str, Any] | None  # target registration error (``inputs.landmark_errors``)
  jacobian: dict[str, Any]
  linear: dict[str, Any] | None   # the linear stage's ``linear.LinearRecord``, or None (off)
  instance_optimisation: dict[str, Any] | None
  convention: str
  files: dict[str, Any] = dataclasses.field(default_factory=dict)
  times_s: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary_lines(self) -> list[str]:
    """A short human-readable report (``fmir register`` prints it)."""
    t = self.times_s
    lines = [f"grid {self.grid.mode} {tuple(self.grid.shape)} at "
             f"{tuple(round(s, 3) for s in self.grid.spacing_mm)} mm",
             'time (s): ' + ', '.join(f'{k[:-2]} {v:.2f}' for k, v in t.items())]
    if self.dice:
      d = self.dice
      lines.append(f"Dice: before {d['mean_before']:.4f}, after {d['mean_after']:.4f} "
                   f"(classes {d['classes']}); HD95 {d['hd95_mean_before']:.2f} -> "
                   f"{d['hd95_mean_after']:.2f} mm")
    if self.landmarks and self.landmarks['after_mm']:
      lm = self.landmarks
      lines.append(f"landmarks ({lm['points']}): TRE mean before {lm['before_mm']['mean']:.2f}"
                   f" mm, after {lm['after_mm']['mean']:.2f} mm" + (
                       f" ({lm['outside_fixed_grid']} outside the fixed grid)"
                       if lm['outside_fixed_grid'] else ''))
    if self.linear:
      lin = self.linear
      lines.append(f"linear ({lin['kind']}, from the {lin['start']}): loss "
                   f"{lin['loss_start']:.4f} -> {lin['loss_after'][-1]:.4f}; rotation "
                   + ', '.join(f'{v:.1f}' for v in lin['rotation_deg']) + ' deg')
    j = self.jacobian
    lines.append(f"folding fraction {j['folding_fraction']:.5f}, SDlogJ {j['sdlogj']:.4f}")
    io_r = self.instance_optimisation
    if io_r:
      lines.append(f"instance optimisation ({io_r['options']['similarity']}, steps "
                   f"{io_r['steps']} coarse to fine): finest-scale loss "
                   f"{io_r['loss_before'][-1]:.4f} -> {io_r['loss_after'][-1]:.4f}")
    paths = [p for v in self.files.values() for p in (v if isinstance(v, list) else [v])]
    lines.append('outputs: ' + ', '.join(paths))
    return lines

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'PairReport':
    """The record of a report.json (keys it does not know are an error: another version;
    what a report written before the linear stage, masks and landmarks lacks is None)."""
    older = dict.fromkeys(('linear', 'landmarks', 'fixed_mask', 'moving_mask',
                           'fixed_landmarks', 'moving_landmarks'))
    return cls(**{**older, **d, 'grid': GridRecord(**d['grid'])})


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


@dataclasses.dataclass(frozen=True)
class RegisterOptions:
  """Everything registration needs besides the file paths.

  grid: "model", "native" or None (the run's default: "native" for a run trained on several
  grids, e.g. the general head, else "model"); dataset_grid: None (the run's reader) or
  "acdc"/"abdomen".
  spacing_mm: native-grid voxel size (None: the fixed image's spacing).
  pyramid_factors: per-level factors override (one triple or levels-1 triples), or None
    (model grid: the run's; native grid: those of the training store with the grid's
    spacing, else ``pyramid.factors_for_spacing``).
  backbone/weights/layer: encoder override (None: the run's encoder).
  checkpoint_step: "best", "last"/"latest" or a step number.
  refine: instance optimisation options (``refine.RefineOptions``) or None (off).
  io_init: 'head' (instance optimisation starts from the head's field) or 'zero' (from the
    identity, the head not run: the comparison of what the head's start is worth).
  head_finest_level: the finest pyramid level the head runs (0: all; 1 skips the
    full-resolution level, the costliest, and upsamples the level-1 field: with ``refine``
    the instance optimisation adds the fine detail).
  linear: the linear stage before the head, 'affine' (default), 'rigid' or 'none'
    (``linear.LinearAligner``).
  linear_similarity: its similarity, 'correlation' or 'mi' (``linear.LinearOptions``).
  linear_shape_weight: its penalty on per-axis scale differences and shears
    (``linear.LinearOptions.shape_weight``).
  """
  grid: str | None = None
  dataset_grid: str | None = None
  spacing_mm: tuple[float, float, float] | None = None
  pyramid_factors: Any = None
  backbone: str | None = None
  weights: str | None = None
  layer: int | str | None = None
  checkpoint_step: str = 'best'
  device: str = 'auto'
  dtype: str = 'float32'
  batch_size: int = 16
  refine: Any = None
  io_init: str = 'head'
  head_finest_level: int = 0
  linear: str = 'affine'
  linear_similarity: str = 'correlation'
  linear_shape_weight: float = 1.0
  l2r_dir: str | None = None
  l2r_fixed_id: str | None = None
  l2r_moving_id: str | None = None
  overwrite: bool = False
