"""The linear stage (``fmir register --linear``) on known maps: accuracy and time per pair.

A smooth phantom (an ellipsoid body holding blobs of other brightness) on an 80x96x80 grid at
2 mm; each moving image is the fixed one under a seeded random map (rotation up to
--max-deg about each axis, shift up to --max-mm, per-axis scale within --max-scale for
"affine"), made by scipy's ``affine_transform``. Prints, per pair and in all, the RMS error
of the found map over the body's voxels (mm), the RMS motion before, and the seconds of the
alignment after compilation (the grid's programs compile once, on the first pair).

  python bench/linear_bench.py                   # affine, 6 pairs
  python bench/linear_bench.py --kind rigid --pairs 3 --shape 40,48,40 --spacing 4
  python bench/linear_bench.py --shape-weight 0.1  # fmir register --linear-shape-weight 0.1
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from fmir_jax.register import linear


def phantom(shape, spacing_mm):
  """(image in [0, 1], body mask, 4x4 voxel -> mm affine centred on the grid)."""
  affine = np.diag([*spacing_mm, 1.0])
  affine[:3, 3] = -np.asarray(spacing_mm) * (np.asarray(shape) - 1) / 2
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  p = idx @ affine[:3, :3].T + affine[:3, 3]
  half = np.asarray(shape) * np.asarray(spacing_mm) / 2
  body = ((p / (0.62 * half)) ** 2).sum(-1) < 1
  img = 0.4 * body
  for c, r, v in (((0.3, -0.2, 0.15), 0.25, 0.5), ((-0.35, 0.3, -0.2), 0.18, 0.35),
                  ((0.05, 0.35, 0.3), 0.14, -0.3), ((-0.1, -0.35, 0.25), 0.1, 0.4)):
    img = img + v * np.exp(-((p - np.asarray(c) * half) ** 2).sum(-1)
                           / (2 * (r * half.min()) ** 2))
  return ndimage.gaussian_filter(np.clip(img, 0, 1), 0.7).astype(np.float32), body, affine


def random_map(rng, kind, max_deg, max_mm, max_scale):
  m = Rotation.from_euler('xyz', rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()
  if kind == 'affine':
    m = m @ np.diag(1 + rng.uniform(-max_scale, max_scale, 3))
  out = np.eye(4)
  out[:3, :3], out[:3, 3] = m, rng.uniform(-max_mm, max_mm, 3)   # about the grid centre (0)
  return out


def rms_mm(a, b, pts):
  d = (pts @ a[:3, :3].T + a[:3, 3]) - (pts @ b[:3, :3].T + b[:3, 3])
  return float(np.sqrt((d ** 2).sum(-1).mean()))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--kind', choices=('affine', 'rigid'), default='affine')
  p.add_argument('--pairs', type=int, default=6)
  p.add_argument('--shape', default='80,96,80')
  p.add_argument('--spacing', type=float, default=2.0, help='mm, isotropic')
  p.add_argument('--max-deg', type=float, default=10.0)
  p.add_argument('--max-mm', type=float, default=10.0)
  p.add_argument('--max-scale', type=float, default=0.08)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--shape-weight', type=float, default=linear.LinearOptions.shape_weight,
                 help="the penalty on per-axis scales and shears (fmir register's "
                      '--linear-shape-weight; default: its default)')
  p.add_argument('--max-voxel-steps', type=int, default=linear.LinearOptions.max_voxel_steps,
                 help='the cap on steps x voxels per scale (default: the stage\'s; a large '
                      'number lifts it)')
  a = p.parse_args(argv)
  shape = tuple(int(v) for v in a.shape.split(','))
  fixed, body, affine = phantom(shape, (a.spacing,) * 3)
  pts = np.argwhere(body) @ affine[:3, :3].T + affine[:3, 3]
  rng = np.random.default_rng(a.seed)
  aligner = linear.LinearAligner(linear.LinearOptions(kind=a.kind,
                                                      shape_weight=a.shape_weight,
                                                      max_voxel_steps=a.max_voxel_steps))
  rows = []
  for i in range(a.pairs):
    truth = random_map(rng, a.kind, a.max_deg, a.max_mm, a.max_scale)
    vox = np.linalg.inv(affine) @ np.linalg.inv(truth) @ affine
    moving = ndimage.affine_transform(fixed, vox[:3, :3], vox[:3, 3], order=3)
    found, rec = aligner.align(moving.astype(np.float32), fixed, affine)
    rows.append({'pair': i, 'before_mm': rms_mm(np.eye(4), truth, pts),
                 'error_mm': rms_mm(found, truth, pts), 'seconds': rec.seconds_total,
                 'compile_s': rec.compile_seconds})
    r = rows[-1]
    print(f"pair {i}: motion {r['before_mm']:.2f} mm RMS -> error {r['error_mm']:.3f} mm; "
          f"{r['seconds']:.2f} s (+ {r['compile_s']:.1f} s compiling)", flush=True)
  err = [r['error_mm'] for r in rows]
  secs = [r['seconds'] for r in rows]
  print(json.dumps({'kind': a.kind, 'shape_weight': a.shape_weight,
                    'max_voxel_steps': a.max_voxel_steps, 'shape': shape, 'spacing_mm': a.spacing,
                    'pairs': a.pairs, 'error_mm_median': float(np.median(err)),
                    'error_mm_max': float(np.max(err)),
                    'seconds_median': float(np.median(secs)), 'rows': rows}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
