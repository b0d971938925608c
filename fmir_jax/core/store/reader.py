"""Reading a store: ``FeatureStore`` (memory-mapped, verified) and ``VolumeInfo`` records.

A store without index.json is read from its worker manifests (merged in memory, not written).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from fmir_jax.core.store import format as fmt
from fmir_jax.core.store import integrity
from fmir_jax.core.store import merging
from fmir_jax.core.store.format import StoreError


def _check_pairs(index_path: str, pairs: Mapping[str, Sequence[Sequence[str]]],
                 volumes: Mapping[str, Any]) -> None:
  """StoreError naming the first pair of the manifest whose volume the store does not hold."""
  for split in sorted(pairs):
    for pair in pairs[split]:
      for key in pair:
        if key not in volumes:
          raise StoreError(
              f'{index_path}: {split} pair {list(pair)} names volume {key!r}, which the store '
              'does not hold. Re-run the feature_extract/run.py command that wrote this store '
              '(it extracts missing volumes), or --merge the worker manifests again instead of '
              'editing or mixing index.json files.')


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
  """Manifest record of one volume.

  shape: (H, W, D) voxels; grid: (D, h, w) patch grid; spacing_mm: per array axis;
  affine: (4, 4) voxel -> world (RAS, mm); geometry: {"offset": [oy, ox], "scale": [sy, sx]}.
  """
  key: str
  dataset: str
  subject: str
  frame: str
  split: str
  shard: str
  shape: tuple[int, int, int]
  grid: tuple[int, int, int]
  spacing_mm: tuple[float, float, float]
  affine: np.ndarray
  geometry: dict[str, list[float]]
  has_labels: bool
  meta: dict[str, Any]


class FeatureStore:
  """Read-only, memory-mapped access to a feature store.

  Opening checks the manifest (format, pairs naming held volumes) and every shard's size and
  header; each shard's sha256 is checked the first time one of its arrays is read.

  Args:
    path: the store directory.
    verify: check shard sha256 sums on first read (default: yes, unless the environment
      variable FMIR_SKIP_SHARD_VERIFY=1 is set).
  """

  def __init__(self, path: str, *, verify: bool | None = None):
    self.path = path
    index = os.path.join(path, fmt.INDEX_NAME)
    if not os.path.isdir(path):
      raise StoreError(f'{path}: feature store directory does not exist. Run '
                       'feature_extract/run.py --out to create it.')
    if os.path.exists(index):
      manifest = fmt._read_json(index)
      self._timings = (fmt._read_json(os.path.join(path, fmt.TIMINGS_NAME))
                       if os.path.exists(os.path.join(path, fmt.TIMINGS_NAME)) else {})
    else:
      manifest, self._timings = merging._merge_partials(path)
    if manifest.get('format_version') != fmt.FORMAT_VERSION:
      raise StoreError(f'{index}: format_version {manifest.get("format_version")!r}, this code '
                       f'reads {fmt.FORMAT_VERSION}. Re-extract the features.')
    self._manifest = manifest
    self.header = {k: v for k, v in manifest.items() if k not in fmt._RESERVED}
    self._volumes = {v['key']: v for v in manifest['volumes']}
    _check_pairs(index, manifest['pairs'], self._volumes)
    self._verify = not integrity._skip_verify_from_env() if verify is None else verify
    self._shards = {shard['file']: shard for shard in manifest['shards']}
    self._arrays: dict[str, np.ndarray] = {}
    for shard in manifest['shards']:
      self._open_shard(shard)

  def _open_shard(self, shard: Mapping[str, Any]) -> None:
    path = os.path.join(self.path, shard['file'])
    problem = integrity.shard_problem(path, shard, check_sha256=False)
    if problem:
      raise integrity._bad_shard(problem, shard)
    head, data_start, _ = fmt._parse_shard_header(path)
    meta = head.get('__metadata__', {})
    if meta.get('format_version') != str(fmt.FORMAT_VERSION) or \
        json.loads(meta.get('keys', '[]')) != shard['keys']:
      raise StoreError(f'{path}: shard metadata (format_version/keys) does not match the '
                       'manifest.')
    fdtype = np.dtype(self.header['feature_dtype'])
    buf = np.memmap(path, dtype=np.uint8, mode='r')
    for key in shard['keys']:
      v = self._volumes.get(key)
      if v is None or v['shard'] != shard['file']:
        raise StoreError(f'{path}: holds {key!r}, which the manifest does not place there.')
      expect = {'features': (tuple(v['grid']) + (self.header['channels'],), fdtype),
                'image': (tuple(v['shape']), np.dtype(np.float32))}
      if v['has_labels']:
        expect['labels'] = (tuple(v['shape']), np.dtype(np.uint8))
      for what, (shape, dtype) in expect.items():
        name = f'{key}/{what}'
        entry = head.get(name)
        if entry is None:
          raise StoreError(f'{path}: tensor {name} is missing.')
        got = (tuple(entry['shape']), fmt._ST_TO_DTYPE[entry['dtype']])
        if got != (shape, dtype):
          raise StoreError(f'{path}: tensor {name} is {got[0]} {got[1]}, manifest expects '
                           f'{shape} {dtype}.')
        begin, stop = (data_start + o for o in entry['data_offsets'])
        self._arrays[name] = buf[begin:stop].view(dtype.newbyteorder('<')).reshape(shape)

  def _check_sha256(self, file: str) -> None:
    shard = self._shards[file]
    problem = integrity._sha256_problem(os.path.join(self.path, file), shard['sha256'])
    if problem:
      raise integrity._bad_shard(problem, shard)

  def validate(self) -> None:
    """Hashes every shard now; StoreError naming the first corrupt one (and the fix)."""
    for file in sorted(self._shards):
      self._check_sha256(file)

  def keys(self, split: str | None = None) -> list[str]:
    """Sorted volume keys, optionally of one split."""
    return [k for k in sorted(self._volumes)
            if split is None or self._volumes[k]['split'] == split]

  def info(self, key: str) -> VolumeInfo:
    v = self._volume(key)
    return VolumeInfo(
        key=v['key'], dataset=v['dataset'], subject=v['subject'], frame=v['frame'],
        split=v['split'], shard=v['shard'], shape=tuple(v['shape']), grid=tuple(v['grid']),
        spacing_mm=tuple(v['spacing_mm']), affine=np.asarray(v['affine'], np.float64),
        geometry=v['geometry'], has_labels=v['has_labels'], meta=v['meta'])

  def _volume(self, key: str) -> dict[str, Any]:
    if key not in self._volumes:
      raise KeyError(f'{self.path}: no volume {key!r} in the store.')
    return self._volumes[key]

  def _array(self, key: str, what: str) -> np.ndarray:
    """A tensor of a volume, its shard's sha256 checked on first read (unless verify=False)."""
    v = self._volume(key)
    if self._verify:
      self._check_sha256(v['shard'])
    return self._arrays[f'{key}/{what}']

  def features(self, key: str) -> np.ndarray:
    """(D, h, w, c) patch-grid features, read-only memory map."""
    return self._array(key, 'features')

  def image(self, key: str) -> np.ndarray:
    """(H, W, D) float32 intensities in [0, 1], read-only memory map."""
    return self._array(key, 'image')

  def labels(self, key: str) -> np.ndarray | None:
    """(H, W, D) uint8 labels, or None when the volume has none."""
    return self._array(key, 'labels') if self._volume(key)['has_labels'] else None

  def pairs(self, split: str) -> list[tuple[str, str]]:
    """(moving_key, fixed_key) pairs of a split ([] when the split has none)."""
    return [tuple(p) for p in self._manifest['pairs'].get(split, [])]

  def timing(self, key: str) -> dict[str, Any] | None:
    """{"seconds": float, "device": str} of feature extraction, or None if not recorded."""
    self._volume(key)
    return self._timings.get(key)
