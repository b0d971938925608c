"""Hybrid training on ACDC + abdomen stores (Table 2, 'Hybrid').

Each store keeps its own grid; per-store pyramid factors and label counts are set in
`data.per_store` (matched by position with `data.train_stores`).
"""
import ml_collections

from configs import common


def get_config():
  c = common.base_config()
  c.name = 'hybrid'
  c.data.train_stores = ('', '')        # (acdc store, abdomen store)
  c.data.per_store = ml_collections.ConfigDict({
      'factors': ((2, 2, 1), (2, 2, 2)),
      'num_classes': (3, 13),
      'blur_in_plane_only': (True, False),
  })
  c.data.num_classes = 13
  c.train.epochs = 301
  c.train.checkpoint_every = 5500
  c.train.eval_every = 5500
  return c
