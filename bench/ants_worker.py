"""ANTs SyN for bench/register_bench.py. Runs inside .venv-ants (antspyx + nibabel; it
imports nothing from this project), one process for a whole set of pairs.

  .venv-ants/bin/python bench/ants_worker.py JOBS.json [--seed N]

JOBS.json: a list of {"name", "fixed", "moving", "moving_labels", "out",
"fixed_points_lps"} (NIfTI paths, an output folder and fixed landmarks, LPS mm). Per job,
with antspyx defaults:

  reg = ants.registration(fixed, moving, type_of_transform='SyN')
  ants.apply_transforms(fixed, moving_labels, reg['fwdtransforms'], interpolator='genericLabel')

and writes into OUT: ``warped_moving_labels.nii.gz`` (uint8, the fixed image's grid and
affine) and ANTs' own transform files (``ants_0Warp.nii.gz``: the SyN displacement field on
the fixed grid, LPS mm, (X, Y, Z, 1, 3); ``ants_1Affine.mat``/``ants_0GenericAffine.mat``:
the affine stage; ``ants_0InverseWarp.nii.gz``).

Prints one JSON line per job on stdout: {"name", "seconds", "registration_s", "warp",
"warped_labels", "mapped_points_lps"} or {"name", "error"}. The landmarks are mapped fixed ->
moving by ``ants.apply_transforms_to_points(3, points, fwdtransforms)`` (ITK maps the
output's points into the input's space: the fixed-to-moving direction, as the images). ``seconds`` is wall time from reading the inputs to
the warped labels written; interpreter start-up and the antspyx import are not counted.
If antspyx cannot be imported it prints {"fatal": "..."} and exits 3.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def register_one(ants, nib, np, job: dict) -> dict:
  """One SyN registration; returns the JSON record of the job."""
  os.makedirs(job['out'], exist_ok=True)
  prefix = os.path.join(job['out'], 'ants_')
  for stale in glob.glob(prefix + '*'):
    os.remove(stale)
  t0 = time.perf_counter()
  fixed = ants.image_read(job['fixed'])
  moving = ants.image_read(job['moving'])
  labels = ants.image_read(job['moving_labels'])
  t1 = time.perf_counter()
  reg = ants.registration(fixed, moving, type_of_transform='SyN', outprefix=prefix)
  registration_s = time.perf_counter() - t1
  warped = ants.apply_transforms(fixed, labels, reg['fwdtransforms'],
                                 interpolator='genericLabel')
  # Written with nibabel on the fixed file's own affine: the same grid bit for bit.
  fixed_affine = nib.load(job['fixed']).affine
  lab = np.rint(warped.numpy()).astype(np.uint8)
  out_labels = os.path.join(job['out'], 'warped_moving_labels.nii.gz')
  img = nib.Nifti1Image(lab, fixed_affine)
  img.set_qform(fixed_affine, code=1)
  img.set_sform(fixed_affine, code=1)
  nib.save(img, out_labels)
  seconds = time.perf_counter() - t0
  import pandas as pd                      # antspyx's own dependency
  pts = np.asarray(job.get('fixed_points_lps') or np.zeros((0, 3)), float)
  mapped = ants.apply_transforms_to_points(
      3, pd.DataFrame(pts, columns=['x', 'y', 'z']), reg['fwdtransforms'])
  warp = [p for p in reg['fwdtransforms'] if p.endswith('.nii.gz')]
  return {'name': job['name'], 'seconds': seconds, 'registration_s': registration_s,
          'warp': warp[0] if warp else None, 'warped_labels': out_labels,
          'fwdtransforms': list(reg['fwdtransforms']),
          'mapped_points_lps': mapped[['x', 'y', 'z']].to_numpy().tolist()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('jobs', help='JSON list of jobs (see the module docstring)')
  p.add_argument('--seed', type=int, default=0, help='ANTs --random-seed (metric sampling)')
  args = p.parse_args(argv)
  try:
    import ants
    import ants.config
    import nibabel as nib
    import numpy as np
  except Exception as e:  # pylint: disable=broad-except
    _emit({'fatal': f'cannot import antspyx/nibabel in {sys.executable}: {e}'})
    return 3
  # The seed only (not ants' deterministic mode, which also forces one thread).
  ants.config.set_ants_deterministic(on=False, seed_value=args.seed)
  with open(args.jobs) as f:
    jobs = json.load(f)
  try:
    for job in jobs:
      try:
        _emit(register_one(ants, nib, np, job))
      except Exception as e:  # pylint: disable=broad-except
        _emit({'name': job.get('name'), 'error': f'{type(e).__name__}: {e}'})
  except (KeyboardInterrupt, BrokenPipeError):   # the bench was stopped
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
