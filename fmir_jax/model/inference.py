"""Inference with a trained head: the jit-compiled forward on the PCA path, the arrays it
reads of a volume, the run's feature normalisation and its PCA basis on device and on stores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmir_jax.core import errors
from fmir_jax.core import store as store_lib
from fmir_jax.model import channel_reg
from fmir_jax.model import network as model_lib
from fmir_jax.model import slabs
from fmir_jax.model.channel_reg import regularise_channels

ConfigError = errors.ConfigError


def make_predict(graphdef, *, c_prime: int, factors=None, slab_rows='auto',
                 finest_level: int = 0):
  """jit-compiled ``predict(params, moving, fixed, pca) -> disp (B,H,W,D,3)`` (PCA path).

  slab_rows: rows per slab for the level-0 compressor and head (``slabs.forward_in_slabs``;
  same result, bounded memory), None for whole volumes, or 'auto' (``slabs.auto_slab_rows``:
  slabs only when a volume's widest level-0 activation would pass 256 MiB).
  finest_level: the finest pyramid level the head runs (``FMIR.level_loop``; 0: all).
  """

  def fn(params, moving, fixed, pca):
    model = nnx.merge(graphdef, params)
    fm, ff = regularise_channels(moving['feat'], fixed['feat'], key=None, c_prime=c_prime,
                                 random_selection=False, pca=pca)
    moving, fixed = dict(moving, feat=fm), dict(fixed, feat=ff)
    rows = slab_rows
    if rows == 'auto':
      whole = model.cfg.head_instance_norm or model.cfg.finest_level
      rows = None if whole else slabs.auto_slab_rows(
          moving['image'].shape[1:4], moving['image'].shape[0], model.cfg.n)
    if rows is None:
      return model(moving, fixed, factors=factors, finest=finest_level).disp
    return slabs.forward_in_slabs(model, moving, fixed, rows=rows, factors=factors,
                                  finest=finest_level).disp

  return jax.jit(fn)


def model_inputs(volume_item: dict) -> dict:
  """The arrays the model reads from a data.volume_item (adds nothing, drops labels)."""
  return {k: volume_item[k] for k in model_lib.INPUT_KEYS}


# ------------------------------------------------------------------------------- PCA on stores

def fit_pca(stores, c_prime: int, split: str = 'train', max_volumes: int = 0,
            progress=None, fit: str = 'centred') -> channel_reg.PCABasis:
  """PCA of the training stores' patch-grid features (float64 streaming sums).

  fit: ``channel_reg.Norm.fit`` ('centred', 'uncentred' or 'standardised').
  """
  c = stores[0].header['channels']
  acc = channel_reg.PCAAccumulator(c)
  keys = [(st, k) for st in stores for k in st.keys(split)]
  if max_volumes:
    keys = keys[:max_volumes]
  if not keys:
    paths = ', '.join(str(st.path) for st in stores)
    raise store_lib.StoreError(f'{paths}: no {split!r} volumes to fit the PCA basis on; '
                               f'extract features for the {split} split')
  for st, k in (progress(keys) if progress else keys):
    acc.update(np.asarray(st.features(k)))
  return acc.finalize(c_prime, fit=fit)


def channel_norm(config, override: str = '', run: str = 'the run') -> channel_reg.Norm:
  """The run's feature normalisation (``config.channel_norm``; runs before it: 'paper').

  override: another normalisation to see the run through at inference; it must share the
    run's PCA fit (``standardise`` and ``matched`` train identically). ``run`` names the
    run in the error.
  """
  own_name = config.get('channel_norm', 'paper')
  for name, where in ((own_name, '--config.channel_norm'), (override, '--channel_norm')):
    if name and name not in channel_reg.NORMS:
      raise ConfigError(f'unknown channel_norm {name!r} ({where}); use one of '
                        f'{sorted(channel_reg.NORMS)}')
  own = channel_reg.norm_of(own_name)
  if not override:
    return own
  norm = channel_reg.norm_of(override)
  if norm.fit != own.fit:
    same = sorted(k for k, v in channel_reg.NORMS.items() if v.fit == own.fit)
    raise ConfigError(f'--channel_norm {override} needs a {norm.fit} PCA but {run} was trained '
                      f'with {own_name} ({own.fit}); use one of {same}')
  return norm


def pca_to_device(basis: channel_reg.PCABasis | None, norm: channel_reg.Norm | None = None):
  """The device maps of ``channel_reg.head_inputs`` (norm None: the basis's own fit, raw
  draw, no whitening); None stays None."""
  if basis is None:
    return None
  if norm is None:
    norm = channel_reg.Norm(basis.fit, whiten=False, draw_standardised=False)
  if norm.fit != basis.fit:
    raise errors.RunError(f'PCA basis is a {basis.fit} fit but channel_norm needs {norm.fit}; '
                        'refit it (delete the pca/ file of the run)')
  return {k: jnp.asarray(v) for k, v in channel_reg.head_inputs(basis, norm).items()}
