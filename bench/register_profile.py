"""Where the time of one `fmir register` pair goes: report.json's stages, median over pairs.

Writes N pairs of a register-benchmark set (``phantom_pairs``: labels and landmarks with
known correspondences), registers them in one batch through the command line
(`fmir register --pairs`: labels scored, landmarks mapped, every output written, as a user
runs it), and prints each stage's median seconds over the pairs after the first (whose run
compiles), with its share of the pair's total (compilation excluded).

  python bench/register_profile.py                         # abdomen-like, head only, 4 pairs
  python bench/register_profile.py --set inverted --io     # + instance optimisation (mind)
  python bench/register_profile.py --set cardiac --fast
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

from feature_extract.synthetic import phantom_pairs
from fmir_jax import cli

STAGES = ('load_preprocess_s', 'linear_s', 'features_s', 'head_s', 'refine_s',
          'write_resample_s', 'write_metrics_s', 'write_files_s')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  names = [s.name for m in (False, True) for s in phantom_pairs.set_specs(False, m)]
  p.add_argument('--set', default='abdomen', choices=names)
  p.add_argument('--pairs', type=int, default=4, help='at least 2 (the first compiles)')
  p.add_argument('--checkpoint', default=None, help='default: the shipped general head')
  p.add_argument('--io', action='store_true')
  p.add_argument('--fast', action='store_true')
  p.add_argument('--smoke', action='store_true', help='the smoke sets\' tiny sizes')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='bench_results/register_profile')
  a = p.parse_args(argv)
  if a.pairs < 2:
    p.error('--pairs: at least 2 (the first pair compiles and is left out)')
  spec = {s.name: s for m in (False, True) for s in phantom_pairs.set_specs(a.smoke, m)}[a.set]
  pairs = phantom_pairs.write_set(spec, a.pairs, a.seed, os.path.join(a.out, 'data'),
                                  lambda s: print(s, flush=True))
  table = os.path.join(a.out, 'pairs.csv')
  cols = ('fixed', 'moving', 'fixed_labels', 'moving_labels', 'fixed_landmarks',
          'moving_landmarks')
  with open(table, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(cols)
    w.writerows([[getattr(pair, c) for c in cols] for pair in pairs])
  args = ['register', '--pairs', table, '--out', os.path.join(a.out, 'runs'), '--overwrite',
          '--grid', 'native', '--pyramid-factors', ','.join(map(str, spec.factors)),
          '--quiet', '--no-cache']
  if a.checkpoint:
    args += ['--checkpoint', a.checkpoint]
  if a.io or a.fast:
    args += ['--fast'] if a.fast else ['--io']
    args += ['--io-similarity', spec.similarity]
  if a.smoke and (a.io or a.fast):
    args += ['--io-budget', '0.05']
  rc = cli.main(args)
  if rc != 0:
    return rc
  with open(os.path.join(a.out, 'runs', 'summary.json')) as f:
    rows = [r for r in json.load(f)['rows'] if r['status'] == 'ok'][1:]
  med = {k: float(np.median([r.get(k, 0.0) or 0.0 for r in rows])) for k in STAGES}
  total = sum(med.values())
  route = 'fast' if a.fast else 'io' if a.io else 'head'
  print(f'{a.set}, {spec.shape} at {spec.spacing_mm} mm, route {route}: median over '
        f'{len(rows)} pairs (the first left out: it compiles)')
  print('| stage | s | share |\n|---|---:|---:|')
  for k in STAGES:
    print(f'| {k[:-2]} | {med[k]:.2f} | {100 * med[k] / total:.0f} % |')
  print(f'| total | {total:.2f} | |')
  print(json.dumps({'set': a.set, 'route': route, 'pairs': len(rows), 'median_s': med,
                    'total_s': total}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
