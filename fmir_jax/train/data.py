"""Feature store -> registration pair batches (host side, numpy), loaded with Grain.

The order of training pairs is a pure function of (seed, step): epoch e visits the pairs in
the permutation ``default_rng([seed, e]).permutation(n)``, and step s takes the next
``batch_size`` of that endless sequence. A resumed run starting at step s therefore sees
exactly the pairs an uninterrupted run would. Grain does the threaded reading and prefetch.

Features stay on the patch grid and in the store's dtype (float16 by default); the
interpolation matrices that upsample them on device travel with each item.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import grain
import numpy as np

from fmir_jax.core import errors
from fmir_jax.core import patches
from fmir_jax.core import store as store_lib


@dataclasses.dataclass(frozen=True)
class PairRef:
  store: int        # index into the list of stores
  moving: str       # volume key
  fixed: str


def volume_item(st: store_lib.FeatureStore, key: str) -> dict[str, np.ndarray]:
  """One volume's arrays: image (H,W,D) f32, feat (D,h,w,c), interp_h (H,h), interp_w (W,w),
  labels (H,W,D) uint8 (zeros when the store has none) and has_labels () bool."""
  image = np.asarray(st.image(key), np.float32)
  labels = st.labels(key)
  return {
      **patches.model_inputs(image, np.asarray(st.features(key)), st.info(key).geometry),
      'labels': (np.zeros(image.shape, np.uint8) if labels is None
                 else np.asarray(labels, np.uint8)),
      'has_labels': np.asarray(labels is not None),
  }


def pair_item(stores: Sequence[store_lib.FeatureStore], ref: PairRef) -> dict:
  st = stores[ref.store]
  return {'moving': volume_item(st, ref.moving), 'fixed': volume_item(st, ref.fixed)}


def list_pairs(stores: Sequence[store_lib.FeatureStore], split: str) -> list[PairRef]:
  """Every pair of `split` in every store, in store order. Errors when there are none."""
  refs = [PairRef(i, m, f) for i, st in enumerate(stores) for m, f in st.pairs(split)]
  if not refs:
    paths = ', '.join(str(st.path) for st in stores)
    raise store_lib.StoreError(f'no {split!r} pairs in feature store(s) {paths}: extract features for '
                     f'that split (feature_extract/run.py --splits ...)')
  return refs


def pair_order(num_pairs: int, seed: int, start: int, count: int) -> np.ndarray:
  """Indices into the pair list for positions [start, start + count) of the endless,
  per-epoch reshuffled sequence."""
  out = np.empty(count, np.int64)
  for j in range(count):
    epoch, pos = divmod(start + j, num_pairs)
    out[j] = np.random.default_rng([seed, epoch]).permutation(num_pairs)[pos]
  return out


def _stack(items: list[dict]) -> dict:
  """Stacks a list of nested dicts of arrays along a new leading batch axis."""
  first = items[0]
  if isinstance(first, dict):
    return {k: _stack([it[k] for it in items]) for k in first}
  shapes = {np.shape(it) for it in items}
  if len(shapes) != 1:
    raise errors.ConfigError(f'cannot batch volumes of different shapes {sorted(shapes)}: use '
                     'batch_size 1 (or one store per run) when grids differ')
  return np.stack(items)


class _TrainSource:
  """Random-access source for Grain: global step -> batch (pure function of the step).

  part: the slice of the global batch's entries this process reads (multi-host runs;
  ``distributed.share``); the other processes read the rest.
  """

  def __init__(self, stores, refs, batch_size, seed, bidirectional, part=slice(None)):
    self.stores, self.refs = stores, refs
    self.batch_size, self.seed, self.bidirectional = batch_size, seed, bidirectional
    self.part = part

  def __len__(self):
    return 2**31 - 1

  def __getitem__(self, step):
    idx = pair_order(len(self.refs), self.seed, step * self.batch_size, self.batch_size)
    entries = [(i, False) for i in idx]                   # (pair, swapped) of the global batch
    if self.bidirectional:
      entries += [(i, True) for i in idx]
    items = []
    for i, swapped in entries[self.part]:
      it = pair_item(self.stores, self.refs[i])
      items.append({'moving': it['fixed'], 'fixed': it['moving']} if swapped else it)
    batch = _stack(items)
    sources = {self.refs[i].store for i in idx}
    if len(sources) != 1:
      raise errors.ConfigError(f'step {step} draws pairs from several stores {sorted(sources)}: with '
                       'several training stores use batch_size 1')
    batch['store'] = np.asarray(sources.pop(), np.int32)   # which store (host-side only)
    return batch


def train_batches(stores: Sequence[store_lib.FeatureStore], *, split: str = 'train',
                  batch_size: int, seed: int, start_step: int, num_steps: int,
                  bidirectional: bool = False, prefetch: int = 2,
                  part: slice = slice(None)) -> Iterator[dict]:
  """Batches for steps [start_step, num_steps), read ahead by background threads.

  Each batch: {'moving': {...}, 'fixed': {...}} with a leading batch axis (2x batch_size
  when bidirectional: the swapped pairs follow), and 'store' (the index of the store the
  pairs come from; the trainer pops it to pick that store's settings). ``part``: only these
  entries of each global batch (this process's share in a multi-host run).
  """
  refs = list_pairs(stores, split)
  source = _TrainSource(stores, refs, batch_size, seed, bidirectional, part)
  ds = grain.MapDataset.source(source)[start_step:num_steps]
  options = grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=max(1, prefetch))
  return iter(ds.to_iter_dataset(options))


def eval_pairs(stores: Sequence[store_lib.FeatureStore], split: str,
               limit: int = 0) -> list[PairRef]:
  refs = list_pairs(stores, split)
  return refs[:limit] if limit else refs
