"""Feature extraction CLI: dataset -> frozen 2D encoder per slice -> sharded feature store.

Example::

  python feature_extract/run.py --backbone dinov3 --dataset acdc --data-root ACDC \\
      --out features/acdc_dinov3

Resumable (kill and re-run: completed shards are kept, the same inputs give a byte-identical
index.json), splittable over workers (``--num-shards N --shard-index i``, then ``--merge``).
Re-running also repairs the store in place: shards that are missing, truncated or fail their
sha256 are reported (one line per volume), re-extracted and rewritten under the same names.
Bad input prints one message and exits with code 2.

Per-dataset defaults (SPEC §2, authors' release): acdc: --layer 2, --input-size 256,
--resize upsample (the authors extract at 512 for testing); abdomen: --layer last,
--input-size 256, --resize pad --pad-to 128 (half resolution); custom: --layer last,
--input-size 256, --resize pad. SAM needs --input-size = its image_size (1024); the patch
size must divide K (DINOv2: 14, so the default K becomes 252).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ''):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tqdm  # pylint: disable=g-import-not-at-top

from feature_extract import backbones  # pylint: disable=g-import-not-at-top
from feature_extract import datasets  # pylint: disable=g-import-not-at-top
from feature_extract import slicing  # pylint: disable=g-import-not-at-top
from feature_extract.datasets.base import DatasetError, Pair, VolumeSource  # pylint: disable=g-import-not-at-top
from fmir_jax import io as fmir_io  # pylint: disable=g-import-not-at-top
from fmir_jax import store  # pylint: disable=g-import-not-at-top

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
_USER_ERRORS = (DatasetError, backbones.BackboneError, store.StoreError, slicing.SlicingError,
                fmir_io.NiftiError)


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
  }


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
            volumes_per_shard: int = 8, progress: bool = True) -> ExtractSummary:
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

  Returns:
    ExtractSummary. index.json is written when this is the only worker.
  """
  if batch_size < 1:
    raise backbones.BackboneError(f'--batch-size must be >= 1, got {batch_size}.')
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
  for repair in writer.repairs:
    for key in repair.keys:
      _log(f'repair: volume {key}: {repair.problem}; re-extracting it.')
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


# --------------------------------------------------------------------------- CLI


def _parse_option(text: str) -> tuple[str, Any]:
  if '=' not in text:
    raise DatasetError(f'--dataset-option {text!r}: expected key=value (e.g. layout=raw, '
                       'subjects=[1,2]).')
  key, value = text.split('=', 1)
  try:
    return key.strip(), json.loads(value)
  except json.JSONDecodeError:
    return key.strip(), value


def _parse_layer(text: str | None) -> int | str | None:
  if text is None or text == 'last':
    return text
  try:
    return int(text)
  except ValueError:
    raise backbones.BackboneError(f'--layer must be an int or "last", got {text!r}.') from None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--backbone', default='dinov3', metavar='NAME',
                 help=f'{" | ".join(backbones.BACKBONES)} (aliases: {backbones.alias_text()}); '
                 'default dinov3')
  p.add_argument('--dataset', default='acdc', help='acdc | abdomen | custom')
  p.add_argument('--data-root', help='dataset folder (custom: the pair-list file)')
  p.add_argument('--out', required=True, help='feature store directory')
  p.add_argument('--weights', help='Hub id or local directory (default per backbone)')
  p.add_argument('--layer', help='hidden_states index (0 = embeddings) or "last"')
  p.add_argument('--input-size', type=int, help='K (default per dataset/backbone)')
  p.add_argument('--resize', choices=slicing.RESIZE_MODES)
  p.add_argument('--pad-to', type=int, help='pad mode: square canvas side in voxels')
  p.add_argument('--splits', default='train,val,test')
  p.add_argument('--device', default='auto', help='auto | cpu | cuda[:N]')
  p.add_argument('--dtype', default='float32', choices=sorted(backbones.DTYPES))
  p.add_argument('--batch-size', type=int, default=16, help='slices per forward pass')
  p.add_argument('--num-shards', type=int, default=1, help='number of workers')
  p.add_argument('--shard-index', type=int, default=0, help='this worker')
  p.add_argument('--volumes-per-shard', type=int, default=8)
  p.add_argument('--merge', action='store_true', help='join the workers into index.json')
  p.add_argument('--feature-dtype', default='float16', choices=('float16', 'float32'))
  p.add_argument('--dataset-option', action='append', default=[], metavar='KEY=VALUE',
                 help='reader option (JSON value or string); repeatable')
  p.add_argument('--no-progress', action='store_true')
  return p


def _resolve_defaults(args: argparse.Namespace, backbone_name: str, patch_size: int | None,
                      required_k: int | None, options: dict[str, Any]) -> dict[str, Any]:
  d = dict(DATASET_DEFAULTS.get(args.dataset, GENERIC_DEFAULTS))
  if args.dataset == 'abdomen' and options.get('resolution', 'half') == 'full':
    d['pad_to'] = None
  resize = args.resize or d['resize']
  pad_to = args.pad_to if args.pad_to is not None else (d['pad_to'] if resize == 'pad' else None)
  k = args.input_size
  if k is None:
    k = required_k or d['input_size']
    if patch_size:
      k = max(patch_size, k - k % patch_size)
  return {'resize': resize, 'pad_to': pad_to, 'input_size': k, 'note': d['note'],
          'layer': d['layer'] if backbone_name in ('dinov3', 'dinov2') else None}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _scan(args: argparse.Namespace, options: dict[str, Any]
          ) -> tuple[list[VolumeSource], list[Pair]]:
  if not args.data_root:
    raise DatasetError('--data-root is required (the dataset folder, or the pair list for '
                       'custom).')
  reader = datasets.get(args.dataset)
  splits = [s for s in args.splits.split(',') if s]
  bad = sorted(set(splits) - {'train', 'val', 'test'})
  if bad:
    raise DatasetError(f'--splits: unknown splits {bad}; use a subset of train,val,test.')
  sources = reader.scan(args.data_root, **options)
  pairs = reader.pairs(sources)
  sources = [s for s in sources if s.split in splits]
  return sources, [p for p in pairs if p.split in splits]


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.merge:
      path = store.merge(args.out)
      _log(f'merged workers into {path}')
      return 0
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
      raise store.StoreError(f'Need 0 <= --shard-index < --num-shards, got {args.shard_index}, '
                             f'{args.num_shards}.')
    name = backbones.canonical_name(args.backbone)
    options = dict(_parse_option(o) for o in args.dataset_option)
    sources, pairs = _scan(args, options)
    user_layer = _parse_layer(args.layer)
    probe = _resolve_defaults(args, name, None, None, options)
    layer = user_layer if args.layer is not None else probe['layer']
    bb = backbones.load(name, args.weights, layer, device=args.device, dtype=args.dtype)
    cfg = _resolve_defaults(args, name, bb.patch_size, bb.required_input_size, options)
    bb.check_input_size(cfg['input_size'])
    _, device_desc = backbones.resolve_device(str(bb.device))
    _log(f'backbone: {bb.label} ({bb.weights or "no weights"}), layer {bb.layer}, '
         f'c={bb.channels}, p={bb.patch_size}, normalisation from {bb.norm_source}')
    _log(f'device: {device_desc}, compute dtype {args.dtype}; K={cfg["input_size"]}, '
         f'resize={cfg["resize"]}' + (f' (pad to {cfg["pad_to"]})' if cfg['pad_to'] else '')
         + (f'; note: {cfg["note"]}' if cfg['note'] else ''))
    _log(f'dataset: {args.dataset} at {args.data_root}: {len(sources)} volumes, '
         f'{len(pairs)} pairs; worker {args.shard_index + 1}/{args.num_shards}')
    summary = extract(
        sources, pairs, bb, args.out, input_size=cfg['input_size'], resize=cfg['resize'],
        pad_to=cfg['pad_to'], dataset=args.dataset,
        dataset_options={'root': os.path.abspath(args.data_root), **options},
        feature_dtype=args.feature_dtype, batch_size=args.batch_size,
        num_shards=args.num_shards, shard_index=args.shard_index,
        volumes_per_shard=args.volumes_per_shard, progress=not args.no_progress)
  except _USER_ERRORS as e:
    _log(f'error: {e}')
    return 2
  except TypeError as e:
    if 'scan()' not in str(e):
      raise
    _log(f'error: --dataset-option: {e}')
    return 2
  _log(f'done: {summary.line()}')
  if summary.index_path:
    _log(f'manifest: {summary.index_path}')
  else:
    _log(f'worker {args.shard_index} complete; run with --merge when all workers are done.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
