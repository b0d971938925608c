"""Train FMIR on a feature store (resumes from the last checkpoint in --workdir; data-
parallel over all local devices).

  python train.py --config=configs/acdc.py --workdir=runs/acdc
      --config.data.train_stores=features/acdc_dinov3

Config fields users override most (--config.FIELD=VALUE; defaults in configs/common.py):
  data.train_stores   feature store(s) to train on, comma-separated in a tuple for hybrid
                      training: '("f/acdc","f/abdomen")'
  data.eval_stores    validation stores (() = the training stores' val splits)
  mode                UN (random channels, paper default), WS (+ Dice on labels), -CR (PCA)
  channel_norm        paper | release | standardise | matched (feature normalisation around the
                      channel draw and the PCA; README "Differences from the paper")
  feature_channels    c', channels the head sees (256)
  optim.lr            learning rate (1e-4; the demo: 3e-3)
  train.num_steps     steps (0 = train.epochs over the training pairs)
  train.batch_size    pairs per step, over all devices (1)
  train.eval_every    validation period in steps; train.checkpoint_every likewise
  model.kernel_init   torch (authors) | he;  model.flow_init  torch | small
"""
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from fmir_jax.train import distributed
from fmir_jax.core import entry
from fmir_jax.core import errors
from fmir_jax.train import checks
from fmir_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, PCA basis, TensorBoard).')
flags.DEFINE_integer('stop_after_steps', 0, 'Leave after this many steps of this invocation '
                     '(the next invocation resumes; 0 = run to the end).', lower_bound=0)
distributed.define_flags(flags)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  # Errors the user can fix (bad config, store, run directory, checkpoint, non-finite loss):
  # one line on stderr and exit status 2. Anything else is a bug and keeps its traceback.
  try:
    checks.check_config(FLAGS.config)       # before any start-up, file or compilation
    distributed.initialize_from_flags(FLAGS)
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                        stop_after_steps=FLAGS.stop_after_steps)
  except errors.UserError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  best = max(result.val_dice.values()) if result.val_dice else float('nan')
  print(f'trained to step {result.step}; best validation Dice {best:.4f}; run in '
        f'{result.workdir}')


if __name__ == '__main__':
  entry.run_absl(main)
