"""The ``fmir`` console script.

  fmir register --fixed F.nii.gz --moving M.nii.gz --checkpoint RUN_DIR --out OUT/ [options]

Bad input (unreadable or 2D image, NaN voxels, label map not on its image's grid, missing
run, unknown backbone, no PCA basis for another backbone, ...) prints one message and exits
with code 2; nothing is written under OUT.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _layer(text: str | None):
  if text is None or text == 'last':
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'--layer must be an int or "last", got {text!r}') from None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='fmir', description='FMIR registration tools.')
  sub = parser.add_subparsers(dest='command', required=True)
  r = sub.add_parser(
      'register', help='register a NIfTI pair with a trained run',
      description='Register MOVING onto FIXED with a trained FMIR run. Outputs under OUT: '
                  'warped_moving.nii.gz, warped_moving_labels.nii.gz (with --moving-labels), '
                  'disp_mm.nii.gz (X,Y,Z,1,3 RAS mm, intent DISPVECT; warped(p) = '
                  'moving(p + disp); for ITK/ANTs LPS negate components 0 and 1), '
                  'report.json.')
  r.add_argument('--fixed', required=True, help='fixed image (.nii/.nii.gz)')
  r.add_argument('--moving', required=True, help='moving image')
  r.add_argument('--checkpoint', required=True, help='training run directory (--workdir)')
  r.add_argument('--out', required=True, help='output folder: created whole when new; in an existing folder only '
                      "register's own files are written (other files are never touched)")
  r.add_argument('--fixed-labels', help='fixed label map (for Dice)')
  r.add_argument('--moving-labels', help='moving label map (warped with nearest neighbour)')
  r.add_argument('--grid', choices=('model', 'native'), default='model',
                 help="model: the run's training grid and preprocessing; native: the fixed "
                      'image field of view at --spacing')
  r.add_argument('--dataset-grid', choices=('acdc', 'abdomen'),
                 help="use this dataset's model grid and intensity rule (implies --grid "
                      'model unless --grid native is given)')
  r.add_argument('--spacing', help='native grid voxel size sx,sy,sz in mm (default: fixed)')
  r.add_argument('--pyramid-factors',
                 help="per-level factors at inference: 'sx,sy,sz' or one triple per level "
                      "transition separated by ';' (default: the checkpoint's)")
  r.add_argument('--backbone', help="encoder (default: the run's); another one needs a PCA "
                                    'basis in the run (eval.py --pca_store)')
  r.add_argument('--weights', help='encoder weights: Hub id or local directory')
  r.add_argument('--layer', type=_layer, help='encoder layer: int or "last"')
  r.add_argument('--checkpoint-step', default='best',
                 help='best | last (alias latest) | STEP (default: best)')
  r.add_argument('--device', default='auto', help='encoder device: auto | cpu | cuda[:N]')
  r.add_argument('--dtype', default='float32', help='encoder compute dtype')
  r.add_argument('--batch-size', type=int, default=16, help='slices per encoder forward')
  r.add_argument('--io-steps', type=int, default=0,
                 help='instance optimisation: Adam steps on the displacement (0 = off)')
  r.add_argument('--io-lr', type=float, default=0.1, help='instance optimisation step (vox)')
  r.add_argument('--l2r-export', metavar='DIR',
                 help='also write DIR/disp_FFFF_MMMM.nii.gz (Learn2Reg: fixed id first, '
                      'X,Y,Z,3 float32 voxels, moving_index = fixed_index + disp)')
  r.add_argument('--l2r-fixed-id', help='Learn2Reg case id of the fixed scan (default: from '
                                        'the file name)')
  r.add_argument('--l2r-moving-id', help='Learn2Reg case id of the moving scan')
  r.add_argument('--overwrite', action='store_true', help="replace an earlier register result in OUT (its files only)")
  r.add_argument('--quiet', action='store_true', help='print nothing but errors')
  return parser


def _user_errors() -> tuple[type, ...]:
  from feature_extract import backbones
  from feature_extract.datasets.base import DatasetError
  from fmir_jax import files
  from fmir_jax import io
  from fmir_jax import register
  from fmir_jax import store
  return (register.RegisterError, io.NiftiError, backbones.BackboneError, store.StoreError,
          DatasetError, files.OutputPathError)


def run_register(args: argparse.Namespace) -> int:
  from fmir_jax import register
  say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
  try:
    opts = register.RegisterOptions(
        grid=args.grid, dataset_grid=args.dataset_grid,
        spacing_mm=register.parse_triple(args.spacing, '--spacing'),
        pyramid_factors=register.parse_factors(args.pyramid_factors),
        backbone=args.backbone, weights=args.weights, layer=args.layer,
        checkpoint_step=args.checkpoint_step, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, io_steps=args.io_steps, io_lr=args.io_lr,
        l2r_dir=args.l2r_export, l2r_fixed_id=args.l2r_fixed_id,
        l2r_moving_id=args.l2r_moving_id, overwrite=args.overwrite)
    report = register.register(args.fixed, args.moving, args.checkpoint, args.out,
                               fixed_labels=args.fixed_labels,
                               moving_labels=args.moving_labels, options=opts, log=say)
  except _user_errors() as e:
    print(f'fmir register: error: {e}', file=sys.stderr)
    return 2
  if not args.quiet:
    print('\n'.join(register.summary_lines(report)))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == 'register':
    return run_register(args)
  raise AssertionError(args.command)


if __name__ == '__main__':
  sys.exit(main())
