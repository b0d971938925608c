"""What ``fmir register`` writes: the result files of one pair (whole or not at all, through a
temporary folder beside OUT) and the Learn2Reg export, under the rules of ``core.files``
(never replace a file fmir-jax did not write; replace its own only with --overwrite).
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import time

import numpy as np

from fmir_jax.core import files
from fmir_jax.core import itk
from fmir_jax.core import nifti
from fmir_jax.evaluate import report as report_lib
from fmir_jax.register.records import PairReport

OUT_FILES = {'warped': 'warped_moving.nii.gz', 'warped_labels': 'warped_moving_labels.nii.gz',
             'disp': 'disp_mm.nii.gz', 'jacobian': 'jacobian_det.nii.gz',
             'itk_warp': 'itk_warp.nii.gz',
             'itk_affine': 'itk_affine.mat', 'report': 'report.json'}


def l2r_paths(l2r_dir: str, fixed: str, moving: str, fixed_id, moving_id) -> list[str]:
  """The Learn2Reg field files of a pair in ``l2r_dir`` (``nifti.l2r_names``)."""
  return [os.path.join(os.path.abspath(l2r_dir), n) for n in nifti.l2r_names(
      nifti.l2r_case(fixed, fixed_id, '--l2r-fixed-id'),
      nifti.l2r_case(moving, moving_id, '--l2r-moving-id'))]


def check_out_dir(out: str, overwrite: bool) -> None:
  """Refuses, before any work, an OUT that cannot be written or holds an earlier result
  (``files.check_result_dir`` with register's file names)."""
  files.check_result_dir(out, OUT_FILES.values(), overwrite, '--out')


def write_outputs(out: str, report: PairReport, arrays: dict[str, np.ndarray],
                  affine: np.ndarray, l2r: tuple[list[str], np.ndarray | None],
                  overwrite: bool) -> None:
  """Writes the result files (temp folder beside OUT, then ``publish``) and the Learn2Reg
  fields; ``report.files`` lists them, and ``report.times_s['write_s']`` gains the
  seconds spent writing the images (also ``write_files_s``)."""
  t0 = time.perf_counter()
  with files.disk_errors(out, '--out'):
    _write_outputs(out, report, arrays, affine, l2r, overwrite, t0)


def _write_outputs(out, report, arrays, affine, l2r, overwrite, t0) -> None:
  tmp = files.make_temp_dir(os.path.dirname(out), os.path.basename(out))
  try:
    # The images are compressed in parallel (zlib releases the GIL).
    jobs = {key: (nifti.save_nifti, arrays[key], {'intent': 'label' if key == 'warped_labels'
                                                 else None})
            for key in ('warped', 'warped_labels') if arrays.get(key) is not None}
    jobs['disp'] = (nifti.save_dispvect, arrays['disp_mm'], {})
    jobs['jacobian'] = (nifti.save_nifti, arrays['jacobian_det'], {})
    if arrays.get('itk_affine') is not None:     # with a linear stage: the pair ITK applies
      jobs['itk_warp'] = (itk.save_displacement_lps, arrays['itk_warp'], {})
      itk.save_affine_mat(os.path.join(tmp, OUT_FILES['itk_affine']), arrays['itk_affine'])
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
      for f in [pool.submit(fn, os.path.join(tmp, OUT_FILES[key]), data, affine, **kw)
                for key, (fn, data, kw) in jobs.items()]:
        f.result()
    report.files.update({key: os.path.join(out, OUT_FILES[key]) for key in jobs})
    if 'itk_warp' in jobs:
      report.files['itk_affine'] = os.path.join(out, OUT_FILES['itk_affine'])
    if l2r[0]:
      report.files['l2r'] = l2r[0]
    report.files['report'] = os.path.join(out, OUT_FILES['report'])
    times = report.times_s
    times['write_files_s'] = time.perf_counter() - t0
    times['write_s'] = times.get('write_s', 0.0) + times['write_files_s']
    report_lib.write_summary_json(os.path.join(tmp, OUT_FILES['report']), report.to_json())
    if l2r[0]:
      write_l2r(l2r[0], l2r[1], affine, overwrite)
    files.publish_result(tmp, out, OUT_FILES['report'], OUT_FILES.values(), overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_l2r(paths: list[str], overwrite: bool) -> None:
  """The Learn2Reg export folder under the rule of ``files.check_replaceable``."""
  files.check_result_dir(os.path.dirname(paths[0]), [os.path.basename(p) for p in paths],
                         overwrite, '--l2r-export')


def write_l2r(paths: list[str], field: np.ndarray, affine: np.ndarray,
              overwrite: bool) -> None:
  """Writes the Learn2Reg fields through a temporary folder (``files.publish_result``)."""
  folder = os.path.dirname(paths[0])
  files.remove_stale_temp_dirs(folder, 'l2r')
  tmp = files.make_temp_dir(folder, 'l2r')
  try:
    for path in paths:
      nifti.save_nifti(os.path.join(tmp, os.path.basename(path)), field, affine)
    files.publish_result(tmp, folder, '', (), overwrite, '--l2r-export')
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
