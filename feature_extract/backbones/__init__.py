"""Frozen 2D encoders: a batch of K x K slices -> patch-grid features.

Backbones (all frozen, eval mode, no_grad), one module each:

* ``dinov3``, ``dinov2``: ViTs (``vit``), from Hugging Face checkpoints (``hub``).
* ``sam``: SAM image encoder, neck output (``sam``); needs K = the config's image_size.
* ``mind``: an offline, weight-free 2D MIND-SSC-style descriptor (``mind``). It is NOT a
  foundation model and is labelled so everywhere.

Aliases (``ALIASES``): ``dino`` = ``dinov3``, ``sam-b`` = ``sam``; ``canonical_name`` resolves
them and suggests the closest valid name for a typo. ``load`` is the entry point; the record
it returns is ``Backbone`` (``base``). transformers is imported only when a Hub checkpoint is
loaded, so names, help and MIND need torch alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

from feature_extract.backbones import hub
from feature_extract.backbones import mind
from feature_extract.backbones import sam
from feature_extract.backbones import vit
from feature_extract.backbones.base import ALIASES
from feature_extract.backbones.base import BACKBONES
from feature_extract.backbones.base import Backbone
from feature_extract.backbones.base import DTYPES
from feature_extract.backbones.base import EncoderSpec
from feature_extract.backbones.base import alias_text
from feature_extract.backbones.base import canonical_name
from feature_extract.backbones.base import check_dtype
from feature_extract.backbones.base import resolve_device
from feature_extract.backbones.hub import DEFAULT_NORMALISATION
from feature_extract.backbones.hub import DEFAULT_WEIGHTS
from feature_extract.backbones.hub import IMAGENET_MEAN
from feature_extract.backbones.hub import IMAGENET_STD
from feature_extract.backbones.hub import hash_weights
from feature_extract.backbones.mind import MIND_LABEL
from feature_extract.backbones.mind import mind_ssc_2d
from fmir_jax.core.errors import BackboneError  # re-exported: its home is fmir_jax.core.errors

__all__ = ['ALIASES', 'BACKBONES', 'Backbone', 'BackboneError', 'DEFAULT_NORMALISATION',
           'DEFAULT_WEIGHTS', 'DTYPES', 'EncoderSpec', 'IMAGENET_MEAN', 'IMAGENET_STD',
           'MIND_LABEL', 'alias_text', 'canonical_name', 'check_dtype', 'hash_weights', 'load',
           'mind_ssc_2d', 'resolve_device']

# The backbones with Hugging Face weights: name -> loader(name, weights, layer).
HUB_LOADERS: dict[str, Callable[[str, str, int | str | None], EncoderSpec]] = {
    'dinov3': vit.load_spec,
    'dinov2': vit.load_spec,
    'sam': sam.load_spec,
}
assert set(HUB_LOADERS) | {'mind'} == set(BACKBONES) == set(DEFAULT_WEIGHTS) | {'mind'}


def load(name: str, weights: str | None = None, layer: int | str | None = None, *,
         device: str = 'auto', dtype: str = 'float32', mind_patch_size: int = 4,
         mind_dilations: Sequence[int] = (1, 2, 4), mind_radius: int = 1) -> Backbone:
  """Loads a frozen backbone.

  Args:
    name: one of BACKBONES or ALIASES.
    weights: Hub id or local directory (default DEFAULT_WEIGHTS[name]); unused for mind.
    layer: int index into hidden_states or "last" (default "last").
    device: "auto" | "cpu" | "cuda[:N]".
    dtype: "float32" | "bfloat16" | "float16" (autocast; float16 only on CUDA).
    mind_*: MIND descriptor parameters (patch pooling size, dilations, box radius).

  Raises:
    BackboneError: unknown name, missing weights (with download instructions), bad layer,
      device or dtype.
  """
  name = canonical_name(name)
  dev, _ = resolve_device(device)
  check_dtype(dtype, dev)
  if name == 'mind':
    if weights is not None:
      raise BackboneError(f'{MIND_LABEL}: has no weights; drop --weights.')
    spec = mind.load_spec(layer, mind_patch_size, mind_dilations, mind_radius)
    label = MIND_LABEL
  else:
    weights = weights or DEFAULT_WEIGHTS[name]
    spec = HUB_LOADERS[name](name, weights, layer)
    label = name
  weights_sha256 = spec.weights_sha256
  if spec.module is not None:
    spec.module.eval().requires_grad_(False).to(dev)
    weights_sha256 = hash_weights(spec.model_dir)
  return Backbone(
      **spec.facts(), name=name, label=label, weights=weights, weights_sha256=weights_sha256,
      revision=hub.revision(spec.model_dir) if spec.model_dir else None, device=dev,
      dtype=dtype, forward=spec.forward, module=spec.module, extra=spec.extra)
