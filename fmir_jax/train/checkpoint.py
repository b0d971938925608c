"""Run directory: Orbax checkpoints (last K + best by validation Dice): save, restore,
resume past a corrupt step, choose 'best' / 'last' / a step. run.json and the PCA files are
``train.run_file``'s, the sha256 records ``train.digests``'; ``restore_run`` rebuilds a run's
model from run.json and restores its parameters (``runs.load_run`` is the way to call it).

Layout of ``workdir``::

  run.json                  config, model config, mode, the training store's header
  checkpoints/<step>/       last K train states (Orbax)
  best/<step>/              best train state by validation Dice (Orbax, metric recorded)
  */<step>/fmir_sha256.json the sha256 of every file of that checkpoint, recorded when Orbax
                            has finished writing it (process 0); checked on every restore
  pca/<tag>.npz             PCA bases, one per backbone/layer (tag from the store header)
  tb/                       TensorBoard event files
  corrupt_checkpoints/<step>/  checkpoints that failed to restore on resume, set aside

Commands that only read a run (eval.py, ``fmir register``) create nothing in it.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from fmir_jax.core import errors
from fmir_jax.model import network as model_lib
from fmir_jax.train import distributed
from fmir_jax.train import digests
from fmir_jax.train import run_file
from fmir_jax.train import state as state_lib

SET_ASIDE_DIR = 'corrupt_checkpoints'


# The run errors live in core.errors (the model layer raises them too); named here as well.
RunError = errors.RunError
RunNotFoundError = errors.RunNotFoundError
CheckpointMismatchError = errors.CheckpointMismatchError


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that records the sha256 of every file of each checkpoint it saves
  (``fmir_sha256.json`` in the step folder), once Orbax has finished writing it: in
  ``wait_until_finished``, which Orbax also calls at the start of the next save. Process 0
  records them (checkpoints of a multi-host run live on a filesystem every process sees)."""

  def __init__(self, *args, **kwargs):
    self._undigested: list[int] = []
    super().__init__(*args, **kwargs)

  def save(self, step, *args, **kwargs):
    saved = super().save(step, *args, **kwargs)
    if saved:
      self._undigested.append(int(step))
    return saved

  def wait_until_finished(self):
    super().wait_until_finished()
    steps, self._undigested = self._undigested, []
    if not steps or not distributed.is_primary():
      return
    kept = set(self.all_steps())
    for step in steps:
      folder = step_dir(self, step)
      if step in kept and os.path.isdir(folder):   # else removed by max_to_keep / best_fn
        digests.record_digests(folder)


def managers(workdir: str, keep: int, *, read_only: bool = False):
  """(last-K manager, best-by-Dice manager).

  read_only: for restoring only; creates no folder in the run (a missing one holds no steps).
  """
  root = os.path.abspath(workdir)
  last = _Manager(
      os.path.join(root, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1),
                                           create=not read_only))
  best = _Manager(
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


def _without_aborted_reads(hook, orbax_dir=os.path.dirname(os.path.abspath(ocp.__file__))):
  """``hook`` (a sys.unraisablehook) minus the reports of a failed restore's aborted reads:
  Orbax closes its event loop while TensorStore's other reads are in flight; each of them then
  reports 'Event loop is closed', and each of its read coroutines, when collected (up to
  interpreter exit), turns the close into an exception (dozens of tracebacks)."""

  def drop(u):
    exc, code = u.exc_value, getattr(u.object, 'cr_code', None)
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    if code is not None and str(code.co_filename).startswith(orbax_dir):
      return
    hook(u)

  return drop


def _unretrieved_task_error(record) -> bool:
  """Logging filter: False (drop) for asyncio's report of a task or future whose exception
  nobody retrieved, which the reads of a failed restore leave behind."""
  return 'exception was never retrieved' not in str(record.msg)


def _key_text(path) -> str:
  """A pytree key path as 'params/blocks/0/conv0/kernel/value', the same for a restore
  target and for Orbax's metadata tree of the saved one."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                  for k in path)


def _shape_mismatch(folder: str, abstract) -> tuple[str, tuple, tuple] | None:
  """(array, stored shape, needed shape) of the first array of ``abstract`` whose shape
  differs from the checkpoint's, read from its metadata (no array is read), else None.

  Found before Orbax reads anything: its failed reads leave dozens of tracebacks behind.
  Metadata Orbax cannot read, and arrays found on one side only, are left to its restore.
  """
  item = os.path.join(folder, 'default')
  if not os.path.isdir(item):
    return None
  from etils import epath
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(item))
  except Exception:  # pylint: disable=broad-except  (restore reports it, with its folder)
    return None
  finally:
    handler.close()
  leaves = jax.tree_util.tree_flatten_with_path(getattr(meta, 'tree', meta))[0]
  stored = {_key_text(p): tuple(leaf.shape) for p, leaf in leaves
            if getattr(leaf, 'shape', None) is not None}
  for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    key = _key_text(p)
    if key in stored and stored[key] != tuple(leaf.shape):
      return key, stored[key], tuple(leaf.shape)
  return None


def restore(manager: ocp.CheckpointManager, target, step: int | None = None):
  """Restores the state at ``step`` (default latest) into the structure of ``target``.

  None when the manager holds no checkpoint. RunError naming the file when a file of the
  checkpoint does not match the sha256 recorded when it was written (checkpoints written
  before digests were recorded are not checked), naming the step folder when that
  checkpoint cannot be read (corrupt, truncated or incomplete files);
  CheckpointMismatchError when its arrays do not have the shapes of ``target``'s.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  folder = step_dir(manager, step)
  problem = digests.digest_problem(folder)
  if problem:
    raise RunError(f'checkpoint {folder} cannot be restored ({problem})')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  mismatch = _shape_mismatch(folder, abstract)
  if mismatch:
    run_json = os.path.join(os.path.dirname(str(manager.directory)), run_file.RUN_FILE)
    raise CheckpointMismatchError(
        f'checkpoint {folder} does not fit the model that {run_json} describes (array '
        f'{mismatch[0]}: {mismatch[1]} in the checkpoint, the model needs {mismatch[2]}): '
        'run.json was edited or comes from another run; put back the run.json written with '
        'this checkpoint')
  hook = sys.unraisablehook
  sys.unraisablehook = _without_aborted_reads(hook)
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Orbax / TensorStore raise bare Exception and ValueError here
    # The filters stay: the aborted reads go on reporting after this returns (as unraisable
    # exceptions, and as asyncio's "Task exception was never retrieved" log records).
    std_logging.getLogger('asyncio').addFilter(_unretrieved_task_error)
    raise RunError(f'checkpoint {folder} cannot be restored ({errors.one_line(e)})') from e
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
    except CheckpointMismatchError:     # the model changed, not the checkpoints: move none
      raise
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


def _validated_steps(workdir: str) -> list[int]:
  """The steps the run's validation log (``val.jsonl``) records, in order."""
  steps = []
  try:
    with open(os.path.join(workdir, run_file.VAL_LOG)) as f:
      for line in f:
        try:
          steps.append(int(json.loads(line)['step']))
        except (ValueError, KeyError, TypeError):   # a line cut by a kill
          continue
  except OSError:
    pass
  return steps


def best_or_latest(workdir: str, which: str = 'best'):
  """(manager, step) of the checkpoint to evaluate, opened read-only.

  which: 'best', 'last' (alias 'latest') or a saved step. 'best' is the last one, with a
  warning, when the run has not validated yet; when it has validated (``val.jsonl``) but
  ``best/`` holds no checkpoint (deleted or moved), RunError says so and names the fix.
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
      raise RunNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first')
    if which == 'best':
      validated = _validated_steps(workdir)
      if validated:
        raise RunError(
            f"checkpoint 'best': {os.path.join(workdir, 'best')} holds no checkpoint, yet the "
            f'run validated ({len(validated)} record{"s" * (len(validated) != 1)} in '
            f'{os.path.join(workdir, run_file.VAL_LOG)}, the last at step {validated[-1]}): the best '
            'checkpoint was deleted or moved. '
            'Put it back, or pass --checkpoint-step=last (eval.py: --checkpoint=last) or a '
            f'saved step, one of {sorted(last.all_steps())}')
      logging.warning("checkpoint 'best': %s has not validated yet (no %s), so no checkpoint "
                      'is best; using the last one, step %d', workdir, run_file.VAL_LOG,
                      last.latest_step())
    return last, last.latest_step()
  step = int(which)
  if step not in last.all_steps():
    if step in best.all_steps():          # e.g. the shipped head: best/<step> only
      return best, step
    raise RunError(f'no checkpoint at step {step} in {workdir}/checkpoints: use '
                   f'{_choices(last.all_steps())}')
  return last, step


def restore_chosen(workdir: str, manager: ocp.CheckpointManager, step: int, target):
  """``restore`` of the checkpoint ``best_or_latest`` chose; on failure RunError names its
  folder and the run's other steps."""
  try:
    return restore(manager, target, step)
  except CheckpointMismatchError:       # names run.json and the fix itself
    raise
  except RunError as e:
    last, _ = managers(workdir, keep=1000, read_only=True)
    failed = step_dir(manager, step)
    others = [s for s in sorted(last.all_steps()) if step_dir(last, s) != failed]
    fix = (f'use another checkpoint: --checkpoint=STEP (fmir register: '
           f'--checkpoint-step=STEP) with STEP one of {others}, or train the run again'
           if others else 'the run has no other checkpoint: train it again')
    raise RunError(f'{e}; it may be corrupt or incomplete: {fix}') from e




def restore_run(workdir: str, which: str = 'best'):
  """(config, graphdef, params, run.json, step, model config) of a run; writes nothing to it.

  which: 'best', 'last' (alias 'latest') or a saved step (``best_or_latest``). Callers use
  ``runs.load_run``, which adds the checks of the folder and of a shipped head.
  """
  info = run_file.read_run_info(workdir)
  run_file.check_run_info(workdir, info)                # one line naming run.json and key
  mgr, step = best_or_latest(workdir, which)            # before the compile: fails fast
  config = ml_collections.ConfigDict(info['config'])
  try:
    graphdef, state, _, _ = state_lib.create(config, int(info['store_header']['channels']),
                                             int(info['total_steps']))
  except ValueError as e:   # a value the model refuses (unknown activation, c' > channels)
    raise RunError(f'{os.path.join(workdir, run_file.RUN_FILE)}: the model it describes '
                   f'cannot be built ({e}); put back the run.json that train.py wrote '
                   'for this run') from e
  restored = restore_chosen(workdir, mgr, step, state)
  params = restored.params if hasattr(restored, 'params') else restored[1]
  return config, graphdef, params, info, step, model_lib.FMIRConfig.from_dict(info['model'])
