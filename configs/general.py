"""The general head (`fmir register`'s default): domain-randomised synthetic pairs
(feature_extract/synthetic/randomised.py) on an isotropic and an anisotropic grid, offline `mind`
features, validated on cardiac, abdomen and inverted-contrast phantom pairs (anatomies the
generator does not imitate), the best checkpoint chosen on them.

  python -m fmir_jax.general --out general_out     # data, features, training, in one command

which is `train.py --config=configs/general.py --workdir=general_out/run` over the stores it
writes. With foundation-model features of the same pairs (feature_extract/run.py --dataset
custom --data-root general_out/data/synth_iso/pairs.csv ...), override
`--config.data.train_stores` and `--config.data.eval_stores` to train a DINOv3 general head.

-CR mode (PCA features at training and inference) with He init: at CPU budgets the paper's
UN mode needs about ten times the steps (docs/results.md, "Training modes at CPU scale").
"""
from configs import common
from fmir_jax.ops import losses

OUT = 'general_out'
TRAIN = ('synth_iso', 'synth_aniso')          # feature stores under OUT/features/
VAL = ('val_cardiac', 'val_abdomen', 'val_inverted')


def get_config():
  c = common.base_config()
  c.name = 'general'
  c.data.train_stores = tuple(f'{OUT}/features/{n}' for n in TRAIN)
  c.data.eval_stores = tuple(f'{OUT}/features/{n}' for n in VAL)
  c.data.per_store = {
      'factors': ((2, 2, 2), (2, 2, 1)),
      'num_classes': (16, 16),
      'blur_in_plane_only': (False, True),
  }
  c.data.num_classes = 16
  c.mode = '-CR'
  c.feature_channels = 16
  c.model.n = 8
  c.model.levels = 4
  c.model.factors = (2, 2, 2)
  c.model.kernel_init = 'he'
  c.loss.ncc_windows = losses.NCC_WINDOWS[:4]
  c.loss.blur_in_plane_only = False
  c.optim.lr = 3e-3
  c.train.num_steps = 1500
  c.train.batch_size = 1
  c.train.log_every = 25
  c.train.checkpoint_every = 250
  c.train.eval_every = 250
  c.train.eval_pairs = 0
  c.train.keep_checkpoints = 2
  return c
