"""The typed record of one evaluation (``evaluation.evaluate_run``): the aggregate scores of
a run on a store's pairs and what produced them. Its JSON (summary.json) is ``to_json()``,
the fields in order; Table 1 is kept beside it in table1.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class EvalSummary:
  """metrics: {name: {'mean', 'std', 'n'}} over pairs (``pair_metrics.aggregate``; with
  ``bidirectional_average`` each subject's two directions are averaged first); per_class:
  {name: {str(class): stats}}. feature_s_mean is NaN for a store that recorded no times.
  """
  n_pairs: int
  classes: list[int]
  metrics: dict[str, dict[str, float]]
  per_class: dict[str, dict[str, dict[str, float]]]
  workdir: str
  checkpoint_step: int
  store: str
  split: str
  backbone: dict[str, Any] | None
  mode: str                        # the run's training mode
  channel_norm: str
  bidirectional_average: bool
  n_directed_pairs: int
  pyramid_factors: Any
  pca_store: str
  head_s_mean: float
  feature_s_mean: float
  files: dict[str, Any] = dataclasses.field(default_factory=dict)
  table1: str = ''                 # Markdown (table1.md); not part of summary.json

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    del out['table1']
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any], table1: str = '') -> 'EvalSummary':
    """The record of a summary.json (keys it does not know: TypeError, another version)."""
    return cls(**d, table1=table1)
