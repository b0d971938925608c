"""ACDC cardiac cine MR, 128x128x16 at 1.8x1.8x10 mm (paper §3.1), unsupervised FMIR (Table 1).

  python train.py --config=configs/acdc.py --workdir=runs/acdc \
      --config.data.train_stores=features/acdc_dinov3
Weakly supervised: --config.mode=WS ; ablation: --config.mode=-CR
"""
from configs import common


def get_config():
  c = common.base_config()
  c.name = 'acdc'
  c.data.num_classes = 3
  c.model.factors = (2, 2, 1)
  c.loss.blur_in_plane_only = True
  c.train.epochs = 301
  c.train.checkpoint_every = 1700       # 10 epochs of 170 pairs
  c.train.eval_every = 1700
  return c
