"""Small CPU-friendly config for the offline demo (synthetic ACDC-layout phantoms, `mind`
features). Not the paper's setting: c' and n are reduced so training takes minutes on 2 cores.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.name = 'demo'
  c.data.train_stores = ('demo_out/features',)
  c.data.num_classes = 3
  c.feature_channels = 16
  c.model.n = 8
  c.model.factors = (2, 2, 1)
  c.train.num_steps = 300
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  c.train.eval_pairs = 4
  c.optim.lr = 1e-3
  return c
