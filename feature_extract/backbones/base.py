"""The record every backbone loads into, its names and aliases, and the device/dtype rules.

A loader (``vit``, ``sam``, ``mind``) returns an ``EncoderSpec``; ``backbones.load`` turns it
into a ``Backbone``: (B, 3, K, K) normalised slices -> (B, K/p, K/p, c) features.

Precision: ``float32`` everywhere; ``bfloat16`` autocast on CUDA and on CPU; ``float16``
autocast on CUDA only (refused on CPU, where half matmuls are slow or unsupported).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import numpy as np
import torch

from fmir_jax.core.errors import BackboneError

BACKBONES = ('dinov3', 'dinov2', 'sam', 'mind')
ALIASES = {'dino': 'dinov3', 'sam-b': 'sam'}   # what people call them -> BACKBONES name
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class EncoderFacts:
  """What an encoder is, as the feature store's manifest records it: its kind and layer,
  patch size p, channels c, prefix tokens, and the per-channel slice normalisation."""
  model_type: str
  layer: int | str
  patch_size: int
  channels: int
  num_prefix_tokens: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  norm_source: str
  required_input_size: int | None


@dataclasses.dataclass(frozen=True)
class EncoderSpec(EncoderFacts):
  """What a loader found: the encoder and its facts.

  ``forward`` maps (B, 3, K, K) float32 slices to (B, K/p, K/p, channels) features.
  ``module``/``model_dir`` are None for a weight-free encoder, which then gives its own
  ``weights_sha256`` (a digest of its parameters); otherwise the weight files are hashed.
  """
  module: torch.nn.Module | None
  model_dir: str | None
  forward: Callable[[torch.Tensor], torch.Tensor] = dataclasses.field(repr=False)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  weights_sha256: str | None = None

  def facts(self) -> dict[str, Any]:
    """The ``EncoderFacts`` fields, by name (a ``Backbone`` is made of them)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(EncoderFacts)}


@dataclasses.dataclass(frozen=True)
class Backbone(EncoderFacts):
  """A frozen encoder: (B, 3, K, K) normalised slices -> (B, K/p, K/p, c) features.

  ``describe()`` gives the manifest's ``backbone`` record; ``mean``/``std`` are the per-channel
  normalisation the slices must have.
  """
  name: str
  label: str
  weights: str | None
  weights_sha256: str
  revision: str | None
  device: torch.device
  dtype: str
  forward: Callable[[torch.Tensor], torch.Tensor] = dataclasses.field(repr=False)
  module: torch.nn.Module | None = dataclasses.field(default=None, repr=False)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def describe(self) -> dict[str, Any]:
    record = {'name': self.name, 'label': self.label, 'weights': self.weights,
              'weights_sha256': self.weights_sha256, 'revision': self.revision,
              'model_type': self.model_type, 'num_prefix_tokens': self.num_prefix_tokens}
    record.update(self.extra)
    return record

  def check_input_size(self, input_size: int) -> None:
    """Raises BackboneError if K does not suit this encoder."""
    if self.required_input_size is not None and input_size != self.required_input_size:
      raise BackboneError(
          f'{self.label}: --input-size {input_size} is not supported. transformers\' SAM '
          f'checks the input size and has no positional-embedding interpolation, so K must be '
          f'{self.required_input_size} (the checkpoint\'s image_size). Use --input-size '
          f'{self.required_input_size}.')
    if input_size % self.patch_size:
      lo = input_size - input_size % self.patch_size
      raise BackboneError(f'{self.label}: --input-size {input_size} is not a multiple of the '
                          f'patch size {self.patch_size}; use {lo} or {lo + self.patch_size}.')

  def __call__(self, slices: torch.Tensor) -> np.ndarray:
    """(B, 3, K, K) float32 slices -> (B, K/p, K/p, c) float32 numpy features."""
    if slices.ndim != 4 or slices.shape[1] != 3 or slices.shape[2] != slices.shape[3]:
      raise BackboneError(f'{self.label}: slices must be (B, 3, K, K), got {tuple(slices.shape)}.')
    self.check_input_size(int(slices.shape[-1]))
    x = slices.to(self.device, torch.float32)
    with torch.inference_mode(), _autocast(self.device, self.dtype):
      feats = self.forward(x)
    grid = slices.shape[-1] // self.patch_size
    expected = (slices.shape[0], grid, grid, self.channels)
    if tuple(feats.shape) != expected:
      raise BackboneError(f'{self.label}: encoder returned {tuple(feats.shape)}, expected '
                          f'{expected}.')
    return feats.float().cpu().numpy()


def canonical_name(name: str) -> str:
  """A BACKBONES name for `name` or one of its ALIASES (case-insensitive).

  Raises:
    BackboneError: unknown name; the message suggests the closest valid one.
  """
  key = name.strip().lower()
  if key in BACKBONES:
    return key
  if key in ALIASES:
    return ALIASES[key]
  close = difflib.get_close_matches(key, BACKBONES + tuple(ALIASES), n=1)
  hint = f"Did you mean '{ALIASES.get(close[0], close[0])}'? " if close else ''
  raise BackboneError(f"--backbone: unknown backbone {name!r}. {hint}Choose one of "
                      f"{', '.join(BACKBONES)} (aliases: {alias_text()}).")


def alias_text() -> str:
  """'dino = dinov3, sam-b = sam' (for help and error messages)."""
  return ', '.join(f'{a} = {n}' for a, n in ALIASES.items())


# --------------------------------------------------------------------------- device / dtype


def resolve_device(device: str) -> tuple[torch.device, str]:
  """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (torch.device, human-readable description)."""
  if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device.startswith('cuda'):
    if not torch.cuda.is_available():
      raise BackboneError('--device cuda was requested but no CUDA GPU is visible to torch '
                          f'({torch.__version__}); use --device cpu or install a CUDA torch build.')
    dev = torch.device(device)
    return dev, f'{dev} ({torch.cuda.get_device_name(dev)})'
  if device != 'cpu':
    raise BackboneError(f'--device must be auto, cpu or cuda[:N], got {device!r}.')
  return torch.device('cpu'), f'cpu ({torch.get_num_threads()} threads)'


def check_dtype(dtype: str, device: torch.device) -> None:
  if dtype not in DTYPES:
    raise BackboneError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.')
  if dtype == 'float16' and device.type == 'cpu':
    raise BackboneError('--dtype float16 is not supported on CPU; use float32 or bfloat16.')


def _autocast(device: torch.device, dtype: str):
  if dtype == 'float32':
    return torch.autocast(device.type, enabled=False)
  return torch.autocast(device.type, dtype=DTYPES[dtype])
