"""encode.encoding_for: slices of any size enter the encoder at the training scale (encoder
pixels per voxel), so the head sees features of the scale it learnt. Checked in closed form
and with the real offline `mind` encoder: a native grid with twice the field of view gives,
in the shared region, the features of the training-size grid."""
import numpy as np
import pytest
from scipy import ndimage

from feature_extract import backbones
from fmir_jax.register import encode

HEADER = {'input_size': 64, 'resize': 'upsample', 'pad_to': None}


def test_encoding_closed_form():
  # Training: 32x32 slices at K=64 -> 2 pixels per voxel.
  same = encode.encoding_for((32, 32), HEADER, (32, 32), None, 4)
  assert (same.input_size, same.resize, same.pad_to, same.pixels_per_voxel) == \
      (64, 'upsample', None, 2.0)
  big = encode.encoding_for((75, 64), HEADER, (32, 32), None, 4)
  assert big.input_size == 152 and big.resize == 'upsample'    # ceil(2 * 75 / 4) * 4
  assert big.pixels_per_voxel == pytest.approx(152 / 75)
  # Pad mode (abdomen): K / pad_to; a fixed-size encoder (SAM) keeps its K on a canvas.
  pad = {'input_size': 256, 'resize': 'pad', 'pad_to': 128}
  assert encode.encoding_for((96, 80), pad, (96, 80), None, 16).input_size == 256
  assert encode.encoding_for((160, 96), pad, (96, 80), None, 16).input_size == 320
  sam = encode.encoding_for((100, 90), {'input_size': 1024, 'resize': 'upsample',
                                      'pad_to': None}, (128, 128), 1024, 16)
  assert (sam.input_size, sam.resize, sam.pad_to) == (1024, 'pad', 128)
  assert sam.pixels_per_voxel == 8.0


def _voxel_features(image, bb, enc):
  inp = encode.encode(image, bb, enc, batch_size=8)
  feat = inp['feat'][0]                                   # (D, h, w, c)
  return np.einsum('yh,dhwc,xw->yxdc', inp['interp_h'][0], feat, inp['interp_w'][0])


def test_native_field_of_view_keeps_the_training_feature_scale():
  rng = np.random.default_rng(0)
  small = ndimage.gaussian_filter(rng.random((32, 32, 3)), (1.5, 1.5, 0)).astype(np.float32)
  small = (small - small.min()) / (small.max() - small.min())
  big = np.pad(small, ((16, 16), (16, 16), (0, 0)), mode='reflect')   # 2x the field of view
  bb = backbones.load('mind', device='cpu')
  ref = _voxel_features(small, bb, encode.encoding_for((32, 32), HEADER, (32, 32), None, 4))
  now = _voxel_features(big, bb, encode.encoding_for((64, 64), HEADER, (32, 32), None, 4))
  old = _voxel_features(big, bb, encode.Encoding(64, 'upsample', None, 1.0))  # fixed K
  core = (slice(8, 24), slice(8, 24))                     # away from the small image's edge
  shift = (slice(24, 40), slice(24, 40))
  err_now = np.abs(now[shift] - ref[core]).mean() / np.abs(ref[core]).mean()
  err_old = np.abs(old[shift] - ref[core]).mean() / np.abs(ref[core]).mean()
  assert err_now < 1e-3 and err_old > 0.05, (err_now, err_old)
