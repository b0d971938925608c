"""The ``fmir`` console script.

  fmir register --fixed F.nii.gz --moving M.nii.gz --out OUT/ [--checkpoint RUN_DIR] [options]
  fmir register --pairs pairs.csv --out OUT/ [--checkpoint RUN_DIR] [options]
  fmir apply --transform OUT/ (--moving X.nii.gz [--labels] | --points P.csv) --out Y
  fmir invert --transform OUT/ --out OUT_INV/ [--reference IMAGE]
  fmir track --series S_4d.nii.gz --out OUT/ [--labels L.nii.gz] [--reference-frame N] [options]

Without --checkpoint the general head shipped in the package registers the pair (trained on
domain-randomised synthetic pairs with `mind` features; not a foundation model).

Bad input (unreadable or 2D image, NaN voxels, label map not on its image's grid, missing
run, unknown backbone, no PCA basis for another backbone, ...) prints one message and exits
with code 2; nothing is written under OUT. In batch mode a failed pair is reported in the
summary and the others go on; the exit code is 1 when any pair failed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Sequence

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.core.errors import RegisterError
from fmir_jax import cli_track
from fmir_jax.register import apply as apply_lib
from fmir_jax.register import batch as register_batch
from fmir_jax.register import registrar as register_lib

# --fast: a quarter of instance optimisation's default steps, from a head that stops at
# pyramid level 1: the finest level costs most and IO recovers its detail (bench/register_bench.py
# measures it; docs/register.md, "--fast").
FAST_IO_BUDGET = 0.25
FAST_HEAD_FINEST_LEVEL = 1


def _layer(text: str | None):
  try:
    return errors.parse_layer(text)
  except errors.BackboneError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_triple(text: str | None, what: str, cast: Callable = float):
  """'a,b,c' -> (a, b, c) of finite positive numbers, or None."""
  if text is None:
    return None
  try:
    vals = tuple(cast(p) for p in text.split(','))
  except ValueError:
    raise RegisterError(f'{what} {text!r}: expected three comma-separated numbers.') from None
  if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
    raise RegisterError(f'{what} {text!r}: expected three finite positive numbers.')
  return vals


def parse_factors(text: str | None):
  """'2,2,1' (all levels) or '2,2,1;2,2,2;...' (one per transition) -> factors or None."""
  if text is None:
    return None
  triples = [parse_triple(t, '--pyramid-factors', int) for t in text.split(';')]
  return triples[0] if len(triples) == 1 else tuple(triples)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='fmir', description='FMIR registration tools.')
  sub = parser.add_subparsers(dest='command', required=True)
  r = sub.add_parser(
      'register', help='register NIfTI pairs with a trained run',
      description='Register MOVING onto FIXED (or every pair of --pairs CSV) with a trained '
                  'FMIR run. Outputs under OUT: warped_moving.nii.gz, '
                  'warped_moving_labels.nii.gz (with --moving-labels), disp_mm.nii.gz '
                  '(X,Y,Z,1,3 RAS mm, intent DISPVECT; warped(p) = moving(p + disp); for '
                  'ITK/ANTs LPS negate components 0 and 1), jacobian_det.nii.gz, report.json; '
                  'with --linear also itk_affine.mat and itk_warp.nii.gz.')
  one = r.add_argument_group('one pair')
  one.add_argument('--fixed', help='fixed image (.nii/.nii.gz)')
  one.add_argument('--moving', help='moving image')
  one.add_argument('--fixed-labels', help='fixed label map (Dice/HD95 before and after)')
  one.add_argument('--moving-labels', help='moving label map (warped with nearest neighbour)')
  one.add_argument('--fixed-mask', help='fixed mask (voxels > 0; any grid of its world): the '
                                        'linear stage and --io count only these voxels '
                                        "(ANTs' -x)")
  one.add_argument('--moving-mask', help='moving mask: the similarity counts a fixed voxel only '
                                         'where the map takes it into this mask')
  one.add_argument('--fixed-landmarks', help='CSV of fixed points (x_ras,y_ras,z_ras or '
                                             'x_lps,y_lps,z_lps mm): the target registration '
                                             'error before/after in report.json')
  one.add_argument('--moving-landmarks', help='CSV of the corresponding moving points, row by '
                                              'row')
  r.add_argument('--pairs', metavar='CSV',
                 help='batch mode: a CSV with columns fixed,moving and optionally '
                      'fixed_labels,moving_labels,fixed_mask,moving_mask,fixed_landmarks,'
                      'moving_landmarks (paths relative to the CSV); each pair goes to '
                      'OUT/NNNN_<moving>_to_<fixed>/, plus OUT/summary.csv and summary.json; '
                      'the run is restored once and compiled once per grid shape')
  r.add_argument('--out', required=True,
                 help='output folder: created whole when new; in an existing folder only '
                      "register's own files are written (other files are never touched)")
  add_method_options(r)
  l2r = r.add_argument_group('Learn2Reg export')
  l2r.add_argument('--l2r-export', metavar='DIR',
                   help='also write DIR/disp_FFFF_MMMM.nii.gz (fixed case first; plus '
                        'disp_FFFF_ffff_MMMM_mmmm.nii.gz when the modality ids are known), '
                        'X,Y,Z,3 float32 voxels, moving_index = fixed_index + disp')
  l2r.add_argument('--l2r-fixed-id', help='Learn2Reg case id NNNN[_MMMM] of the fixed scan '
                                          '(default: from a Learn2Reg file name)')
  l2r.add_argument('--l2r-moving-id', help='Learn2Reg case id of the moving scan')
  r.add_argument('--overwrite', action='store_true',
                 help='replace an earlier register result in OUT (its files only)')
  _add_apply(sub)
  _add_invert(sub)
  cli_track.add_parser(sub, add_method_options)
  return parser


def add_method_options(r, linear_default: str = 'affine') -> None:
  """The options of how a pair is registered (run, grid, encoder, linear stage,
  instance optimisation, head, cache), shared by `fmir register` and `fmir track`."""
  r.add_argument('--checkpoint', default=None,
                 help='training run directory (train.py --workdir); default: the general '
                      'head shipped with fmir-jax (mind features, not a foundation model)')
  r.add_argument('--grid', choices=('model', 'native'), default=None,
                 help="model: the run's training grid and preprocessing; native: the fixed "
                      'image field of view at --spacing (default: model, or native for a run '
                      'trained on several grids, such as the general head)')
  r.add_argument('--dataset-grid', choices=('acdc', 'abdomen'),
                 help="use this dataset's model grid and intensity rule (default: the run's)")
  r.add_argument('--spacing', help='native grid voxel size sx,sy,sz in mm (default: the '
                                   "fixed image's)")
  r.add_argument('--pyramid-factors',
                 help="per-level factors at inference: 'sx,sy,sz' or one triple per level "
                      "transition separated by ';' (default: the checkpoint's; on a native "
                      'grid those of its training grid of that spacing, else halving the axes '
                      'within 1.5x of the finest spacing)')
  r.add_argument('--backbone', help="encoder (default: the run's); another one needs a PCA "
                                    'basis in the run (eval.py --pca_store)')
  r.add_argument('--weights', help="encoder weights: Hub id or local directory (default: "
                                   "the run's)")
  r.add_argument('--layer', type=_layer, help='encoder layer: int or "last" (default: the '
                                              "run's)")
  r.add_argument('--checkpoint-step', default='best',
                 help='best | last (alias latest) | STEP (default: best)')
  r.add_argument('--device', default='auto', help='encoder device: auto | cpu | cuda[:N] '
                                                  '(default: auto)')
  r.add_argument('--dtype', default='float32', help='encoder compute dtype (default: float32)')
  r.add_argument('--batch-size', type=int, default=16,
                 help='slices per encoder forward (default: 16)')
  lin = r.add_argument_group('linear pre-alignment (before the head)')
  lin.add_argument('--linear', choices=register_lib.LINEAR, default=linear_default,
                   help=f'affine: rigid, then affine, coarse to fine, from the centres of '
                        f'mass; rigid; none: the images are aligned already (default: '
                        f'{linear_default})')
  lin.add_argument('--linear-similarity', choices=('correlation', 'mi'), default='correlation',
                   help='correlation (default): squared correlation, one contrast or its '
                        'inverse; mi: mutual information, any two contrasts (CT/MR, T1/T2)')
  lin.add_argument('--linear-shape-weight', type=float, default=1.0,
                   help='penalty on per-axis scale differences and shears (default: 1.0, '
                        'best before the head on deformed anatomy; 0.1 for a pair that '
                        'differs by a true anisotropic affine)')
  io_default = _refine_lib().RefineOptions()      # the defaults shown below
  fmt = lambda xs: ','.join(f'{x:g}' for x in xs)
  io_g = r.add_argument_group('instance optimisation (refines the head\'s field on each pair)')
  io_g.add_argument('--io', action='store_true',
                    help='multi-scale instance optimisation with the defaults (coarse to fine, '
                         'Adam, local NCC + diffusion)')
  io_g.add_argument('--fast', action='store_true',
                    help='the quick route: --io --io-budget 0.25 --head-finest-level 1 '
                         '(each can still be set); docs/register.md gives its Dice and time '
                         'against the default')
  io_g.add_argument('--io-budget', type=float, default=None, metavar='FRACTION',
                    help='scale the Adam steps of every scale by FRACTION (at least 1 '
                         'step each); implies --io (default: 1)')
  io_g.add_argument('--io-steps', type=int, default=None,
                    help='Adam steps at the finest scale (coarser scales keep theirs); '
                         f'implies --io (default: {fmt(io_default.steps)} per scale, '
                         'coarse to fine)')
  io_g.add_argument('--io-lr', type=float, default=None,
                    help='Adam step size in voxels at the coarse scales; the finest keeps '
                         f'its ratio (default: {fmt(io_default.lr_vox)} per scale)')
  io_g.add_argument('--io-similarity', choices=('ncc', 'mind'), default=None,
                    help='ncc (default): same contrast; mind: MIND-SSC, for pairs of '
                         'different contrast')
  io_g.add_argument('--io-fold', type=float, default=None,
                    help='weight of the penalty on Jacobian determinants below '
                         f'{io_default.fold_margin:g} (folding); 0 turns it off (default: '
                         f'{io_default.fold:g})')
  io_g.add_argument('--io-init', choices=('head', 'zero'), default='head',
                    help="head (default): start from the head's field; zero: from the "
                         'identity, without running the head (to compare)')
  io_g.add_argument('--io-diffeomorphic', action='store_true',
                    help='optimise a velocity field integrated by scaling and squaring '
                         '(slower; no folding by construction)')
  r.add_argument('--head-finest-level', type=int, default=None, metavar='LEVEL',
                 help='finest pyramid level the head runs: 0 (default) all; 1 skips the '
                      'full-resolution level (about half the head\'s time; instance '
                      'optimisation adds the fine detail)')
  r.add_argument('--cache-dir', default=None,
                 help='JAX compilation cache, so a later call on the same grid shape skips '
                      'compiling (default: $FMIR_CACHE_DIR or ~/.cache/fmir-jax/jax)')
  r.add_argument('--no-cache', action='store_true', help='do not use the compilation cache')
  r.add_argument('--quiet', action='store_true', help='print nothing but errors')


def _add_apply(sub) -> None:
  """`fmir apply`: a saved result on other images, label maps or points."""
  a = sub.add_parser(
      'apply', help='apply a saved register result to another image, label map or points',
      description="Warp an image or label map of the moving scan's space onto the fixed "
                  'grid (--moving), or map fixed-world points to the moving world (--points), '
                  "with a fmir register result's disp_mm.nii.gz (the whole map). No model "
                  'is loaded and nothing is compiled.')
  a.add_argument('--transform', required=True, metavar='RESULT',
                 help='a fmir register --out folder (or one pair folder of a batch)')
  what = a.add_mutually_exclusive_group(required=True)
  what.add_argument('--moving', help='image (or label map, with --labels) to warp; any grid '
                                     "in the moving scan's world space")
  what.add_argument('--points', metavar='CSV',
                    help='points in the fixed world: a CSV with x_ras,y_ras,z_ras or '
                         'x_lps,y_lps,z_lps columns (mm); other columns are kept')
  a.add_argument('--labels', action='store_true',
                 help='--moving is a label map: nearest neighbour, ids kept')
  a.add_argument('--out', required=True,
                 help='output file: .nii/.nii.gz for --moving, .csv for --points (the '
                      'rows plus x_moving,y_moving,z_moving in the same convention)')
  a.add_argument('--overwrite', action='store_true',
                 help='replace an earlier fmir apply result at --out')


def _add_invert(sub) -> None:
  """`fmir invert`: the inverse map of a saved result."""
  v = sub.add_parser(
      'invert', help='the inverse map of a saved register result',
      description='Write the inverse of a fmir register result (fixed point iteration) on a '
                  "grid of the moving world: OUT/disp_mm.nii.gz, which fmir apply "
                  '--transform OUT uses to take fixed-space images, labels and points to the '
                  'moving side, and OUT/inverse.json with the inverse-consistency error.')
  v.add_argument('--transform', required=True, metavar='RESULT',
                 help='a fmir register --out folder')
  v.add_argument('--out', required=True, help='output folder')
  v.add_argument('--reference', metavar='IMAGE',
                 help="the grid of the inverse (default: the result's moving scan)")
  v.add_argument('--iterations', type=int, default=40, help='fixed point iterations '
                                                            '(default: 40)')
  v.add_argument('--overwrite', action='store_true',
                 help='replace an earlier fmir invert result in OUT')


def run_invert(args: argparse.Namespace) -> int:
  try:
    res = apply_lib.invert(args.transform, args.out, reference=args.reference,
                           iterations=args.iterations, overwrite=args.overwrite)
  except errors.UserError as e:
    print(f'fmir invert: error: {e}', file=sys.stderr)
    return 2
  ic = res['inverse_consistency_mm']
  print(f"inverse on {res['points']} points of {res['reference']}: inverse-consistency error "
        f"median {ic['median']} mm, max {ic['max']} mm, above a tenth of a voxel at "
        f"{100 * (ic['over_tenth_voxel_fraction'] or 0):.2f} % of the points; "
        f"{res['outside_fixed_grid']} points map "
        f"outside the fixed grid (left at 0); {os.path.abspath(args.out)}")
  return 0


def run_apply(args: argparse.Namespace) -> int:
  try:
    if args.points is not None:
      if args.labels:
        raise RegisterError('--labels goes with --moving (a label map), not --points.')
      res = apply_lib.map_points(args.transform, args.points, args.out,
                                 overwrite=args.overwrite)
      print(f"{res['points']} points mapped to the moving world ({res['space'].upper()}); "
            f"{res['outside']} outside the fixed grid left empty: {os.path.abspath(args.out)}")
    else:
      print(apply_lib.apply_image(args.transform, args.moving, args.out, labels=args.labels,
                                  overwrite=args.overwrite))
  except errors.UserError as e:
    print(f'fmir apply: error: {e}', file=sys.stderr)
    return 2
  return 0


def enable_compilation_cache(args: argparse.Namespace) -> str | None:
  """Points JAX's persistent compilation cache at a folder and caches every program there:
  --cache-dir, else $FMIR_CACHE_DIR, else a cache JAX already has (JAX_COMPILATION_CACHE_DIR),
  else ~/.cache/fmir-jax/jax."""
  if args.no_cache:
    return None
  import jax
  path = (args.cache_dir or os.environ.get('FMIR_CACHE_DIR')
          or jax.config.jax_compilation_cache_dir      # JAX_COMPILATION_CACHE_DIR
          or os.path.join(os.path.expanduser('~'), '.cache', 'fmir-jax', 'jax'))
  flag = '--cache-dir' if args.cache_dir else 'the compilation cache'
  files.check_writable_dir(path, flag)
  with files.disk_errors(path, flag):
    os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path


def _refine_lib():
  from fmir_jax.register import refine   # jax, no torch: only with the register command
  return refine


def refine_options(args: argparse.Namespace):
  """``refine.RefineOptions`` from the --io* flags, or None when instance optimisation is off."""
  budget = args.io_budget if args.io_budget is not None else (FAST_IO_BUDGET if args.fast
                                                                else None)
  if not (args.io or args.fast or budget is not None or args.io_steps or args.io_similarity
          or args.io_diffeomorphic or args.io_fold is not None):
    return None
  refine = _refine_lib()
  kw = {'diffeomorphic': args.io_diffeomorphic}
  default = refine.RefineOptions()
  if budget is not None:
    default = default.with_budget(budget)
    kw['steps'] = default.steps
  if args.io_steps:
    kw['steps'] = default.steps[:-1] + (args.io_steps,)
  if args.io_lr:
    kw['lr_vox'] = tuple(args.io_lr * r / default.lr_vox[0] for r in default.lr_vox)
  if args.io_similarity:
    kw['similarity'] = args.io_similarity
  if args.io_fold is not None:
    kw['fold'] = args.io_fold
  return refine.RefineOptions(**kw)


def register_options(args: argparse.Namespace):
  """``register_lib.RegisterOptions`` from the parsed flags (--fast filled in); RegisterError for
  values out of range."""
  finite = lambda x: x is None or math.isfinite(x)  # noqa: E731
  if args.io_steps is not None and args.io_steps < 1:
    raise register_lib.RegisterError(f'--io-steps {args.io_steps}: need at least 1 step.')
  if args.io_lr is not None and not (args.io_lr > 0 and finite(args.io_lr)):
    raise register_lib.RegisterError(f'--io-lr {args.io_lr}: need a finite positive step size.')
  if args.io_fold is not None and not (args.io_fold >= 0 and finite(args.io_fold)):
    raise register_lib.RegisterError(f'--io-fold {args.io_fold}: need a finite weight >= 0.')
  if args.io_budget is not None and not (args.io_budget > 0 and finite(args.io_budget)):
    raise register_lib.RegisterError(f'--io-budget {args.io_budget}: need a finite fraction > 0 '
                                 '(e.g. 0.25).')
  if args.batch_size < 1:
    raise register_lib.RegisterError(f'--batch-size {args.batch_size}: need at least 1 slice '
                                 'per encoder forward.')
  finest = args.head_finest_level
  finest = (FAST_HEAD_FINEST_LEVEL if args.fast else 0) if finest is None else finest
  return register_lib.RegisterOptions(
      grid=args.grid, dataset_grid=args.dataset_grid,
      spacing_mm=parse_triple(args.spacing, '--spacing'),
      pyramid_factors=parse_factors(args.pyramid_factors),
      backbone=args.backbone, weights=args.weights, layer=args.layer,
      checkpoint_step=args.checkpoint_step, device=args.device, dtype=args.dtype,
      batch_size=args.batch_size, refine=refine_options(args), io_init=args.io_init,
      head_finest_level=finest, linear=args.linear,
      linear_similarity=args.linear_similarity,
      linear_shape_weight=args.linear_shape_weight,
      l2r_dir=getattr(args, 'l2r_export', None),
      l2r_fixed_id=getattr(args, 'l2r_fixed_id', None),
      l2r_moving_id=getattr(args, 'l2r_moving_id', None), overwrite=args.overwrite)


def run_register(args: argparse.Namespace) -> int:
  say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
  try:
    one = [args.fixed, args.moving]
    optional = {k: getattr(args, k) for k in ('fixed_labels', 'moving_labels', 'fixed_mask',
                                              'moving_mask', 'fixed_landmarks',
                                              'moving_landmarks')}
    if args.pairs is not None and any(one + list(optional.values())):
      raise register_lib.RegisterError(
          '--pairs registers the pairs of a CSV: leave out --fixed/--moving and the labels, '
          'masks and landmarks (they are columns of the CSV).')
    if args.pairs is None and not all(one):
      raise register_lib.RegisterError('pass --fixed and --moving (one pair) or --pairs CSV.')
    opts = register_options(args)
    cache = enable_compilation_cache(args)
    if args.pairs is not None:
      summary = register_batch.register_batch(args.pairs, args.checkpoint, args.out,
                                              options=opts, log=say)
    else:
      report = register_lib.register(args.fixed, args.moving, args.checkpoint, args.out,
                                     options=opts, log=say, **optional)
  except errors.UserError as e:
    print(f'fmir register: error: {e}', file=sys.stderr)
    return 2
  except register_batch.BatchInterrupted as e:
    s = e.summary
    print(f'fmir register: interrupted; {s.pairs - s.not_run} of {s.pairs} pairs '
          f'done, summary so far: {e.summary_csv}. Run the same command again to register '
          'the rest.', file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print('fmir register: interrupted; nothing was written for the pair in progress.',
          file=sys.stderr)
    return 130
  say(f'compilation cache: {cache or "off"}')
  if args.pairs is not None:
    if not args.quiet:
      resumed = f', {summary.resumed} kept from an earlier run' if summary.resumed else ''
      print(f"{summary.pairs} pairs, {summary.failed} failed{resumed}; summary: "
            f"{os.path.join(os.path.abspath(args.out), 'summary.csv')}")
    return 1 if summary.failed else 0
  if not args.quiet:
    print('\n'.join(report.summary_lines()))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == 'register':
    return run_register(args)
  if args.command == 'apply':
    return run_apply(args)
  if args.command == 'invert':
    return run_invert(args)
  if args.command == 'track':
    return cli_track.run(args, register_options, enable_compilation_cache)
  raise AssertionError(args.command)


if __name__ == '__main__':
  sys.exit(main())
