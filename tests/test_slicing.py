"""Tests for feature_extract.slicing: placement, masking, and the voxel <-> patch geometry."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from feature_extract import slicing
from fmir_jax.core import patches

ID_MEAN, ID_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def sample_at_voxels(plane: np.ndarray, layout: slicing.SliceLayout) -> np.ndarray:
  """Samples a K x K input-pixel map at the voxel centres (inverse of the slicing).

  Args:
    plane: (..., K, K) values on the encoder's input pixel grid.
    layout: the layout the volume was sliced with.

  Returns:
    (..., H, W) bilinear samples at each voxel's input-pixel position.
  """
  geom = layout.geometry(patch_size=1)
  k = layout.input_size
  wy = patches.interp_matrix(layout.in_shape[0], k, geom['offset'][0], geom['scale'][0])
  wx = patches.interp_matrix(layout.in_shape[1], k, geom['offset'][1], geom['scale'][1])
  return np.einsum('yk,...kl,xl->...yx', wy, np.asarray(plane, np.float32), wx)


def _rand(shape, seed=0):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize('mode', ['upsample', 'pad'])
def test_unit_scale_round_trip_is_exact(mode):
  vol = _rand((9, 6, 4))
  slices, layout = slicing.volume_to_slices(vol, 9, mode, ID_MEAN, ID_STD)
  assert slices.shape == (4, 3, 9, 9) and layout.resize_factor == (1.0, 1.0)
  assert layout.pad_px == (0.0, 1.0)                     # (9 - 6) // 2 columns on the left
  crop = slices[:, 0, :, 1:7].numpy()
  np.testing.assert_array_equal(crop, np.moveaxis(vol, -1, 0))
  np.testing.assert_allclose(sample_at_voxels(slices[:, 1].numpy(), layout),
                             np.moveaxis(vol, -1, 0), atol=1e-6)
  assert torch.all(slices[:, :, :, [0, 7, 8]] == 0)


def test_upsample_matches_scipy_zoom_oracle():
  vol = _rand((12, 8, 2), seed=1)
  slices, layout = slicing.volume_to_slices(vol, 48, 'upsample', ID_MEAN, ID_STD)
  assert layout.resized == (48, 32) and layout.pad_px == (0.0, 8.0)
  for d in range(2):
    oracle = ndimage.zoom(vol[:, :, d], 4, order=1, mode='nearest', grid_mode=True)
    np.testing.assert_allclose(slices[d, 2, :, 8:40].numpy(), oracle, atol=1e-5)


def test_pad_mode_matches_manual_pad_then_zoom():
  vol = _rand((10, 6, 2), seed=2)
  slices, layout = slicing.volume_to_slices(vol, 20, 'pad', ID_MEAN, ID_STD)
  assert layout.square_pad == (0, 2) and layout.pad_px == (0.0, 4.0)
  padded = np.pad(vol[:, :, 1], ((0, 0), (2, 2)))
  oracle = ndimage.zoom(padded, 2, order=1, mode='nearest', grid_mode=True)
  oracle[:, :4] = 0                                       # non-padding mask
  oracle[:, 16:] = 0
  np.testing.assert_allclose(slices[1, 0].numpy(), oracle, atol=1e-5)


def test_pad_to_canvas_like_the_authors_abdomen():
  # 96 x 80 -> centred zero pad to 128 x 128 -> x2 -> 256 (scaled down 8x here: 12 x 10 -> 16).
  vol = _rand((12, 10, 1), seed=4)
  slices, layout = slicing.volume_to_slices(vol, 32, 'pad', ID_MEAN, ID_STD, pad_to=16)
  assert layout.square_pad == (2, 3) and layout.pad_px == (4.0, 6.0)
  assert layout.resize_factor == (2.0, 2.0)
  oracle = ndimage.zoom(np.pad(vol[:, :, 0], ((2, 2), (3, 3))), 2, order=1, mode='nearest',
                        grid_mode=True) * layout.mask()
  np.testing.assert_allclose(slices[0, 0].numpy(), oracle, atol=1e-5)
  with pytest.raises(slicing.SlicingError, match='--pad-to 11 is smaller'):
    slicing.slice_layout((12, 10), 32, 'pad', pad_to=11)


@pytest.mark.parametrize('mode', ['upsample', 'pad'])
def test_padding_is_zero_after_normalisation(mode):
  vol = _rand((12, 7, 3), seed=3)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  slices, layout = slicing.volume_to_slices(vol, 32, mode, mean, std)
  mask = torch.from_numpy(layout.mask())
  assert 0 < mask.sum() < 32 * 32
  assert torch.all(slices[:, :, ~mask] == 0)
  inside = slices[:, :, mask]
  # Inside the content: exactly the normalised intensities (per channel).
  raw = slicing.volume_to_slices(vol, 32, mode, ID_MEAN, ID_STD)[0][:, :, mask]
  for c in range(3):
    torch.testing.assert_close(inside[:, c], (raw[:, c] - mean[c]) / std[c])


def _clean_patch_coordinates(layout, patch_size, axis):
  """Patch indices along an axis whose pixels all map to unclamped voxel positions."""
  k, n = layout.input_size, layout.in_shape[axis]
  pix = np.arange(k)
  src = (pix + 0.5 - layout.pad_px[axis]) / layout.resize_factor[axis] - 0.5
  valid = (src >= 0) & (src <= n - 1)
  return valid.reshape(-1, patch_size).all(axis=1)


@pytest.mark.parametrize('shape,k,p,mode', [((12, 8), 48, 8, 'upsample'),
                                             ((7, 5), 32, 4, 'upsample'),
                                             ((10, 6), 40, 4, 'pad')])
def test_geometry_maps_voxels_to_patch_grid(shape, k, p, mode):
  """Linear ramp -> slices -> p x p mean pooling ("encoder") -> interp back = the ramp."""
  h, w = shape
  layout = slicing.slice_layout(shape, k, mode)
  geom = layout.geometry(p)
  for axis in range(2):
    ramp = np.indices(shape, dtype=np.float32)[axis][:, :, None]             # (H, W, 1)
    slices, _ = slicing.volume_to_slices(ramp, k, mode, ID_MEAN, ID_STD)
    grid = F.avg_pool2d(slices[:, :1], p)[0, 0].numpy().astype(np.float64)   # (K/p, K/p)
    wy = patches.interp_matrix(h, k // p, geom['offset'][0], geom['scale'][0])
    wx = patches.interp_matrix(w, k // p, geom['offset'][1], geom['scale'][1])
    back = wy @ grid @ wx.T                                                  # (H, W)
    clean = _clean_patch_coordinates(layout, p, axis)
    coords = geom['offset'][axis] + geom['scale'][axis] * np.arange(shape[axis])
    lo, hi = np.floor(coords).astype(int), np.ceil(coords).astype(int)
    ok = (lo >= 0) & (hi < k // p)
    ok[ok] &= clean[lo[ok]] & clean[hi[ok]]
    assert ok.sum() >= 2, ok
    expect = np.arange(shape[axis], dtype=np.float64)
    got = back[:, w // 2] if axis == 0 else back[h // 2, :]
    np.testing.assert_allclose(got[ok], expect[ok], atol=1e-4)
    # Negative control: dropping the half-voxel term (offset = pad/p - 1/2) is off by 0.5.
    bad = geom['offset'][axis] - 0.5 * geom['scale'][axis]
    wbad = patches.interp_matrix(shape[axis], k // p, bad, geom['scale'][axis])
    got_bad = (wbad @ grid @ wx.T)[:, w // 2] if axis == 0 else (wy @ grid @ wbad.T)[h // 2]
    assert np.median((expect - got_bad)[ok]) == pytest.approx(0.5, abs=1e-4)


def test_bad_input_is_rejected():
  with pytest.raises(slicing.SlicingError, match='--resize'):
    slicing.slice_layout((4, 4), 8, 'crop')
  with pytest.raises(slicing.SlicingError, match=r'\(H, W, D\)'):
    slicing.volume_to_slices(np.zeros((4, 4), np.float32), 8, 'pad', ID_MEAN, ID_STD)
  with pytest.raises(slicing.SlicingError, match='NaN'):
    slicing.volume_to_slices(np.full((4, 4, 1), np.nan, np.float32), 8, 'pad', ID_MEAN, ID_STD)
