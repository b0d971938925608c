"""Shared benchmark setup: problem sizes, synthetic batches, timing and memory helpers.

Numpy only at import (no jax, no torch), so both the JAX and the PyTorch sides can use it.
Batches follow ``fmir_jax.train.data``: ``{'moving': {...}, 'fixed': {...}}`` with
image (B, H, W, D) float32 in [0, 1], feat (B, D, h, w, c) float16 patch grid,
interp_h (B, H, h), interp_w (B, W, w), labels (B, H, W, D) uint8, has_labels (B,) bool.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Callable

import numpy as np
from scipy import ndimage

from fmir_jax.core import patches


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem size.

  shape: volume (H, W, D) in voxels; patch: patch grid (h, w); pad_px, resize: in-plane
  geometry of the K x K encoder input (``patches.patch_geometry``); factors: pyramid factors.
  """
  name: str
  shape: tuple[int, int, int]
  patch: tuple[int, int]
  pad_px: tuple[float, float]
  resize: tuple[float, float]
  factors: tuple[int, int, int]
  channels: int = 768          # c, DINOv3 ViT-B
  c_prime: int = 256
  n: int = 32
  levels: int = 5
  steps: int = 7               # scaling-and-squaring steps
  patch_size: int = 16


# ACDC: 128x128 slices upsampled x2 to K=256, p=16 -> 16x16 patch grid.
ACDC = Case('acdc', (128, 128, 16), (16, 16), (0.0, 0.0), (2.0, 2.0), (2, 2, 1))
# Abdomen half resolution: 96x80 zero-padded (centred) to 128x128, x2 to K=256 -> 16x16.
ABDOMEN_HALF = Case('abdomen_half', (96, 80, 128), (16, 16), (32.0, 48.0), (2.0, 2.0),
                    (2, 2, 2))
# Abdomen full resolution: 192x160 padded to 256x256, x2 to K=512 -> 32x32 patch grid.
ABDOMEN_FULL = Case('abdomen_full', (192, 160, 256), (32, 32), (64.0, 96.0), (2.0, 2.0),
                    (2, 2, 2))
# Smoke: tiny everything (the test suite runs this).
SMOKE = Case('smoke', (16, 16, 8), (4, 4), (0.0, 0.0), (2.0, 2.0), (2, 2, 1), channels=12,
             c_prime=8, n=4, levels=2, steps=1, patch_size=8)

CASES = {c.name: c for c in (ACDC, ABDOMEN_HALF, ABDOMEN_FULL, SMOKE)}


def geometry_of(case: Case) -> dict[str, list[float]]:
  """The case's patch geometry ({"offset", "scale"}, ``patches.patch_geometry``)."""
  return patches.patch_geometry(case.pad_px, case.resize, case.patch_size)


def volume(case: Case, rng: np.random.Generator, *, channels: int | None = None) -> dict:
  """One synthetic volume item (smooth random image, random patch features), no batch axis.

  Returns image (H, W, D) float32, feat (D, h, w, c) float16, interp_h (H, h),
  interp_w (W, w), labels (H, W, D) uint8 zeros, has_labels () False.
  """
  c = case.channels if channels is None else channels
  h, w, d = case.shape
  img = ndimage.gaussian_filter(rng.random((h, w, d), dtype=np.float32), (2.0, 2.0, 1.0))
  img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)
  feat = rng.standard_normal((d, case.patch[0], case.patch[1], c), dtype=np.float32)
  return {**patches.model_inputs(img, feat.astype(np.float16), geometry_of(case)),
          'labels': np.zeros((h, w, d), np.uint8), 'has_labels': np.asarray(False)}


def pair_batch(case: Case, seed: int = 0, *, channels: int | None = None) -> dict:
  """A batch of one pair: {'moving': {...}, 'fixed': {...}}, leading batch axis 1."""
  rng = np.random.default_rng(seed)
  out = {}
  for role in ('moving', 'fixed'):
    out[role] = {k: np.asarray(v)[None] for k, v in volume(case, rng, channels=channels).items()}
  return out


def pca_basis(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """A random orthonormal (c, c') basis and zero mean, float32 (stands in for a fitted PCA)."""
  rng = np.random.default_rng(seed + 99)
  q, _ = np.linalg.qr(rng.standard_normal((case.channels, case.c_prime)))
  return {'mean': np.zeros(case.channels, np.float32), 'components': q.astype(np.float32)}


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int) -> dict[str, float]:
  """Wall seconds of ``fn()`` (which must block until its result is ready).

  Returns {'median_s', 'min_s', 'repeats'} over ``repeats`` calls after ``warmup`` calls.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {'median_s': float(np.median(times)), 'min_s': float(np.min(times)),
          'repeats': int(repeats)}


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far, bytes (Linux ru_maxrss is KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def load_average() -> tuple[float, float, float]:
  """1, 5 and 15 minute load averages."""
  return tuple(float(x) for x in os.getloadavg())  # type: ignore[return-value]
