"""Writing a store: one worker's resumable, atomic ``StoreWriter`` and the split of keys.

A worker writes its shards and its partial manifest (resume state); on resume it re-checks its
shards and rewrites the bad ones (``ShardRepair``); the last worker to close merges the store.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fmir_jax.core.store import format as fmt
from fmir_jax.core.store import integrity
from fmir_jax.core.store import merging
from fmir_jax.core.store.format import StoreError


def _make_store_dir(out_dir: str) -> None:
  """Creates `out_dir` (and parents); StoreError naming it if it cannot hold a store."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise StoreError(f'{out_dir}: exists and is a file, not a folder. Pass --out a folder path '
                     '(new or an existing feature store).')
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise StoreError(f'{out_dir}: cannot create the feature store folder ({e.strerror or e}: '
                     f'{e.filename}). Pass --out a path under a folder you can write to.') from e
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise StoreError(f'{out_dir}: the feature store folder is not writable. Fix its permissions '
                     'or pass --out a folder you can write to.')


def assign_keys(keys: Iterable[str], num_shards: int, shard_index: int) -> list[str]:
  """Deterministic split of volume keys between workers: sorted keys, round robin."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f'Need 0 <= shard_index < num_shards, got shard_index={shard_index}, '
                     f'num_shards={num_shards}.')
  return sorted(set(keys))[shard_index::num_shards]


@dataclasses.dataclass(frozen=True)
class ShardRepair:
  """A shard found missing, truncated or corrupt when a writer resumed: dropped, to be rewritten.

  file: the shard file name; keys: the volumes it held (re-extracted); problem: what was wrong.
  """
  file: str
  keys: tuple[str, ...]
  problem: str


class StoreWriter:
  """Writes one worker's share of a feature store, resumably and atomically.

  Each shard is written to a temporary name and renamed; the worker's partial manifest is
  rewritten atomically after each completed shard. A kill loses at most the shard in
  progress; re-opening the writer with the same header resumes (``done_keys``). Resuming
  re-checks this worker's shards (size, header, sha256): a missing, truncated or corrupt one is
  dropped (listed in ``repairs``) and rewritten under its own name, with the same volumes, once
  they have all been added again; no other file is touched.

  Args:
    out_dir: store directory (created if absent).
    header: store-wide fields (see REQUIRED_HEADER_FIELDS); must equal the header of any
      existing partial manifest of this worker, else StoreError.
    shard_index, num_shards: this worker and the number of workers.
    volumes_per_shard: volumes per shard file.
    keys: all volume keys of the store (every worker passes the full list); lets merge report
      missing volumes. Optional for a single worker.
    pairs: {split: [[moving_key, fixed_key], ...]} recorded in the manifest.
  """

  def __init__(self, out_dir: str, header: Mapping[str, Any], *, shard_index: int = 0,
               num_shards: int = 1, volumes_per_shard: int = 8,
               keys: Sequence[str] | None = None,
               pairs: Mapping[str, Sequence[Sequence[str]]] | None = None):
    if volumes_per_shard < 1:
      raise ValueError(f'volumes_per_shard must be >= 1, got {volumes_per_shard}.')
    assign_keys([], num_shards, shard_index)  # validates the worker arguments
    self.out_dir = out_dir
    self.header = fmt._check_header(header)
    self.shard_index = shard_index
    self.num_shards = num_shards
    self.volumes_per_shard = volumes_per_shard
    self.all_keys = sorted(set(keys)) if keys is not None else None
    self.pairs = fmt._canonical({s: [list(p) for p in v] for s, v in (pairs or {}).items()})
    self._partial_path = os.path.join(out_dir, fmt.partial_name(shard_index, num_shards))
    self._timings_path = os.path.join(out_dir, fmt.timings_partial_name(shard_index, num_shards))
    self._pending: list[tuple[dict[str, Any], list[tuple[str, np.ndarray]]]] = []
    self._pending_times: dict[str, Any] = {}
    self._shards: list[dict[str, Any]] = []
    self._volumes: dict[str, dict[str, Any]] = {}
    self._timings: dict[str, Any] = {}
    self._redo: dict[str, list[str]] = {}      # dropped shard file -> its volume keys, in order
    self._redo_pending: dict[str, dict[str, tuple[dict[str, Any], list]]] = {}
    self.repairs: list[ShardRepair] = []
    self.bytes_written = 0
    _make_store_dir(out_dir)
    self._check_other_workers()
    self._resume()

  @property
  def done_keys(self) -> frozenset[str]:
    """Keys of volumes already in complete shards of this worker."""
    return frozenset(self._volumes)

  def _check_other_workers(self) -> None:
    for path in sorted(glob.glob(os.path.join(self.out_dir, 'index.worker-*.json'))):
      m = fmt._PARTIAL_RE.match(os.path.basename(path))
      if m and int(m.group(2)) != self.num_shards:
        raise StoreError(f'{path}: this store was written with --num-shards {int(m.group(2))}, '
                         f'not {self.num_shards}. Use the same worker count or a new --out.')
      diffs = fmt.header_diff(fmt._read_json(path), self.header)
      if diffs:
        raise StoreError(f'{path}: refusing to resume into a store with a different header: '
                         + '; '.join(diffs) + '. Use a new --out directory (or the original '
                         'arguments).')

  def _resume(self) -> None:
    prefix = fmt.shard_name(self.shard_index, self.num_shards, 0)[:-len('00000.safetensors')]
    for stale in glob.glob(os.path.join(self.out_dir, glob.escape(prefix) + '*.tmp-*')):
      os.remove(stale)  # a shard whose write was interrupted; never referenced by a manifest
    if not os.path.exists(self._partial_path):
      return
    part = fmt._read_json(self._partial_path)
    if part.get('format_version') != fmt.FORMAT_VERSION:
      raise StoreError(f'{self._partial_path}: format_version {part.get("format_version")} '
                       f'!= {fmt.FORMAT_VERSION}; use a new --out directory.')
    if self.all_keys is not None and part.get('all_keys') not in (None, self.all_keys):
      raise StoreError(f'{self._partial_path}: the volume list differs from the one this store '
                       'was started with (dataset contents or options changed). Use a new --out.')
    self._redo = {r['file']: list(r['keys']) for r in part.get('redo_shards', [])}
    for shard in part['shards']:
      problem = integrity.shard_problem(os.path.join(self.out_dir, shard['file']), shard)
      if problem:
        self.repairs.append(ShardRepair(shard['file'], tuple(shard['keys']), problem))
        self._redo[shard['file']] = list(shard['keys'])
      else:
        self._shards.append(shard)
    self._volumes = {v['key']: v for v in part['volumes'] if v['shard'] not in self._redo}
    if os.path.exists(self._timings_path):
      self._timings = fmt._read_json(self._timings_path)
    self._timings = {k: v for k, v in self._timings.items() if k in self._volumes}

  def add(self, volume: Any, features: np.ndarray, geometry: Mapping[str, Sequence[float]],
          seconds: float, device: str = '') -> None:
    """Queues one volume; writes a shard once `volumes_per_shard` are queued.

    Args:
      volume: a ``feature_extract.datasets.base.Volume`` (key, image (H, W, D) float32,
        labels (H, W, D) uint8 | None, spacing_mm, affine (4, 4), meta, ids).
      features: (D, h, w, c) patch-grid features (any float dtype; stored as feature_dtype).
      geometry: {"offset": [oy, ox], "scale": [sy, sx]} voxel -> patch-grid coordinates.
      seconds: feature-extraction time for this volume (goes to timings, not the manifest).
      device: device description for the timings file.
    """
    key = volume.key
    if key in self._volumes or any(v['key'] == key for v, _ in self._pending) or any(
        key in group for group in self._redo_pending.values()):
      raise StoreError(f'Volume {key!r} was already added to {self.out_dir}.')
    if self.all_keys is not None and key not in self.all_keys:
      raise StoreError(f'Volume {key!r} is not in the key list given to StoreWriter.')
    image = np.asarray(volume.image)
    if image.ndim != 3 or image.dtype != np.float32:
      raise StoreError(f'Volume {key!r}: image must be (H, W, D) float32, got '
                       f'{image.shape} {image.dtype}.')
    features = np.asarray(features)
    c = self.header['channels']
    if features.ndim != 4 or features.shape[0] != image.shape[2] or features.shape[3] != c:
      raise StoreError(f'Volume {key!r}: features must be (D={image.shape[2]}, h, w, c={c}), '
                       f'got {features.shape}.')
    if not np.all(np.isfinite(features)):
      raise StoreError(f'Volume {key!r}: features contain NaN/inf (try --dtype float32).')
    tensors = [(f'{key}/features', features.astype(self.header['feature_dtype'])),
               (f'{key}/image', image)]
    if volume.labels is not None:
      labels = np.asarray(volume.labels)
      if labels.shape != image.shape or labels.dtype != np.uint8:
        raise StoreError(f'Volume {key!r}: labels must be {image.shape} uint8, got '
                         f'{labels.shape} {labels.dtype}.')
      tensors.append((f'{key}/labels', labels))
    affine = np.asarray(volume.affine, np.float64)
    if affine.shape != (4, 4):
      raise StoreError(f'Volume {key!r}: affine must be 4x4, got {affine.shape}.')
    geometry = {'offset': [float(v) for v in geometry['offset']],
                'scale': [float(v) for v in geometry['scale']]}
    if len(geometry['offset']) != 2 or len(geometry['scale']) != 2:
      raise StoreError(f'Volume {key!r}: geometry needs 2 offsets and 2 scales, got {geometry}.')
    info = fmt._canonical({
        'key': key, 'dataset': volume.dataset, 'subject': volume.subject, 'frame': volume.frame,
        'split': volume.split, 'shape': list(image.shape), 'grid': list(features.shape[:3]),
        'spacing_mm': [float(s) for s in volume.spacing_mm], 'affine': affine,
        'geometry': geometry, 'has_labels': volume.labels is not None, 'meta': volume.meta,
    })
    self._pending_times[key] = {'seconds': float(seconds), 'device': device}
    redo = next((f for f, keys in self._redo.items() if key in keys), None)
    if redo is not None:  # a volume of a dropped shard: rewrite that shard once it is whole
      group = self._redo_pending.setdefault(redo, {})
      group[key] = (info, tensors)
      if len(group) == len(self._redo[redo]):
        self._write_shard(redo, [group[k] for k in self._redo.pop(redo)])
        del self._redo_pending[redo]
      return
    self._pending.append((info, tensors))
    if len(self._pending) >= self.volumes_per_shard:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    # Shards are numbered 0.. in write order; dropped shards keep their numbers.
    seq = len(self._shards) + len(self._redo)
    entries, self._pending = self._pending, []
    self._write_shard(fmt.shard_name(self.shard_index, self.num_shards, seq), entries)

  def _write_shard(self, name: str, entries: list[tuple[dict[str, Any], list]]) -> None:
    keys = [info['key'] for info, _ in entries]
    data = fmt._shard_bytes([t for _, ts in entries for t in ts], keys)
    fmt._atomic_write_bytes(os.path.join(self.out_dir, name), data)
    self.bytes_written += len(data)
    for info, _ in entries:
      info['shard'] = name
      self._volumes[info['key']] = info
    self._shards = sorted(self._shards + [{'file': name, 'keys': keys, 'bytes': len(data),
                                           'sha256': hashlib.sha256(data).hexdigest()}],
                          key=lambda shard: shard['file'])
    self._timings.update({k: self._pending_times.pop(k) for k in keys})
    self._write_partial(complete=False)

  def _write_partial(self, complete: bool) -> None:
    part = dict(self.header)
    part.update({
        'format_version': fmt.FORMAT_VERSION, 'num_workers': self.num_shards,
        'worker': self.shard_index, 'complete': complete, 'all_keys': self.all_keys,
        'pairs': self.pairs, 'shards': self._shards,
        'volumes': [self._volumes[k] for k in sorted(self._volumes)],
    })
    if self._redo:  # dropped shards not yet rewritten: their names and volumes survive a kill
      part['redo_shards'] = [{'file': f, 'keys': k} for f, k in sorted(self._redo.items())]
    fmt._atomic_write_bytes(self._timings_path, fmt.dumps(self._timings).encode())
    fmt._atomic_write_bytes(self._partial_path, fmt.dumps(part).encode())

  def close(self) -> str | None:
    """Writes the last shard, marks this worker complete, and merges the store when every
    worker is complete (``merge_when_complete``: the last worker to finish does it).

    Returns the path of index.json when the store is complete, else None.
    """
    if self.all_keys is not None:
      mine = set(assign_keys(self.all_keys, self.num_shards, self.shard_index))
      queued = set(self._volumes) | {info['key'] for info, _ in self._pending}
      if queued != mine:
        missing = sorted(mine - queued)
        raise StoreError(f'{self.out_dir}: worker {self.shard_index} closes without volumes '
                         f'{missing[:20]}{" ..." if len(missing) > 20 else ""}; nothing was lost,'
                         ' re-run to complete them.')
    missing = sorted(k for f, keys in self._redo.items() for k in keys
                     if k not in self._redo_pending.get(f, {}))
    if missing:
      raise StoreError(f'{self.out_dir}: worker {self.shard_index} closes without re-adding '
                       f'volumes {missing[:20]} of dropped shards {sorted(self._redo)}; re-run '
                       'with all volumes to repair them.')
    self._flush()
    self._write_partial(complete=True)
    return merging.merge_when_complete(self.out_dir)
