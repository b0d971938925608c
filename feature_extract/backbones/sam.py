"""SAM image-encoder adapter: the neck output (256 channels for the released models).

``sam``: default facebook/sam-vit-base, transformers ``SamVisionModel``. transformers' SAM
checks the input size and has no positional-embedding interpolation, so K must be the
config's image_size (1024); ``Backbone.check_input_size`` says so before a forward pass.
"""
from __future__ import annotations

import torch

from feature_extract.backbones import base
from feature_extract.backbones import hub
from fmir_jax.core.errors import BackboneError


def load_spec(name: str, weights: str, layer: int | str | None) -> base.EncoderSpec:
  """A SAM checkpoint's vision encoder; ``layer`` must be None or "last" (the neck)."""
  # transformers only when SAM is loaded: MIND, names and --help stay light.
  import transformers  # pylint: disable=g-import-not-at-top
  if layer not in (None, 'last'):
    raise BackboneError(f'sam: --layer {layer!r} is not supported; SAM features are the neck '
                        'output (256 channels): use --layer last.')
  model, model_dir = hub.load_pretrained(transformers.SamVisionModel, name, weights)
  cfg = model.config
  mean, std, source = hub.normalisation(name, model_dir)

  def forward(x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state.permute(0, 2, 3, 1)   # (B, h, w, 256)

  return base.EncoderSpec(
      module=model, model_dir=model_dir, model_type=cfg.model_type, layer='last',
      patch_size=cfg.patch_size, channels=cfg.output_channels, num_prefix_tokens=0, mean=mean,
      std=std, norm_source=source, required_input_size=cfg.image_size, forward=forward,
      extra={'output': 'neck'})
