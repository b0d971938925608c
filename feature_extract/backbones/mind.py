"""``mind``: an offline, weight-free 2D MIND-SSC-style self-similarity descriptor.

It is NOT a foundation model and is labelled so everywhere (``MIND_LABEL`` in messages and
in the manifest). It needs no weights and no network, is invariant to affine intensity
changes, and serves as the offline baseline and the backbone of the tests and the demo.
Features are the descriptor averaged over ``patch_size`` x ``patch_size`` patches.
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch
import torch.nn.functional as F

from feature_extract.backbones import base
from fmir_jax.core.errors import BackboneError

MIND_LABEL = 'mind (offline, not a foundation model)'


def _ring_pairs(d: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """12 offset pairs at dilation d: 8 adjacent pairs of the 8-ring + 4 pairs of the 4-ring."""
  ring = [(-d, -d), (-d, 0), (-d, d), (0, d), (d, d), (d, 0), (d, -d), (0, -d)]
  adjacent = [(ring[i], ring[(i + 1) % 8]) for i in range(8)]
  cross = [(ring[i], ring[(i + 2) % 8]) for i in (1, 3, 5, 7)]
  return adjacent + cross


def mind_ssc_2d(image: torch.Tensor, dilations: Sequence[int] = (1, 2, 4),
                radius: int = 1) -> torch.Tensor:
  """2D MIND-SSC-style descriptor.

  Args:
    image: (B, 1, H, W) intensities.
    dilations: neighbourhood distances in pixels; 12 channels per dilation.
    radius: half-width of the box over which patch SSDs are averaged.

  Returns:
    (B, 12 * len(dilations), H, W) in [0, 1]: exp(-(SSD - min SSD) / var), var = mean SSD
    clamped to [1e-3, 1e3] x its image mean, normalised by the per-pixel max (per dilation).
    Invariant to intensity changes a*x + b (a != 0) up to floating-point error.

  The SSD of a pair of offsets (a, b) at p is box((x(q + a) - x(q + b))^2)(p), which is the
  box-filtered squared difference at offset o = a - b read at p + b (at p + a for -o): the
  12 pairs of a dilation need 4 box filters, (0, d), (d, 0), (d, d) and (d, -d), not 12
  (same numbers, bit for bit; half the time).
  """
  big = max(dilations)
  lo = big + radius                    # squared differences on positions [-lo, H + lo)
  pad = big + lo                       # replicate padding that every offset view needs
  padded = F.pad(image, (pad,) * 4, mode='replicate')
  h, w = image.shape[-2:]

  def view(off):                       # x(q + off) for q in [-lo, H + lo) x [-lo, W + lo)
    return padded[..., big + off[0]:big + off[0] + h + 2 * lo,
                  big + off[1]:big + off[1] + w + 2 * lo]

  offsets = [o for d in dilations for o in ((0, d), (d, 0), (d, d), (d, -d))]
  which = {o: i for i, o in enumerate(offsets)}
  # Box filter over the valid window: positions [-big, H + big).
  boxed = F.avg_pool2d(torch.cat([(view(o) - view((0, 0))) ** 2 for o in offsets], dim=1),
                       2 * radius + 1, stride=1)
  out = []
  for d in dilations:
    ssd = []
    for a, b in _ring_pairs(d):
      o = (a[0] - b[0], a[1] - b[1])
      k, at = (which[o], b) if o in which else (which[(-o[0], -o[1])], a)
      ssd.append(boxed[:, k:k + 1, big + at[0]:big + at[0] + h, big + at[1]:big + at[1] + w])
    ssd = torch.cat(ssd, dim=1)                                               # (B, 12, H, W)
    ssd = ssd - ssd.amin(dim=1, keepdim=True)
    var = ssd.mean(dim=1, keepdim=True)
    ref = var.mean(dim=(2, 3), keepdim=True)
    var = torch.maximum(torch.minimum(var, ref * 1000.0), ref * 0.001)
    var = torch.clamp(var, min=torch.finfo(var.dtype).tiny)
    desc = torch.exp(-ssd / var)
    out.append(desc / desc.amax(dim=1, keepdim=True))
  return torch.cat(out, dim=1)


def load_spec(layer: int | str | None, patch_size: int, dilations: Sequence[int],
              radius: int) -> base.EncoderSpec:
  """The descriptor pooled to (B, K/patch_size, K/patch_size, 12 * len(dilations)).

  ``weights_sha256`` is the sha256 of its parameters (there are no weight files).
  """
  if layer not in (None, 'last'):
    raise BackboneError(f'{MIND_LABEL}: has no layers; drop --layer (got {layer!r}).')
  params = {'dilations': [int(d) for d in dilations], 'radius': int(radius),
            'pooling': f'mean over {patch_size}x{patch_size} patches'}

  def forward(x: torch.Tensor) -> torch.Tensor:
    desc = mind_ssc_2d(x[:, :1].float(), dilations, radius)
    return F.avg_pool2d(desc, patch_size).permute(0, 2, 3, 1)

  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
  return base.EncoderSpec(
      module=None, model_dir=None, model_type='mind_ssc_2d', layer='last',
      patch_size=patch_size, channels=12 * len(dilations), num_prefix_tokens=0,
      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
      norm_source='none (MIND is invariant to affine intensity changes)',
      required_input_size=None, forward=forward, extra=params, weights_sha256=digest)
