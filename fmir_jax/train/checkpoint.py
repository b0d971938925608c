"""Run directory: Orbax checkpoints (last K + best by validation Dice), run metadata and
PCA bases per backbone.

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

import dataclasses
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

from fmir_jax.model import channel_reg
from fmir_jax.train import distributed
from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.core import store as store_lib

RUN_FILE = 'run.json'
SET_ASIDE_DIR = 'corrupt_checkpoints'
DIGESTS_FILE = 'fmir_sha256.json'   # in each step folder: {"sha256": {relative path: hex}}
HEAD_CARD = 'general_head.json'     # general.CARD: a shipped head's card, its files' sha256
VAL_LOG = 'val.jsonl'               # trainer.VAL_LOG: one record per validation


# The run errors live in core.errors (the model layer raises them too); named here as well.
RunError = errors.RunError
RunNotFoundError = errors.RunNotFoundError
CheckpointMismatchError = errors.CheckpointMismatchError


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
    raise RunNotFoundError(f'{path} not found: {workdir} is not an fmir-jax training run '
                           '(train.py --workdir=... creates it)')
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise RunError(f'{path} is not readable JSON ({_one_line(e)}); put back the run.json that '
                   'train.py wrote for this run') from e


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _field_problem(field: dataclasses.Field, v) -> str | None:
  """Why ``v`` (from JSON) cannot be the value of an ``FMIRConfig`` field, or None."""
  default = field.default
  if isinstance(default, bool):
    return None if isinstance(v, bool) else 'must be true or false'
  if isinstance(default, int):
    low = 0 if field.name == 'integration_steps' else 1
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= low else \
        f'must be an integer >= {low}'
  if isinstance(default, str):
    from fmir_jax.ops import conv as conv_lib
    from fmir_jax.model import network as model_lib
    choices = {'activation': model_lib.ACTIVATIONS, 'kernel_init': model_lib.KERNEL_INITS,
               'flow_init': model_lib.FLOW_INITS, 'conv_impl': conv_lib.IMPLS}.get(field.name)
    if not isinstance(v, str) or (choices is not None and v not in choices):
      return f'must be one of {sorted(choices)}' if choices is not None else 'must be a string'
    return None
  if isinstance(default, tuple):         # factors: one (sx, sy, sz) triple or one per level
    triples = v if isinstance(v, list) and v and isinstance(v[0], list) else [v]
    if not (isinstance(v, list) and v and all(
        isinstance(t, list) and len(t) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t)
        for t in triples)):
      return 'must be one positive integer triple [sx, sy, sz], or a list of them'
  return None


def check_run_info(workdir: str, info: Any) -> None:
  """RunError naming run.json, the key and the fix when ``info`` (its content) cannot describe
  a model: a missing entry, an unknown key under ``model`` or ``config.model``, a value of the
  wrong type, or the two model sections disagreeing (an edited file)."""
  from fmir_jax.model import network as model_lib
  path = os.path.join(workdir, RUN_FILE)
  fix = 'put back the run.json that train.py wrote for this run (or train it again)'

  def bad(what: str):
    raise RunError(f'{path}: {what}; {fix}')

  if not isinstance(info, dict):
    bad('not a JSON object')
  for key, kind in (('config', dict), ('model', dict), ('store_header', dict),
                    ('total_steps', int)):
    if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
      bad(f'{key!r} is missing or not a JSON {"object" if kind is dict else "integer"}')
  fields = {f.name: f for f in dataclasses.fields(model_lib.FMIRConfig)}
  config = info['config']
  for name, v in (('store_header.channels', info['store_header'].get('channels')),
                  ('config.feature_channels', config.get('feature_channels'))):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      bad(f'{name} is {v!r}, must be an integer >= 1')
  if not isinstance(config.get('model'), dict):
    bad("'config.model' is missing or not a JSON object")
  required = ('n', 'levels', 'factors', 'integration_steps', 'activation',
              'head_instance_norm', 'exact_feature_path')     # train_lib.model_config reads
  for section, known in (('model', fields), ('config.model', {
      k: f for k, f in fields.items() if k != 'feature_channels'})):
    values = info['model'] if section == 'model' else config['model']
    for key, v in values.items():
      if key not in known:
        bad(f'unknown key {key!r} under {section!r} (known: {", ".join(sorted(known))})')
      problem = _field_problem(known[key], v)
      if problem:
        bad(f'{section}.{key} is {v!r}: it {problem}')
    if section == 'config.model':
      for key in required:
        if key not in values:
          bad(f'no key {key!r} under {section!r}')
  built = {**{k: f.default for k, f in fields.items()}, **config['model'],
           'feature_channels': config['feature_channels']}
  saved = {**{k: f.default for k, f in fields.items()}, **info['model']}
  for key in fields:
    if _tuples(built[key]) != _tuples(saved[key]):
      where = 'config.feature_channels' if key == 'feature_channels' else f'config.model.{key}'
      bad(f'model.{key} is {saved[key]!r} but {where} is {built[key]!r}')




def folder_digests(folder: str, skip=(DIGESTS_FILE,)) -> dict[str, str]:
  """{path relative to ``folder`` (with /): sha256} of every file below ``folder`` but
  ``skip`` and hidden ones (temporary files, .gitattributes: not part of the data)."""
  out = {}
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(n for n in names if not n.startswith('.')):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder).replace(os.sep, '/')
      if rel not in skip:
        out[rel] = files.file_digest(path)
  return out


def record_digests(folder: str) -> str:
  """Writes ``folder/fmir_sha256.json``: the sha256 of every other file of the checkpoint
  folder (after Orbax has finished it). Returns its path."""
  path = os.path.join(folder, DIGESTS_FILE)
  with files.atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump({'sha256': folder_digests(folder)}, f, indent=0, sort_keys=True)
  return path


def digest_problem(folder: str, record: str | None = None) -> str | None:
  """None when every file listed in the digest record (default ``folder/fmir_sha256.json``)
  has its recorded sha256; else one sentence naming the first file that does not. A folder
  without a record (written before digests were recorded) passes unchecked."""
  record = record or os.path.join(folder, DIGESTS_FILE)
  if not os.path.exists(record):
    logging.debug('%s: no %s (written before checkpoints recorded digests); not verified',
                  folder, DIGESTS_FILE)
    return None
  try:
    with open(record) as f:
      expected = json.load(f)['sha256']
    expected = {str(k): str(v) for k, v in expected.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f'{record} is not a readable digest record ({_one_line(e)})'
  for rel, sha in sorted(expected.items()):
    path = os.path.join(folder, *rel.split('/'))
    if not os.path.isfile(path):
      return f'{path} is missing (listed in {record})'
    if files.file_digest(path) != sha:
      return (f'{path} does not match its sha256 in {record}, recorded when it was written '
              '(its bytes changed on disk)')
  return None


def shipped_head_problem(folder: str) -> str | None:
  """``digest_problem`` of a shipped head (``python -m fmir_jax.general --ship``) against the
  sha256 its card records; None for a folder without a card, or a card without digests."""
  card = os.path.join(folder, HEAD_CARD)
  if not os.path.isfile(card):
    return None
  try:
    with open(card) as f:
      recorded = 'sha256' in json.load(f)
  except (OSError, ValueError, TypeError) as e:
    return f'{card} is not readable JSON ({_one_line(e)})'
  return digest_problem(folder, card) if recorded else None


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
        record_digests(folder)


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
  problem = digest_problem(folder)
  if problem:
    raise RunError(f'checkpoint {folder} cannot be restored ({problem})')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  mismatch = _shape_mismatch(folder, abstract)
  if mismatch:
    run_file = os.path.join(os.path.dirname(str(manager.directory)), RUN_FILE)
    raise CheckpointMismatchError(
        f'checkpoint {folder} does not fit the model that {run_file} describes (array '
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
    raise RunError(f'checkpoint {folder} cannot be restored ({_one_line(e)})') from e
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
    with open(os.path.join(workdir, VAL_LOG)) as f:
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
            f'{os.path.join(workdir, VAL_LOG)}, the last at step {validated[-1]}): the best '
            'checkpoint was deleted or moved. '
            'Put it back, or pass --checkpoint-step=last (eval.py: --checkpoint=last) or a '
            f'saved step, one of {sorted(last.all_steps())}')
      logging.warning("checkpoint 'best': %s has not validated yet (no %s), so no checkpoint "
                      'is best; using the last one, step %d', workdir, VAL_LOG,
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
