"""Merging worker partial manifests into the store's index.json and timings.json.

``merge`` checks that every worker finished with the same header and pair list and that no
volume is missing or written twice; ``merge_when_complete`` runs it once all workers are done.
"""
from __future__ import annotations

import glob
import os
from typing import Any

from fmir_jax.core.store import format as fmt
from fmir_jax.core.store.format import StoreError


def _merge_partials(out_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Joins the worker partial manifests of `out_dir` into (manifest, timings)."""
  paths = sorted(glob.glob(os.path.join(out_dir, 'index.worker-*.json')))
  if not paths:
    raise StoreError(f'{out_dir}: no {fmt.INDEX_NAME} and no worker manifests; not a feature store '
                     '(or extraction never completed a shard).')
  parts = [fmt._read_json(p) for p in paths]
  counts = {p['num_workers'] for p in parts}
  if len(counts) != 1:
    raise StoreError(f'{out_dir}: worker manifests from different --num-shards {sorted(counts)}.')
  n = counts.pop()
  present = {p['worker'] for p in parts}
  absent = sorted(set(range(n)) - present)
  if absent:
    raise StoreError(f'{out_dir}: workers {absent} of {n} have not written a manifest yet; run '
                     '--shard-index for them first.')
  incomplete = [p['worker'] for p in parts if not p['complete']]
  if incomplete:
    raise StoreError(f'{out_dir}: workers {incomplete} have not finished; re-run them (they '
                     'resume), then merge.')
  head = {k: v for k, v in parts[0].items() if k not in fmt._RESERVED + fmt._PARTIAL_ONLY}
  for path, part in zip(paths[1:], parts[1:]):
    diffs = fmt.header_diff(head, part)
    if diffs:
      raise StoreError(f'{path}: header differs from {paths[0]}: ' + '; '.join(diffs))
  owner: dict[str, list[str]] = {}
  volumes = []
  for part in parts:
    for v in part['volumes']:
      owner.setdefault(v['key'], []).append(v['shard'])
      volumes.append(v)
  dup = sorted(k for k, s in owner.items() if len(s) > 1)
  if dup:
    raise StoreError(f'{out_dir}: volumes written more than once: '
                     + ', '.join(f'{k} in {owner[k]}' for k in dup[:20]))
  expected = set()
  for part in parts:
    expected |= set(part.get('all_keys') or [])
  pairs = parts[0]['pairs']
  for part in parts[1:]:
    if part['pairs'] != pairs:
      raise StoreError(f'{out_dir}: workers recorded different pair lists; re-run with the same '
                       'dataset arguments.')
  expected |= {k for split_pairs in pairs.values() for pair in split_pairs for k in pair}
  missing = sorted(expected - set(owner))
  if missing:
    raise StoreError(f'{out_dir}: volumes missing from the store: {missing[:20]}'
                     f'{" ..." if len(missing) > 20 else ""} ({len(missing)} in all).')
  manifest = dict(head)
  manifest.update({
      'format_version': fmt.FORMAT_VERSION, 'num_workers': n, 'pairs': pairs,
      'shards': sorted((s for p in parts for s in p['shards']), key=lambda s: s['file']),
      'volumes': sorted(volumes, key=lambda v: v['key']),
  })
  timings: dict[str, Any] = {}
  for part in parts:
    tpath = os.path.join(out_dir, fmt.timings_partial_name(part['worker'], n))
    if os.path.exists(tpath):
      timings.update(fmt._read_json(tpath))
  return manifest, timings


def _all_workers_complete(out_dir: str) -> bool:
  paths = glob.glob(os.path.join(out_dir, 'index.worker-*.json'))
  parts = [fmt._read_json(p) for p in paths]
  counts = {p.get('num_workers') for p in parts}
  return (len(counts) == 1 and {p.get('worker') for p in parts} == set(range(counts.pop()))
          and all(p.get('complete') for p in parts))


def merge_when_complete(out_dir: str) -> str | None:
  """``merge`` once every worker's manifest says complete (else None: a worker that has not
  finished will merge when it does). Workers closing at the same moment take turns on a
  lock file (``.merge.lock``, released by the system if a process dies); the bytes written
  are the same whoever merges, and an index.json already holding them is left untouched.
  """
  import fcntl
  with open(os.path.join(out_dir, '.merge.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not _all_workers_complete(out_dir):
      return None
    return merge(out_dir)


def merge(out_dir: str) -> str:
  """Joins all worker manifests into OUT/index.json (and timings.json); returns its path.

  Raises StoreError listing missing workers, unfinished workers, duplicated or missing keys.
  """
  manifest, timings = _merge_partials(out_dir)
  for name, value in ((fmt.TIMINGS_NAME, timings), (fmt.INDEX_NAME, manifest)):
    path, data = os.path.join(out_dir, name), fmt.dumps(value).encode()
    if os.path.exists(path):
      with open(path, 'rb') as f:
        if f.read() == data:
          continue
    fmt._atomic_write_bytes(path, data)
  return path
