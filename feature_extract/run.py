"""Feature extraction CLI: dataset -> frozen 2D encoder per slice -> sharded feature store.

Example::

  python feature_extract/run.py --backbone dinov3 --dataset acdc --data-root ACDC \\
      --out features/acdc_dinov3

``python -m feature_extract ...`` is the same command (``feature_extract/__main__.py``).

Resumable (kill and re-run: completed shards are kept, the same inputs give a byte-identical
index.json), splittable over workers (``--num-shards N --shard-index i``, or read from a
launcher: ``torchrun --nproc-per-node=N feature_extract/run.py ...`` or ``srun``); the last
worker to finish writes index.json (``--merge`` does it by hand).
Re-running also repairs the store in place: shards that are missing, truncated or fail their
sha256 are reported (one line per volume), re-extracted and rewritten under the same names.
Bad input prints one message and exits with code 2. The work is done by
``feature_extract.pipeline.extract_dataset`` (the same, as a library function).

Per-dataset defaults (paper §2.2, authors' release): acdc: --layer 2, --input-size 256,
--resize upsample (the authors extract at 512 for testing); abdomen: --layer last,
--input-size 256, --resize pad --pad-to 128 (half resolution); custom: --layer last,
--input-size 256, --resize pad. SAM needs --input-size = its image_size (1024); the patch
size must divide K (DINOv2: 14, so the default K becomes 252).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

if __package__ in (None, ''):  # run as a script: import this checkout's package, not another
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from feature_extract import backbones  # pylint: disable=g-import-not-at-top
from feature_extract import pipeline  # pylint: disable=g-import-not-at-top
from feature_extract import slicing  # pylint: disable=g-import-not-at-top
from fmir_jax.core import entry  # pylint: disable=g-import-not-at-top
from fmir_jax.core import store  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top,g-bad-import-order
from fmir_jax.core.errors import DatasetError, UserError  # pylint: disable=g-import-not-at-top


def _parse_option(text: str) -> tuple[str, Any]:
  if '=' not in text:
    raise DatasetError(f'--dataset-option {text!r}: expected key=value (e.g. layout=raw, '
                       'subjects=[1,2]).')
  key, value = text.split('=', 1)
  try:
    return key.strip(), json.loads(value)
  except json.JSONDecodeError:
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=entry.HelpFormatter)
  p.add_argument('--backbone', default='dinov3', metavar='NAME',
                 help=f'{" | ".join(backbones.BACKBONES)} (aliases: {backbones.alias_text()})')
  p.add_argument('--dataset', default='acdc', help='acdc | abdomen | custom')
  p.add_argument('--data-root', help='dataset folder (custom: the pair-list file) '
                 '(default: none; every dataset needs one)')
  p.add_argument('--out', required=True, help='feature store directory (required)')
  p.add_argument('--weights', help='Hub id or local directory (default: per backbone, '
                 f'{", ".join(f"{k}: {v}" for k, v in backbones.DEFAULT_WEIGHTS.items())})')
  p.add_argument('--layer', help='hidden_states index (0 = embeddings) or "last" '
                 '(default: per dataset, see above)')
  p.add_argument('--input-size', type=int,
                 help='K (default: per dataset/backbone, see above)')
  p.add_argument('--resize', choices=slicing.RESIZE_MODES,
                 help='how slices reach K x K (default: per dataset, see above)')
  p.add_argument('--pad-to', type=int, help='pad mode: square canvas side in voxels '
                 '(default: per dataset, see above; none: the slice\'s larger side)')
  p.add_argument('--splits', default='train,val,test', help='comma-separated splits to extract')
  p.add_argument('--device', default='auto',
                 help='auto | cpu | cuda[:N] (auto under a launcher: cuda:LOCAL_RANK)')
  p.add_argument('--dtype', default='float32', choices=sorted(backbones.DTYPES),
                 help='compute dtype of the encoder')
  p.add_argument('--batch-size', type=int, default=16, help='slices per forward pass')
  p.add_argument('--num-shards', type=int, default=None,
                 help='number of workers (default: the launcher\'s, torchrun WORLD_SIZE or '
                      'SLURM_NTASKS, else 1)')
  p.add_argument('--shard-index', type=int, default=None,
                 help='this worker (default: the launcher\'s RANK or SLURM_PROCID, else 0)')
  p.add_argument('--volumes-per-shard', type=int, default=8,
                 help='volumes per safetensors shard file')
  p.add_argument('--merge', action='store_true',
                 help='join the workers into index.json (the last worker to finish does this '
                      'itself)')
  p.add_argument('--feature-dtype', default='float16', choices=('float16', 'float32'),
                 help='dtype of the stored features')
  p.add_argument('--dataset-option', action='append', default=[], metavar='KEY=VALUE',
                 help='reader option (JSON value or string); repeatable (default: none)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  return p


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.merge:
      path = store.merge(args.out)
      _log(f'merged workers into {path}')
      return 0
    options = dict(_parse_option(o) for o in args.dataset_option)
    rank, size, local = pipeline.launcher_worker()
    if args.num_shards is None and args.shard_index is None:
      args.num_shards, args.shard_index = size, rank
      if args.device == 'auto' and local is not None and torch.cuda.is_available():
        args.device = f'cuda:{local}'
    args.num_shards = 1 if args.num_shards is None else args.num_shards
    args.shard_index = 0 if args.shard_index is None else args.shard_index
    summary = pipeline.extract_dataset(
        out=args.out, data_root=args.data_root, dataset=args.dataset, backbone=args.backbone,
        weights=args.weights, layer=args.layer, input_size=args.input_size,
        resize=args.resize, pad_to=args.pad_to,
        splits=[s for s in args.splits.split(',') if s], device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, num_shards=args.num_shards,
        shard_index=args.shard_index, volumes_per_shard=args.volumes_per_shard,
        feature_dtype=args.feature_dtype, dataset_options=options,
        progress=not args.no_progress, log=_log)
  except UserError as e:            # the project's user-error family; bugs keep a traceback
    _log(f'error: {e}')
    return 2
  _log(f'done: {summary.line()}')
  if summary.index_path:
    _log(f'manifest: {summary.index_path}')
  else:
    _log(f'worker {args.shard_index} of {args.num_shards} complete; the last worker to '
         'finish writes index.json.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
