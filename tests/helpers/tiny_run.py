"""A tiny trained run for the register tests: ACDC-style phantoms on a small "custom" model
grid, offline `mind` features (feature_extract.pipeline.extract), a few training steps
(loop.train_and_evaluate). Built once per test session (conftest's ``run_dir``)."""
import glob

from feature_extract import backbones
from feature_extract import pipeline
from feature_extract.datasets import custom as custom_pairs
from feature_extract.synthetic import phantoms
from fmir_jax.train import loop
from tests.helpers.tiny_model import tiny_config

GRID = dict(shape=(32, 32, 8), spacing_mm=(3.5, 3.5, 10.0))
INPLANE = (80, 96)


def build(data_root: str, workdir: str) -> str:
  """Writes the phantoms and features under data_root, trains into workdir; returns it."""
  rows = ['moving,fixed,moving_label,fixed_label,split']
  for pid in (1, 2, 18):
    phantoms.write_acdc_phantoms(data_root, 1, seed=0, first_id=pid, inplane_size=INPLANE)
    imgs = sorted(glob.glob(f'{data_root}/training/patient{pid:03d}/*frame??.nii.gz'))
    labs = [p.replace('.nii.gz', '_gt.nii.gz') for p in imgs]
    split = 'val' if pid == 18 else 'train'
    rows += [f'{imgs[0]},{imgs[1]},{labs[0]},{labs[1]},{split}',
             f'{imgs[1]},{imgs[0]},{labs[1]},{labs[0]},{split}']
  with open(f'{data_root}/pairs.csv', 'w') as f:
    f.write('\n'.join(rows) + '\n')
  sources = custom_pairs.scan(f'{data_root}/pairs.csv', **GRID)
  store = f'{data_root}/features'
  pipeline.extract(sources, custom_pairs.pairs(sources), backbones.load('mind', device='cpu'),
                      store, input_size=64, resize='upsample', dataset='custom',
                      dataset_options=dict(GRID), progress=False)
  c = tiny_config(store, feature_channels=8, num_steps=4, eval_every=4, checkpoint_every=4,
                  eval_pairs=1)
  loop.train_and_evaluate(c, workdir, quiet=True)
  return workdir
