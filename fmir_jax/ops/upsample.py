"""Patch-grid features -> volume grid: separable linear upsampling on device.

The feature store keeps encoder features on the patch grid, ``(D, h, w, c)`` per volume
(one 2D patch grid per slice; the slice axis is not resampled). Voxel ``i`` of in-plane
array axis ``a`` sits at patch-grid coordinate ``offset[a] + scale[a] * i`` (the store's
``geometry``); upsampling is linear interpolation at those coordinates, which
``fmir_jax.core.patches.interp_matrix`` turns into one small ``(n_vox, n_patch)`` matrix per axis.
Both matrices travel with the batch as arrays, so volumes of different geometry share one
compiled program.

Everything here is linear and acts per channel, so channel selection / PCA projection
commute with it (they are applied on the patch grid, before upsampling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def upsample_features(feat, interp_h, interp_w):
  """Upsamples patch-grid features to the volume grid, channels last.

  Args:
    feat: (B, D, h, w, c) features on the patch grid.
    interp_h: (B, H, h) interpolation weights for array axis 0.
    interp_w: (B, W, w) interpolation weights for array axis 1.

  Returns:
    (B, H, W, D, c) features on the volume grid.
  """
  t = jnp.einsum('bHh,bdhwc->bdHwc', interp_h.astype(feat.dtype), feat)
  t = jnp.einsum('bWw,bdHwc->bHWdc', interp_w.astype(feat.dtype), t)
  return t


def shifted_interp(interp):
  """The three row-shifted copies of an interpolation matrix used by a 3-tap SAME conv.

  Args:
    interp: (B, N, n) interpolation matrix.

  Returns:
    (B, 3, N, n): entry k holds rows ``i + k - 1`` of ``interp`` (zero rows outside), i.e.
    the interpolation that lands on the voxel a conv tap at offset ``k - 1`` reads.
  """
  padded = jnp.pad(interp, ((0, 0), (1, 1), (0, 0)))
  n = interp.shape[1]
  return jnp.stack([padded[:, k:k + n] for k in range(3)], axis=1)


def conv3_of_upsampled(feat, kernel, interp_h, interp_w):
  """Exact ``conv3x3x3_SAME(upsample(feat))`` without materialising ``upsample(feat)``.

  Upsampling is linear and per channel, so the conv's channel contraction can run on the
  patch grid first (c -> n per kernel tap); the in-plane taps become row-shifted
  interpolation matrices and the slice-axis taps (the slice axis is not resampled) become
  shifts on the patch grid. Cost: O(D h w c 27 n) on the patch grid plus
  O(D H w 9 n h + D H W 3 n w) for the upsampling, against O(H W D 27 c n) for the
  straightforward conv on the upsampled volume.

  Args:
    feat: (B, D, h, w, c) patch-grid features.
    kernel: (3, 3, 3, c, n) conv kernel (axes H, W, D taps; in; out), as in ``nnx.Conv``.
    interp_h: (B, H, h); interp_w: (B, W, w).

  Returns:
    (B, H, W, D, n) = conv(upsample(feat)) with zero 'SAME' padding, no bias.
  """
  return upsample_taps(project_taps(feat, kernel), interp_h, interp_w)


def project_taps(feat, kernel):
  """Patch-grid half of ``conv3_of_upsampled``: channel contraction per in-plane tap, with the
  slice-axis taps already summed. (B, D, h, w, c) -> (B, D, h, w, 3, 3, n).

  The three slice-axis taps are contracted one at a time so that the 27-tap tensor is
  never materialised.
  """
  kernel = kernel.astype(feat.dtype)
  depth = feat.shape[1]
  fp = jnp.pad(feat, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  # Slice-axis taps: out[d] reads in[d + dz - 1]; zero outside.
  return sum(jnp.einsum('bdhwc,yxcn->bdhwyxn', fp[:, dz:dz + depth], kernel[:, :, dz])
             for dz in range(3))


def upsample_taps(g, interp_h, interp_w):
  """Volume half of ``conv3_of_upsampled``: in-plane taps as row-shifted interpolation.

  g: (B, D, h, w, 3, 3, n) from ``project_taps``; interp_h (B, H, h); interp_w (B, W, w).
  Rows of interp_h may be any contiguous block of the volume's rows plus one row of context
  per side (slab-wise inference); the result then holds those rows.
  """
  ah = shifted_interp(interp_h).astype(g.dtype)                     # (B, 3, H, h)
  aw = shifted_interp(interp_w).astype(g.dtype)                     # (B, 3, W, w)
  t = jnp.einsum('byHh,bdhwyxn->bdHwxn', ah, g)
  return jnp.einsum('bxWw,bdHwxn->bHWdn', aw, t)


def conv3_of_upsampled_reference(feat, kernel, interp_h, interp_w):
  """Straightforward reference for ``conv3_of_upsampled``: upsample, then conv."""
  up = upsample_features(feat, interp_h, interp_w)
  return jax.lax.conv_general_dilated(
      up, kernel.astype(up.dtype), window_strides=(1, 1, 1), padding='SAME',
      dimension_numbers=('NHWDC', 'HWDIO', 'NHWDC'))
