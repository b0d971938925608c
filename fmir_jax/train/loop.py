"""The training loop (what ``train.py`` runs): resumable, logged, data-parallel."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from fmir_jax.model import channel_reg
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import run_file
from fmir_jax.train import data as data_lib
from fmir_jax.train import distributed
from fmir_jax.core import errors
from fmir_jax.evaluate import evaluation
from fmir_jax.core import store as store_lib
from fmir_jax.train import step as step_lib
from fmir_jax.train import checks
from fmir_jax.model import inference
from fmir_jax.train import plan as plan_lib
from fmir_jax.train import state as state_lib


class NonFiniteLossError(errors.UserError, FloatingPointError):
  pass


VAL_LOG = 'val.jsonl'     # one JSON line per validation (a resumed run may repeat a step)
VAL_METRICS = ('dice_mean', 'initial_dice_mean', 'folding_fraction')


def _validate(val_sets: Sequence[plan_lib.ValidationSet], params, pca) -> dict[str, float]:
  """Means of ``VAL_METRICS`` over each store's validation pairs, then over the stores (so
  every dataset weighs the same), with inputs ``pca``. In a multi-host run each process
  scores its share of the pairs and the rows are gathered."""
  params, pca = distributed.local_copy(params), distributed.local_copy(pca)
  per_store = []
  for vs in val_sets:
    mine = list(vs.refs[jax.process_index()::jax.process_count()])
    res = evaluation.evaluate_pairs(vs.predict, params, [vs.store], mine, pca, vs.classes)
    rows = np.asarray([[getattr(r.metrics, m) for m in VAL_METRICS] for r in res], np.float64)
    per_store.append(np.nanmean(distributed.allgather_rows(rows.reshape(-1, 3)), axis=0))
  return dict(zip(VAL_METRICS, (float(v) for v in np.mean(per_store, axis=0))))


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())


def read_val_log(workdir: str) -> dict[int, dict]:
  """{step: record} of a run's validations (the last record of a repeated step wins)."""
  out = {}
  path = os.path.join(workdir, VAL_LOG)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          try:
            rec = json.loads(line)
          except ValueError:      # a line cut by a kill
            continue
          out[int(rec['step'])] = rec
  return out


class _NoWriter:
  """TensorBoard stand-in for the processes other than 0 of a multi-host run."""

  def add_scalar(self, *args, **kwargs):
    pass

  flush = close = add_scalar


@dataclasses.dataclass
class TrainResult:
  step: int
  losses: dict[int, float]            # step -> total loss (this invocation's steps)
  val_dice: dict[int, float]
  workdir: str


def train_and_evaluate(config, workdir: str, *, stop_after_steps: int = 0,
                       mesh=None, quiet: bool = False) -> TrainResult:
  """Trains (or resumes) the run in ``workdir``.

  stop_after_steps: leave after this many steps of this invocation (a time slice on a
    preemptible machine); the next call resumes from the last checkpoint.
  """
  # Every user error that needs no compiled program is raised before the run folder exists.
  _check_request(config, workdir, stop_after_steps)
  mode = step_lib.mode_of(config.mode).name
  norm = inference.channel_norm(config)
  mesh = mesh or distributed.make_mesh()
  tp = plan_lib.plan(config, int(mesh.devices.size), evaluation.settings_for_store)
  graphdef, state, tx, mcfg = state_lib.create(config, int(tp.header['channels']),
                                               tp.num_steps)
  primary = distributed.is_primary()      # writes the run's shared files (multi-host runs)
  _write_run_info(config, workdir, tp, mcfg, mode, int(mesh.devices.size), primary)
  pca = inference.pca_to_device(_pca_basis(config, workdir, tp, norm, primary), norm)
  draw_pca = _draw_pca(config, mode, tp.header, pca)
  last_mgr, best_mgr = ckpt.managers(workdir, int(config.train.keep_checkpoints))
  state = _restore(last_mgr, state, workdir, mesh)
  start = int(state.step)
  pca = jax.device_put(pca, step_lib.replicated(mesh))
  step_of_store = _compile_steps(config, mode, graphdef, tx, tp.settings, mesh)
  val_sets = _validation_sets(config, graphdef, tp)
  end = tp.num_steps if not stop_after_steps else min(tp.num_steps,
                                                      start + int(stop_after_steps))
  from tensorboardX import SummaryWriter   # it imports torch: only when a run writes events
  writer = SummaryWriter(os.path.join(workdir, 'tb')) if primary else _NoWriter()
  entries = int(config.train.batch_size) * (2 if config.train.bidirectional else 1)
  batches = data_lib.train_batches(
      tp.stores, batch_size=int(config.train.batch_size), seed=int(config.train.seed),
      start_step=start, num_steps=end, bidirectional=bool(config.train.bidirectional),
      prefetch=int(config.data.prefetch), part=distributed.share(entries))
  bar = tqdm(total=tp.num_steps, initial=start, desc=f'train {config.name} [{mode}]',
             disable=quiet or not primary, dynamic_ncols=True, unit='step')
  run = _Run(config, workdir, mesh, step_of_store, val_sets, pca, draw_pca, last_mgr,
             best_mgr, writer, bar, primary, tp.num_steps)
  try:
    state, losses, val_dice = _steps(run, state, batches, start, end)
  finally:
    bar.close()
    writer.close()
    last_mgr.wait_until_finished()
    best_mgr.wait_until_finished()
  return TrainResult(step=int(state.step), losses=losses, val_dice=val_dice, workdir=workdir)


def _check_request(config, workdir: str, stop_after_steps: int) -> None:
  """The config, --stop_after_steps and --workdir, before anything is opened."""
  checks.check_config(config)
  if int(stop_after_steps) < 0:
    raise step_lib.ConfigError(f'--stop_after_steps={stop_after_steps}: must be >= 0 '
                                '(0 = run to the end)')
  why = run_file.unwritable_reason(workdir)
  if why:
    raise ckpt.RunError(f'--workdir={workdir}: {why}; pass a directory path you can write to')


def _write_run_info(config, workdir: str, tp: plan_lib.TrainPlan, mcfg, mode: str,
                    num_devices: int, primary: bool) -> None:
  """run.json (process 0); a resumed run must describe the same model, mode and norm."""
  os.makedirs(workdir, exist_ok=True)
  run_info = json.loads(json.dumps({
      'config': config.to_dict(), 'model': dataclasses.asdict(mcfg), 'mode': mode,
      'channel_norm': config.get('channel_norm', 'paper'),
      'store_header': tp.header, 'train_stores': list(config.data.train_stores),
      'total_steps': tp.num_steps, 'num_devices': num_devices,
      'store_datasets': tp.store_datasets,
      'store_settings': [s.to_json() for s in tp.settings]}))
  if os.path.exists(os.path.join(workdir, run_file.RUN_FILE)):
    old = run_file.read_run_info(workdir)
    old_norm = old.get('channel_norm', 'paper')
    if (old['model'] != run_info['model'] or old['mode'] != mode
        or old_norm != run_info['channel_norm']):
      raise ckpt.RunError(f'{workdir} holds a run with another model/mode/channel_norm '
                          f'({old["mode"]}, {old_norm}, {old["model"]}); use a new --workdir')
    store_lib.check_compatible(old['store_header'], tp.header)
  if primary:
    run_file.write_run_info(workdir, run_info)


def _pca_basis(config, workdir: str, tp: plan_lib.TrainPlan, norm, primary: bool):
  """The PCA basis on the training features: inference for UN/WS, training and inference
  for -CR. Fitted once, by process 0; the others read its file."""
  header = tp.header
  basis = run_file.load_pca(workdir, header) if primary else None
  if primary and basis is None:
    logging.info('fitting a %s PCA (c=%d -> c\'=%d) on the training features', norm.fit,
                 header['channels'], int(config.feature_channels))
    basis = inference.fit_pca(tp.stores, int(config.feature_channels),
                              max_volumes=int(config.train.pca_max_volumes), fit=norm.fit)
    run_file.save_pca(workdir, header, basis, source=','.join(st.path for st in tp.stores))
  distributed.barrier('pca')
  return basis or run_file.load_pca(workdir, header)


def _draw_pca(config, mode: str, header, pca):
  """The head's training-time inputs on validation pairs (a fixed draw), or None: a gap
  between this curve and the PCA one is a train/inference mismatch."""
  if not (bool(config.train.get('eval_channel_draw', False))
          and step_lib.mode_of(mode).random_channels):
    return None
  idx = channel_reg.draw_channels(jax.random.key(int(config.train.seed) + 1),
                                  int(header['channels']), int(config.feature_channels))
  return {k: jnp.asarray(v) for k, v in channel_reg.selection_inputs(
      {k: np.asarray(v) for k, v in pca.items()}, np.asarray(idx)).items()}


def _restore(last_mgr, state, workdir: str, mesh):
  """The state to start from: the last sound checkpoint, else ``state``. Placed as the step
  returns it (replicated; other shardings would make the second call compile again)."""
  state = jax.device_put(state, step_lib.replicated(mesh))
  restored = ckpt.restore_for_resume(last_mgr, state, workdir)
  if restored is None:
    return state
  state = state_lib.TrainState(*restored) if not isinstance(restored, state_lib.TrainState) \
      else restored
  logging.info('resumed from step %d', int(state.step))
  return state


def _compile_steps(config, mode: str, graphdef, tx, settings, mesh) -> list:
  """The train step of each training store: one compiled program per distinct setting
  (hybrid: cardiac (2,2,1), abdomen (2,2,2))."""
  step_fns, step_of_store = {}, []
  for st_set in settings:
    spec = step_lib.LossSpec.from_config(config, mode, num_classes=st_set.num_classes,
                                          blur_in_plane_only=st_set.blur_in_plane_only)
    key = (st_set.factors, spec)
    if key not in step_fns:
      step_fns[key] = step_lib.make_train_step(
          graphdef, tx, spec, c_prime=int(config.feature_channels), mode=mode, mesh=mesh,
          factors=st_set.factors)
    step_of_store.append(step_fns[key])
  return step_of_store


def _validation_sets(config, graphdef, tp: plan_lib.TrainPlan) -> list[plan_lib.ValidationSet]:
  return [plan_lib.ValidationSet(
      inference.make_predict(graphdef, c_prime=int(config.feature_channels),
                             factors=st_set.factors),
      st, tuple(refs_i), tuple(range(1, st_set.num_classes + 1)))
          for st, st_set, refs_i in zip(tp.eval_stores, tp.eval_settings, tp.val_refs)
          if refs_i]


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the step loop needs besides the state and the batches."""
  config: Any
  workdir: str
  mesh: Any
  step_of_store: list
  val_sets: list
  pca: Any
  draw_pca: Any
  last_mgr: Any
  best_mgr: Any
  writer: Any
  bar: Any
  primary: bool
  num_steps: int


def _steps(run: _Run, state, batches, start: int, end: int):
  """Steps ``start``..``end``: logs, validates and checkpoints on the config's schedule."""
  cfg = run.config.train
  losses, val_dice = {}, {}
  t_start = time.perf_counter()
  for step in range(start, end):
    batch = next(batches)
    store_index = int(batch.pop('store'))
    batch = step_lib.shard_batch(batch, run.mesh)
    state, metrics, finite = run.step_of_store[store_index](state, batch, run.pca)
    if not bool(finite):
      _stop_non_finite(run, state, metrics, step)
    done = step + 1
    losses[done] = loss = float(metrics['loss'])
    if done % int(cfg.log_every) == 0 or done == end:
      for k, v in metrics.items():
        run.writer.add_scalar(f'train/{k}', float(v), done)
      run.writer.add_scalar('train/steps_per_s',
                            (done - start) / (time.perf_counter() - t_start), done)
      run.writer.flush()     # a killed run keeps its curves (else only every 120 s)
    run.bar.set_postfix(loss=f'{loss:.4f}', refresh=False)
    run.bar.update(1)
    if done % int(cfg.eval_every) == 0 or done == run.num_steps:
      val_dice[done] = _validate_and_keep(run, state, done)
    if done % int(cfg.checkpoint_every) == 0 or done == end:
      ckpt.save(run.last_mgr, done, state)
  return state, losses, val_dice


def _stop_non_finite(run: _Run, state, metrics, step: int) -> None:
  """The step kept the last good parameters: save them, then stop with one line."""
  good_step = int(state.step)
  ckpt.save(run.last_mgr, good_step, state)
  run.last_mgr.wait_until_finished()
  raise NonFiniteLossError(
      f'non-finite loss or gradient at step {step + 1} '
      f'(loss={float(metrics["loss"])}, grad_norm={float(metrics["grad_norm"])}); '
      f'the last good state is saved in {run.workdir}/checkpoints (step {good_step}). '
      'Check the feature store for NaN/inf, or lower --config.optim.lr.')


def _validate_and_keep(run: _Run, state, done: int) -> float:
  """Validation Dice at step ``done``: logged (val.jsonl, TensorBoard) and saved as a
  candidate best checkpoint."""
  summary = _validate(run.val_sets, state.params, run.pca)
  dice = summary['dice_mean']
  record = {'step': done, 'dice': dice, 'initial_dice': summary['initial_dice_mean'],
            'folding_fraction': summary['folding_fraction']}
  if run.draw_pca is not None:
    record['dice_draw'] = _validate(run.val_sets, state.params, run.draw_pca)['dice_mean']
    run.writer.add_scalar('val/dice_channel_draw', record['dice_draw'], done)
  if run.primary:
    _append_jsonl(os.path.join(run.workdir, VAL_LOG), record)
  for name in ('dice', 'initial_dice', 'folding_fraction'):
    run.writer.add_scalar(f'val/{name}', record[name], done)
  run.writer.flush()
  logging.info('step %d: val Dice %.4f (initial %.4f)', done, dice, record['initial_dice'])
  ckpt.save(run.best_mgr, done, state, metrics={'val_dice': dice})
  return dice
