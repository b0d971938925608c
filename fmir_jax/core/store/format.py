"""The store format: names, header fields, canonical JSON and the safetensors shard codec.

The one error type (``StoreError``), the file names of shards and manifests, the header fields a
writer must provide and a model checks (``check_compatible``), byte-identical JSON (``dumps``),
atomic file writes, and the shard bytes themselves: ``_shard_bytes`` writes the safetensors
layout, ``_parse_shard_header`` reads and checks it. Names with a leading underscore are private
to the ``store`` package (its modules share them), not to this file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fmir_jax.core import errors
from fmir_jax.core import jsonio


FORMAT_VERSION = 1
INDEX_NAME = 'index.json'
TIMINGS_NAME = 'timings.json'
# Header fields that must agree between a store and a model trained on another store.
COMPAT_FIELDS = ('backbone.name', 'backbone.weights_sha256', 'layer', 'channels', 'patch_size',
                 'normalisation.mean', 'normalisation.std')
# Header fields every writer must provide.
REQUIRED_HEADER_FIELDS = ('backbone', 'layer', 'input_size', 'resize', 'normalisation',
                          'feature_dtype', 'channels', 'patch_size', 'dataset')

_DTYPE_TO_ST = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
                np.dtype(np.uint8): 'U8'}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_FEATURE_DTYPES = ('float16', 'float32')
_RESERVED = ('format_version', 'num_workers', 'volumes', 'pairs', 'shards')
_PARTIAL_ONLY = ('worker', 'complete', 'all_keys', 'redo_shards')
_PARTIAL_RE = re.compile(r'^index\.worker-(\d{5})-of-(\d{5})\.json$')


class StoreError(errors.UserError, ValueError):
  """A feature store is missing, corrupt, incomplete, or does not match what is expected."""


# --------------------------------------------------------------------------- canonical json, files


def _canonical(obj: Any) -> Any:
  """Converts numpy/tuple values to plain JSON types; rejects non-finite floats."""
  try:
    return jsonio.plain(obj, finite_only=True)
  except jsonio.NonFinite as e:
    raise StoreError(f'Manifest values must be finite numbers, got {e.args[0]!r}.') from None
  except jsonio.Unsupported as e:
    raise StoreError(
        f'Manifest value of type {type(e.args[0]).__name__} is not JSON-serialisable: '
        f'{e.args[0]!r}. Convert it to str/int/float/list/dict in the reader meta.') from None


def dumps(obj: Any) -> str:
  """Canonical JSON: sorted keys, shortest round-trip floats, trailing newline."""
  return json.dumps(_canonical(obj), sort_keys=True, indent=1, allow_nan=False) + '\n'


def _atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise StoreError(f'{path}: cannot write ({e.strerror or e}). Make room or fix the permissions '
                     'of the folder, then re-run: completed shards are kept.') from e


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, 'r', encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise StoreError(f'{path}: not valid JSON ({e}); the file is corrupt. Delete it and '
                     're-run feature extraction (completed shards are reused).') from e


# --------------------------------------------------------------------------- header


def get_field(header: Mapping[str, Any], dotted: str) -> Any:
  """``header['a']['b']`` for ``'a.b'``; None when any part is missing."""
  value: Any = header
  for part in dotted.split('.'):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  return value


def backbone_name(header: Mapping[str, Any]) -> str:
  """The backbone's name recorded in a store header (e.g. 'dinov3', 'mind')."""
  bb = header.get('backbone')
  return str(bb.get('name', '?')) if isinstance(bb, Mapping) else str(bb)


def dataset_name(header: Mapping[str, Any]) -> str:
  """The dataset reader's name recorded in a store header (e.g. 'acdc'), '' if none."""
  ds = header.get('dataset')
  return str(ds.get('name', '')) if isinstance(ds, Mapping) else str(ds or '')


def header_diff(a: Mapping[str, Any], b: Mapping[str, Any],
                fields: Iterable[str] | None = None) -> list[str]:
  """Lists 'field: a != b' for differing header fields (all top-level fields by default)."""
  ca, cb = _canonical(a), _canonical(b)
  if fields is None:
    fields = sorted((set(ca) | set(cb)) - set(_RESERVED) - set(_PARTIAL_ONLY))
  return [f'{f}: {get_field(ca, f)!r} != {get_field(cb, f)!r}' for f in fields
          if get_field(ca, f) != get_field(cb, f)]


def check_compatible(expected: Mapping[str, Any], actual: Mapping[str, Any], *,
                     source: str = 'feature store',
                     fields: Sequence[str] = COMPAT_FIELDS) -> None:
  """Raises StoreError if `actual` (a store header) cannot feed a model built for `expected`.

  Compared: backbone name and weights hash, layer, channels, patch size, normalisation.
  Input size, resize mode and dataset may differ (e.g. K = 256 for training, 512 at test).
  """
  diffs = header_diff(expected, actual, fields)
  if diffs:
    raise StoreError(f'{source} does not match what the model expects: ' + '; '.join(diffs) +
                     '. Extract features with the same backbone/weights/layer, or use a model '
                     'trained on this backbone.')


def _check_header(header: Mapping[str, Any]) -> dict[str, Any]:
  """The canonical header a writer records; StoreError if a field is missing or bad."""
  missing = [f for f in REQUIRED_HEADER_FIELDS if f not in header]
  if missing:
    raise StoreError(f'Store header is missing fields {missing}.')
  clash = [f for f in _RESERVED if f in header]
  if clash:
    raise StoreError(f'Store header must not define reserved fields {clash}.')
  if header['feature_dtype'] not in _FEATURE_DTYPES:
    raise StoreError(f'feature_dtype must be one of {_FEATURE_DTYPES}, got '
                     f'{header["feature_dtype"]!r}.')
  return _canonical(header)


# --------------------------------------------------------------------------- file names


def shard_name(worker: int, num_workers: int, seq: int) -> str:
  return f'shard-{worker:05d}-of-{num_workers:05d}-{seq:05d}.safetensors'


def partial_name(worker: int, num_workers: int) -> str:
  return f'index.worker-{worker:05d}-of-{num_workers:05d}.json'


def timings_partial_name(worker: int, num_workers: int) -> str:
  return f'timings.worker-{worker:05d}-of-{num_workers:05d}.json'


# --------------------------------------------------------------------------- safetensors


def _shard_bytes(tensors: Sequence[tuple[str, np.ndarray]], keys: Sequence[str]) -> bytes:
  """Serialises tensors in safetensors layout: u64 header size, JSON header, data.

  Tensors are laid out by decreasing itemsize then name, so each is naturally aligned.
  """
  order = sorted(tensors, key=lambda t: (-t[1].dtype.itemsize, t[0]))
  header: dict[str, Any] = {'__metadata__': {'format_version': str(FORMAT_VERSION),
                                             'keys': json.dumps(list(keys))}}
  start = 0
  chunks = []
  for name, arr in order:
    if arr.dtype not in _DTYPE_TO_ST:
      raise StoreError(f'Tensor {name}: unsupported dtype {arr.dtype}.')
    data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': _DTYPE_TO_ST[arr.dtype], 'shape': list(arr.shape),
                    'data_offsets': [start, start + len(data)]}
    chunks.append(data)
    start += len(data)
  head = json.dumps(header, sort_keys=True, separators=(',', ':')).encode('utf-8')
  head += b' ' * (-len(head) % 8)
  return struct.pack('<Q', len(head)) + head + b''.join(chunks)


def _parse_shard_header(path: str) -> tuple[dict[str, Any], int, int]:
  """Returns (header dict, data start byte, file size); StoreError naming the file if bad."""
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise StoreError(f'{path}: truncated shard (file shorter than 8 bytes).')
      (n,) = struct.unpack('<Q', raw)
      if n > min(size - 8, 100_000_000):
        raise StoreError(f'{path}: corrupt shard (header length {n} exceeds file size {size}).')
      head = json.loads(f.read(n).decode('utf-8'))
  except FileNotFoundError as e:
    raise StoreError(f'{path}: shard file is missing.') from e
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise StoreError(f'{path}: corrupt shard (unreadable safetensors header: {e}).') from e
  if not isinstance(head, dict):
    raise StoreError(f'{path}: corrupt shard (header is not a JSON object).')
  data_start = 8 + n
  end = 0
  for name, entry in head.items():
    if name == '__metadata__':
      continue
    begin, stop = entry['data_offsets']
    if entry['dtype'] not in _ST_TO_DTYPE:
      raise StoreError(f'{path}: tensor {name} has unsupported dtype {entry["dtype"]}.')
    expected = int(np.prod(entry['shape'], dtype=np.int64)) * _ST_TO_DTYPE[entry['dtype']].itemsize
    if stop - begin != expected:
      raise StoreError(f'{path}: corrupt shard (tensor {name} has {stop - begin} bytes, its '
                       f'shape needs {expected}).')
    end = max(end, stop)
  if data_start + end != size:
    raise StoreError(f'{path}: corrupt or truncated shard ({size} bytes on disk, header '
                     f'describes {data_start + end}).')
  return head, data_start, size
