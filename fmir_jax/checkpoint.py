"""Run directory: Orbax checkpoints (last K + best by validation Dice), run metadata and
PCA bases per backbone.

Layout of ``workdir``::

  run.json                  config, model config, mode, the training store's header
  checkpoints/<step>/       last K train states (Orbax)
  best/<step>/              best train state by validation Dice (Orbax, metric recorded)
  pca/<tag>.npz             PCA bases, one per backbone/layer (tag from the store header)
  tb/                       TensorBoard event files
  corrupt_checkpoints/<step>/  checkpoints that failed to restore on resume, set aside

Commands that only read a run (eval.py, ``fmir register``) create nothing in it.
"""
from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fmir_jax import channel_reg
from fmir_jax import distributed
from fmir_jax import errors
from fmir_jax import files
from fmir_jax import store as store_lib

RUN_FILE = 'run.json'
SET_ASIDE_DIR = 'corrupt_checkpoints'


class RunError(errors.UserError, ValueError):
  """A run directory, checkpoint or PCA file that cannot be used; the message names the path
  and the fix."""


def _one_line(e: BaseException) -> str:
  """An exception's first sentence on one short line (TensorStore's span many lines)."""
  text = ' '.join(str(e).split()).split('. ')[0] or type(e).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def unwritable_reason(path: str) -> str | None:
  """Why ``path`` cannot be (created as) a writable directory, or None when it can.

  Looks at ``path`` or its nearest existing ancestor; creates nothing.
  """
  p = os.path.abspath(path)
  while not os.path.exists(p):     # also False below a regular file (file.txt/sub)
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    return f'{p} is a file, not a directory'
  if not os.access(p, os.W_OK | os.X_OK):
    return f'{p} is not writable'
  return None


def write_run_info(workdir: str, info: dict[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  with files.atomic_path(os.path.join(workdir, RUN_FILE)) as tmp, open(tmp, 'w') as f:
    f.write(json.dumps(info, indent=2, sort_keys=True))


def read_run_info(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not an fmir-jax training run '
                            '(train.py --workdir=... creates it)')
  with open(path) as f:
    return json.load(f)


def managers(workdir: str, keep: int, *, read_only: bool = False):
  """(last-K manager, best-by-Dice manager).

  read_only: for restoring only; creates no folder in the run (a missing one holds no steps).
  """
  root = os.path.abspath(workdir)
  last = ocp.CheckpointManager(
      os.path.join(root, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1),
                                           create=not read_only))
  best = ocp.CheckpointManager(
      os.path.join(root, 'best'),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m['val_dice'],
                                           best_mode='max', create=not read_only,
                                           keep_checkpoints_without_metrics=False))
  return last, best


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(int(step)))


def save(manager: ocp.CheckpointManager, step: int, state, metrics=None) -> None:
  manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics)
  if jax.process_count() > 1:
    # Across processes Orbax names its commit barrier after the step alone: the last-K and
    # best managers saving the same step at once would collide, so each save completes first.
    manager.wait_until_finished()


def _without_closed_loop_errors(hook):
  """``hook`` (a sys.unraisablehook) minus 'Event loop is closed' errors: after a restore fails,
  Orbax closes its event loop while TensorStore's other reads are in flight, and each of
  them reports that error as an unraisable exception (dozens of tracebacks) for a while."""

  def drop(u):
    if not (isinstance(u.exc_value, RuntimeError)
            and str(u.exc_value) == 'Event loop is closed'):
      hook(u)

  return drop


def _unretrieved_task_error(record) -> bool:
  """Logging filter: False (drop) for asyncio's report of a task or future whose exception
  nobody retrieved, which the reads of a failed restore leave behind."""
  return 'exception was never retrieved' not in str(record.msg)


def restore(manager: ocp.CheckpointManager, target, step: int | None = None):
  """Restores the state at ``step`` (default latest) into the structure of ``target``.

  None when the manager holds no checkpoint; RunError naming the step folder when that
  checkpoint cannot be read (corrupt, truncated or incomplete files).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  hook = sys.unraisablehook
  sys.unraisablehook = _without_closed_loop_errors(hook)
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Orbax / TensorStore raise bare Exception and ValueError here
    # The filters stay: the aborted reads go on reporting after this returns (as unraisable
    # exceptions, and as asyncio's "Task exception was never retrieved" log records).
    std_logging.getLogger('asyncio').addFilter(_unretrieved_task_error)
    raise RunError(f'checkpoint {step_dir(manager, step)} cannot be restored '
                   f'({_one_line(e)})') from e
  sys.unraisablehook = hook
  return state


def _set_aside(folder: str, workdir: str) -> str:
  """Moves a checkpoint folder to workdir/corrupt_checkpoints/ (never deletes it)."""
  dest_root = os.path.join(workdir, SET_ASIDE_DIR)
  os.makedirs(dest_root, exist_ok=True)
  dest = os.path.join(dest_root, os.path.basename(folder))
  n = 1
  while os.path.exists(dest):
    dest, n = os.path.join(dest_root, f'{os.path.basename(folder)}-{n}'), n + 1
  os.replace(folder, dest)
  return dest


def restore_for_resume(manager: ocp.CheckpointManager, target, workdir: str):
  """The newest checkpoint of ``manager`` that restores (None when there is none).

  Newer checkpoints that fail are moved to ``workdir/corrupt_checkpoints/`` with a one-line
  warning each, so that training can save those steps again. When no checkpoint restores,
  nothing is moved and RunError names the folder and the fix.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failed = []
  for step in steps:
    try:
      state = restore(manager, target, step)
    except RunError as e:
      failed.append((step, e))
      continue
    for bad, e in failed:          # every process sees the same failures; process 0 moves
      if distributed.is_primary():
        dest = _set_aside(step_dir(manager, bad), workdir)
        logging.warning('%s; moved it to %s and resuming from step %d', e, dest, step)
    if failed:
      distributed.barrier('set-aside')
      manager.reload()
    return state
  if failed:
    raise RunError(f'no checkpoint in {manager.directory} can be restored (steps '
                   f'{sorted(steps)}; {failed[0][1]}). Move {manager.directory} away to train '
                   'this run from step 0, or use a new --workdir')
  return None


def _choices(steps) -> str:
  return f"'best', 'last' (or 'latest'), or one of the saved steps {sorted(steps)}"


def best_or_latest(workdir: str, which: str = 'best'):
  """(manager, step) of the checkpoint to evaluate, opened read-only.

  which: 'best', 'last' (alias 'latest') or a saved step; 'best' is the last one when no
  validation ran.
  """
  last, best = managers(workdir, keep=1000, read_only=True)
  which = str(which).strip().lower()
  which = 'last' if which == 'latest' else which
  if which not in ('best', 'last') and not which.isdigit():
    raise RunError(f'checkpoint {which!r}: use {_choices(last.all_steps())}')
  if which == 'best' and best.best_step() is not None:
    return best, best.best_step()
  if which in ('best', 'last'):
    if last.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first')
    return last, last.latest_step()
  step = int(which)
  if step not in last.all_steps():
    raise RunError(f'no checkpoint at step {step} in {workdir}/checkpoints: use '
                   f'{_choices(last.all_steps())}')
  return last, step


def restore_chosen(workdir: str, manager: ocp.CheckpointManager, step: int, target):
  """``restore`` of the checkpoint ``best_or_latest`` chose; on failure RunError names its
  folder and the run's other steps."""
  try:
    return restore(manager, target, step)
  except RunError as e:
    last, _ = managers(workdir, keep=1000, read_only=True)
    failed = step_dir(manager, step)
    others = [s for s in sorted(last.all_steps()) if step_dir(last, s) != failed]
    fix = (f'evaluate another checkpoint: --checkpoint=STEP (fmir register: '
           f'--checkpoint-step=STEP) with STEP one of {others}' if others else
           'the run has no other checkpoint: train it again')
    raise RunError(f'{e}; it may be corrupt or incomplete: {fix}') from e


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
  with files.atomic_path(path) as tmp:
    np.savez(tmp, **arrays)
  return path


def load_pca(workdir: str, header: dict[str, Any]) -> channel_reg.PCABasis | None:
  """The run's PCA basis for ``header``'s feature space; None when there is none.

  A file that is not a plain-array .npz basis (truncated, pickled, other keys) raises
  RunError naming it and the refit command.
  """
  path = pca_path(workdir, header)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files if k not in ('header_json', 'source')}
    return channel_reg.PCABasis.from_dict(d)
  except Exception as e:  # zipfile, pickle, numpy and key errors alike
    raise RunError(
        f'{path} is not a readable PCA basis ({_one_line(e)}). Delete it and refit it: '
        f'python eval.py --workdir={workdir} --features=STORE --pca_store=TRAIN_STORE '
        '(TRAIN_STORE: features of this backbone on training data; for the training '
        f'backbone, resuming train.py --workdir={workdir} also refits it)') from e
