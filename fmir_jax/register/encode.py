"""The frozen 2D encoder for registration: the run's encoder (or the one asked for), and the
encoder geometry that brings slices of any grid to the training scale.

The encoder is PyTorch (``feature_extract``), imported inside the functions that load or
run it, so importing this module imports neither torch nor jax.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from fmir_jax.core import patches
from fmir_jax.core import store as store_lib
from fmir_jax.core.errors import RunError
from fmir_jax.train.runs import RunInfo


def load_backbone(run: RunInfo, name: str | None = None, weights: str | None = None,
                  layer: int | str | None = None, device: str = 'auto',
                  dtype: str = 'float32'):
  """(Backbone, its store-style header): the run's encoder, or the one requested."""
  from feature_extract import backbones, pipeline   # torch: only when an encoder is loaded
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
  from feature_extract import pipeline   # torch: only when slices are encoded
  feats, geo = pipeline.encode_volume(image, bb, input_size=encoding.input_size,
                                         resize=encoding.resize, pad_to=encoding.pad_to,
                                         batch_size=batch_size)
  return dict(patches.model_inputs(image, feats.astype(np.float32), geo, batch=True))
