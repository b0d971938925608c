"""`fmir track`: the command line of ``fmir_jax.register.track`` (a thin shell over it)."""
from __future__ import annotations

import argparse
import os
import sys

from fmir_jax.core import errors
from fmir_jax.register import registrar as register_lib
from fmir_jax.register import track as track_lib


def add_parser(sub, add_method_options) -> None:
  t = sub.add_parser(
      'track', help='register every frame of a 4D series (cine) with one reference frame',
      description='Register every frame of a 4D series (X,Y,Z,T) with a reference frame in '
                  'one process (compiled once for the series\' grid) and propagate the '
                  "reference's labels through it. Outputs under OUT: disp_mm.nii.gz "
                  '(X,Y,Z,T,3 RAS mm, intent DISPVECT: frame t voxel p maps to the reference '
                  'at p + disp), warped_series.nii.gz (the reference moved onto every frame), '
                  'track.json; with --labels also labels_series.nii.gz, volumes.csv, '
                  'volumes.png and, for ACDC label ids, LV/RV volumes and ejection fractions.')
  t.add_argument('--series', required=True, help='4D NIfTI series, e.g. patientNNN_4d.nii.gz')
  t.add_argument('--out', required=True,
                 help='output folder (in an existing one only track\'s own files are written)')
  t.add_argument('--reference-frame', type=int, default=None, metavar='N',
                 help='1-based reference frame (default: the ED frame of Info.cfg beside an '
                      'ACDC patientNNN_4d.nii.gz, else 1)')
  t.add_argument('--labels', help='label map of the reference frame (propagated to every frame)')
  t.add_argument('--frame-labels', action='append', default=[], metavar='N:PATH',
                 help='ground-truth labels of frame N: Dice/HD95 of the propagated labels '
                      '(repeatable)')
  t.add_argument('--mode', choices=('direct', 'sequential'), default='direct',
                 help='direct (default): every frame with the reference; sequential: every '
                      'frame with its neighbour towards the reference, maps composed (the '
                      'drift against a direct registration is reported)')
  t.add_argument('--overwrite', action='store_true',
                 help='replace an earlier track result in OUT (its files only)')
  t.add_argument('--head-only', action='store_true',
                 help='the head alone, without instance optimisation (fastest; it '
                      'under-registers large contractions: docs/track.md)')
  add_method_options(t, linear_default='none')
  t.set_defaults(io=True)       # instance optimisation by default: the cycle's large motions


def run(args: argparse.Namespace, register_options, enable_compilation_cache) -> int:
  """``register_options``, ``enable_compilation_cache``: cli's (shared with register)."""
  say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
  try:
    if args.head_only:
      if (args.fast or args.io_budget is not None or args.io_steps or args.io_diffeomorphic
          or args.io_similarity or args.io_fold is not None):
        raise track_lib.TrackError('--head-only runs no instance optimisation: leave out '
                                   '--fast and the --io-* options.')
      args.io = False
    inputs = track_lib.check_inputs(       # before the model loads
        args.series, args.labels, args.frame_labels, args.reference_frame,
        None if args.reference_frame else track_lib.acdc_ed_frame(args.series))
    opts = register_options(args)
    cache = enable_compilation_cache(args)
    registrar = register_lib.Registrar(args.checkpoint, opts, say)
    report = track_lib.track(registrar, inputs, args.out, log=say,
                             options=track_lib.TrackOptions(mode=args.mode,
                                                            overwrite=args.overwrite))
  except errors.UserError as e:
    print(f'fmir track: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('fmir track: interrupted; the frames done are kept: run the same command again to '
          'go on.', file=sys.stderr)
    return 130
  say(f'compilation cache: {cache or "off"}')
  if not args.quiet:
    ej = (report.get('ejection') or {}).get('lv')
    print(f"{report['frames']} frames tracked to frame {report['reference_frame']} "
          f"({report['mode']}), {report['seconds_per_frame_median'] or 0:.2f} s per frame; "
          + (f"LV EF {ej['ef_percent']:.1f} % (ED {ej['ed_frame']}, ES {ej['es_frame']}); "
             if ej else '') + f"report: {os.path.join(os.path.abspath(args.out), 'track.json')}")
  return 0
