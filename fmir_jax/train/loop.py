"""The training loop (what ``train.py`` runs): resumable, logged, data-parallel."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter
from tqdm import tqdm

from fmir_jax.model import channel_reg
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import data as data_lib
from fmir_jax.train import distributed
from fmir_jax.core import errors
from fmir_jax.evaluate import evaluation
from fmir_jax.core import store as store_lib
from fmir_jax.train import step as step_lib
from fmir_jax.train import checks
from fmir_jax.model import inference
from fmir_jax.train import state as state_lib


class NonFiniteLossError(errors.UserError, FloatingPointError):
  pass


VAL_LOG = 'val.jsonl'     # one JSON line per validation (a resumed run may repeat a step)
VAL_METRICS = ('dice_mean', 'initial_dice_mean', 'folding_fraction')


def _validate(val_sets, params, pca) -> dict[str, float]:
  """Means of ``VAL_METRICS`` over each store's validation pairs, then over the stores (so
  every dataset weighs the same), with inputs ``pca``. In a multi-host run each process
  scores its share of the pairs and the rows are gathered."""
  params, pca = distributed.local_copy(params), distributed.local_copy(pca)
  per_store = []
  for pred, st, refs_i, classes in val_sets:
    mine = refs_i[jax.process_index()::jax.process_count()]
    res = evaluation.evaluate_pairs(pred, params, [st], mine, pca, classes)
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


def open_stores(paths) -> list[store_lib.FeatureStore]:
  paths = [p for p in (paths if isinstance(paths, (list, tuple)) else [paths]) if p]
  if not paths:
    raise step_lib.ConfigError('no feature store given: set --config.data.train_stores=PATH '
                                '(written by feature_extract/run.py)')
  stores = [store_lib.FeatureStore(p) for p in paths]
  for st in stores[1:]:
    if st.header['channels'] != stores[0].header['channels']:
      raise store_lib.StoreError(
          f'{st.path}: {st.header["channels"]} channels but {stores[0].path} has '
          f'{stores[0].header["channels"]}: stores trained together must share a backbone')
  return stores


def _check_train_pairs(stores, batch_size: int) -> None:
  """The training pairs can be batched: there are some, and with ``batch_size`` > 1 a step's
  pairs come from one store and share one grid (``data.train_batches`` stacks them)."""
  with_pairs = [st for st in stores if st.pairs('train')]
  paths = ', '.join(str(st.path) for st in stores)
  if not with_pairs:
    raise store_lib.StoreError(f'no \'train\' pairs in feature store(s) {paths}: extract '
                               'features for that split (feature_extract/run.py --splits ...)')
  if batch_size > 1 and len(with_pairs) > 1:
    raise step_lib.ConfigError(
        f'--config.train.batch_size={batch_size} with {len(with_pairs)} training stores '
        f'({paths}): a step takes its pairs from one store, use batch_size 1')
  if batch_size > 1:
    st = with_pairs[0]
    shapes = {st.info(k).shape for pair in st.pairs('train') for k in pair}
    if len(shapes) > 1:
      raise step_lib.ConfigError(
          f'--config.train.batch_size={batch_size}: the training volumes of {st.path} have '
          f'different shapes {sorted(shapes)}, which do not stack; use batch_size 1')


def _check_batch_split(config, num_devices: int) -> None:
  """A step's entries (pairs, doubled when bidirectional) split evenly over the processes
  and over the devices of the mesh."""
  batch = int(config.train.batch_size)
  per_pair = 2 if config.train.bidirectional else 1
  for count, what in ((jax.process_count(), 'processes'), (num_devices, 'devices')):
    if (batch * per_pair) % count:
      raise step_lib.ConfigError(
          f'--config.train.batch_size={batch}: {batch * per_pair} pairs per step do not split '
          f'over {count} {what}; set --config.train.batch_size to a multiple of '
          f'{count // math.gcd(count, per_pair)}')


def total_steps(config, num_pairs: int) -> int:
  if config.train.num_steps:
    return int(config.train.num_steps)
  per_epoch = math.ceil(num_pairs / int(config.train.batch_size))
  return int(config.train.epochs) * per_epoch


def store_settings(config, num_stores: int) -> list[dict[str, Any]]:
  """Pyramid factors, label count and blur rule per training store.

  ``config.data.per_store`` (hybrid training) gives them per store, by position in
  ``data.train_stores``; otherwise every store uses model.factors / data.num_classes /
  loss.blur_in_plane_only.
  """
  ps = config.data.get('per_store')
  if ps is None:
    return [{'factors': tuple(tuple(f) if isinstance(f, (list, tuple)) else f
                              for f in config.model.factors),
             'num_classes': int(config.data.num_classes),
             'blur_in_plane_only': bool(config.loss.blur_in_plane_only)}] * num_stores
  out = []
  for name in ('factors', 'num_classes', 'blur_in_plane_only'):
    if len(ps[name]) != num_stores:
      raise step_lib.ConfigError(
          f'--config.data.per_store.{name} has {len(ps[name])} entries for {num_stores} '
          'training stores: give one per data.train_stores entry')
  for i in range(num_stores):
    out.append({'factors': tuple(int(v) for v in ps.factors[i]),
                'num_classes': int(ps.num_classes[i]),
                'blur_in_plane_only': bool(ps.blur_in_plane_only[i])})
  return out


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
  checks.check_config(config)
  if int(stop_after_steps) < 0:
    raise step_lib.ConfigError(f'--stop_after_steps={stop_after_steps}: must be >= 0 '
                                '(0 = run to the end)')
  why = ckpt.unwritable_reason(workdir)
  if why:
    raise ckpt.RunError(f'--workdir={workdir}: {why}; pass a directory path you can write to')
  mode = step_lib.mode_of(config.mode).name
  norm = inference.channel_norm(config)
  stores = open_stores(list(config.data.train_stores))
  eval_stores = open_stores(list(config.data.eval_stores)) if config.data.eval_stores \
      else stores
  header = stores[0].header
  _check_train_pairs(stores, int(config.train.batch_size))
  refs = data_lib.list_pairs(stores, 'train')
  n_steps = total_steps(config, len(refs))
  c_prime = int(config.feature_channels)
  mesh = mesh or distributed.make_mesh()
  _check_batch_split(config, int(mesh.devices.size))
  # each training store's settings, with its voxel spacing (evaluation matches stores by it)
  settings = [dict(s, spacing_mm=list(st.info(st.keys()[0]).spacing_mm))
              for s, st in zip(store_settings(config, len(stores)), stores)]
  store_datasets = [store_lib.dataset_name(st.header) for st in stores]
  eval_settings = settings if eval_stores is stores else [
      evaluation.settings_for_store(st, [data_lib.PairRef(0, m, f) for m, f in st.pairs('val')],
                                    store_datasets, settings) for st in eval_stores]
  val_refs = []   # the validation pairs of each validation store
  for st in eval_stores:
    refs_i = [data_lib.PairRef(0, m, f) for m, f in st.pairs('val')]
    val_refs.append(refs_i[:int(config.train.eval_pairs)] if int(config.train.eval_pairs)
                    else refs_i)
  if not any(val_refs):
    raise store_lib.StoreError(
        'no validation pairs in ' + ', '.join(st.path for st in eval_stores)
        + ': extract features for the val split (or set --config.data.eval_stores)')
  graphdef, state, tx, mcfg = state_lib.create(config, int(header['channels']), n_steps)

  os.makedirs(workdir, exist_ok=True)
  run_info = json.loads(json.dumps({
      'config': config.to_dict(), 'model': dataclasses.asdict(mcfg), 'mode': mode,
      'channel_norm': config.get('channel_norm', 'paper'),
      'store_header': header, 'train_stores': list(config.data.train_stores),
      'total_steps': n_steps, 'num_devices': int(mesh.devices.size),
      'store_datasets': store_datasets,
      'store_settings': settings}))
  if os.path.exists(os.path.join(workdir, ckpt.RUN_FILE)):
    old = ckpt.read_run_info(workdir)
    old_norm = old.get('channel_norm', 'paper')
    if (old['model'] != run_info['model'] or old['mode'] != mode
        or old_norm != run_info['channel_norm']):
      raise ckpt.RunError(f'{workdir} holds a run with another model/mode/channel_norm '
                          f'({old["mode"]}, {old_norm}, {old["model"]}); use a new --workdir')
    store_lib.check_compatible(old['store_header'], header)
  primary = distributed.is_primary()      # writes the run's shared files (multi-host runs)
  if primary:
    ckpt.write_run_info(workdir, run_info)

  # PCA basis on the training features: inference for UN/WS, training and inference for -CR.
  # Fitted once, by process 0; the others read its file.
  basis = ckpt.load_pca(workdir, header) if primary else None
  if primary and basis is None:
    logging.info('fitting a %s PCA (c=%d -> c\'=%d) on the training features', norm.fit,
                 header['channels'], c_prime)
    basis = inference.fit_pca(stores, c_prime, max_volumes=int(config.train.pca_max_volumes),
                              fit=norm.fit)
    ckpt.save_pca(workdir, header, basis, source=','.join(st.path for st in stores))
  distributed.barrier('pca')
  basis = basis or ckpt.load_pca(workdir, header)
  pca = inference.pca_to_device(basis, norm)
  # The head's training-time inputs on validation pairs (a fixed draw): a gap between this
  # curve and the PCA one is a train/inference mismatch.
  draw_pca = None
  if (bool(config.train.get('eval_channel_draw', False))
      and step_lib.mode_of(mode).random_channels):
    idx = channel_reg.draw_channels(jax.random.key(int(config.train.seed) + 1),
                                    int(header['channels']), c_prime)
    draw_pca = {k: jnp.asarray(v) for k, v in channel_reg.selection_inputs(
        {k: np.asarray(v) for k, v in pca.items()}, np.asarray(idx)).items()}

  last_mgr, best_mgr = ckpt.managers(workdir, int(config.train.keep_checkpoints))
  # Place the state as the step returns it (replicated over the mesh; a state with other
  # shardings would make the second call compile the step again), and restore into that.
  state = jax.device_put(state, step_lib.replicated(mesh))
  restored = ckpt.restore_for_resume(last_mgr, state, workdir)
  if restored is not None:
    state = state_lib.TrainState(*restored) if not isinstance(restored, state_lib.TrainState) \
        else restored
    logging.info('resumed from step %d', int(state.step))
  start = int(state.step)
  pca = jax.device_put(pca, step_lib.replicated(mesh))
  # One compiled step per distinct store setting (hybrid: cardiac (2,2,1), abdomen (2,2,2)).
  step_fns, step_of_store = {}, []
  for st_set in settings:
    spec = step_lib.LossSpec.from_config(config, mode, num_classes=st_set['num_classes'],
                                          blur_in_plane_only=st_set['blur_in_plane_only'])
    key = (st_set['factors'], spec)
    if key not in step_fns:
      step_fns[key] = step_lib.make_train_step(graphdef, tx, spec, c_prime=c_prime, mode=mode,
                                                mesh=mesh, factors=st_set['factors'])
    step_of_store.append(step_fns[key])
  val_sets = []   # (predict, store, refs, classes) per validation store
  for st, st_set, refs_i in zip(eval_stores, eval_settings, val_refs):
    if refs_i:
      val_sets.append((inference.make_predict(graphdef, c_prime=c_prime,
                                              factors=st_set['factors']),
                       st, refs_i, tuple(range(1, st_set['num_classes'] + 1))))
  end = n_steps if not stop_after_steps else min(n_steps, start + int(stop_after_steps))

  writer = SummaryWriter(os.path.join(workdir, 'tb')) if primary else _NoWriter()
  entries = int(config.train.batch_size) * (2 if config.train.bidirectional else 1)
  batches = data_lib.train_batches(
      stores, batch_size=int(config.train.batch_size), seed=int(config.train.seed),
      start_step=start, num_steps=end, bidirectional=bool(config.train.bidirectional),
      prefetch=int(config.data.prefetch), part=distributed.share(entries))
  losses, val_dice = {}, {}
  bar = tqdm(total=n_steps, initial=start, desc=f'train {config.name} [{mode}]',
             disable=quiet or not primary, dynamic_ncols=True, unit='step')
  t_start = time.perf_counter()
  try:
    for step in range(start, end):
      batch = next(batches)
      store_index = int(batch.pop('store'))
      batch = step_lib.shard_batch(batch, mesh)
      state, metrics, finite = step_of_store[store_index](state, batch, pca)
      if not bool(finite):
        # The step kept the last good parameters: save them before stopping.
        good_step = int(state.step)
        ckpt.save(last_mgr, good_step, state)
        last_mgr.wait_until_finished()
        raise NonFiniteLossError(
            f'non-finite loss or gradient at step {step + 1} '
            f'(loss={float(metrics["loss"])}, grad_norm={float(metrics["grad_norm"])}); '
            f'the last good state is saved in {workdir}/checkpoints (step {good_step}). '
            'Check the feature store for NaN/inf, or lower --config.optim.lr.')
      done = step + 1
      loss = float(metrics['loss'])
      losses[done] = loss
      if done % int(config.train.log_every) == 0 or done == end:
        for k, v in metrics.items():
          writer.add_scalar(f'train/{k}', float(v), done)
        writer.add_scalar('train/steps_per_s', (done - start) / (time.perf_counter() - t_start),
                          done)
        writer.flush()     # a killed run keeps its curves (else only every 120 s)
      bar.set_postfix(loss=f'{loss:.4f}', refresh=False)
      bar.update(1)
      if done % int(config.train.eval_every) == 0 or done == n_steps:
        summary = _validate(val_sets, state.params, pca)
        dice = val_dice[done] = summary['dice_mean']
        record = {'step': done, 'dice': dice, 'initial_dice': summary['initial_dice_mean'],
                  'folding_fraction': summary['folding_fraction']}
        if draw_pca is not None:
          record['dice_draw'] = _validate(val_sets, state.params, draw_pca)['dice_mean']
          writer.add_scalar('val/dice_channel_draw', record['dice_draw'], done)
        if primary:
          _append_jsonl(os.path.join(workdir, VAL_LOG), record)
        for name in ('dice', 'initial_dice', 'folding_fraction'):
          writer.add_scalar(f'val/{name}', record[name], done)
        writer.flush()
        logging.info('step %d: val Dice %.4f (initial %.4f)', done, dice,
                     record['initial_dice'])
        ckpt.save(best_mgr, done, state, metrics={'val_dice': dice})
      if done % int(config.train.checkpoint_every) == 0 or done == end:
        ckpt.save(last_mgr, done, state)
  finally:
    bar.close()
    writer.close()
    last_mgr.wait_until_finished()
    best_mgr.wait_until_finished()
  return TrainResult(step=int(state.step), losses=losses, val_dice=val_dice, workdir=workdir)
