"""Evaluate trained FMIR runs on feature stores (Dice, HD95, SDlogJ, folding, time).

One run, one store (Table 1 row):
  python eval.py --workdir=runs/acdc --features=features/acdc_dinov3 --split=test
Any backbone (the head is backbone-agnostic; a new backbone needs its own PCA basis, fitted
on that backbone's training features):
  python eval.py --workdir=runs/acdc --features=features/acdc_sam \
      --pca_store=features/acdc_sam
A run of one channel_norm seen through another with the same PCA fit (standardise and
matched train identically; README "Differences from the paper"):
  python eval.py --workdir=runs/acdc --features=features/acdc_dinov3 --channel_norm=matched
Cross-domain grid (Table 2): comma-separated runs x stores:
  python eval.py --workdir=runs/acdc_un,runs/acdc_ws --features=f/acdc_dino,f/abd_dino \
      --table2=results/table2.md
  (add --out=results/eval --reuse to keep the evaluations already made there for the same
  checkpoint, store, split and pairs: a killed or extended table resumes)
"""
import os
import sys

from absl import flags
from absl import logging
from tqdm import tqdm

from fmir_jax.train import distributed
from fmir_jax.core import entry
from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.evaluate import tables

FLAGS = flags.FLAGS
flags.DEFINE_list('workdir', None, 'Training run directory (or several, comma-separated).')
flags.DEFINE_list('features', None, 'Feature store(s) to evaluate on.')
flags.DEFINE_list('pca_store', [], 'Per --features entry (or one for all): a store of the '
                  'same backbone on training data, to fit a PCA basis for a new backbone.')
flags.DEFINE_string('split', 'test', 'Split of the store to evaluate.')
flags.DEFINE_string('checkpoint', 'best', "'best', 'last' (or 'latest') or a saved step.")
flags.DEFINE_string('out', '', 'Output directory (default: WORKDIR/eval/STORE_SPLIT).')
flags.DEFINE_integer('figures', 3, 'Per-pair figures to draw.')
flags.DEFINE_integer('limit', 0, 'Evaluate only the first N pairs (0 = all).')
flags.DEFINE_string('table2', '', 'Write the cross-domain Markdown table here.')
flags.DEFINE_string('channel_norm', '', "Inference normalisation instead of the run's own, "
                    'one with the same PCA fit (standardise <-> matched: they train alike).')
flags.DEFINE_bool('overwrite', False, 'Replace an earlier evaluation in --out (and an earlier '
                  '--table2 file); files fmir-jax did not write are never replaced.')
flags.DEFINE_bool('reuse', False, 'Keep an evaluation already in --out when it scored the same '
                  'checkpoint, store, split, pairs and normalisation (a long --table2 resumes).')
distributed.define_flags(flags)
flags.mark_flags_as_required(['workdir', 'features'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  pca = FLAGS.pca_store
  if pca and len(pca) not in (1, len(FLAGS.features)):
    print('error: --pca_store needs one entry or one per --features entry', file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.table2:       # before any work (and again when it is written)
      files.check_result_file(FLAGS.table2, FLAGS.overwrite, '--table2')
    # A multi-host launch (every host runs this command): process 0 evaluates alone, on its
    # own devices, and writes; the others have nothing to do.
    if distributed.launch_index(FLAGS) > 0:
      print(f'process {distributed.launch_index(FLAGS)}: evaluation runs on process 0')
      return
    spec = tables.GridSpec(
        split=FLAGS.split, checkpoint=FLAGS.checkpoint, limit=FLAGS.limit, pca_stores=pca,
        channel_norm=FLAGS.channel_norm, figures=FLAGS.figures, overwrite=FLAGS.overwrite,
        reuse=FLAGS.reuse, out=FLAGS.out)
    grid = tables.evaluate_grid(
        FLAGS.workdir, FLAGS.features, spec,
        progress=lambda path: lambda xs: tqdm(xs, desc=f'eval {os.path.basename(path)}'))
    if FLAGS.table2:
      table = grid.markdown()
      files.write_result_file(FLAGS.table2, table, FLAGS.overwrite, '--table2')
      print(table)
  except errors.UserError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  entry.run_absl(main)
