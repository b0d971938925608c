"""Small CPU-friendly config for the offline demo (synthetic ACDC-layout phantoms, `mind`
features). Not the paper's setting: the grid is coarser (the demo's reader options), c', n
and the pyramid depth are reduced so training takes minutes on 2 CPU cores.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.name = 'demo'
  c.data.train_stores = ('demo_out/features',)
  c.data.num_classes = 3
  c.feature_channels = 16
  c.model.n = 8
  c.model.levels = 4
  c.model.factors = (2, 2, 1)
  c.loss.ncc_windows = (9, 5, 3, 3)
  c.train.num_steps = 100
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.train.eval_every = 50
  c.train.eval_pairs = 4
  c.optim.lr = 2e-3
  return c
