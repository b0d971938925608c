"""A trained run as inference needs it: config, parameters, the encoder that made its
features, its PCA basis, and the encoder geometry for any registration grid.

The frozen 2D encoder is PyTorch (``feature_extract``), imported inside the functions that
load or run it, so importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from fmir_jax.core import errors
from fmir_jax.train.checkpoint import RunError  # noqa: F401  (the one error type for runs)


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """A loaded training run: config, model graph and parameters, store header, step."""
  workdir: str
  config: Any
  graphdef: Any
  params: Any
  info: dict[str, Any]
  step: int

  @property
  def header(self) -> dict[str, Any]:
    """The header of the feature store the run was trained on."""
    return self.info['store_header']

  @property
  def model(self):
    """The run's typed model config (``model.FMIRConfig``, from run.json)."""
    from fmir_jax.model import network as model_lib
    return model_lib.FMIRConfig.from_dict(self.info['model'])

  @property
  def dataset(self) -> tuple[str, dict[str, Any]]:
    """(reader name, reader options) of the training store."""
    from fmir_jax.core import store as store_lib
    ds = self.header.get('dataset', {})
    return (store_lib.dataset_name(self.header) or '',
            dict(ds.get('options') or {}) if isinstance(ds, dict) else {})


def load_run(workdir: str, which: str = 'best') -> RunInfo:
  """Loads a training run directory (reads only) with clear errors: RunError, one line
  naming the file and the fix, for a run.json that does not describe a model, a checkpoint
  whose files changed since they were written (sha256), one of another shape, and a shipped
  head whose files do not match its card."""
  from fmir_jax.train import checkpoint as ckpt
  from fmir_jax.evaluate import evaluation
  if not os.path.isdir(workdir):
    raise RunError(f'--checkpoint {workdir}: directory does not exist. Pass the --workdir of '
                   'a training run (train.py).')
  if not os.path.exists(os.path.join(workdir, ckpt.RUN_FILE)):
    raise RunError(f'--checkpoint {workdir}: no {ckpt.RUN_FILE}; this is not an fmir-jax '
                   'training run directory (train.py --workdir=... creates it).')
  problem = ckpt.shipped_head_problem(workdir)   # its card records its files' sha256
  if problem:
    raise RunError(f'--checkpoint {workdir}: {problem}. Reinstall fmir-jax (its shipped head), '
                   'or ship the run again: python -m fmir_jax.general --out OUT --ship DIR')
  try:
    config, graphdef, params, info, step = evaluation.load_run(workdir, which)
  except errors.UserError as e:
    raise RunError(f'--checkpoint {workdir}: {e}') from e
  return RunInfo(workdir, config, graphdef, params, info, int(step))


def load_backbone(run: RunInfo, name: str | None = None, weights: str | None = None,
                  layer: int | str | None = None, device: str = 'auto',
                  dtype: str = 'float32'):
  """(Backbone, its store-style header): the run's encoder, or the one requested."""
  from feature_extract import backbones
  from feature_extract import pipeline
  from fmir_jax.core import store as store_lib
  header = run.header
  bb_rec = header.get('backbone', {})
  name = backbones.canonical_name(name) if name else bb_rec.get('name')
  same = name == bb_rec.get('name') and weights is None and layer is None
  if name == 'mind':
    bb = backbones.load('mind', None, layer, device=device, dtype=dtype,
                        mind_patch_size=int(header['patch_size']) if same else 4,
                        mind_dilations=tuple(bb_rec.get('dilations', (1, 2, 4))) if same
                        else (1, 2, 4),
                        mind_radius=int(bb_rec.get('radius', 1)) if same else 1)
  else:
    bb = backbones.load(name, weights or (bb_rec.get('weights') if same else None),
                        layer if layer is not None else (header.get('layer') if same else None),
                        device=device, dtype=dtype)
  dataset, options = run.dataset
  new_header = pipeline.make_header(
      bb, input_size=int(header['input_size']) if same else bb.required_input_size or 256,
      resize=header.get('resize', 'upsample'), pad_to=header.get('pad_to'),
      feature_dtype=header.get('feature_dtype', 'float16'), dataset=dataset,
      dataset_options=options)
  if same:
    try:
      store_lib.check_compatible(header, new_header, source=f'encoder {bb.label}')
    except store_lib.StoreError as e:
      raise RunError(f'{e} (the run {run.workdir} records weights sha256 '
                     f'{bb_rec.get("weights_sha256")}; pass the same --weights).') from e
  return bb, new_header


def pca_basis(run: RunInfo, header: dict[str, Any]):
  """The PCA basis of ``header``'s feature space saved in the run, or a clear refusal."""
  from fmir_jax.train import checkpoint as ckpt
  basis = ckpt.load_pca(run.workdir, header)
  if basis is None:
    bb = header.get('backbone', {})
    raise RunError(
        f'--checkpoint {run.workdir}: no PCA basis for backbone {bb.get("name")} (layer '
        f'{header.get("layer")}) in {ckpt.pca_path(run.workdir, header)}. Extract features of '
        'some training images with this backbone (feature_extract/run.py --backbone ...) and '
        f'fit one with: python eval.py --workdir={run.workdir} --features=STORE '
        '--pca_store=STORE (STORE: features of training images with this backbone; each '
        'backbone gets its own basis).')
  c_prime = run.model.feature_channels
  if basis.components.shape != (int(header['channels']), c_prime):
    raise RunError(f'{run.workdir}: PCA basis has shape {basis.components.shape}, expected '
                   f'({header["channels"]}, {c_prime}).')
  return basis


# --------------------------------------------------------------------------- encoder geometry


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How a grid's (H, W) slices enter the encoder: K, resize mode, pad canvas (voxels)."""
  input_size: int
  resize: str
  pad_to: int | None
  pixels_per_voxel: float


def training_pixels_per_voxel(header: dict[str, Any], train_slice: tuple[int, int]) -> float:
  """Encoder input pixels per voxel at training: K / max(H, W), or K / pad_to in pad mode."""
  k = int(header['input_size'])
  if header.get('resize') == 'pad' and header.get('pad_to'):
    return k / int(header['pad_to'])
  return k / max(train_slice)


def encoding_for(slice_shape: tuple[int, int], header: dict[str, Any],
                 train_slice: tuple[int, int] | None, required_size: int | None,
                 patch_size: int) -> Encoding:
  """The encoder input for slices of ``slice_shape`` at the training scale.

  The head learnt features at a fixed number of encoder pixels per voxel; slices of another
  size (a native grid) are brought to the same scale, so a patch covers as many voxels as
  at training. The training grid itself gets the training input unchanged. An encoder with
  one input size (SAM) gets its slice on a zero-padded canvas at that scale when it fits.
  """
  k, resize, pad_to = int(header['input_size']), header.get('resize', 'upsample'), \
      header.get('pad_to')
  if train_slice is None or tuple(slice_shape) == tuple(train_slice):
    r = k / max(slice_shape) if train_slice is None else \
        training_pixels_per_voxel(header, train_slice)
    if pad_to is not None and pad_to < max(slice_shape):
      pad_to = None
    return Encoding(k, resize, pad_to, r)
  r = training_pixels_per_voxel(header, train_slice)
  side = max(slice_shape)
  if required_size:
    canvas = int(round(required_size / r))
    if canvas >= side:
      return Encoding(required_size, 'pad', canvas, required_size / canvas)
    return Encoding(required_size, 'upsample', None, required_size / side)
  k_new = max(patch_size, int(math.ceil(r * side / patch_size)) * patch_size)
  return Encoding(k_new, 'pad' if resize == 'pad' else 'upsample', None, k_new / side)


def encode(image: np.ndarray, bb, encoding: Encoding, batch_size: int) -> dict[str, np.ndarray]:
  """(H, W, D) image in [0, 1] -> model inputs with a batch axis of 1.

  Returns {'image': (1, H, W, D), 'feat': (1, D, h, w, c), 'interp_h': (1, H, h),
  'interp_w': (1, W, w)}.
  """
  from feature_extract import pipeline
  from fmir_jax.core import patches
  feats, geo = pipeline.encode_volume(image, bb, input_size=encoding.input_size,
                                         resize=encoding.resize, pad_to=encoding.pad_to,
                                         batch_size=batch_size)
  return dict(patches.model_inputs(image, feats.astype(np.float32), geo, batch=True))
