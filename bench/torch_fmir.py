"""Eager PyTorch reference of the FMIR registration head, written for the benchmark.

The authors' straightforward path (paper §2.3): patch-grid features are upsampled to the volume
grid, concatenated with the intensity into a (c'+1)-channel volume and fed to the 3-layer
3x3x3 compressor; a 5-level pyramid head with grid_sample warps (align_corners=True, zero
padding), scaling and squaring, trilinear align-corners pyramids and upsampling with
components x s. Losses as paper §2.5 (VoxelMorph NCC with zero-padded box sums, diffusion on
the pre-integration field, Gaussian image pyramid).

Layout: channels-first ``(B, C, H, W, D)``, spatial axes in NIfTI voxel order as in the JAX
model; displacements ``(B, 3, H, W, D)`` in voxels of their level's grid, component k along
spatial axis k. ``load_jax_params`` copies a JAX ``FMIR`` model's parameters in, so both
implementations can be checked against each other with the same weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Shape3 = tuple[int, int, int]


# ------------------------------------------------------------------------------- geometry


def pyramid_shapes(shape: Sequence[int], factors: Sequence[int], levels: int) -> list[Shape3]:
  """Level i + 1 = ceil(level i / s) per axis (as ``fmir_jax.ops.pyramid.pyramid_shapes``)."""
  shapes = [tuple(int(n) for n in shape)]
  for _ in range(levels - 1):
    shapes.append(tuple(math.ceil(n / s) for n, s in zip(shapes[-1], factors)))
  return shapes


def resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
  """Trilinear align-corners resize of (B, C, H, W, D) to spatial ``shape``."""
  if tuple(x.shape[2:]) == tuple(shape):
    return x
  return F.interpolate(x, size=tuple(shape), mode='trilinear', align_corners=True)


def _identity(shape: Sequence[int], device, dtype) -> torch.Tensor:
  """(1, 3, H, W, D) voxel coordinates, component k = index along spatial axis k."""
  axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
  return torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=0)[None]


def warp(vol: torch.Tensor, disp_vox: torch.Tensor) -> torch.Tensor:
  """Trilinear backward warp ``out[x] = vol[x + disp(x)]``, zeros outside.

  Args:
    vol: (B, C, H, W, D).
    disp_vox: (B, 3, H, W, D) voxels; every spatial axis must be longer than 1 (an axis of
      length 1 has no align-corners normalisation).

  Returns:
    (B, C, H, W, D).
  """
  shape = vol.shape[2:]
  if min(shape) < 2:
    raise ValueError(f'warp needs spatial axes of length >= 2, got {tuple(shape)}.')
  pos = _identity(shape, vol.device, disp_vox.dtype) + disp_vox
  scale = torch.tensor([2.0 / (n - 1) for n in shape], device=vol.device,
                       dtype=disp_vox.dtype).view(1, 3, 1, 1, 1)
  grid = (pos * scale - 1.0).permute(0, 2, 3, 4, 1).flip(-1)   # grid_sample wants (z, y, x)
  return F.grid_sample(vol, grid, mode='bilinear', padding_mode='zeros', align_corners=True)


def integrate(v: torch.Tensor, steps: int) -> torch.Tensor:
  """Scaling and squaring: u = v / 2**steps, then ``steps`` times u = u + warp(u, u)."""
  if steps == 0:
    return v
  u = v / (2.0 ** steps)
  for _ in range(steps):
    u = u + warp(u, u)
  return u


def compose(u_up: torch.Tensor, u_res: torch.Tensor) -> torch.Tensor:
  """phi_up o phi_res: ``u_res + warp(u_up, u_res)``."""
  return u_res + warp(u_up, u_res)


def upsample_features(feat: torch.Tensor, interp_h: torch.Tensor,
                      interp_w: torch.Tensor) -> torch.Tensor:
  """(B, D, h, w, c) patch grid -> (B, c, H, W, D) volume by the interpolation matrices."""
  return torch.einsum('bHh,bWw,bdhwc->bcHWd', interp_h, interp_w, feat)


# --------------------------------------------------------------------------------- network


class Compressor(nn.Module):
  """Three 3x3x3 conv blocks (c'+1) -> n -> 2n -> n, conv + activation."""

  def __init__(self, c_prime: int, n: int, activation: str = 'leaky_relu'):
    super().__init__()
    self.conv0 = nn.Conv3d(c_prime + 1, n, 3, padding=1)
    self.conv1 = nn.Conv3d(n, 2 * n, 3, padding=1)
    self.conv2 = nn.Conv3d(2 * n, n, 3, padding=1)
    if activation == 'leaky_relu':
      self.act = nn.LeakyReLU(0.2)
    elif activation == 'relu':
      self.act = nn.ReLU()
    else:
      raise ValueError(f'activation {activation!r}: use leaky_relu or relu')

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(B, c'+1, H, W, D) -> (B, n, H, W, D)."""
    x = self.act(self.conv0(x))
    x = self.act(self.conv1(x))
    return self.act(self.conv2(x))


class LevelBlock(nn.Module):
  """conv(2n->2n) ReLU conv(2n->27) ReLU conv(27->3) on cat(y + x, y - x)."""

  def __init__(self, n: int):
    super().__init__()
    self.conv0 = nn.Conv3d(2 * n, 2 * n, 3, padding=1)
    self.conv1 = nn.Conv3d(2 * n, 27, 3, padding=1)
    self.flow = nn.Conv3d(27, 3, 3, padding=1)

  def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = F.relu(self.conv0(torch.cat([y + x, y - x], dim=1)))
    h = F.relu(self.conv1(h))
    return self.flow(h)


class TorchFMIR(nn.Module):
  """Compressor + pyramid head; ``forward`` returns (disp, v_levels, u_levels)."""

  def __init__(self, c_prime: int = 256, n: int = 32, levels: int = 5,
               factors: Sequence[int] = (2, 2, 1), integration_steps: int = 7,
               activation: str = 'leaky_relu'):
    super().__init__()
    self.levels = int(levels)
    self.factors = tuple(int(s) for s in factors)
    self.steps = int(integration_steps)
    self.compressor = Compressor(c_prime, n, activation)
    self.blocks = nn.ModuleList([LevelBlock(n) for _ in range(self.levels)])

  def encode(self, image: torch.Tensor, feat: torch.Tensor, interp_h: torch.Tensor,
             interp_w: torch.Tensor) -> torch.Tensor:
    """image (B, H, W, D), feat (B, D, h, w, c') -> level-0 features (B, n, H, W, D)."""
    up = upsample_features(feat.float(), interp_h.float(), interp_w.float())
    return self.compressor(torch.cat([image[:, None].float(), up], dim=1))

  def forward(self, moving: dict, fixed: dict):
    """moving/fixed: dicts of tensors image, feat, interp_h, interp_w (batch first).

    Returns (disp (B, 3, H, W, D), v_levels, u_levels), level 0 finest; disp samples the
    moving image at x + disp(x).
    """
    b = moving['image'].shape[0]
    both = {k: torch.cat([moving[k], fixed[k]], 0)
            for k in ('image', 'feat', 'interp_h', 'interp_w')}
    shapes = pyramid_shapes(moving['image'].shape[1:4], self.factors, self.levels)
    pyramid = [self.encode(both['image'], both['feat'], both['interp_h'], both['interp_w'])]
    for shape in shapes[1:]:
      pyramid.append(resize(pyramid[-1], shape))
    scale = torch.tensor(self.factors, dtype=torch.float32,
                         device=pyramid[0].device).view(1, 3, 1, 1, 1)
    v_levels: list = [None] * self.levels
    u_levels: list = [None] * self.levels
    u_up = None
    for i in reversed(range(self.levels)):
      x, y = pyramid[i][:b], pyramid[i][b:]
      if u_up is not None:
        x = warp(x, u_up)
      v = self.blocks[i](x, y)
      u = integrate(v, self.steps)
      if u_up is not None:
        u = compose(u_up, u)
      v_levels[i], u_levels[i] = v, u
      if i > 0:
        u_up = resize(u, shapes[i - 1]) * scale
    return u_levels[0], v_levels, u_levels


def load_jax_params(model: TorchFMIR, params) -> None:
  """Copies parameters of a JAX ``fmir_jax.model.network.FMIR`` (``nnx.state`` / ``nnx.split``).

  Kernels go from (kH, kW, kD, in, out) to (out, in, kH, kW, kD); the input channel order of
  the first compressor conv (0 = intensity, 1.. = features) is the same on both sides.
  """
  def as_np(x):
    return np.array(x.get_value() if hasattr(x, 'get_value') else x)   # writable copy

  def copy(conv: nn.Conv3d, p) -> None:
    kernel = as_np(p['kernel'])
    bias = as_np(p['bias'])
    want = tuple(conv.weight.shape)
    got = kernel.transpose(4, 3, 0, 1, 2)
    if got.shape != want or bias.shape != tuple(conv.bias.shape):
      raise ValueError(f'JAX kernel {kernel.shape} / bias {bias.shape} do not fit torch '
                       f'Conv3d weight {want}: build TorchFMIR with the JAX FMIRConfig sizes')
    with torch.no_grad():
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(got)))
      conv.bias.copy_(torch.from_numpy(bias))

  comp = params['compressor']
  for name in ('conv0', 'conv1', 'conv2'):
    copy(getattr(model.compressor, name), comp[name])
  if len(params['blocks']) != len(model.blocks):
    raise ValueError(f'JAX model has {len(params["blocks"])} levels, torch {len(model.blocks)}')
  for i, block in enumerate(model.blocks):
    for name in ('conv0', 'conv1', 'flow'):
      copy(getattr(block, name), params['blocks'][i][name])


# ---------------------------------------------------------------------------------- losses


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
  """Zero-padded 'SAME' box sum over H, W, D of (B, 1, H, W, D) (window odd; may be long)."""
  for axis in range(3):
    k = [1, 1, 1]
    k[axis] = window
    pad = [0, 0, 0]
    pad[axis] = window // 2
    x = F.conv3d(x, torch.ones((1, 1, *k), dtype=x.dtype, device=x.device), padding=pad)
  return x


def ncc_loss(a: torch.Tensor, b: torch.Tensor, window: int, eps: float = 1e-5) -> torch.Tensor:
  """VoxelMorph local NCC loss, -mean(cross^2 / (var_a var_b + eps)), (B, 1, H, W, D)."""
  n = float(window ** 3)
  sa, sb, saa, sbb, sab = (box_sum(t, window) for t in (a, b, a * a, b * b, a * b))
  ma, mb = sa / n, sb / n
  cross = sab - mb * sa - ma * sb + ma * mb * n
  var_a = saa - 2 * ma * sa + ma * ma * n
  var_b = sbb - 2 * mb * sb + mb * mb * n
  return -torch.mean(cross * cross / (var_a * var_b + eps))


def diffusion_loss(v: torch.Tensor) -> torch.Tensor:
  """(1/3) sum over spatial axes of mean squared forward differences of (B, 3, H, W, D)."""
  total = v.new_zeros(())
  for axis in (2, 3, 4):
    if v.shape[axis] > 1:
      total = total + torch.mean(torch.diff(v, dim=axis) ** 2)
  return total / 3.0


def gaussian_blur(x: torch.Tensor, sigma: float, in_plane_only: bool,
                  truncate: float = 3.0) -> torch.Tensor:
  """Separable Gaussian of (B, 1, H, W, D) with scipy 'reflect' (half-sample symmetric)."""
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (t / sigma) ** 2)
  taps = torch.tensor(taps / taps.sum(), dtype=x.dtype, device=x.device)
  for axis in ((2, 3) if in_plane_only else (2, 3, 4)):
    n = x.shape[axis]
    if n == 1:
      continue
    idx = np.arange(-radius, n + radius)
    idx = np.mod(idx, 2 * n)                       # symmetric padding repeats with period 2n
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    padded = x.index_select(axis, torch.as_tensor(idx, device=x.device))
    shape = [1, 1, 1, 1, 1]
    shape[axis] = 2 * radius + 1
    x = F.conv3d(padded, taps.view(shape))
  return x


def registration_loss(model: TorchFMIR, out, moving: dict, fixed: dict, *,
                      # mirrors fmir_jax.ops.losses.NCC_WINDOWS (this oracle imports no fmir_jax)
                      windows: Sequence[int] = (9, 5, 3, 3, 3), sigma: float = 1.0,
                      in_plane_only: bool = True, smooth: float = 1.0) -> torch.Tensor:
  """Sum over levels i of (NCC(warp(m_i, u_i), f_i) + smooth * diffusion(v_i)) / 2**i."""
  _, v_levels, u_levels = out
  shapes = [tuple(v.shape[2:]) for v in v_levels]
  pyr = {}
  for role, d in (('m', moving), ('f', fixed)):
    levels = [d['image'][:, None].float()]
    for shape in shapes[1:]:
      levels.append(resize(gaussian_blur(levels[-1], sigma, in_plane_only), shape))
    pyr[role] = levels
  total = v_levels[0].new_zeros(())
  for i in range(len(v_levels)):
    w = 1.0 / 2 ** i
    warped = warp(pyr['m'][i], u_levels[i])
    total = total + w * (ncc_loss(warped, pyr['f'][i], windows[i])
                         + smooth * diffusion_loss(v_levels[i]))
  return total


def select_channels(moving: dict, fixed: dict, c_prime: int, generator: torch.Generator):
  """Random channel regularisation: the same c' of c channels for moving and fixed."""
  c = moving['feat'].shape[-1]
  idx = torch.randperm(c, generator=generator)[:c_prime]
  return dict(moving, feat=moving['feat'][..., idx]), dict(fixed, feat=fixed['feat'][..., idx])


def train_step(model: TorchFMIR, opt: torch.optim.Optimizer, moving: dict, fixed: dict, *,
               c_prime: int, generator: torch.Generator, clip: float = 1.0, **loss_kw) -> float:
  """One step: channel draw, forward, multi-level loss, backward, clip, optimiser step."""
  mv, fx = select_channels(moving, fixed, c_prime, generator)
  opt.zero_grad(set_to_none=True)
  loss = registration_loss(model, model(mv, fx), mv, fx, **loss_kw)
  loss.backward()
  if clip:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
  opt.step()
  return float(loss.detach())


def to_torch(batch_role: dict, device='cpu') -> dict:
  """numpy volume dict (image, feat, interp_h, interp_w) -> float32 torch tensors."""
  return {k: torch.as_tensor(np.asarray(batch_role[k], np.float32), device=device)
          for k in ('image', 'feat', 'interp_h', 'interp_w')}
