"""Feature-extraction throughput (slices/s) with random weights at the real model sizes.

Measures the user path: the model is saved with ``save_pretrained`` to a temporary directory
and loaded through ``feature_extract.backbones.load``; slices go through
``feature_extract.pipeline.encode_volume`` (slicing + normalisation + encoder + copy to host).

  python bench/extract.py                       # DINOv3 ViT-B/16 at K=256, 512; SAM ViT-B 1024
  python bench/extract.py --only dinov3-256     # one case
  python bench/extract.py --quick               # tiny models, smoke test (seconds)

fp32 and bf16 (autocast) are timed; fp16 only on CUDA; bf16 on CPU only when the CPU has
native bf16 (AVX512-BF16/AMX): without it torch emulates bf16 and is ~20x slower than fp32
(measured here on an AVX2 CPU), so ask for it explicitly with --dtypes. Not a test: numbers
depend on the machine (the CPU figure is for whatever cores are free).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from feature_extract import backbones  # pylint: disable=g-import-not-at-top
from feature_extract import pipeline  # pylint: disable=g-import-not-at-top


def dinov3_config(quick: bool) -> transformers.DINOv3ViTConfig:
  """A randomly initialised DINOv3 config: tiny (quick) or ViT-B sized (timings only)."""
  if quick:
    return transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        patch_size=16, num_register_tokens=4)
  # facebook/dinov3-vitb16-pretrain-lvd1689m: ViT-B/16, 4 registers, layerscale 1e-5.
  return transformers.DINOv3ViTConfig(hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      patch_size=16, num_register_tokens=4, image_size=224,
                                      layerscale_value=1e-5, rope_theta=100.0)


def _sam_model(quick: bool) -> transformers.SamVisionModel:
  if quick:
    cfg = transformers.SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=64, patch_size=16,
                                       window_size=2, global_attn_indexes=[1], mlp_dim=64)
  else:
    cfg = transformers.SamVisionConfig()  # defaults = SAM ViT-B image encoder, 1024 px
  return transformers.SamVisionModel(cfg)


def _cases(quick: bool) -> list[tuple[str, str, int, object]]:
  """(case id, backbone name, K, layer)."""
  if quick:
    return [('dinov3-64', 'dinov3', 64, 'last'), ('dinov3-64-layer2', 'dinov3', 64, 2),
            ('sam-64', 'sam', 64, 'last')]
  return [('dinov3-256', 'dinov3', 256, 'last'), ('dinov3-256-layer2', 'dinov3', 256, 2),
          ('dinov3-512', 'dinov3', 512, 'last'), ('sam-1024', 'sam', 1024, 'last')]


def _time_case(model_dir: str, name: str, k: int, layer, dtype: str, device: str,
               n_slices: int, batch: int, repeats: int) -> float:
  bb = backbones.load(name, model_dir, layer, device=device, dtype=dtype)
  image = np.random.default_rng(0).random((128, 128, n_slices), dtype=np.float32)
  pipeline.encode_volume(image[..., :min(batch, n_slices)], bb, input_size=k,
                         resize='upsample', pad_to=None, batch_size=batch)          # warm-up
  best = float('inf')
  for _ in range(repeats):
    if bb.device.type == 'cuda':
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipeline.encode_volume(image, bb, input_size=k, resize='upsample', pad_to=None,
                           batch_size=batch)
    best = min(best, time.perf_counter() - t0)
  return n_slices / best


def _cpu_has_bf16() -> bool:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = f.read()
  except OSError:
    return False
  return 'avx512_bf16' in flags or 'amx_bf16' in flags


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='tiny models (smoke test)')
  p.add_argument('--only', action='append', help='case id(s) to run, e.g. dinov3-256')
  p.add_argument('--dtypes', default=None, help='comma list (default float32,bfloat16'
                 '[,float16 on CUDA])')
  p.add_argument('--device', default='auto')
  p.add_argument('--slices', type=int, default=None, help='slices per timed volume')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--repeats', type=int, default=1)
  args = p.parse_args(argv)
  dev, desc = backbones.resolve_device(args.device)
  if args.dtypes:
    dtypes = args.dtypes.split(',')
  elif dev.type == 'cuda':
    dtypes = ['float32', 'bfloat16', 'float16']
  else:
    dtypes = ['float32'] + (['bfloat16'] if _cpu_has_bf16() else [])
  n_slices = args.slices or (4 if args.quick else 8)
  print(f'device: {desc}; torch {torch.__version__}; transformers {transformers.__version__}; '
        f'random weights, real configs{" (QUICK: tiny configs)" if args.quick else ""}')
  print(f'{"case":<20} {"dtype":<9} {"K":>5} {"layer":>5} {"slices/s":>9} {"s/16-slice vol":>15}')
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as tmp:
    saved = {}
    for case, name, k, layer in _cases(args.quick):
      if args.only and case not in args.only:
        continue
      if name not in saved:
        model = (transformers.DINOv3ViTModel(dinov3_config(args.quick)) if name == 'dinov3'
                 else _sam_model(args.quick))
        saved[name] = os.path.join(tmp, name)
        model.save_pretrained(saved[name])
        del model
      for dtype in dtypes:
        try:
          rate = _time_case(saved[name], name, k, layer, dtype, args.device, n_slices,
                            args.batch_size, args.repeats)
        except backbones.BackboneError as e:
          print(f'{case:<20} {dtype:<9} {k:>5} {layer!s:>5}   skipped: {e}')
          continue
        print(f'{case:<20} {dtype:<9} {k:>5} {layer!s:>5} {rate:>9.2f} {16 / rate:>15.2f}',
              flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
