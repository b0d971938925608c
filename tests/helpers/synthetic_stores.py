"""Tiny synthetic feature stores for engine / training tests (no encoder involved).

Each subject has two frames: a label map of ellipsoid structures and the same map under a
known smooth radial contraction; images are label-derived intensities plus texture.
"Features" are image-derived channels on a patch grid of patch size 2 (block means of the
image, its square and random fixed mixtures), so they carry the anatomy like a real encoder.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from feature_extract.datasets.base import Volume
from fmir_jax.core import patches as geometry_lib
from fmir_jax.core import store as store_lib

PATCH = 2


def label_map(shape, rng, scale=1.0):
  h, w, d = shape
  yy, xx, zz = np.meshgrid(np.arange(h), np.arange(w), np.arange(d), indexing='ij')
  cy, cx = h / 2 + rng.uniform(-1, 1), w / 2 + rng.uniform(-1, 1)
  r_out = (0.32 * min(h, w)) * rng.uniform(0.9, 1.1)
  r_in = r_out * 0.55 * scale
  rr = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
  lab = np.zeros(shape, np.uint8)
  lab[rr < r_out] = 2
  lab[rr < r_in] = 3
  side = np.sqrt((yy - cy) ** 2 + (xx - (cx + r_out * 1.1)) ** 2) < r_out * 0.5
  lab[side & (lab == 0)] = 1
  return lab


def image_from_labels(lab, rng):
  means = np.array([0.1, 0.55, 0.35, 0.85], np.float32)
  img = means[lab] + 0.03 * rng.standard_normal(lab.shape).astype(np.float32)
  img = ndimage.gaussian_filter(img, (1.0, 1.0, 0.0))
  return np.clip(img, 0, 1).astype(np.float32)


def patch_features(img, c, seed=0):
  h, w, d = img.shape
  hp, wp = h // PATCH, w // PATCH
  blocks = img[:hp * PATCH, :wp * PATCH].reshape(hp, PATCH, wp, PATCH, d)
  mean = blocks.mean(axis=(1, 3))
  sq = (blocks ** 2).mean(axis=(1, 3))
  base = np.stack([mean, sq, np.sin(3 * mean), np.cos(3 * mean)], -1)   # (hp, wp, d, 4)
  mix = np.random.default_rng(seed).normal(size=(4, c)).astype(np.float32)
  f = base @ mix
  return np.transpose(f, (2, 0, 1, 3)).astype(np.float32)               # (D, h, w, c)


def geometry():
  # voxel i lies in patch i // PATCH: patch-centre convention, scale 1/PATCH.
  return geometry_lib.patch_geometry([0.0, 0.0], [1.0, 1.0], PATCH)


def write_store(out_dir, *, shape=(16, 16, 6), channels=6, subjects=(1, 2, 3, 4),
                val=(3,), test=(4,), seed=0):
  rng = np.random.default_rng(seed)
  header = {'backbone': {'name': 'synthetic', 'weights_sha256': 'none'}, 'layer': 0,
            'input_size': shape[0], 'resize': 'none', 'normalisation': {'mean': 0, 'std': 1},
            'feature_dtype': 'float32', 'channels': channels, 'patch_size': PATCH,
            'dataset': {'name': 'synthetic'}, 'num_classes': 3}
  vols, pairs = [], {'train': [], 'val': [], 'test': []}
  for s in subjects:
    split = 'val' if s in val else 'test' if s in test else 'train'
    lab_a = label_map(shape, rng)
    lab_b = label_map(shape, np.random.default_rng(seed * 1000 + s), scale=0.7)
    for frame, lab in (('ed', lab_a), ('es', lab_b)):
      img = image_from_labels(lab, rng)
      vols.append(Volume(key=f's{s:03d}_{frame}', dataset='synthetic', subject=f's{s:03d}',
                         frame=frame, split=split, image=img, labels=lab,
                         spacing_mm=(1.8, 1.8, 10.0), affine=np.diag([1.8, 1.8, 10.0, 1.0]),
                         meta={}))
    pairs[split] += [[f's{s:03d}_ed', f's{s:03d}_es'], [f's{s:03d}_es', f's{s:03d}_ed']]
  writer = store_lib.StoreWriter(out_dir, header, keys=[v.key for v in vols], pairs=pairs,
                                 volumes_per_shard=4)
  for v in vols:
    writer.add(v, patch_features(v.image, channels), geometry(), seconds=0.01)
  writer.close()
  return out_dir
