"""Volume (H, W, D) -> normalised K x K encoder slices, and the geometry back to voxels.

Per paper §2.2: the slice axis is the last one; each (H, W) plane is repeated to 3 channels and
brought to K x K by one of two modes:

* ``upsample``: bilinear resize by K / max(H, W) (aspect kept), then centred zero padding of
  the short side (authors' cardiac practice: 128 x 128 -> 256 or 512).
* ``pad``: centred zero padding to a square canvas (``pad_to``, default max(H, W)), then
  bilinear resize to K (authors' abdomen practice: 96 x 80 -> 128 x 128 -> 256).

Then each channel is normalised ((x - mean) / std) and multiplied by the non-padding mask, so
padding is exactly zero after normalisation (authors' practice).

Bilinear is torch's ``interpolate(mode="bilinear", align_corners=False, antialias=False)``: an
output pixel x samples the input at (x + 0.5) * N / n - 0.5. Hence voxel i of an axis of size N
resized to n = N*r pixels starting ``pad`` pixels into the K x K input sits at input pixel
``pad + (i + 0.5) * r - 0.5``; ``fmir_jax.core.patches.patch_geometry`` turns that into patch-grid
coordinates.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmir_jax.core import errors
from fmir_jax.core import patches

RESIZE_MODES = ('upsample', 'pad')


class SlicingError(errors.UserError, ValueError):
  """Bad slicing arguments or input volume (message names the argument and the fix)."""


@dataclasses.dataclass(frozen=True)
class SliceLayout:
  """Where an (H, W) plane lands inside the K x K encoder input.

  in_shape: (H, W) voxels.
  input_size: K pixels.
  resized: (n_y, n_x) size of the resized plane content in input pixels (= N * r).
  pad_px: (2,) input pixels from the input's top/left edge to the content's edge.
  resize_factor: (2,) input pixels per voxel, r, per in-plane array axis.
  square_pad: (2,) voxels of zero padding added before resizing (``pad`` mode), else (0, 0).
  """
  in_shape: tuple[int, int]
  input_size: int
  mode: str
  resized: tuple[int, int]
  pad_px: tuple[float, float]
  resize_factor: tuple[float, float]
  square_pad: tuple[int, int]

  def geometry(self, patch_size: int) -> dict[str, list[float]]:
    """{"offset": [oy, ox], "scale": [sy, sx]}: voxel i -> patch coordinate offset + scale*i."""
    return patches.patch_geometry(self.pad_px, self.resize_factor, patch_size)

  def mask(self) -> np.ndarray:
    """(K, K) bool: input pixels whose centre lies inside the volume content."""
    axes = []
    for a in range(2):
      centres = np.arange(self.input_size) + 0.5
      lo = self.pad_px[a]
      axes.append((centres >= lo) & (centres < lo + self.in_shape[a] * self.resize_factor[a]))
    return axes[0][:, None] & axes[1][None, :]

  def to_dict(self) -> dict[str, object]:
    return dataclasses.asdict(self)


def slice_layout(in_shape: Sequence[int], input_size: int, mode: str,
                 pad_to: int | None = None) -> SliceLayout:
  """Placement of an (H, W) plane inside the K x K input.

  Args:
    in_shape: (H, W) voxels.
    input_size: K pixels.
    mode: "upsample" or "pad".
    pad_to: ``pad`` mode only: side of the square zero-padded canvas in voxels (>= max(H, W));
      default max(H, W).
  """
  if mode not in RESIZE_MODES:
    raise SlicingError(f'--resize must be one of {RESIZE_MODES}, got {mode!r}.')
  if input_size < 1:
    raise SlicingError(f'--input-size must be positive, got {input_size}.')
  h, w = (int(s) for s in in_shape)
  if h < 1 or w < 1:
    raise SlicingError(f'Slice shape must be positive, got {(h, w)}.')
  k = int(input_size)
  if pad_to is not None and mode != 'pad':
    raise SlicingError(f'--pad-to only applies to --resize pad (got --resize {mode}).')
  if pad_to is not None and pad_to < max(h, w):
    raise SlicingError(f'--pad-to {pad_to} is smaller than the slice ({h}x{w}); use at least '
                       f'{max(h, w)} or leave it unset.')
  if mode == 'upsample':
    r = k / max(h, w)
    resized = (min(k, max(1, round(h * r))), min(k, max(1, round(w * r))))
    pad = ((k - resized[0]) // 2, (k - resized[1]) // 2)
    return SliceLayout((h, w), k, mode, resized, (float(pad[0]), float(pad[1])),
                       (resized[0] / h, resized[1] / w), (0, 0))
  side = int(pad_to) if pad_to is not None else max(h, w)
  square_pad = ((side - h) // 2, (side - w) // 2)
  r = k / side
  return SliceLayout((h, w), k, mode, (round(h * r), round(w * r)),
                     (square_pad[0] * r, square_pad[1] * r), (r, r), square_pad)


def _resize(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
  """(N, 1, h, w) -> (N, 1, *size) bilinear, align_corners=False, no antialias."""
  if tuple(planes.shape[-2:]) == tuple(size):
    return planes
  return F.interpolate(planes, size=size, mode='bilinear', align_corners=False, antialias=False)


def volume_to_slices(image: np.ndarray, input_size: int, mode: str, mean: Sequence[float],
                     std: Sequence[float], pad_to: int | None = None
                     ) -> tuple[torch.Tensor, SliceLayout]:
  """Turns a volume into normalised, masked encoder inputs.

  Args:
    image: (H, W, D) float32 intensities (typically in [0, 1]); slices along the last axis.
    input_size: K, encoder input size in pixels.
    mode: "upsample" or "pad" (see module docstring).
    mean, std: (3,) per-channel normalisation.
    pad_to: ``pad`` mode canvas side in voxels (see slice_layout).

  Returns:
    slices: (D, 3, K, K) float32 torch tensor, zero outside the content mask.
    layout: the SliceLayout (geometry, mask).
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise SlicingError(f'Volume image must be (H, W, D), got shape {image.shape}.')
  if not np.all(np.isfinite(image)):
    raise SlicingError('Volume image contains NaN/inf; fix the dataset reader output.')
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise SlicingError(f'Normalisation needs 3 means and 3 positive stds, got {mean}, {std}.')
  h, w, d = image.shape
  layout = slice_layout((h, w), input_size, mode, pad_to)
  k = layout.input_size
  planes = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), np.float32))
  planes = planes[:, None]                                                  # (D, 1, H, W)
  if mode == 'pad':
    side = round(k / layout.resize_factor[0])
    sy, sx = layout.square_pad
    planes = F.pad(planes, (sx, side - w - sx, sy, side - h - sy))
    planes = _resize(planes, (k, k))
  else:
    planes = _resize(planes, layout.resized)
    py, px = (int(p) for p in layout.pad_px)
    planes = F.pad(planes, (px, k - layout.resized[1] - px, py, k - layout.resized[0] - py))
  mask = torch.from_numpy(layout.mask()).to(planes.dtype)
  mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
  std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
  slices = (planes.expand(d, 3, k, k) - mean_t) / std_t * mask
  return slices.contiguous(), layout
