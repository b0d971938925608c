"""DINOv3 and DINOv2 ViT adapters: patch tokens of one layer on the patch grid.

* ``dinov3``: DINOv3 ViT (default facebook/dinov3-vitb16-pretrain-lvd1689m, gated),
  transformers ``DINOv3ViTModel``.
* ``dinov2``: DINOv2 ViT (default facebook/dinov2-base), ``Dinov2Model`` (or the -reg variant).

Patch size, hidden size and the number of CLS + register tokens come from the model config.
``layer``: an int indexes ``hidden_states`` (0 = embeddings, i = output of block i; blocks
after i are not run), "last" = ``last_hidden_state`` (after the final norm).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from feature_extract.backbones import base
from feature_extract.backbones import hub
from fmir_jax.core.errors import BackboneError
from fmir_jax.core.errors import parse_layer

MODEL_TYPES = {
    'dinov3': ('dinov3_vit',),
    'dinov2': ('dinov2', 'dinov2_with_registers'),
}


def _vit_forward(model: Any, layer: int | str, num_prefix: int, patch: int
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
  """Runs a ViT to `layer` and returns patch tokens as (B, K/p, K/p, c)."""

  def forward(x: torch.Tensor) -> torch.Tensor:
    if layer == 'last':
      tokens = model(pixel_values=x).last_hidden_state
    else:
      tokens = model(pixel_values=x, output_hidden_states=True).hidden_states[layer]
    grid = x.shape[-1] // patch
    if tokens.shape[1] != num_prefix + grid * grid:
      raise BackboneError(f'Token count {tokens.shape[1]} != {num_prefix} prefix + {grid}x{grid} '
                          'patches; the model config does not describe this checkpoint.')
    return tokens[:, num_prefix:, :].reshape(x.shape[0], grid, grid, tokens.shape[-1])

  return forward


def _truncate_blocks(model: Any, layer: int | str) -> None:
  """Keeps only the blocks needed for hidden_states[layer] (later ones do not affect it)."""
  if layer == 'last':
    return
  encoder = model.encoder if hasattr(model, 'encoder') else model.model
  encoder.layer = encoder.layer[:max(layer, 1)]  # hidden_states needs >= 1 block to be recorded


def load_spec(name: str, weights: str, layer: int | str | None) -> base.EncoderSpec:
  """A ``dinov3`` or ``dinov2`` checkpoint, truncated after ``layer`` (None = "last")."""
  # transformers only when a ViT is loaded: MIND, names and --help stay light.
  import transformers  # pylint: disable=g-import-not-at-top
  cls = transformers.DINOv3ViTModel if name == 'dinov3' else transformers.AutoModel
  model, model_dir = hub.load_pretrained(cls, name, weights)
  cfg = model.config
  if cfg.model_type not in MODEL_TYPES[name]:
    raise BackboneError(f'--weights {weights}: model_type {cfg.model_type!r} is not a {name} '
                        f'checkpoint (expected {MODEL_TYPES[name]}).')
  patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
  num_prefix = 1 + int(getattr(cfg, 'num_register_tokens', 0) or 0)
  layer = parse_layer('last' if layer is None else layer, cfg.num_hidden_layers, name)
  _truncate_blocks(model, layer)
  mean, std, source = hub.normalisation(name, model_dir)
  return base.EncoderSpec(
      module=model, model_dir=model_dir, model_type=cfg.model_type, layer=layer,
      patch_size=patch, channels=cfg.hidden_size, num_prefix_tokens=num_prefix, mean=mean,
      std=std, norm_source=source, required_input_size=None,
      forward=_vit_forward(model, layer, num_prefix, patch),
      extra={'num_hidden_layers': cfg.num_hidden_layers})
