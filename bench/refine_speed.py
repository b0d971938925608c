"""Seconds per pair of the multi-scale instance optimisation (fmir_jax/register/refine.py).

  python bench/refine_speed.py                 # 80x96x80 (1 mm) and 128x128x16 (1.8x1.8x10)
  python bench/refine_speed.py --pairs 5 --json bench_results/refine.json

For each grid and each of {ncc, mind} x {displacement, diffeomorphic} with otherwise default
``RefineOptions``: one Refiner, a first pair (its compile seconds reported separately), then
``--pairs`` further synthetic pairs of the same shape (smoothed noise, moved by a smooth
field; zero initial field) timed after compilation. Prints the median seconds per pair, the
median split (pyramid/MIND, then each scale coarse to fine) and the finest scale's loss
at its first and last step. The machine's load average is printed too: on shared cores the
wall times move with it; the process CPU seconds per pair (all threads) move less.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fmir_jax.register import refine  # pylint: disable=g-import-not-at-top

GRIDS = {'80x96x80': ((80, 96, 80), (1.0, 1.0, 1.0)),
         '128x128x16': ((128, 128, 16), (1.8, 1.8, 10.0))}
CONFIGS = (('ncc', False), ('ncc', True), ('mind', False), ('mind', True))


def synthetic_pair(shape, spacing_mm, seed):
  """(moving, fixed) in [0, 1]: fixed(x) = moving(x + u(x)), u smooth, up to 4 mm."""
  rng = np.random.default_rng(seed)
  sigma_vox = [2.0 / s for s in spacing_mm]
  img = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox)
  img = ((img - img.min()) / (img.max() - img.min())).astype(np.float32)
  u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape),
                                        [8.0 / s for s in spacing_mm]) for _ in range(3)])
  u *= 4.0 / np.abs(u).max() / np.asarray(spacing_mm)[:, None, None, None]   # mm -> voxels
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'))
  fixed = ndimage.map_coordinates(img, grid + u, order=1, mode='nearest')
  return img, fixed.astype(np.float32)


def bench_one(shape, spacing_mm, similarity, diffeomorphic, pairs):
  """Compile seconds and per-pair timings of one configuration."""
  refiner = refine.Refiner(refine.RefineOptions(similarity=similarity,
                                                diffeomorphic=diffeomorphic))
  moving, fixed = synthetic_pair(shape, spacing_mm, 0)
  t0 = time.perf_counter()
  _, first = refiner.refine(moving, fixed, spacing_mm)
  first_call_s = time.perf_counter() - t0
  records, cpu = [], []
  for seed in range(1, pairs + 1):
    moving, fixed = synthetic_pair(shape, spacing_mm, seed)
    c0 = time.process_time()
    records.append(refiner.refine(moving, fixed, spacing_mm)[1])
    cpu.append(time.process_time() - c0)
  assert refiner.compiles == 1 + len(first.shapes), 'recompiled for a pair of the same shape'
  med = lambda xs: float(np.median(xs))
  return {
      'similarity': similarity, 'diffeomorphic': diffeomorphic,
      'seconds_per_pair': med([r.seconds_total for r in records]),
      'cpu_seconds_per_pair': med(cpu),
      'compile_seconds': first.compile_seconds, 'first_call_seconds': first_call_s,
      'prepare_seconds': med([r.prepare_seconds for r in records]),
      'scale_seconds': [med(s) for s in zip(*[r.seconds for r in records])],
      'scales': [list(s) for s in first.shapes], 'steps': list(first.steps),
      'finest_loss_first_last': [med([r.loss_before[-1] for r in records]),
                                 med([r.loss_after[-1] for r in records])],
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', type=int, default=3, help='timed pairs per configuration')
  parser.add_argument('--grids', default=','.join(GRIDS), help='comma list of ' +
                      ', '.join(GRIDS))
  parser.add_argument('--json', default=None, help='also write the results here')
  args = parser.parse_args(argv)
  results = {'load_average_start': os.getloadavg(), 'cpu_count': os.cpu_count(), 'runs': []}
  print(f'load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; '
        f'{args.pairs} timed pairs per row')
  print(f'{"grid":<11} {"similarity":<10} {"diffeo":<6} {"s/pair":>7} {"cpu s":>6} '
        f'{"compile s":>9}  '
        f'split: prepare | scales coarse->fine (s)   finest loss first->last')
  for name in args.grids.split(','):
    shape, spacing = GRIDS[name]
    for similarity, diffeo in CONFIGS:
      r = bench_one(shape, spacing, similarity, diffeo, args.pairs)
      r['grid'] = name
      results['runs'].append(r)
      split = ' '.join(f'{s:.2f}' for s in r['scale_seconds'])
      first, last = r['finest_loss_first_last']
      print(f'{name:<11} {similarity:<10} {str(diffeo):<6} {r["seconds_per_pair"]:7.2f} '
            f'{r["cpu_seconds_per_pair"]:6.2f} {r["compile_seconds"]:9.1f}  {r["prepare_seconds"]:.2f} | {split}   '
            f'{first:.4f}->{last:.4f}', flush=True)
  results['load_average_end'] = os.getloadavg()
  print(f'load average at the end {os.getloadavg()[0]:.2f}')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
