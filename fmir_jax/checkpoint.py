"""Run directory: Orbax checkpoints (last K + best by validation Dice), run metadata and
PCA bases per backbone.

Layout of ``workdir``::

  run.json                  config, model config, mode, the training store's header
  checkpoints/<step>/       last K train states (Orbax)
  best/<step>/              best train state by validation Dice (Orbax, metric recorded)
  pca/<tag>.npz             PCA bases, one per backbone/layer (tag from the store header)
  tb/                       TensorBoard event files
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmir_jax import channel_reg
from fmir_jax import store as store_lib

RUN_FILE = 'run.json'


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_run_info(workdir: str, info: dict[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  _atomic_write_text(os.path.join(workdir, RUN_FILE), json.dumps(info, indent=2, sort_keys=True))


def read_run_info(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not an fmir-jax training run '
                            '(train.py --workdir=... creates it)')
  with open(path) as f:
    return json.load(f)


def managers(workdir: str, keep: int):
  """(last-K manager, best-by-Dice manager)."""
  root = os.path.abspath(workdir)
  last = ocp.CheckpointManager(
      os.path.join(root, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True))
  best = ocp.CheckpointManager(
      os.path.join(root, 'best'),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m['val_dice'],
                                           best_mode='max', create=True,
                                           keep_checkpoints_without_metrics=False))
  return last, best


def save(manager: ocp.CheckpointManager, step: int, state, metrics=None) -> None:
  manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics)


def restore(manager: ocp.CheckpointManager, target, step: int | None = None):
  """Restores the state at ``step`` (default latest) into the structure of ``target``."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def best_or_latest(workdir: str, which: str = 'best'):
  """(manager, step) of the checkpoint to evaluate: 'best', 'last' or an explicit step."""
  last, best = managers(workdir, keep=1000)
  if which == 'best' and best.best_step() is not None:
    return best, best.best_step()
  if which in ('best', 'last'):
    if last.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first')
    return last, last.latest_step()
  step = int(which)
  if step not in last.all_steps():
    raise FileNotFoundError(f'no checkpoint at step {step} in {workdir}/checkpoints '
                            f'(have {sorted(last.all_steps())})')
  return last, step


# ------------------------------------------------------------------------------------ PCA files

def backbone_tag(header: dict[str, Any]) -> str:
  """A file-name tag for a store's feature space: backbone name, weights and layer."""
  name = store_lib.backbone_name(header)
  ident = json.dumps({f: store_lib.get_field(header, f) for f in store_lib.COMPAT_FIELDS},
                     sort_keys=True)
  digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
  return re.sub(r'[^A-Za-z0-9._-]', '_', f'{name}-layer{header.get("layer")}-{digest}')


def pca_path(workdir: str, header: dict[str, Any]) -> str:
  return os.path.join(workdir, 'pca', backbone_tag(header) + '.npz')


def save_pca(workdir: str, header: dict[str, Any], basis: channel_reg.PCABasis,
             source: str) -> str:
  path = pca_path(workdir, header)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {k: np.asarray(v) for k, v in basis.to_dict().items()}
  arrays['header_json'] = np.asarray(json.dumps(header, sort_keys=True))
  arrays['source'] = np.asarray(source)
  tmp = path + f'.tmp-{os.getpid()}.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def load_pca(workdir: str, header: dict[str, Any]) -> channel_reg.PCABasis | None:
  path = pca_path(workdir, header)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    d = {k: z[k] for k in z.files if k not in ('header_json', 'source')}
  return channel_reg.PCABasis.from_dict(d)
