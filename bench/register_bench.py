"""Registration benchmark: identity, ANTs SyN, `fmir register` (head) and head + instance
optimisation, side by side on synthetic NIfTI pairs with known smooth deformations.

  python bench/register_bench.py --checkpoint RUN          # 3 sets x 6 pairs
  python bench/register_bench.py --checkpoint RUN --smoke  # tiny sizes, < 60 s on 2 cores
  python bench/register_bench.py                           # trains the offline demo run first
                                                           # (python -m fmir_jax.demo)

Sets (deterministic from --seed). Fixed = a phantom; moving = the same phantom warped by a
random smooth deformation (a Gaussian-smoothed random velocity field integrated by scaling
and squaring, i.e. diffeomorphic, peak 5-8 mm), so the labels are exact ground truth:
  (feature_extract/synthetic/phantom_pairs.py)
  cardiac   ACDC-like phantom (feature_extract/synthetic/phantoms.py), 112x112x12 voxels at
            1.6x1.6x8 mm, oblique orientation; deformation mostly in-plane (slice axis x0.3).
  abdomen   CT-like abdomen phantom (phantoms.abdomen_phantom, given a torso that changes
            along z: ``torso_profile``), 80x96x80 at 2 mm.
  inverted  as abdomen, but the moving image's intensities inverted (max - x): NCC cannot
            match the pair; its instance optimisation uses MIND-SSC.
  <set>_misaligned  the same pairs with the moving scan's header moved by a random rotation
            (<= 15 degrees per axis), translation (<= 15 mm) and scale (+-10 %), seeded:
            scans as they arrive from two visits (``phantom_pairs.misalignment``).
Every pair has 20 landmarks with known correspondences (inside the labelled structures):
each method's target registration error (TRE, mm) maps the fixed landmarks through its map.
Each pair is written as NIfTI (image + labels, proper affines) under OUT/data/<set>/ and
every method registers from those files (the real CLI path).

Methods:
  identity      the moving labels as they are.
  ANTs SyN      ants.registration(fixed, moving, type_of_transform='SyN') (antspyx defaults:
                its rigid + affine stages, then SyN), labels warped with 'genericLabel',
                landmarks with apply_transforms_to_points; bench/ants_worker.py in .venv-ants,
                ONE subprocess per set, each pair timed inside it (bench/setup_ants.sh).
  fmir head     register.Registrar, grid native (the fixed grid), pyramid factors (2,2,1)
                cardiac / (2,2,2) abdomen-like; one Registrar per option set, so the head
                compiles once per grid shape; ``--linear`` (default: fmir register's)
                sets the linear stage of every fmir method.
  fmir head+IO  the same plus instance optimisation: refine.RefineOptions defaults
                (similarity 'mind' for the inverted set).
  fmir --fast   `fmir register --fast`: the head down to pyramid level 1 only, then a
                quarter of the instance optimisation's default steps.
  IO from zero  instance optimisation from the identity, the head not run (--io-init zero).

Metrics, by the same code for every method, on the FIXED image's grid: warped moving labels
vs fixed labels, mean Dice over the foreground classes present in both (%), HD95 (mm, mean
over those classes), folding (% of voxels with det J <= 0) and SDlogJ (Learn2Reg: 2-voxel
crop, log(J + 3)) of the method's displacement field resampled to fixed-grid voxels (ANTs:
its SyN warp field, without the affine stage), seconds per pair (compile excluded and
printed apart: first-pair compile seconds). Prints one Markdown table per set with the
differences against SyN, and writes OUT/results.json (default OUT: bench_results/register).
Timings are of this machine as it is (load averages recorded); the bench sets
OMP_WAIT_POLICY=PASSIVE unless set (see ``main``). One line per pair; Ctrl-C stops it (the
ANTs worker too), keeping the sets finished so far in results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# numpy/scipy/nibabel only (jax is imported after XLA_FLAGS is set, in main).
from feature_extract.synthetic.phantom_pairs import (  # noqa: E402
    Pair, SetSpec, set_specs, write_set)
from fmir_jax.core import files  # noqa: E402
from fmir_jax.core import nifti  # noqa: E402
from fmir_jax.core import metrics as metrics_lib  # noqa: E402
from fmir_jax.core import world  # noqa: E402
from fmir_jax.register import apply as apply_lib  # noqa: E402

ANTS_PYTHON = os.path.join(ROOT, '.venv-ants', 'bin', 'python')
ANTS_WORKER = os.path.join(ROOT, 'bench', 'ants_worker.py')
METHODS = ('identity', 'ants_syn', 'fmir_head', 'fmir_head_io', 'fmir_fast', 'fmir_io_zero',
           'fmir_head_l1')
METHOD_NAMES = {'identity': 'identity', 'ants_syn': 'ANTs SyN', 'fmir_head': 'fmir head',
                'fmir_head_io': 'fmir head + IO', 'fmir_fast': 'fmir --fast',
                'fmir_io_zero': 'IO from zero',
                'fmir_head_l1': 'fmir head to level 1'}   # --head-finest-level 1, no IO
DEFAULT_METHODS = METHODS[:5]


# =========================================================================== scoring


@dataclasses.dataclass
class Reference:
  """What every method is scored against, on the fixed grid: fixed labels (H, W, D), the
  moving labels there without any transform (identity), the scored classes (foreground in
  both), the fixed affine (4x4 voxel -> RAS mm) and spacing (mm)."""
  fixed_labels: np.ndarray
  initial: np.ndarray
  classes: list[int]
  affine: np.ndarray
  spacing_mm: tuple[float, float, float]
  fixed_points_mm: np.ndarray     # (N, 3) RAS landmarks and their moving partners
  moving_points_mm: np.ndarray


def load_reference(pair: Pair) -> Reference:
  """Reads the pair's label files (the files the methods registered)."""
  fixed, f_aff, f_hdr = nifti.load_nifti(pair.fixed_labels, what='label')
  moving, m_aff, _ = nifti.load_nifti(pair.moving_labels, what='label')
  initial = world.warp_to_fixed(moving, m_aff, fixed.shape, f_aff, None, order=0)
  classes = sorted((set(np.unique(fixed).tolist()) & set(np.unique(moving).tolist())) - {0})
  points = [np.loadtxt(p, delimiter=',', skiprows=1, ndmin=2)
            for p in (pair.fixed_landmarks, pair.moving_landmarks)]
  return Reference(fixed, initial, classes, f_aff, f_hdr.spacing_mm, *points)


def tre_mm(ref: Reference, mapped_mm: np.ndarray) -> float:
  """Mean target registration error (mm) of the fixed landmarks mapped to ``mapped_mm``."""
  return float(np.linalg.norm(mapped_mm - ref.moving_points_mm, axis=-1).mean())


def score(ref: Reference, warped_labels: np.ndarray, disp_vox: np.ndarray,
          mapped_mm: np.ndarray) -> dict[str, Any]:
  """Metrics of one result. warped_labels: (H, W, D) on the fixed grid; disp_vox:
  (H, W, D, 3) displacement in fixed-grid voxels (component k along axis k); mapped_mm:
  the fixed landmarks mapped to the moving world (N, 3) RAS mm."""
  dice = metrics_lib.dice_per_class(warped_labels, ref.fixed_labels, ref.classes)
  hd = metrics_lib.hd95_per_class(warped_labels, ref.fixed_labels, ref.classes,
                                  ref.spacing_mm)
  return {'dice': metrics_lib.mean_dice(dice),
          'hd95_mm': float(np.nanmean(list(hd.values()))),
          'folding_fraction': metrics_lib.folding_fraction(disp_vox),
          'sdlogj': metrics_lib.sdlogj(disp_vox), 'tre_mm': tre_mm(ref, mapped_mm),
          'dice_per_class': {str(c): v for c, v in dice.items()}}


def ras_mm_to_vox(disp_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """(X, Y, Z, 3) RAS mm vectors -> voxels of the grid of ``affine`` (4x4)."""
  return (disp_mm @ np.linalg.inv(affine[:3, :3]).T).astype(np.float32)


def read_field(path: str, affine: np.ndarray, lps: bool) -> np.ndarray:
  """A (X, Y, Z, 1, 3) displacement NIfTI on the fixed grid -> (X, Y, Z, 3) fixed voxels.

  lps: the vectors are ITK/ANTs LPS mm (x and y negated relative to RAS), else RAS mm.
  """
  img = nib.load(path)
  if not np.allclose(img.affine, affine, atol=1e-3):
    raise ValueError(f'{path}: the field is not on the fixed grid (affine {img.affine} vs '
                     f'{affine}).')
  d = np.asarray(img.dataobj, np.float64).reshape(img.shape[:3] + (3,))
  if lps:
    d = d * np.array([-1.0, -1.0, 1.0])
  return ras_mm_to_vox(d, affine)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean, std (ddof 1) and median over pairs of each metric (None/NaN skipped), and the
  first pair's compile seconds."""
  out: dict[str, Any] = {'n': len(rows)}
  for key in ('dice', 'hd95_mm', 'folding_fraction', 'sdlogj', 'tre_mm', 'seconds'):
    vals = np.asarray([r[key] for r in rows if r.get(key) is not None], float)
    vals = vals[np.isfinite(vals)]
    out[key] = {'mean': float(vals.mean()) if vals.size else math.nan,
                'std': float(vals.std(ddof=1)) if vals.size > 1 else math.nan,
                'median': float(np.median(vals)) if vals.size else math.nan}
  out['compile_s_first_pair'] = rows[0].get('compile_s') if rows else None
  return out


# =========================================================================== methods


def run_identity(spec: SetSpec, pairs: list[Pair], refs: list[Reference],
                 progress: Callable[[str], None]) -> list[dict[str, Any]]:
  """The moving labels unchanged (zero displacement)."""
  rows = []
  for i, (pair, ref) in enumerate(zip(pairs, refs), start=1):
    row = {'pair': pair.name, 'seconds': None,
           **score(ref, ref.initial, np.zeros(ref.initial.shape + (3,), np.float32),
                   ref.fixed_points_mm)}
    rows.append(row)
    progress(_pair_line(spec.name, 'identity', i, len(pairs), row))
  return rows


def _pair_line(set_name: str, method: str, i: int, n: int, row: dict[str, Any]) -> str:
  sec = '' if row.get('seconds') is None else f', {row["seconds"]:.2f} s'
  comp = f' (+ compile {row["compile_s"]:.1f} s)' if row.get('compile_s') else ''
  return (f'[{set_name}] {METHOD_NAMES[method]:<15} pair {i}/{n}: Dice '
          f'{100 * row["dice"]:.1f}%, HD95 {row["hd95_mm"]:.1f} mm, TRE '
          f'{row["tre_mm"]:.2f} mm, folding '
          f'{100 * row["folding_fraction"]:.3f}%{sec}{comp}')


def run_fmir(method: str, registrar, spec: SetSpec, pairs: list[Pair],
             refs: list[Reference], out_root: str,
             progress: Callable[[str], None]) -> list[dict[str, Any]]:
  """``registrar.register`` on every pair from its files; scores the written outputs.

  seconds: wall time of ``register`` (read, preprocess, features, head, refinement,
  resampling to the fixed grid, writing) minus the compile time it reports.
  """
  from fmir_jax.register import registrar as register_lib
  rows = []
  for i, (pair, ref) in enumerate(zip(pairs, refs), start=1):
    out = os.path.join(out_root, pair.name)
    t0 = time.perf_counter()
    # Fixed labels left out: register would score Dice/HD95 itself (timed); we score below.
    report = registrar.register(register_lib.PairFiles(
        pair.fixed, pair.moving, None, pair.moving_labels,
        fixed_landmarks=pair.fixed_landmarks, moving_landmarks=pair.moving_landmarks), out)
    wall = time.perf_counter() - t0
    compile_s = float(report.times_s['compile_s'])       # head + refinement programs
    warped, _, _ = nifti.load_nifti(os.path.join(out, 'warped_moving_labels.nii.gz'),
                                 what='label')
    disp_mm = nib.load(os.path.join(out, 'disp_mm.nii.gz'))
    disp_mm = np.asarray(disp_mm.dataobj, np.float64)[:, :, :, 0, :]
    disp_vox = ras_mm_to_vox(disp_mm, ref.affine)
    mapped = apply_lib.map_ras(disp_mm, ref.affine, ref.fixed_points_mm)
    row = {'pair': pair.name, 'seconds': wall - compile_s, 'compile_s': compile_s,
           **score(ref, warped, disp_vox, mapped), 'times_s': report.times_s,
           'jacobian_registration_grid': report.jacobian,
           'registration_grid': report.grid.shape}
    rows.append(row)
    progress(_pair_line(spec.name, method, i, len(pairs), row))
  return rows


def run_ants(python: str, spec: SetSpec, pairs: list[Pair], refs: list[Reference],
             out_root: str, seed: int, progress: Callable[[str], None]
             ) -> list[dict[str, Any]]:
  """ANTs SyN on all pairs of a set in ONE worker process (bench/ants_worker.py); the
  results are scored after the worker exits, so scoring never competes with ANTs for CPU."""
  os.makedirs(out_root, exist_ok=True)
  jobs = [{'name': p.name, 'fixed': p.fixed, 'moving': p.moving,
           'moving_labels': p.moving_labels, 'out': os.path.join(out_root, p.name),
           'fixed_points_lps': (ref.fixed_points_mm * [-1.0, -1.0, 1.0]).tolist()}
          for p, ref in zip(pairs, refs)]
  jobs_path = os.path.join(out_root, 'jobs.json')
  with open(jobs_path, 'w') as f:
    json.dump(jobs, f, indent=1)
  env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(os.cpu_count() or 1))
  proc = subprocess.Popen([python, ANTS_WORKER, jobs_path, '--seed', str(seed)],
                          stdout=subprocess.PIPE, text=True, env=env)
  records = {}
  try:
    for line in proc.stdout:
      if not line.startswith('{'):         # anything else antspyx may print
        continue
      rec = json.loads(line)
      if 'fatal' in rec:
        raise AntsUnavailable(rec['fatal'])
      if 'error' in rec:
        raise RuntimeError(f'ANTs SyN failed on {rec["name"]}: {rec["error"]}')
      records[rec['name']] = rec
      progress(f'[{spec.name}] {METHOD_NAMES["ants_syn"]:<15} pair {len(records)}/'
               f'{len(pairs)}: registered in {rec["seconds"]:.2f} s')
    if proc.wait() != 0:
      raise RuntimeError(f'ANTs worker exited with code {proc.returncode}')
  finally:
    if proc.poll() is None:
      proc.terminate()
      proc.wait(10)
  rows = []
  for pair, ref in zip(pairs, refs):
    rec = records[pair.name]
    warped, _, _ = nifti.load_nifti(rec['warped_labels'], what='label')
    disp_vox = read_field(rec['warp'], ref.affine, lps=True)
    mapped = np.asarray(rec['mapped_points_lps'], np.float64) * [-1.0, -1.0, 1.0]
    rows.append({'pair': pair.name, 'seconds': rec['seconds'],
                 'registration_s': rec['registration_s'], 'compile_s': None,
                 **score(ref, warped, disp_vox, mapped)})
  return rows


class AntsUnavailable(RuntimeError):
  """The ANTs interpreter is missing or cannot import antspyx."""


def ants_python(path: str) -> tuple[str | None, str]:
  """(interpreter, '') if ``path`` is an executable file, else (None, why). Whether it can
  import antspyx shows when the worker starts (``AntsUnavailable``)."""
  if not (os.path.isfile(path) and os.access(path, os.X_OK)):
    return None, f'{path} does not exist'
  return path, ''


# =========================================================================== report


def _pm(s: dict[str, float], scale: float, digits: int) -> str:
  if not np.isfinite(s['mean']):
    return 'n/a'
  std = f' ± {scale * s["std"]:.{digits}f}' if np.isfinite(s['std']) else ''
  return f'{scale * s["mean"]:.{digits}f}{std}'


def table(spec: SetSpec, set_result: dict[str, Any]) -> str:
  """The Markdown table of one set (mean ± std over pairs; seconds: median)."""
  methods = set_result['methods']
  syn = methods.get('ants_syn', {}).get('summary')
  n = next(iter(methods.values()))['summary']['n']
  peaks = [p['peak_mm'] for p in set_result['pairs']]
  lines = [f'### {spec.name}: {n} pairs, {"x".join(map(str, spec.shape))} voxels at '
           f'{"x".join(f"{s:g}" for s in spec.spacing_mm)} mm, peak deformation '
           f'{min(peaks):.1f}-{max(peaks):.1f} mm'
           + (', moving intensities inverted' if spec.invert else '')
           + (', moving scan misaligned' if spec.misalign else ''), '',
           '| method | Dice % | HD95 mm | TRE mm | folding % | SDlogJ | s/pair | compile s '
           '| ΔDice vs SyN (points) | time vs SyN |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for method, res in methods.items():
    s = res['summary']
    sec = s['seconds']['median']
    comp = s['compile_s_first_pair']
    d_dice = t_ratio = '–'
    if syn is not None and method != 'ants_syn':
      d_dice = f'{100 * (s["dice"]["mean"] - syn["dice"]["mean"]):+.1f}'
      if np.isfinite(sec):
        t_ratio = f'{sec / syn["seconds"]["median"]:.2f}x'
    lines.append(
        f'| {METHOD_NAMES[method]} | {_pm(s["dice"], 100, 1)} | {_pm(s["hd95_mm"], 1, 2)} '
        f'| {_pm(s["tre_mm"], 1, 2)} | {_pm(s["folding_fraction"], 100, 3)} | {_pm(s["sdlogj"], 1, 3)} '
        f'| {"–" if not np.isfinite(sec) else f"{sec:.2f}"} '
        f'| {"–" if comp is None else f"{comp:.1f}"} | {d_dice} | {t_ratio} |')
  if set_result.get('io_curve'):
    lines += ['', f'{spec.name}: instance optimisation budget (fraction of the default steps '
              'per scale) vs mean Dice %, started from the head and from zero', '',
              '| budget | steps per scale | from head | from zero | s/pair head | s/pair zero |',
              '|---:|---|---:|---:|---:|---:|']
    for r in set_result['io_curve']:
      lines.append(f'| {r["budget"]:g} | {",".join(map(str, r["steps"]))} '
                   f'| {_pm(r["head"]["dice"], 100, 1)} | {_pm(r["zero"]["dice"], 100, 1)} '
                   f'| {r["head"]["seconds"]["median"]:.2f} '
                   f'| {r["zero"]["seconds"]["median"]:.2f} |')
  return '\n'.join(lines)


# =========================================================================== main


def demo_checkpoint(smoke: bool, progress: Callable[[str], None]) -> str:
  """The offline demo run under bench_results/ (trained now unless an earlier bench did)."""
  out = os.path.join(ROOT, 'bench_results', 'demo_run_smoke' if smoke else 'demo_run')
  run = os.path.join(out, 'run')
  if os.path.isfile(os.path.join(run, 'run.json')) and os.path.isdir(os.path.join(run, 'best')):
    progress(f'no --checkpoint: using the demo run an earlier bench trained: {run}')
    return run
  cmd = [sys.executable, '-m', 'fmir_jax.demo', '--out', out, '--no-register']
  cmd += ['--smoke'] if smoke else []
  progress('no --checkpoint: training the offline demo run first (several minutes on 2 '
           f'cores): {" ".join(cmd)}')
  subprocess.run(cmd, cwd=ROOT, check=True)
  return run


class Registrars:
  """One ``Registrar`` per option set (pyramid factors, refinement), shared by the sets
  that need the same options, so the head compiles once per grid shape."""

  def __init__(self, checkpoint: str, smoke: bool, progress: Callable[[str], None],
               linear: str | None = None):
    self.checkpoint, self.smoke, self.progress = checkpoint, smoke, progress
    self.linear = linear
    self.cache: dict[Any, Any] = {}
    self.seen: set[str] = set()

  def options(self, spec: SetSpec, refine: bool, init: str = 'head', budget: float = 1.0,
              finest: int = 0):
    """budget: fraction of the default instance-optimisation steps (every scale); finest:
    the head's finest level (``--head-finest-level``)."""
    from fmir_jax.register import refine as refine_lib
    from fmir_jax.register import registrar as register_lib
    io_opts = None
    if refine:
      io_opts = refine_lib.RefineOptions(similarity=spec.similarity).with_budget(
          budget / 20 if self.smoke else budget)           # smoke: ~1/20 of the steps
    linear = {} if self.linear is None else {'linear': self.linear}
    return register_lib.RegisterOptions(grid='native', pyramid_factors=spec.factors,
                                        refine=io_opts, io_init=init, overwrite=True,
                                        head_finest_level=finest, **linear)

  def _log(self, line: str) -> None:
    if 'warning' in line and line not in self.seen:       # each warning once
      self.seen.add(line)
      self.progress('  fmir: ' + line)

  def get(self, spec: SetSpec, refine: bool, init: str = 'head', budget: float = 1.0,
          finest: int = 0):
    from fmir_jax.register import registrar as register_lib
    opts = self.options(spec, refine, init, budget, finest)
    if opts not in self.cache:
      self.cache[opts] = register_lib.Registrar(self.checkpoint, opts, self._log)
    return self.cache[opts]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--checkpoint', help='trained run (train.py --workdir); default: the '
                 'offline demo run, trained first into bench_results/demo_run')
  p.add_argument('--out', default=os.path.join(ROOT, 'bench_results', 'register'))
  p.add_argument('--pairs', type=int, help='pairs per set (default 6; --smoke 2)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--smoke', action='store_true', help='tiny sizes, few refine steps')
  p.add_argument('--sets', default=','.join(s.name for s in set_specs(False, True)),
                 help='default: the three sets and their misaligned variants')
  p.add_argument('--linear', choices=('affine', 'rigid', 'none'), default=None,
                 help="the fmir methods' linear stage (default: fmir register's default)")
  p.add_argument('--methods', default=','.join(DEFAULT_METHODS),
                 help=f'subset of {METHODS} (default: the first five)')
  p.add_argument('--io-curve', default='',
                 help="fractions of the default IO steps, e.g. '0.1,0.25,0.5': mean Dice of "
                      'IO started from the head and from zero at each budget (per set)')
  p.add_argument('--ants-python', default=ANTS_PYTHON,
                 help='interpreter with antspyx (default .venv-ants; bench/setup_ants.sh)')
  args = p.parse_args(argv)
  args.pairs = args.pairs or (2 if args.smoke else 6)
  args.sets = [s for s in args.sets.split(',') if s]
  args.methods = [m for m in args.methods.split(',') if m]
  args.io_curve = [float(f) for f in args.io_curve.split(',') if f]
  bad = set(args.methods) - set(METHODS)
  if bad or args.pairs < 1:
    p.error(f'--methods: unknown {sorted(bad)} (use {METHODS}); --pairs must be >= 1')
  return args


def run_set(spec: SetSpec, args, registrars: Registrars | None,
            progress: Callable[[str], None]) -> dict[str, Any]:
  """Writes one set's pairs and runs every method on them; returns the set's results.
  ``args.ants``: the ANTs interpreter, or None (ANTs skipped)."""
  pairs = write_set(spec, args.pairs, args.seed, os.path.join(args.out, 'data', spec.name),
                    progress)
  refs = [load_reference(p) for p in pairs]
  result: dict[str, Any] = {'spec': dataclasses.asdict(spec),
                            'pairs': [dataclasses.asdict(p) for p in pairs], 'methods': {}}
  for method in args.methods:
    out_root = os.path.join(args.out, spec.name, method)
    if method == 'identity':
      rows = run_identity(spec, pairs, refs, progress)
    elif method == 'ants_syn':
      if not args.ants:
        continue
      try:
        rows = run_ants(args.ants, spec, pairs, refs, out_root, args.seed, progress)
      except AntsUnavailable as e:
        progress(ants_skipped(str(e)))
        args.ants = None
        continue
    else:
      from fmir_jax import cli
      fast = method == 'fmir_fast'
      registrar = registrars.get(spec, refine=method not in ('fmir_head', 'fmir_head_l1'),
                                 init='zero' if method == 'fmir_io_zero' else 'head',
                                 budget=cli.FAST_IO_BUDGET if fast else 1.0,
                                 finest=cli.FAST_HEAD_FINEST_LEVEL if fast
                                 else 1 if method == 'fmir_head_l1' else 0)
      rows = run_fmir(method, registrar, spec, pairs, refs, out_root, progress)
    result['methods'][method] = {'pairs': rows, 'summary': summarize(rows)}
  if args.io_curve:
    result['io_curve'] = io_curve(spec, args, registrars, pairs, refs, progress)
  return result


def io_curve(spec: SetSpec, args, registrars: Registrars, pairs: list[Pair],
             refs: list[Reference], progress: Callable[[str], None]) -> list[dict[str, Any]]:
  """Mean Dice and seconds of instance optimisation from the head and from zero at each
  budget of ``args.io_curve`` (fractions of the default steps per scale)."""
  rows = []
  for budget in args.io_curve:
    row = {'budget': budget}
    for init in ('head', 'zero'):
      registrar = registrars.get(spec, True, init, budget)
      row['steps'] = list(registrar.options.refine.steps)
      out_root = os.path.join(args.out, spec.name, f'io_curve_{init}_{budget:g}')
      res = run_fmir('fmir_head_io' if init == 'head' else 'fmir_io_zero', registrar, spec, pairs, refs, out_root,
                     lambda line: None)
      row[init] = summarize(res)
    progress(f'[{spec.name}] IO budget {budget:g} (steps {row["steps"]}): Dice from head '
             f'{100 * row["head"]["dice"]["mean"]:.1f}, from zero '
             f'{100 * row["zero"]["dice"]["mean"]:.1f}')
    rows.append(row)
  return rows


def ants_skipped(why: str) -> str:
  return (f'ANTs SyN SKIPPED: {why}. Set it up with: bash bench/setup_ants.sh (creates '
          '.venv-ants with antspyx 0.6.3), or pass --ants-python.')


def write_json(path: str, results: dict[str, Any]) -> None:
  with files.atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump(results, f, indent=1, default=float)


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f'signal {signum}')


def main(argv=None) -> int:
  args = parse_args(argv)
  t_start = time.perf_counter()
  progress = lambda line: print(line, flush=True)  # noqa: E731
  if args.smoke:   # compile faster (as bench/run.py --suite smoke); timings mean nothing
    os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
  # Before torch loads: with OpenMP's default (active) waiting, the encoder's threads on
  # shared, busy cores ran up to 15x slower than with passive waiting.
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  specs = [s for s in set_specs(args.smoke, misaligned=True) if s.name in args.sets]
  os.makedirs(args.out, exist_ok=True)
  args.ants = None
  if 'ants_syn' in args.methods:
    args.ants, why = ants_python(args.ants_python)
    if args.ants is None:
      progress(ants_skipped(why))
  registrars = None
  if any(m.startswith('fmir') for m in args.methods):
    checkpoint = args.checkpoint or demo_checkpoint(args.smoke, progress)
    registrars = Registrars(checkpoint, args.smoke, progress, args.linear)
  results: dict[str, Any] = {
      'settings': {'checkpoint': registrars and registrars.checkpoint, 'seed': args.seed,
                   'smoke': args.smoke, 'pairs_per_set': args.pairs,
                   'methods': args.methods, 'ants_python': args.ants,
                   'linear': args.linear,
                   'cpu_count': os.cpu_count(), 'platform': platform.platform(),
                   'env': {k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'XLA_FLAGS')},
                   'load_average_start': list(os.getloadavg())},
      'sets': {}}
  json_path = os.path.join(args.out, 'results.json')
  signal.signal(signal.SIGTERM, _interrupt)      # kill PID: clean up as Ctrl-C does
  try:
    for spec in specs:
      results['sets'][spec.name] = run_set(spec, args, registrars, progress)
      print('\n' + table(spec, results['sets'][spec.name]) + '\n', flush=True)
      write_json(json_path, results)
  except KeyboardInterrupt:
    done = f'sets finished so far in {json_path}' if results['sets'] else 'no set finished'
    print(f'interrupted; {done}', file=sys.stderr)
    return 130
  results['total_wall_s'] = time.perf_counter() - t_start
  results['settings']['load_average_end'] = list(os.getloadavg())
  write_json(json_path, results)
  print('Dice: mean over foreground classes present in both label maps; ± std over pairs. '
        's/pair: median, compile excluded (compile s: first pair; 0 = reused). folding, '
        'SDlogJ: the displacement on fixed-grid voxels (ANTs: SyN warp without its affine).')
  print(f'total wall time {results["total_wall_s"]:.0f} s; results: {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
