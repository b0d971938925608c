"""Learn2Reg 2020 abdomen CT at half resolution 96x80x128 (paper §3.1)."""
from configs import common


def get_config():
  c = common.base_config()
  c.name = 'abdomen'
  c.data.num_classes = 13
  c.model.factors = (2, 2, 2)
  c.loss.blur_in_plane_only = False
  c.train.epochs = 301
  c.train.checkpoint_every = 3800       # 10 epochs of 380 pairs
  c.train.eval_every = 3800
  return c
