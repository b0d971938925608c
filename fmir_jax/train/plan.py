"""What a training run trains and validates on: its stores, their settings and the
validation sets, checked before anything is compiled or written (``plan``).

The per-store settings travel as ``run_file.StoreSetting`` records and are saved in run.json
(``store_settings``) for evaluation and registration (``runs.RunInfo.store_settings``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

from fmir_jax.core import errors
from fmir_jax.core import store as store_lib
from fmir_jax.train import data as data_lib
from fmir_jax.train import run_file

ConfigError = errors.ConfigError
StoreSetting = run_file.StoreSetting   # the run.json record (one home: train.run_file)


@dataclasses.dataclass(frozen=True)
class ValidationSet:
  """One validation store: its pairs, the labels scored and the compiled forward."""
  predict: Callable          # model.inference.make_predict(...) for this store's factors
  store: store_lib.FeatureStore
  refs: tuple                # data.PairRef of the pairs scored
  classes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """The stores of a run and what each trains or validates with (no arrays, nothing
  compiled): ``plan`` checks every user error here, before the run folder exists."""
  stores: list
  eval_stores: list
  settings: list[StoreSetting]          # one per training store, with its spacing
  eval_settings: list[StoreSetting]     # per validation store (factors, labels scored)
  val_refs: list[list]                  # the validation pairs of each validation store
  num_steps: int

  @property
  def header(self) -> dict[str, Any]:
    return self.stores[0].header

  @property
  def store_datasets(self) -> list[str]:
    return [store_lib.dataset_name(st.header) for st in self.stores]


def plan(config, num_devices: int, settings_for_store: Callable) -> TrainPlan:
  """Opens and checks the stores of ``config``; ``settings_for_store`` is
  ``evaluation.settings_for_store`` (the rule for a validation store of another dataset)."""
  stores = open_stores(list(config.data.train_stores))
  eval_stores = open_stores(list(config.data.eval_stores)) if config.data.eval_stores \
      else stores
  _check_train_pairs(stores, int(config.train.batch_size))
  n_steps = total_steps(config, len(data_lib.list_pairs(stores, 'train')))
  _check_batch_split(config, num_devices)
  settings = [dataclasses.replace(s, spacing_mm=tuple(st.info(st.keys()[0]).spacing_mm))
              for s, st in zip(store_settings(config, len(stores)), stores)]
  datasets = [store_lib.dataset_name(st.header) for st in stores]
  eval_settings = settings if eval_stores is stores else [
      settings_for_store(st, _val_pairs(st), datasets, settings) for st in eval_stores]
  limit = int(config.train.eval_pairs)
  val_refs = [_val_pairs(st)[:limit] if limit else _val_pairs(st) for st in eval_stores]
  if not any(val_refs):
    raise store_lib.StoreError(
        'no validation pairs in ' + ', '.join(st.path for st in eval_stores)
        + ': extract features for the val split (or set --config.data.eval_stores)')
  return TrainPlan(stores, eval_stores, settings, eval_settings, val_refs, n_steps)


def _val_pairs(st) -> list:
  return [data_lib.PairRef(0, m, f) for m, f in st.pairs('val')]


def open_stores(paths) -> list[store_lib.FeatureStore]:
  paths = [p for p in (paths if isinstance(paths, (list, tuple)) else [paths]) if p]
  if not paths:
    raise ConfigError('no feature store given: set --config.data.train_stores=PATH '
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
    raise ConfigError(
        f'--config.train.batch_size={batch_size} with {len(with_pairs)} training stores '
        f'({paths}): a step takes its pairs from one store, use batch_size 1')
  if batch_size > 1:
    st = with_pairs[0]
    shapes = {st.info(k).shape for pair in st.pairs('train') for k in pair}
    if len(shapes) > 1:
      raise ConfigError(
          f'--config.train.batch_size={batch_size}: the training volumes of {st.path} have '
          f'different shapes {sorted(shapes)}, which do not stack; use batch_size 1')


def _check_batch_split(config, num_devices: int) -> None:
  """A step's entries (pairs, doubled when bidirectional) split evenly over the processes
  and over the devices of the mesh."""
  batch = int(config.train.batch_size)
  per_pair = 2 if config.train.bidirectional else 1
  for count, what in ((jax.process_count(), 'processes'), (num_devices, 'devices')):
    if (batch * per_pair) % count:
      raise ConfigError(
          f'--config.train.batch_size={batch}: {batch * per_pair} pairs per step do not split '
          f'over {count} {what}; set --config.train.batch_size to a multiple of '
          f'{count // math.gcd(count, per_pair)}')


def total_steps(config, num_pairs: int) -> int:
  if config.train.num_steps:
    return int(config.train.num_steps)
  per_epoch = math.ceil(num_pairs / int(config.train.batch_size))
  return int(config.train.epochs) * per_epoch


def store_settings(config, num_stores: int) -> list[StoreSetting]:
  """Pyramid factors, label count and blur rule per training store.

  ``config.data.per_store`` (hybrid training) gives them per store, by position in
  ``data.train_stores``; otherwise every store uses model.factors / data.num_classes /
  loss.blur_in_plane_only.
  """
  ps = config.data.get('per_store')
  if ps is None:
    return [StoreSetting(factors=tuple(tuple(f) if isinstance(f, (list, tuple)) else f
                                       for f in config.model.factors),
                         num_classes=int(config.data.num_classes),
                         blur_in_plane_only=bool(config.loss.blur_in_plane_only))] * num_stores
  for name in ('factors', 'num_classes', 'blur_in_plane_only'):
    if len(ps[name]) != num_stores:
      raise ConfigError(
          f'--config.data.per_store.{name} has {len(ps[name])} entries for {num_stores} '
          'training stores: give one per data.train_stores entry')
  return [StoreSetting(factors=tuple(int(v) for v in ps.factors[i]),
                       num_classes=int(ps.num_classes[i]),
                       blur_in_plane_only=bool(ps.blur_in_plane_only[i]))
          for i in range(num_stores)]
