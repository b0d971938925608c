"""The tiny model config the training tests share (no torch at import: subprocesses use it)."""
from configs import demo


def tiny_config(store: str, *, feature_channels: int = 4, **train):
  """configs/demo.py shrunk to compile in seconds (2 levels, n=4), trained on ``store``:
  6 steps, checkpoints every 2, validated on 2 pairs at the end; ``train``: config.train
  fields to change."""
  c = demo.get_config()
  c.data.train_stores = (store,)
  c.feature_channels = feature_channels
  c.model.n = 4
  c.model.levels = 2
  c.model.integration_steps = 2
  c.loss.ncc_windows = (5, 3)
  c.train.num_steps = 6
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.eval_every = 6
  c.train.eval_pairs = 2
  c.optim.lr = 3e-3
  c.data.prefetch = 1
  for k, v in train.items():
    setattr(c.train, k, v)
  return c
