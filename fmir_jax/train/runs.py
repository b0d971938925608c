"""A trained run, loaded: the one ``load_run`` (config, model graph and parameters, run.json,
step) and its PCA basis for a store header. Every command that reads a run (eval.py,
``fmir register``) loads it here.

Numpy-only at import: the checkpoint code (jax, orbax) is imported when a run is loaded, so
``fmir --help`` and the input checks of ``fmir register`` stay light.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from fmir_jax.core import errors
from fmir_jax.core import store as store_lib
from fmir_jax.core.errors import RunError
from fmir_jax.train import digests


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """A loaded training run: config, model graph and parameters, store header, step."""
  workdir: str
  config: Any
  graphdef: Any
  params: Any
  info: dict[str, Any]
  step: int
  model: Any            # the typed model config (``network.FMIRConfig``, from run.json)
  store_settings: list  # run_file.StoreSetting per training store ([]: a run before them)

  @property
  def header(self) -> dict[str, Any]:
    """The header of the feature store the run was trained on."""
    return self.info['store_header']

  @property
  def dataset(self) -> tuple[str, dict[str, Any]]:
    """(reader name, reader options) of the training store."""
    ds = self.header.get('dataset', {})
    return (store_lib.dataset_name(self.header) or '',
            dict(ds.get('options') or {}) if isinstance(ds, dict) else {})


def load_run(workdir: str, which: str = 'best', *, flag: str | None = '--checkpoint'
             ) -> RunInfo:
  """Loads a training run directory (reads only) with clear errors.

  which: 'best', 'last' (alias 'latest') or a saved step. flag: the command-line flag that
  named ``workdir``, prefixed to every error (None: the errors as the run files raise them).
  Raises RunError, one line naming the file and the fix, for a folder that is not a run, a
  run.json that does not describe a model, a checkpoint whose files changed since they were
  written (sha256), one of another shape, and a shipped head whose files do not match its card.
  """
  from fmir_jax.train import checkpoint as ckpt, run_file   # jax + orbax: only when loaded
  where = f'{flag} {workdir}' if flag else workdir
  if not os.path.isdir(workdir):
    raise RunError(f'{where}: directory does not exist. Pass the --workdir of '
                   'a training run (train.py).')
  if not os.path.exists(os.path.join(workdir, run_file.RUN_FILE)):
    raise RunError(f'{where}: no {run_file.RUN_FILE}; this is not an fmir-jax '
                   'training run directory (train.py --workdir=... creates it).')
  problem = digests.shipped_head_problem(workdir)   # its card records its files' sha256
  if problem:
    raise RunError(f'{where}: {problem}. Reinstall fmir-jax (its shipped head), '
                   'or ship the run again: python -m fmir_jax.general --out OUT --ship DIR')
  try:
    config, graphdef, params, info, step, model = ckpt.restore_run(workdir, which)
  except errors.UserError as e:
    if not flag:
      raise
    raise RunError(f'{where}: {e}') from e
  settings = [run_file.StoreSetting.from_json(s) for s in info.get('store_settings') or []]
  return RunInfo(workdir, config, graphdef, params, info, int(step), model, settings)


def pca_basis(run: RunInfo, header: dict[str, Any]):
  """The PCA basis of ``header``'s feature space saved in the run, or a clear refusal."""
  from fmir_jax.train import run_file   # the PCA file's record type is the model's (jax)
  basis = run_file.load_pca(run.workdir, header)
  if basis is None:
    bb = header.get('backbone', {})
    raise RunError(
        f'--checkpoint {run.workdir}: no PCA basis for backbone {bb.get("name")} (layer '
        f'{header.get("layer")}) in {run_file.pca_path(run.workdir, header)}. Extract features of '
        'some training images with this backbone (feature_extract/run.py --backbone ...) and '
        f'fit one with: python eval.py --workdir={run.workdir} --features=STORE '
        '--pca_store=STORE (STORE: features of training images with this backbone; each '
        'backbone gets its own basis).')
  c_prime = run.model.feature_channels
  if basis.components.shape != (int(header['channels']), c_prime):
    raise RunError(f'{run.workdir}: PCA basis has shape {basis.components.shape}, expected '
                   f'({header["channels"]}, {c_prime}).')
  return basis
