"""The feature stage as a library: dataset -> frozen 2D encoder per slice -> feature store.

``extract_dataset`` is what ``feature_extract/run.py`` does, with keyword arguments instead of
flags::

  from feature_extract import pipeline
  summary = pipeline.extract_dataset(backbone='mind', dataset='acdc', data_root='ACDC',
                                     out='features/acdc_mind', device='cpu')

``extract`` is the step below it (volume sources and a loaded backbone -> store);
``encode_volume`` and ``make_header`` serve the code that encodes images at registration time.
Bad input raises a ``fmir_jax.core.errors.UserError`` (``USER_ERRORS``), whose message names the
flag or file and the fix.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

from feature_extract import backbones
from feature_extract import datasets
from feature_extract import slicing
from feature_extract.datasets.base import Pair, VolumeSource
from fmir_jax.core import store
from fmir_jax.core.errors import BackboneError, DatasetError, UserError, parse_layer

DATASET_DEFAULTS = {
    'acdc': {'layer': 2, 'input_size': 256, 'resize': 'upsample', 'pad_to': None,
             'note': "authors' release: K=256 for training, K=512 at test"},
    'abdomen': {'layer': 'last', 'input_size': 256, 'resize': 'pad', 'pad_to': 128,
                'note': "authors' release: 96x80 slices padded to 128x128, upsampled to 256"},
    'custom': {'layer': 'last', 'input_size': 256, 'resize': 'pad', 'pad_to': None, 'note': ''},
}
GENERIC_DEFAULTS = {'layer': 'last', 'input_size': 256, 'resize': 'pad', 'pad_to': None,
                    'note': ''}
PREPROCESSING = {
    'slice_axis': 2,
    'grey_to_rgb': 'repeat',
    'interpolation': 'torch bilinear, align_corners=False, antialias=False',
    'mask': 'normalised slices multiplied by the non-padding mask',
}
# What bad input (flags, files, an existing store) raises: the project's user-error family
# (DatasetError, BackboneError, StoreError, SlicingError, NiftiError, ...); the CLI turns it
# into exit 2. A tuple, for ``except USER_ERRORS``.
USER_ERRORS = (UserError,)


@dataclasses.dataclass(frozen=True)
class ExtractSummary:
  """What one extract() call did (this worker only)."""
  out_dir: str
  volumes: int          # volumes extracted in this call
  skipped: int          # volumes already complete (resume)
  repaired: int         # of `volumes`: re-extracted because their shard was bad (resume)
  slices: int
  seconds: float        # wall time of this call
  bytes_written: int    # shard bytes written in this call
  index_path: str | None  # index.json when it was (re)written

  def line(self) -> str:
    rate = self.slices / self.seconds if self.seconds > 0 else 0.0
    repaired = f'; {self.repaired} to repair bad shards' if self.repaired else ''
    return (f'{self.volumes} volumes ({self.skipped} already done{repaired}), {self.slices} '
            f'slices in {self.seconds:.1f} s ({rate:.1f} slices/s), '
            f'{self.bytes_written / 1e9:.3f} GB written to {self.out_dir}')


def make_header(backbone: backbones.Backbone, *, input_size: int, resize: str,
                pad_to: int | None, feature_dtype: str, dataset: str,
                dataset_options: dict[str, Any]) -> dict[str, Any]:
  """The store header (everything that determines the features)."""
  return {
      'backbone': backbone.describe(),
      'layer': backbone.layer,
      'input_size': int(input_size),
      'resize': resize,
      'pad_to': pad_to,
      'normalisation': {'mean': list(backbone.mean), 'std': list(backbone.std),
                        'source': backbone.norm_source},
      'feature_dtype': feature_dtype,
      'compute_dtype': backbone.dtype,
      'channels': backbone.channels,
      'patch_size': backbone.patch_size,
      'dataset': {'name': dataset, 'options': dataset_options},
      'preprocessing': PREPROCESSING,
      **_label_count(dataset),
  }


def _label_count(dataset: str) -> dict[str, int]:
  """{'num_classes': n} for a reader with a fixed label set (acdc 3, abdomen 13), else {}:
  evaluation scores these classes on any head, including heads trained elsewhere."""
  try:
    n = getattr(datasets.get(dataset), "NUM_CLASSES", None)
  except DatasetError:
    return {}
  return {'num_classes': int(n)} if n else {}


def encode_volume(image: np.ndarray, backbone: backbones.Backbone, *, input_size: int,
                  resize: str, pad_to: int | None, batch_size: int,
                  progress: Any = None) -> tuple[np.ndarray, dict[str, list[float]]]:
  """(H, W, D) image -> ((D, K/p, K/p, c) float32 features, geometry)."""
  slices, layout = slicing.volume_to_slices(image, input_size, resize, backbone.mean,
                                            backbone.std, pad_to)
  out = []
  for start in range(0, slices.shape[0], batch_size):
    batch = slices[start:start + batch_size]
    out.append(backbone(batch))
    if progress is not None:
      progress.update(batch.shape[0])
  return np.concatenate(out, axis=0), layout.geometry(backbone.patch_size)


def _pairs_by_split(pairs: Sequence[Pair], keys: set[str]) -> dict[str, list[list[str]]]:
  out: dict[str, list[list[str]]] = {}
  for p in pairs:
    if p.moving in keys and p.fixed in keys:
      out.setdefault(p.split, []).append([p.moving, p.fixed])
  return out


def extract(sources: Sequence[VolumeSource], pairs: Sequence[Pair],
            backbone: backbones.Backbone, out_dir: str, *, input_size: int,
            resize: str = 'upsample', pad_to: int | None = None, dataset: str = 'custom',
            dataset_options: dict[str, Any] | None = None, feature_dtype: str = 'float16',
            batch_size: int = 16, num_shards: int = 1, shard_index: int = 0,
            volumes_per_shard: int = 8, progress: bool = True,
            log: Callable[[str], None] | None = None) -> ExtractSummary:
  """Extracts features for this worker's share of `sources` into the store at `out_dir`.

  Args:
    sources: volumes (from a reader's ``scan``); keys must be unique.
    pairs: registration pairs (recorded per split; pairs with volumes absent are dropped).
    backbone: a loaded ``backbones.Backbone``.
    out_dir: store directory (created; resumed if it holds this worker's partial manifest).
    input_size: K; resize, pad_to: slicing mode (see ``slicing``).
    dataset, dataset_options: recorded in the header.
    feature_dtype: "float16" or "float32" storage dtype.
    batch_size: slices per forward pass.
    num_shards, shard_index: worker split (sorted keys, round robin).
    volumes_per_shard: volumes per shard file.
    progress: show a tqdm bar (slices/s).
    log: takes one line per repaired volume (default: stderr).

  Returns:
    ExtractSummary. index.json is written when this is the only worker.
  """
  if batch_size < 1:
    raise BackboneError(f'--batch-size must be >= 1, got {batch_size}.')
  backbone.check_input_size(input_size)
  slicing.slice_layout((1, 1), input_size, resize, pad_to)  # validates K/mode/pad_to early
  by_key: dict[str, VolumeSource] = {}
  for s in sources:
    if s.key in by_key:
      raise DatasetError(f'Duplicate volume key {s.key!r} ({s.files} and {by_key[s.key].files}).')
    by_key[s.key] = s
  if not by_key:
    raise DatasetError('No volumes to extract (check --data-root, --splits and the dataset '
                       'options).')
  header = make_header(backbone, input_size=input_size, resize=resize, pad_to=pad_to,
                       feature_dtype=feature_dtype, dataset=dataset,
                       dataset_options=dataset_options or {})
  writer = store.StoreWriter(out_dir, header, shard_index=shard_index, num_shards=num_shards,
                             volumes_per_shard=volumes_per_shard, keys=sorted(by_key),
                             pairs=_pairs_by_split(pairs, set(by_key)))
  mine = store.assign_keys(by_key, num_shards, shard_index)
  todo = [k for k in mine if k not in writer.done_keys]
  log = log or _log
  for repair in writer.repairs:
    for key in repair.keys:
      log(f'repair: volume {key}: {repair.problem}; re-extracting it.')
  start = time.perf_counter()
  device = f'{backbone.device} ({backbone.dtype})'
  bar = tqdm.tqdm(total=None, unit='slice', desc=backbone.label, disable=not progress,
                  dynamic_ncols=True, file=sys.stderr)
  n_slices = 0
  with bar:
    for key in todo:
      volume = by_key[key].load()
      if volume.key != key:
        raise DatasetError(f'{by_key[key].files}: reader returned key {volume.key!r} for '
                           f'source {key!r}.')
      bar.set_postfix_str(key)
      t0 = time.perf_counter()
      feats, geometry = encode_volume(volume.image, backbone, input_size=input_size,
                                      resize=resize, pad_to=pad_to, batch_size=batch_size,
                                      progress=bar)
      seconds = time.perf_counter() - t0
      writer.add(volume, feats, geometry, seconds, device)
      n_slices += feats.shape[0]
    index_path = writer.close()
  return ExtractSummary(out_dir, len(todo), len(mine) - len(todo),
                        sum(len(r.keys) for r in writer.repairs), n_slices,
                        time.perf_counter() - start, writer.bytes_written, index_path)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _settings(dataset: str, backbone: str, options: dict[str, Any], *, input_size: int | None,
              resize: str | None, pad_to: int | None, patch_size: int | None = None,
              required_k: int | None = None) -> dict[str, Any]:
  """The dataset's defaults (``DATASET_DEFAULTS``) under the values given (None = default)."""
  d = dict(DATASET_DEFAULTS.get(dataset, GENERIC_DEFAULTS))
  if dataset == 'abdomen' and options.get('resolution', 'half') == 'full':
    d['pad_to'] = None
  resize = resize or d['resize']
  pad_to = pad_to if pad_to is not None else (d['pad_to'] if resize == 'pad' else None)
  k = input_size
  if k is None:
    k = required_k or d['input_size']
    if patch_size:
      k = max(patch_size, k - k % patch_size)
  return {'resize': resize, 'pad_to': pad_to, 'input_size': k, 'note': d['note'],
          'layer': d['layer'] if backbone in ('dinov3', 'dinov2') else None}


def _scan(dataset: str, data_root: str | None, splits: Sequence[str], options: dict[str, Any]
         ) -> tuple[list[VolumeSource], list[Pair]]:
  """The volumes and pairs of ``splits`` (a subset of train, val, test) of a dataset."""
  if not data_root:
    raise DatasetError('--data-root is required (the dataset folder, or the pair list for '
                       'custom).')
  reader = datasets.get(dataset)
  bad = sorted(set(splits) - {'train', 'val', 'test'})
  if bad:
    raise DatasetError(f'--splits: unknown splits {bad}; use a subset of train,val,test.')
  try:
    sources = reader.scan(data_root, **options)
  except TypeError as e:          # an option the reader does not take
    if 'scan()' not in str(e):
      raise
    raise DatasetError(f'--dataset-option: {e}') from None
  pairs = reader.pairs(sources)
  sources = [s for s in sources if s.split in splits]
  return sources, [p for p in pairs if p.split in splits]


# Launcher variables naming a worker: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM srun.
_LAUNCHERS = (('RANK', 'WORLD_SIZE', 'LOCAL_RANK'),
              ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID'))


def launcher_worker(env=None) -> tuple[int, int, int | None]:
  """(worker index, worker count, local rank) from a launcher's environment (torchrun, then
  SLURM); (0, 1, None) without one. The local rank picks the GPU: cuda:LOCAL_RANK."""
  env = os.environ if env is None else env
  for rank, size, local in _LAUNCHERS:
    if env.get(rank, '').isdigit() and env.get(size, '').isdigit():
      lr = env.get(local, '')
      return int(env[rank]), int(env[size]), int(lr) if lr.isdigit() else None
  return 0, 1, None


def extract_dataset(*, out: str, data_root: str | None, dataset: str = 'acdc',
                    backbone: str = 'dinov3', weights: str | None = None,
                    layer: int | str | None = None, input_size: int | None = None,
                    resize: str | None = None, pad_to: int | None = None,
                    splits: Sequence[str] = ('train', 'val', 'test'), device: str = 'auto',
                    dtype: str = 'float32', batch_size: int = 16, num_shards: int = 1,
                    shard_index: int = 0, volumes_per_shard: int = 8,
                    feature_dtype: str = 'float16',
                    dataset_options: dict[str, Any] | None = None, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> ExtractSummary:
  """Extracts a dataset's features with a named backbone into the store at ``out``.

  The keywords are ``feature_extract/run.py``'s flags (its --help says what each means);
  None takes the per-dataset/backbone default (``DATASET_DEFAULTS``). ``layer`` is an int,
  "last" or its text; ``dataset_options`` go to the reader's ``scan`` and into the header.
  ``log`` takes the settings lines and repair lines (default: stderr). Resumes and repairs
  like the CLI; with ``num_shards`` > 1 join the workers with ``store.merge(out)``.

  Returns:
    ExtractSummary (``index_path`` None while other workers remain).
  Raises:
    fmir_jax.core.errors.UserError (a subclass) on bad input.
  """
  log = log or _log
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise store.StoreError(f'Need 0 <= --shard-index < --num-shards, got {shard_index}, '
                           f'{num_shards}.')
  name = backbones.canonical_name(backbone)
  options = dict(dataset_options or {})
  sources, pairs = _scan(dataset, data_root, splits, options)
  user_layer = parse_layer(layer)
  flags = {'input_size': input_size, 'resize': resize, 'pad_to': pad_to}
  if user_layer is None:
    user_layer = _settings(dataset, name, options, **flags)['layer']
  bb = backbones.load(name, weights, user_layer, device=device, dtype=dtype)
  cfg = _settings(dataset, name, options, **flags, patch_size=bb.patch_size,
                  required_k=bb.required_input_size)
  bb.check_input_size(cfg['input_size'])
  _, device_desc = backbones.resolve_device(str(bb.device))
  log(f'backbone: {bb.label} ({bb.weights or "no weights"}), layer {bb.layer}, '
      f'c={bb.channels}, p={bb.patch_size}, normalisation from {bb.norm_source}')
  log(f'device: {device_desc}, compute dtype {dtype}; K={cfg["input_size"]}, '
      f'resize={cfg["resize"]}' + (f' (pad to {cfg["pad_to"]})' if cfg['pad_to'] else '')
      + (f'; note: {cfg["note"]}' if cfg['note'] else ''))
  log(f'dataset: {dataset} at {data_root}: {len(sources)} volumes, {len(pairs)} pairs; '
      f'worker {shard_index + 1}/{num_shards}')
  return extract(
      sources, pairs, bb, out, input_size=cfg['input_size'], resize=cfg['resize'],
      pad_to=cfg['pad_to'], dataset=dataset,
      dataset_options={'root': os.path.abspath(data_root), **options},
      feature_dtype=feature_dtype, batch_size=batch_size, num_shards=num_shards,
      shard_index=shard_index, volumes_per_shard=volumes_per_shard, progress=progress,
      log=log)
