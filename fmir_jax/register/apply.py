"""Apply a saved result (``fmir apply``): with a result folder's ``disp_mm.nii.gz`` alone
(the whole map, linear part included), warp any other image or label map of the moving
scan's space onto the fixed grid, or map points from the fixed world to the moving one.

numpy + nibabel + scipy only: no model is loaded and nothing is compiled.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
from scipy import ndimage

from fmir_jax.core import files
from fmir_jax.core import nifti
from fmir_jax.core import resample
from fmir_jax.core import world
from fmir_jax.core.errors import RegisterError
from fmir_jax.register.outputs import OUT_FILES

# Point columns by world convention: RAS (nibabel, ours) or LPS (ITK, ANTs, 3D Slicer's LPS).
POINT_COLUMNS = {'ras': ('x_ras', 'y_ras', 'z_ras'), 'lps': ('x_lps', 'y_lps', 'z_lps')}
_LPS = np.array([-1.0, -1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class SavedField:
  """A result's map: ``disp_mm`` (X, Y, Z, 3) RAS mm on the fixed grid (``affine``), so that
  a fixed point p matches the moving point p + disp_mm(p)."""
  disp_mm: np.ndarray
  affine: np.ndarray

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(n) for n in self.disp_mm.shape[:3])


def load_field(result: str) -> SavedField:
  """The map of a ``fmir register --out`` folder, or a one-line refusal."""
  path = os.path.join(result, OUT_FILES['disp'])
  if not os.path.isfile(path):
    raise RegisterError(f'--transform {result}: no {OUT_FILES["disp"]} there; pass the --out '
                        'folder of a fmir register run (one pair, or one pair folder of a '
                        'batch).')
  try:
    img = nib.load(path)
    data = np.asarray(img.dataobj, np.float32)
  except Exception as e:                 # nibabel raises many kinds for a damaged file
    raise RegisterError(f'--transform {result}: {OUT_FILES["disp"]} cannot be read ({e}); '
                        'run fmir register again.') from e
  if data.ndim != 5 or data.shape[3:] != (1, 3):
    raise RegisterError(f'--transform {result}: {OUT_FILES["disp"]} has shape {data.shape}, '
                        'not (X, Y, Z, 1, 3): it is not a displacement fmir register wrote.')
  return SavedField(data[:, :, :, 0, :], np.asarray(img.affine, np.float64))


def apply_image(result: str, moving: str, out: str, *, labels: bool = False,
                overwrite: bool = False) -> str:
  """Warps ``moving`` (an image or, with ``labels``, a label map in the moving scan's world
  space; any grid) onto the fixed grid of ``result``: linear, or nearest neighbour for
  labels. Writes ``out`` (.nii/.nii.gz) and returns it."""
  if not out.endswith(('.nii', '.nii.gz')):
    raise RegisterError(f'--out {out}: name a .nii or .nii.gz file.')
  files.check_result_file(out, overwrite, '--out')
  field = load_field(result)
  data, affine, _ = nifti.load_nifti(moving, what='label' if labels else 'image')
  warped = world.warp_to_fixed(data, affine, field.shape, field.affine, field.disp_mm,
                               order=0 if labels else 1)
  folder, name = os.path.split(os.path.abspath(out))
  with files.disk_errors(folder, '--out'):
    files.remove_stale_temp_dirs(folder, name)
    tmp = files.make_temp_dir(folder, name)
    try:
      nifti.save_nifti(os.path.join(tmp, name), warped, field.affine,
                       intent='label' if labels else None)
      files.publish_result(tmp, folder, name, (), overwrite)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return os.path.abspath(out)


def read_points(path: str, flag: str = '--points') -> tuple[list[dict], str, np.ndarray]:
  """(rows, 'ras' or 'lps', (N, 3) RAS mm points) of a points CSV, or a one-line refusal
  naming ``flag``."""
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.DictReader(f))
      header = rows and list(rows[0]) or []
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise RegisterError(f'{flag} {path}: cannot be read ({e}).') from e
  space = [s for s, cols in POINT_COLUMNS.items() if set(cols) <= set(header)]
  if not rows or len(space) != 1:
    raise RegisterError(f'{flag} {path}: needs a header with x_ras,y_ras,z_ras (RAS mm, '
                        'as nibabel) or x_lps,y_lps,z_lps (LPS mm, as ITK/ANTs) and one row '
                        'per point.')
  cols = POINT_COLUMNS[space[0]]
  try:
    pts = np.array([[float(r[c]) for c in cols] for r in rows], np.float64)
  except (TypeError, ValueError):
    raise RegisterError(f'{flag} {path}: every row needs three numbers in '
                        f'{",".join(cols)}.') from None
  if not np.isfinite(pts).all():
    raise RegisterError(f'{flag} {path}: a coordinate is not a finite number.')
  return rows, space[0], pts * (_LPS if space[0] == 'lps' else 1.0)


def map_ras(disp_mm: np.ndarray, affine: np.ndarray, p_ras: np.ndarray) -> np.ndarray:
  """(N, 3) fixed-world points p -> p + disp_mm(p) (linear interpolation on the grid of
  ``affine``), NaN for a point outside the grid."""
  inv = np.linalg.inv(affine)
  vox = (p_ras @ inv[:3, :3].T + inv[:3, 3]).T
  disp = np.stack([resample.sample_voxels(disp_mm[..., k], vox, order=1, cval=np.nan)
                   for k in range(3)], -1)
  return p_ras + disp


def map_points(result: str, points: str, out: str, *, overwrite: bool = False) -> dict:
  """Maps fixed-world points to the moving world through ``result``'s map: p -> p +
  disp_mm(p), linearly interpolated. Writes ``out`` (the CSV's rows plus x_moving, y_moving,
  z_moving in the CSV's own convention; empty for a point outside the fixed grid) and
  returns {'points', 'outside', 'space'}."""
  files.check_result_file(out, overwrite, '--out')
  rows, space, p_ras = read_points(points)
  field = load_field(result)
  q = map_ras(field.disp_mm, field.affine, p_ras) * (_LPS if space == 'lps' else 1.0)
  names = [f'{a}_moving' for a in 'xyz']
  for row, point in zip(rows, q):
    row.update({n: '' if np.isnan(v) else f'{v:.6f}' for n, v in zip(names, point)})
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  files.write_result_file(out, text.getvalue(), overwrite, '--out')
  return {'points': len(rows), 'outside': int(np.isnan(q[:, 0]).sum()), 'space': space}


INVERSE_FILES = (OUT_FILES['disp'], 'inverse.json')


def invert(result: str, out: str, *, reference: str | None = None, iterations: int = 40,
           overwrite: bool = False) -> dict:
  """The inverse map of a result, on a grid of the moving world (``reference``'s; default
  the result's moving scan, named in its report.json), written as OUT/disp_mm.nii.gz in the
  same convention (a moving point q matches the fixed point q + disp_mm(q)), so that
  ``fmir apply --transform OUT`` takes fixed-space images and points to the moving side.

  Fixed point iteration v <- -u(q + v) (u: the result's displacement, linearly
  interpolated). Returns and writes (OUT/inverse.json) the inverse-consistency error
  |q + v + u(q + v) - q| in mm (median, 95th percentile, max, and the fraction above a tenth
  of a fixed voxel) over the points whose inverse lies in the fixed grid; the others get 0
  and are counted.
  """
  files.check_result_dir(out, INVERSE_FILES, overwrite, '--out')
  if iterations < 1:
    raise RegisterError(f'--iterations {iterations}: need at least 1.')
  field = load_field(result)
  reference = reference or _moving_of(result)
  hdr = nifti.read_header(reference)
  q = world.voxel_world(hdr.shape[:3], hdr.affine)
  inv = np.linalg.inv(field.affine)

  def u_at(p, edge):
    """u at world points p: beyond the grid NaN, or (edge) the nearest edge value, so that
    points starting outside can still walk in."""
    vox = np.moveaxis(p @ inv[:3, :3].T + inv[:3, 3], -1, 0)
    if edge:
      return np.stack([ndimage.map_coordinates(field.disp_mm[..., k], vox, order=1,
                                               mode='nearest') for k in range(3)], -1)
    return np.stack([resample.sample_voxels(field.disp_mm[..., k], vox, order=1, cval=np.nan)
                     for k in range(3)], -1)

  v = np.zeros_like(q)
  for _ in range(iterations):
    v = -u_at(q + v, edge=True)
  residual = np.linalg.norm(v + u_at(q + v, edge=False), axis=-1)
  inside = np.isfinite(residual)
  v[~inside] = 0.0
  # a tenth of the fixed grid's finest voxel: where the iteration did not settle (the map's
  # gradient too steep for it, or a preimage at the grid's edge)
  tenth_mm = 0.1 * float(np.linalg.norm(field.affine[:3, :3], axis=0).min())
  stats = {'inverse_of': os.path.abspath(result), 'reference': os.path.abspath(reference),
           'iterations': int(iterations), 'points': int(inside.size),
           'outside_fixed_grid': int((~inside).sum()),
           'inverse_consistency_mm': {
               'median': float(np.median(residual[inside])) if inside.any() else None,
               'p95': float(np.percentile(residual[inside], 95)) if inside.any() else None,
               'max': float(residual[inside].max()) if inside.any() else None,
               'over_tenth_voxel_fraction': float(np.mean(residual[inside] > tenth_mm))
                                            if inside.any() else None}}
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  with files.disk_errors(parent, '--out'):
    os.makedirs(parent, exist_ok=True)
    tmp = files.make_temp_dir(parent, os.path.basename(out))
    try:
      nifti.save_dispvect(os.path.join(tmp, INVERSE_FILES[0]), v.astype(np.float32),
                          hdr.affine)
      with open(os.path.join(tmp, INVERSE_FILES[1]), 'w') as f:
        json.dump(stats, f, indent=1)
      files.publish_result(tmp, out, INVERSE_FILES[1], INVERSE_FILES, overwrite)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return stats


def _moving_of(result: str) -> str:
  """The moving scan a result's report.json names (the default inverse grid)."""
  try:
    with open(os.path.join(result, OUT_FILES['report'])) as f:
      moving = json.load(f)['moving']
  except (OSError, ValueError, KeyError, TypeError):
    moving = None
  if not moving or not os.path.isfile(moving):
    raise RegisterError(f'--transform {result}: its report.json names no moving scan that '
                        'exists here; pass --reference IMAGE (any grid in the moving world, '
                        'e.g. the moving scan).')
  return moving
