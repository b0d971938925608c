"""The feature-store format: write, read (memory-mapped), validate, merge.

numpy + json only (the shard files are safetensors, written and read here directly so that the
bytes are deterministic and reads are zero-copy ``np.memmap`` views). No jax, no torch.

Layout of a store directory ``OUT``::

  OUT/index.json                                  manifest of the complete store
  OUT/shard-WWWWW-of-NNNNN-SSSSS.safetensors      W = worker index, N = workers, S = sequence
  OUT/index.worker-WWWWW-of-NNNNN.json            per-worker partial manifest (resume state)
  OUT/timings.json                                seconds of feature extraction per volume
  OUT/timings.worker-WWWWW-of-NNNNN.json          per-worker timings

Tensors in a shard, per volume key: ``<key>/features`` (D, h, w, c) on the patch grid (float16
by default), ``<key>/image`` (H, W, D) float32 in [0, 1], ``<key>/labels`` (H, W, D) uint8
(only when the volume has labels). The safetensors ``__metadata__`` holds ``format_version``
and ``keys`` (a JSON list of the volume keys in the shard).

Geometry contract: for in-plane array axis a in {0, 1}, voxel index i maps to the continuous
patch-grid coordinate ``offset[a] + scale[a] * i`` (patch centres at integer coordinates);
``fmir_jax.core.patches`` computes it and turns it into linear-interpolation weights.

Manifest (``index.json``): the header fields at the top level (backbone, layer, input_size,
resize, normalisation, feature_dtype, channels, patch_size, dataset, preprocessing, ...),
plus ``format_version``, ``num_workers``, ``volumes`` (sorted by key), ``pairs`` (per split,
lists of [moving_key, fixed_key]) and ``shards`` (file, keys, bytes, sha256). It is written
with sorted keys and canonical floats, so the same inputs give a byte-identical file.

Integrity: ``FeatureStore`` checks every shard's size and safetensors header when it opens, and
its sha256 against the manifest the first time one of its arrays is read (once per process:
verified shards are remembered by absolute path, inode, size, mtime and digest). Opt out with
``FeatureStore(path, verify=False)`` or the environment variable ``FMIR_SKIP_SHARD_VERIFY=1``
(e.g. for a store on slow network storage you trust); ``FeatureStore.validate()`` hashes every
shard at once. A corrupt, truncated or missing shard is repaired in place by re-running the
extraction command that wrote the store: ``StoreWriter`` re-checks its shards on resume, drops
the bad ones (``StoreWriter.repairs``) and rewrites them under the same names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import struct
import threading
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fmir_jax.core import errors
from fmir_jax.core import files
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
SKIP_VERIFY_ENV = 'FMIR_SKIP_SHARD_VERIFY'
REPAIR_HINT = ('Re-run the feature_extract/run.py command that wrote this store, with the same '
               'arguments (then --merge if it used --num-shards): it re-extracts only these '
               'volumes and repairs the store in place.')


class StoreError(errors.UserError, ValueError):
  """A feature store is missing, corrupt, incomplete, or does not match what is expected."""


# --------------------------------------------------------------------------- canonical json


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


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, 'r', encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise StoreError(f'{path}: not valid JSON ({e}); the file is corrupt. Delete it and '
                     're-run feature extraction (completed shards are reused).') from e


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




# (absolute path, inode, size in bytes, mtime in ns, sha256) of shards hashed in this process.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()
_VERIFY_LOCK = threading.Lock()


def _sha256_problem(path: str, expected_sha256: str) -> str | None:
  """None if the file hashes to `expected_sha256` (hashed once per process per file state)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return f'{path}: shard file is missing'
  token = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, expected_sha256)
  if token in _VERIFIED:
    return None
  with _VERIFY_LOCK:  # one thread hashes a shard; the others wait for its verdict
    if token not in _VERIFIED:
      if files.file_digest(path) != expected_sha256:
        return f'{path}: sha256 mismatch with the manifest (the bytes changed on disk)'
      _VERIFIED.add(token)
  return None


def shard_problem(path: str, shard: Mapping[str, Any], *, check_sha256: bool = True
                  ) -> str | None:
  """What is wrong with a shard file given its manifest record, or None if it is sound.

  Args:
    path: the shard file.
    shard: its manifest record ({"file", "keys", "bytes", "sha256"}).
    check_sha256: also compare the sha256 (reads the whole file, once per process).

  Returns:
    One sentence naming the file (missing, corrupt header, truncated, sha256 mismatch), or None.
  """
  try:
    _, _, size = _parse_shard_header(path)
  except StoreError as e:
    return str(e).rstrip('.')
  if size != shard['bytes']:
    return (f'{path}: {size} bytes on disk, the manifest says {shard["bytes"]} (truncated, or '
            'written by another run)')
  return _sha256_problem(path, shard['sha256']) if check_sha256 else None


def _bad_shard(problem: str, shard: Mapping[str, Any]) -> StoreError:
  keys = shard['keys']
  return StoreError(f'{problem}; it holds volumes {", ".join(keys[:20])}'
                    f'{" ..." if len(keys) > 20 else ""}. {REPAIR_HINT}')


def _skip_verify_from_env() -> bool:
  return os.environ.get(SKIP_VERIFY_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')


# --------------------------------------------------------------------------- naming / workers


def shard_name(worker: int, num_workers: int, seq: int) -> str:
  return f'shard-{worker:05d}-of-{num_workers:05d}-{seq:05d}.safetensors'


def partial_name(worker: int, num_workers: int) -> str:
  return f'index.worker-{worker:05d}-of-{num_workers:05d}.json'


def timings_partial_name(worker: int, num_workers: int) -> str:
  return f'timings.worker-{worker:05d}-of-{num_workers:05d}.json'


def assign_keys(keys: Iterable[str], num_shards: int, shard_index: int) -> list[str]:
  """Deterministic split of volume keys between workers: sorted keys, round robin."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f'Need 0 <= shard_index < num_shards, got shard_index={shard_index}, '
                     f'num_shards={num_shards}.')
  return sorted(set(keys))[shard_index::num_shards]


# --------------------------------------------------------------------------- writer


def _check_header(header: Mapping[str, Any]) -> dict[str, Any]:
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
    self.header = _check_header(header)
    self.shard_index = shard_index
    self.num_shards = num_shards
    self.volumes_per_shard = volumes_per_shard
    self.all_keys = sorted(set(keys)) if keys is not None else None
    self.pairs = _canonical({s: [list(p) for p in v] for s, v in (pairs or {}).items()})
    self._partial_path = os.path.join(out_dir, partial_name(shard_index, num_shards))
    self._timings_path = os.path.join(out_dir, timings_partial_name(shard_index, num_shards))
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
      m = _PARTIAL_RE.match(os.path.basename(path))
      if m and int(m.group(2)) != self.num_shards:
        raise StoreError(f'{path}: this store was written with --num-shards {int(m.group(2))}, '
                         f'not {self.num_shards}. Use the same worker count or a new --out.')
      diffs = header_diff(_read_json(path), self.header)
      if diffs:
        raise StoreError(f'{path}: refusing to resume into a store with a different header: '
                         + '; '.join(diffs) + '. Use a new --out directory (or the original '
                         'arguments).')

  def _resume(self) -> None:
    prefix = shard_name(self.shard_index, self.num_shards, 0)[:-len('00000.safetensors')]
    for stale in glob.glob(os.path.join(self.out_dir, glob.escape(prefix) + '*.tmp-*')):
      os.remove(stale)  # a shard whose write was interrupted; never referenced by a manifest
    if not os.path.exists(self._partial_path):
      return
    part = _read_json(self._partial_path)
    if part.get('format_version') != FORMAT_VERSION:
      raise StoreError(f'{self._partial_path}: format_version {part.get("format_version")} '
                       f'!= {FORMAT_VERSION}; use a new --out directory.')
    if self.all_keys is not None and part.get('all_keys') not in (None, self.all_keys):
      raise StoreError(f'{self._partial_path}: the volume list differs from the one this store '
                       'was started with (dataset contents or options changed). Use a new --out.')
    self._redo = {r['file']: list(r['keys']) for r in part.get('redo_shards', [])}
    for shard in part['shards']:
      problem = shard_problem(os.path.join(self.out_dir, shard['file']), shard)
      if problem:
        self.repairs.append(ShardRepair(shard['file'], tuple(shard['keys']), problem))
        self._redo[shard['file']] = list(shard['keys'])
      else:
        self._shards.append(shard)
    self._volumes = {v['key']: v for v in part['volumes'] if v['shard'] not in self._redo}
    if os.path.exists(self._timings_path):
      self._timings = _read_json(self._timings_path)
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
    info = _canonical({
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
    self._write_shard(shard_name(self.shard_index, self.num_shards, seq), entries)

  def _write_shard(self, name: str, entries: list[tuple[dict[str, Any], list]]) -> None:
    keys = [info['key'] for info, _ in entries]
    data = _shard_bytes([t for _, ts in entries for t in ts], keys)
    _atomic_write_bytes(os.path.join(self.out_dir, name), data)
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
        'format_version': FORMAT_VERSION, 'num_workers': self.num_shards,
        'worker': self.shard_index, 'complete': complete, 'all_keys': self.all_keys,
        'pairs': self.pairs, 'shards': self._shards,
        'volumes': [self._volumes[k] for k in sorted(self._volumes)],
    })
    if self._redo:  # dropped shards not yet rewritten: their names and volumes survive a kill
      part['redo_shards'] = [{'file': f, 'keys': k} for f, k in sorted(self._redo.items())]
    _atomic_write_bytes(self._timings_path, dumps(self._timings).encode())
    _atomic_write_bytes(self._partial_path, dumps(part).encode())

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
    return merge_when_complete(self.out_dir)


# --------------------------------------------------------------------------- merge


def _merge_partials(out_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Joins the worker partial manifests of `out_dir` into (manifest, timings)."""
  paths = sorted(glob.glob(os.path.join(out_dir, 'index.worker-*.json')))
  if not paths:
    raise StoreError(f'{out_dir}: no {INDEX_NAME} and no worker manifests; not a feature store '
                     '(or extraction never completed a shard).')
  parts = [_read_json(p) for p in paths]
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
  head = {k: v for k, v in parts[0].items() if k not in _RESERVED + _PARTIAL_ONLY}
  for path, part in zip(paths[1:], parts[1:]):
    diffs = header_diff(head, part)
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
      'format_version': FORMAT_VERSION, 'num_workers': n, 'pairs': pairs,
      'shards': sorted((s for p in parts for s in p['shards']), key=lambda s: s['file']),
      'volumes': sorted(volumes, key=lambda v: v['key']),
  })
  timings: dict[str, Any] = {}
  for part in parts:
    tpath = os.path.join(out_dir, timings_partial_name(part['worker'], n))
    if os.path.exists(tpath):
      timings.update(_read_json(tpath))
  return manifest, timings


def _all_workers_complete(out_dir: str) -> bool:
  paths = glob.glob(os.path.join(out_dir, 'index.worker-*.json'))
  parts = [_read_json(p) for p in paths]
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
  for name, value in ((TIMINGS_NAME, timings), (INDEX_NAME, manifest)):
    path, data = os.path.join(out_dir, name), dumps(value).encode()
    if os.path.exists(path):
      with open(path, 'rb') as f:
        if f.read() == data:
          continue
    _atomic_write_bytes(path, data)
  return path


# --------------------------------------------------------------------------- reader


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
    index = os.path.join(path, INDEX_NAME)
    if not os.path.isdir(path):
      raise StoreError(f'{path}: feature store directory does not exist. Run '
                       'feature_extract/run.py --out to create it.')
    if os.path.exists(index):
      manifest = _read_json(index)
      self._timings = (_read_json(os.path.join(path, TIMINGS_NAME))
                       if os.path.exists(os.path.join(path, TIMINGS_NAME)) else {})
    else:
      manifest, self._timings = _merge_partials(path)
    if manifest.get('format_version') != FORMAT_VERSION:
      raise StoreError(f'{index}: format_version {manifest.get("format_version")!r}, this code '
                       f'reads {FORMAT_VERSION}. Re-extract the features.')
    self._manifest = manifest
    self.header = {k: v for k, v in manifest.items() if k not in _RESERVED}
    self._volumes = {v['key']: v for v in manifest['volumes']}
    _check_pairs(index, manifest['pairs'], self._volumes)
    self._verify = not _skip_verify_from_env() if verify is None else verify
    self._shards = {shard['file']: shard for shard in manifest['shards']}
    self._arrays: dict[str, np.ndarray] = {}
    for shard in manifest['shards']:
      self._open_shard(shard)

  def _open_shard(self, shard: Mapping[str, Any]) -> None:
    path = os.path.join(self.path, shard['file'])
    problem = shard_problem(path, shard, check_sha256=False)
    if problem:
      raise _bad_shard(problem, shard)
    head, data_start, _ = _parse_shard_header(path)
    meta = head.get('__metadata__', {})
    if meta.get('format_version') != str(FORMAT_VERSION) or \
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
        got = (tuple(entry['shape']), _ST_TO_DTYPE[entry['dtype']])
        if got != (shape, dtype):
          raise StoreError(f'{path}: tensor {name} is {got[0]} {got[1]}, manifest expects '
                           f'{shape} {dtype}.')
        begin, stop = (data_start + o for o in entry['data_offsets'])
        self._arrays[name] = buf[begin:stop].view(dtype.newbyteorder('<')).reshape(shape)

  def _check_sha256(self, file: str) -> None:
    shard = self._shards[file]
    problem = _sha256_problem(os.path.join(self.path, file), shard['sha256'])
    if problem:
      raise _bad_shard(problem, shard)

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
