"""`fmir track`: every frame of a 4D series (X, Y, Z, T) registered with the reference frame in
one process, the reference's labels propagated through the cycle, volume curves and, for
ACDC label ids, ejection fractions.

Each frame is a pair in the convention of ``fmir register``: the frame is the fixed image and
the reference frame the moving one, so ``disp_mm[..., t, :]`` (RAS mm on the series' grid)
takes a voxel p of frame t to the reference at p + disp, ``labels_series`` holds the
reference labels at p + disp (what ``fmir register`` writes as warped_moving_labels) and
``warped_series`` the reference image moved onto every frame.

mode 'direct' registers every frame with the reference; 'sequential' registers every frame
with its neighbour towards the reference and composes the maps (small motions per step; the
drift against a direct registration of the frame farthest from the reference is reported).

Frame numbers are 1-based, as ACDC's Info.cfg counts them. Per-frame results are kept under
OUT/.fmir-track-partial/ as they finish, so a killed run resumes where it stopped; the output
files appear only when every frame is done.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.core import nifti
from fmir_jax.core import pair_metrics
from fmir_jax.core import world
from fmir_jax.register.inputs import LoadedPair

TRACK_FILES = {'disp': 'disp_mm.nii.gz', 'warped': 'warped_series.nii.gz',
               'labels': 'labels_series.nii.gz', 'volumes': 'volumes.csv',
               'figure': 'volumes.png', 'report': 'track.json'}
PARTIAL = '.fmir-track-partial'
MODES = ('direct', 'sequential')
# ACDC's label ids (the release's _gt files): the ventricles whose ejection fraction is given.
ACDC_VENTRICLES = {'lv': 3, 'rv': 1}


class TrackError(errors.UserError, ValueError):
  """A series, labels or frame number that cannot be tracked: the message names the fix."""


@dataclasses.dataclass(frozen=True)
class TrackOptions:
  """mode: 'direct' or 'sequential'; overwrite: replace an earlier result."""
  mode: str = 'direct'
  overwrite: bool = False


def load_series(path: str) -> tuple[np.ndarray, nifti.NiftiHeader]:
  """(series (X, Y, Z, T) float32, the header of one frame (3D shape)); a clear error for
  a 3D file or a series of one frame."""
  data, _, hdr = nifti.load_nifti(path, what='image', allow_4d=True, warn=False)
  nifti.require_world_placement(hdr, 'image')
  if data.ndim != 4:             # nibabel's (X, Y, Z, 1) reads as 3D
    raise TrackError(f'--series {path}: a 3D image {tuple(data.shape)} (or a series of one '
                     'frame); fmir track needs a 4D series (X, Y, Z, T) of 2 frames or more, '
                     "e.g. ACDC's patientNNN_4d.nii.gz. Register two scans with fmir register.")
  return data, dataclasses.replace(hdr, shape=tuple(data.shape[:3]))


def acdc_ed_frame(series_path: str) -> int | None:
  """The ED frame of the ACDC patient folder a series is the cine of (its Info.cfg, read by
  the ACDC reader), or None for any other series."""
  folder = os.path.dirname(os.path.abspath(series_path))
  if not (re.match(r'patient\d+_4d\.nii(\.gz)?$', os.path.basename(series_path))
          and os.path.isfile(os.path.join(folder, 'Info.cfg'))):
    return None
  from feature_extract.datasets import acdc   # Info.cfg and the cine: the ACDC reader's
  try:
    patient = acdc.patient_files(folder)
  except acdc.DatasetError:            # e.g. the ED/ES frame files left out: Info.cfg alone
    return acdc.parse_info_cfg(os.path.join(folder, 'Info.cfg'))[0]
  same = patient.series and os.path.samefile(patient.series, series_path)
  return patient.frame_numbers['ed'] if same else None


def parse_frame_labels(items: list[str], n_frames: int) -> dict[int, str]:
  """['N:PATH', ...] -> {N: PATH}; frame numbers checked against the series."""
  out = {}
  for item in items:
    number, sep, path = item.partition(':')
    if not sep or not number.strip().isdigit() or not path:
      raise TrackError(f'--frame-labels {item!r}: expected FRAME:PATH, e.g. 12:es_gt.nii.gz.')
    out[check_frame(int(number), n_frames, '--frame-labels')] = path
  return out


def check_frame(frame: int, n_frames: int, flag: str) -> int:
  if not 1 <= frame <= n_frames:
    raise TrackError(f'{flag} {frame}: the series has frames 1..{n_frames} (1-based, as '
                     "ACDC's Info.cfg counts them).")
  return frame


def load_labels(path: str, hdr: nifti.NiftiHeader, flag: str) -> np.ndarray:
  """A label map on the series' grid (same shape and affine as one frame)."""
  lab, affine, lab_hdr = nifti.load_nifti(path, what='label', warn=False)
  try:
    nifti.check_same_grid(hdr.path, hdr.affine, hdr.shape, lab_hdr.path, affine, lab_hdr.shape)
  except errors.UserError as e:
    raise TrackError(f'{flag}: {e}') from e
  return lab


def compose_mm(step_mm: np.ndarray, total_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """p -> p + step(p) -> that point + total(it): the displacement (mm, RAS) of applying
  ``step_mm`` first and then ``total_mm``, both on one grid (linear interpolation of
  ``total_mm`` at the moved points, edge values outside)."""
  shape = step_mm.shape[:3]
  grid = np.moveaxis(np.indices(shape, dtype=np.float64), 0, -1)
  world_pts = grid @ affine[:3, :3].T + affine[:3, 3] + step_mm
  vox = (world_pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
  coords = np.moveaxis(vox, -1, 0)
  moved = np.stack([ndimage.map_coordinates(total_mm[..., k], coords, order=1, mode='nearest')
                    for k in range(3)], -1)
  return (step_mm + moved).astype(np.float32)


def _settings_digest(inputs, options: TrackOptions, registrar) -> str:
  """What a partial result depends on: resuming with other settings starts again."""
  key = json.dumps({'series': os.path.abspath(inputs.path),
                    'series_digest': files.file_digest(inputs.path), 'mode': options.mode,
                    'reference': inputs.reference, 'checkpoint': registrar.checkpoint,
                    'options': repr(registrar.options)}, sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


class _Partial:
  """OUT/.fmir-track-partial/: one .npz per finished frame, under a digest of the settings.
  Only files of its own names are ever removed, and the folder only when it is left empty."""

  def __init__(self, out: str, digest: str, log: Callable[[str], None]):
    self.folder = os.path.join(out, PARTIAL)
    self.stamp = os.path.join(self.folder, 'settings.json')
    if os.path.isdir(self.folder):
      try:
        with open(self.stamp) as f:
          stamp = json.load(f)
      except (OSError, ValueError):
        stamp = {}
      if stamp.get('written_by') != 'fmir track':
        raise TrackError(f'--out {out}: {PARTIAL}/ exists but was not written by fmir track; '
                         'move it away or choose another --out.')
      if stamp.get('digest') != digest:
        log(f'{self.folder}: frames of an earlier run with other settings; starting again')
        self.clear()
    os.makedirs(self.folder, exist_ok=True)
    with files.atomic_path(self.stamp) as tmp, open(tmp, 'w') as f:
      json.dump({'digest': digest, 'written_by': 'fmir track'}, f)

  def _ours(self) -> list[str]:
    return [os.path.join(self.folder, n) for n in os.listdir(self.folder)
            if re.fullmatch(r'\.?(frame\d{3}\.npz|settings\.json)(\.tmp-\d+-.*)?', n)
            and n != 'settings.json']       # with the temporary files of a killed run

  def clear(self) -> None:
    for path in self._ours():
      os.remove(path)

  def remove(self) -> None:
    """After the results are published: our files, then the folder if nothing else is in it."""
    self.clear()
    os.remove(self.stamp)
    if not os.listdir(self.folder):
      os.rmdir(self.folder)

  def path(self, frame: int) -> str:
    return os.path.join(self.folder, f'frame{frame:03d}.npz')

  def load(self, frame: int) -> dict[str, np.ndarray] | None:
    try:
      with np.load(self.path(frame)) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError):
      return None

  def save(self, frame: int, arrays: dict[str, np.ndarray]) -> None:
    with files.atomic_path(self.path(frame)) as tmp:
      with open(tmp, 'wb') as f:
        np.savez(f, **arrays)


@dataclasses.dataclass
class SeriesInputs:
  """What ``check_inputs`` read and checked: the series, its frame header, the reference
  frame (1-based) and where it came from, its labels and any frames' ground truth."""
  path: str
  series: np.ndarray
  header: nifti.NiftiHeader
  reference: int
  reference_from: str
  labels_path: str | None
  labels: np.ndarray | None
  truth: dict[int, np.ndarray]


def check_inputs(series_path: str, labels_path: str | None = None,
                 frame_labels: list[str] = (), reference_frame: int | None = None,
                 info_ed_frame: int | None = None) -> SeriesInputs:
  """Reads and checks everything a track needs before any model is loaded. The reference:
  ``reference_frame``, else ``info_ed_frame`` (the ED of an ACDC Info.cfg beside the
  series), else the first frame."""
  series, hdr = load_series(series_path)
  n = series.shape[3]
  ref, source = reference_frame, 'given'
  if ref is None:
    ref = info_ed_frame
    source = 'ED of Info.cfg' if ref is not None else 'first frame'
    ref = 1 if ref is None else ref
  check_frame(ref, n, '--reference-frame')
  ref_labels = None if labels_path is None else load_labels(labels_path, hdr, '--labels')
  truth = {t: load_labels(p, hdr, f'--frame-labels {t}')
           for t, p in parse_frame_labels(list(frame_labels), n).items()}
  if truth and ref_labels is None:
    raise TrackError('--frame-labels scores the propagated labels: add --labels (the labels '
                     'of the reference frame).')
  ref_ids = set() if ref_labels is None else set(np.unique(ref_labels).tolist()) - {0}
  for t, lab in truth.items():
    if not (set(np.unique(lab).tolist()) & ref_ids):
      raise TrackError(f'--frame-labels {t}: its label map shares no foreground label with '
                       '--labels; pass the segmentation of the same structures.')
  return SeriesInputs(series_path, series, hdr, ref, source, labels_path, ref_labels, truth)


def track(registrar, inputs: SeriesInputs, out: str, options: TrackOptions = TrackOptions(),
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Tracks a checked series into OUT with one ``Registrar`` (restored and compiled once);
  returns the report (also OUT/track.json)."""
  if options.mode not in MODES:
    raise TrackError(f'--mode {options.mode!r}: use one of {MODES}.')
  out = os.path.abspath(out)
  files.check_result_dir(out, TRACK_FILES.values(), options.overwrite, '--out')
  series, hdr, ref = inputs.series, inputs.header, inputs.reference
  n = series.shape[3]
  with files.disk_errors(out, '--out'):
    os.makedirs(out, exist_ok=True)
    partial = _Partial(out, _settings_digest(inputs, options, registrar), log)
  frames = [series[..., t - 1] for t in range(1, n + 1)]
  order = ([t for t in range(ref + 1, n + 1)] + [t for t in range(ref - 1, 0, -1)])
  results: dict[int, dict[str, np.ndarray]] = {ref: {
      'disp_mm': np.zeros(hdr.shape + (3,), np.float32), 'seconds': np.zeros(())}}
  first_done, encoded = None, {}
  t_start = time.perf_counter()
  for count, t in enumerate(order, start=1):
    kept = partial.load(t)
    if kept is not None:
      results[t] = kept
      continue
    t0 = time.perf_counter()
    if options.mode == 'direct':
      disp = _register(registrar, frames[t - 1], frames[ref - 1], hdr, encoded)
    else:
      toward = t - 1 if t > ref else t + 1
      step = _register(registrar, frames[t - 1], frames[toward - 1], hdr, encoded)
      disp = compose_mm(step, results[toward]['disp_mm'], hdr.affine)
    seconds = time.perf_counter() - t0
    first_done = t if first_done is None else first_done
    results[t] = {'disp_mm': disp, 'seconds': np.asarray(seconds)}
    partial.save(t, results[t])
    log(f'frame {t} ({count}/{len(order)}): {seconds:.2f} s')
  disp_series = np.stack([results[t]['disp_mm'] for t in range(1, n + 1)], axis=3)
  report = _outputs(out, inputs, frames, disp_series, options, registrar, results,
                    first_done, t_start, log)
  partial.remove()
  return report


def _register(registrar, fixed: np.ndarray, moving: np.ndarray, hdr,
              encoded: dict | None = None) -> np.ndarray:
  """disp_mm (X, Y, Z, 3) of one pair of frames on the series' grid; ``encoded``: the
  encoder's inputs of the last frames, kept by the caller (the reference encoded once)."""
  pair = LoadedPair(fixed, hdr, moving, hdr, None, None)
  arrays, _, _ = registrar.register_arrays(pair, log_grid=False, field_only=True,
                                           encoded=encoded)
  return arrays['disp_mm'].astype(np.float32)


def _outputs(out, inputs, frames, disp_series, options, registrar, results, first_done,
             t_start, log):
  """Warps the reference (and its labels) onto every frame, measures, writes the files."""
  hdr, ref, ref_labels, truth = inputs.header, inputs.reference, inputs.labels, inputs.truth
  n = disp_series.shape[3]
  reference = frames[ref - 1]
  aff = hdr.affine
  warp = lambda vol, t, order: world.warp_to_fixed(vol, aff, hdr.shape, aff,   # noqa: E731
                                                   disp_series[..., t, :], order=order)
  warped = np.stack([warp(reference, t, 1) for t in range(n)], axis=3).astype(np.float32)
  report: dict[str, Any] = {
      'series': os.path.abspath(inputs.path), 'frames': n, 'reference_frame': ref,
      'reference_from': inputs.reference_from, 'labels': inputs.labels_path and os.path.abspath(
          inputs.labels_path), 'mode': options.mode, 'checkpoint': registrar.checkpoint,
      'head': registrar.card and registrar.card['what'],
      'convention': 'disp_mm.nii.gz (X,Y,Z,T,3) RAS mm: frame t (fixed) voxel p maps to the '
                    'reference frame (moving) at p + disp; warped_series and labels_series: '
                    'the reference image and labels at p + disp, per frame',
      'frame_seconds': {str(t): float(results[t]['seconds']) for t in range(1, n + 1)
                        if t != ref}}
  secs = [float(results[t]['seconds']) for t in range(1, n + 1)
          if t not in (ref, first_done)]
  report['seconds_per_frame_median'] = float(np.median(secs)) if secs else None
  report['first_frame_seconds'] = None if first_done is None else float(
      results[first_done]['seconds'])            # with this run's compiles
  report['folding_fraction'] = {str(t + 1): float(np.mean(world.jacobian_det_mm(
      disp_series[..., t, :], aff) <= 0)) for t in range(n)}
  if options.mode == 'sequential' and n > 2:
    report['composition_error_mm'] = _drift(registrar, hdr, frames, disp_series, ref, log)
  labels_series = None
  rows = []
  if ref_labels is not None:
    labels_series = np.stack([warp(ref_labels, t, 0) for t in range(n)], 3)
    voxel_ml = float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0
    ids = sorted(int(k) for k in np.unique(ref_labels) if k > 0)
    counts = {k: [int(np.sum(labels_series[..., t] == k)) for t in range(n)] for k in ids}
    rows = [{'frame': t + 1, 'label': k, 'voxels': counts[k][t],
             'volume_ml': counts[k][t] * voxel_ml} for t in range(n) for k in ids]
    report['volumes_ml'] = {str(k): [c * voxel_ml for c in counts[k]] for k in ids}
    report['ejection'] = _ejection(report['volumes_ml'], ids, ref, inputs.reference_from)
    try:
      report['dice'] = {str(t): pair_metrics.label_overlap_before_after(
          labels_series[..., t - 1], ref_labels, lab, hdr.spacing_mm)
          for t, lab in truth.items()}
    except ValueError as e:                  # frame labels sharing no class with --labels
      raise TrackError(f'--frame-labels: {e}') from e
  report['seconds_total'] = time.perf_counter() - t_start
  _write(out, report, disp_series, warped, labels_series, rows, aff, options.overwrite)
  return report


def _drift(registrar, hdr, frames, disp_series, ref, log) -> dict[str, float]:
  """The composed map against a direct registration of the frame farthest from the
  reference: mean and 95th percentile over the grid of |difference| (mm)."""
  n = disp_series.shape[3]
  far = max(range(1, n + 1), key=lambda t: abs(t - ref))
  log(f'sequential: frame {far} registered directly too, for the composition error')
  direct = _register(registrar, frames[far - 1], frames[ref - 1], hdr)
  err = np.linalg.norm(disp_series[..., far - 1, :] - direct, axis=-1)
  return {'frame': far, 'mean_mm': float(err.mean()),
          'p95_mm': float(np.percentile(err, 95))}


def _ejection(volumes_ml: dict[str, list[float]], ids: list[int], ref: int,
              ref_source: str) -> dict[str, Any] | None:
  """End-diastolic/end-systolic volumes and ejection fraction of ACDC's ventricles (label 3
  LV, 1 RV) when the labels are ACDC's: ED the reference when it is Info.cfg's ED, else the
  frame of the largest volume; ES the frame of the smallest."""
  if not set(ids) <= {1, 2, 3} or 3 not in ids:
    return None
  out = {'label_ids': 'ACDC (1 RV, 2 MYO, 3 LV)'}
  for name, k in ACDC_VENTRICLES.items():
    if str(k) not in volumes_ml:
      continue
    v = np.asarray(volumes_ml[str(k)])
    ed = ref - 1 if ref_source == 'ED of Info.cfg' else int(np.argmax(v))
    es = int(np.argmin(v))
    out[name] = {'ed_frame': ed + 1, 'es_frame': es + 1, 'edv_ml': float(v[ed]),
                 'esv_ml': float(v[es]), 'ef_percent': float(100 * (v[ed] - v[es]) / v[ed])}
  return out


def _write(out, report, disp_series, warped, labels_series, rows, affine, overwrite) -> None:
  """The result files through a temporary folder beside OUT (``files.publish_result``)."""
  tmp = files.make_temp_dir(os.path.dirname(out), os.path.basename(out))
  try:
    nifti.save_dispvect(os.path.join(tmp, TRACK_FILES['disp']), disp_series, affine)
    nifti.save_nifti(os.path.join(tmp, TRACK_FILES['warped']), warped, affine)
    report['files'] = {'disp': os.path.join(out, TRACK_FILES['disp']),
                       'warped': os.path.join(out, TRACK_FILES['warped'])}
    if labels_series is not None:
      nifti.save_nifti(os.path.join(tmp, TRACK_FILES['labels']), labels_series, affine,
                       intent='label')
      buf = io.StringIO()
      w = csv.DictWriter(buf, fieldnames=['frame', 'label', 'voxels', 'volume_ml'])
      w.writeheader()
      w.writerows(rows)
      with open(os.path.join(tmp, TRACK_FILES['volumes']), 'w') as f:
        f.write(buf.getvalue())
      _figure(os.path.join(tmp, TRACK_FILES['figure']), report)
      report['files'].update({k: os.path.join(out, TRACK_FILES[k])
                              for k in ('labels', 'volumes', 'figure')})
    report['files']['report'] = os.path.join(out, TRACK_FILES['report'])
    with open(os.path.join(tmp, TRACK_FILES['report']), 'w') as f:
      json.dump(report, f, indent=1)
    files.publish_result(tmp, out, TRACK_FILES['report'], TRACK_FILES.values(), overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _figure(path: str, report: dict[str, Any]) -> None:
  """Volume of every label against the frame, ED and ES marked for the ventricles."""
  import matplotlib                # only when a figure is drawn
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for k, v in report['volumes_ml'].items():
    ax.plot(range(1, len(v) + 1), v, marker='o', ms=3, label=f'label {k}')
  for name, e in (report.get('ejection') or {}).items():
    if isinstance(e, dict):
      ax.axvline(e['es_frame'], ls=':', c='grey')
      ax.set_title(f"{name.upper()} EF {e['ef_percent']:.1f} % (ES frame {e['es_frame']})"
                   if name == 'lv' else ax.get_title())
  ax.set_xlabel('frame')
  ax.set_ylabel('volume (ml)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
