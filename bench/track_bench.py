"""`fmir track` on phantom cines with known motion: seconds per frame, the LV volume curve and
ejection fraction against the phantom's truth, for the head alone and with instance
optimisation, direct and sequential.

Writes ACDC phantom patients with their whole cycle (``phantoms.write_acdc_phantoms(...,
cine=True)``), brings each series and its ED labels to ``--shape`` (linear / nearest
resampling, the affine scaled to keep the field of view), and runs `fmir track` on it
through the command line, as a user would. The truth: every frame's heart
(``phantoms.heart_at``) drawn on the original grid; EF = 1 - min(LV) / LV(ED).

  python bench/track_bench.py                            # 128x128x16, 2 patients
  python bench/track_bench.py --routes head,io --patients 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

from feature_extract.synthetic import phantoms
from fmir_jax import cli

ROUTES = {'head': ['--head-only'], 'io': [], 'head_seq': ['--head-only', '--mode', 'sequential'],
          'io_seq': ['--mode', 'sequential']}


def true_lv_ml(p: phantoms.AcdcPhantom) -> np.ndarray:
  """LV cavity volume (ml) of every frame's heart on the phantom's own grid."""
  nx, ny, nz = p.shape
  s, _, t = p.spacing_mm
  x = ((np.arange(nx) - (nx - 1) / 2) * s)[:, None, None]
  y = ((np.arange(ny) - (ny - 1) / 2) * s)[None, :, None]
  z = (np.arange(nz) * t)[None, None, :]
  return np.array([np.sum(phantoms.heart_labels(phantoms.heart_at(p, f), x, y, z) == 3)
                   for f in range(1, phantoms.n_frames(p) + 1)]) * s * s * t / 1000.0


def to_shape(path: str, out: str, shape, order: int) -> str:
  """The image (3D or 4D) resampled to ``shape`` in its first three axes, same field of view."""
  img = nib.load(path)
  data = np.asarray(img.dataobj)
  zoom = [n / m for n, m in zip(shape, data.shape[:3])] + [1] * (data.ndim - 3)
  new = ndimage.zoom(data.astype(np.float32), zoom, order=order, mode='nearest', grid_mode=True)
  z = np.asarray(zoom[:3])
  affine = img.affine.copy()          # new voxel j sits at old index j / z + (1 / z - 1) / 2
  affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ ((1 / z - 1) / 2)
  affine[:3, :3] = img.affine[:3, :3] / z
  out_img = nib.Nifti1Image(new.astype(data.dtype), affine)
  out_img.set_qform(affine, 1)
  out_img.set_sform(affine, 1)
  nib.save(out_img, out)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--shape', default='128,128,16')
  ap.add_argument('--patients', type=int, default=2)
  ap.add_argument('--routes', default='head,io,head_seq', help=f'subset of {list(ROUTES)}')
  ap.add_argument('--checkpoint', default=None, help='default: the shipped general head')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--out', default='bench_results/track')
  a = ap.parse_args(argv)
  shape = tuple(int(v) for v in a.shape.split(','))
  rows = []
  for pid in range(101, 101 + a.patients):
    (p,) = phantoms.write_acdc_phantoms(os.path.join(a.out, 'data'), 1, a.seed, first_id=pid,
                                        inplane_size=(112, 144), cine=True)
    folder = os.path.join(a.out, 'data', 'testing', f'patient{pid:03d}')
    series = to_shape(os.path.join(folder, f'patient{pid:03d}_4d.nii.gz'),
                      os.path.join(a.out, f'p{pid}_4d.nii.gz'), shape, 1)
    labels = to_shape(os.path.join(folder, f'patient{pid:03d}_frame{p.ed_frame:02d}_gt.nii.gz'),
                      os.path.join(a.out, f'p{pid}_ed_gt.nii.gz'), shape, 0)
    truth = true_lv_ml(p)
    true_ef = 100 * (1 - truth.min() / truth[p.ed_frame - 1])
    for route in [r for r in a.routes.split(',') if r]:
      out = os.path.join(a.out, f'p{pid}_{route}')
      args = ['track', '--series', series, '--labels', labels, '--out', out, '--overwrite',
              '--reference-frame', str(p.ed_frame), '--no-cache', '--quiet', *ROUTES[route]]
      if a.checkpoint:
        args += ['--checkpoint', a.checkpoint]
      if cli.main(args) != 0:
        return 1
      rep = json.load(open(os.path.join(out, 'track.json')))
      lv = rep['ejection']['lv']
      rows.append({'patient': pid, 'route': route, 'frames': rep['frames'],
                   's_per_frame': rep['seconds_per_frame_median'],
                   'first_frame_s': rep['first_frame_seconds'], 'total_s': rep['seconds_total'],
                   'ef': lv['ef_percent'], 'true_ef': true_ef, 'es': lv['es_frame'],
                   'true_es': p.es_frame,
                   'folding_max': max(rep['folding_fraction'].values())})
  print(f'fmir track on phantom cines at {shape} ({os.cpu_count()} CPUs); s/frame: median '
        'over the frames after the first (which compiles)')
  print('| patient | route | frames | s/frame | first frame s | LV EF % (truth) | ES frame '
        '(truth) | max folding % |\n|---|---|---:|---:|---:|---|---|---:|')
  for r in rows:
    print(f"| {r['patient']} | {r['route']} | {r['frames']} | {r['s_per_frame']:.2f} | "
          f"{r['first_frame_s']:.1f} | {r['ef']:.1f} ({r['true_ef']:.1f}) | {r['es']} "
          f"({r['true_es']}) | {100 * r['folding_max']:.3f} |")
  print(json.dumps(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
