"""Train FMIR on a feature store.

  python train.py --config=configs/acdc.py --workdir=runs/acdc \
      --config.data.train_stores=features/acdc_dinov3 [--config.mode=WS] [--config.optim.lr=3e-4]

Resumes from the last checkpoint in --workdir. Data-parallel over all local devices.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fmir_jax import checkpoint
from fmir_jax import store as store_lib
from fmir_jax import trainer

FLAGS = flags.FLAGS
# Errors the user can fix (bad store, config, run directory, checkpoint, non-finite loss):
# one line on stderr and exit status 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, store_lib.StoreError,
               checkpoint.RunError)
config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, PCA basis, TensorBoard).')
flags.DEFINE_integer('stop_after_steps', 0, 'Leave after this many steps of this invocation '
                     '(the next invocation resumes).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  try:
    result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                        stop_after_steps=FLAGS.stop_after_steps)
  except USER_ERRORS as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  best = max(result.val_dice.values()) if result.val_dice else float('nan')
  print(f'trained to step {result.step}; best validation Dice {best:.4f}; run in '
        f'{result.workdir}')


if __name__ == '__main__':
  app.run(main)
