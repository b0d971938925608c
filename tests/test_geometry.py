"""fmir_jax.core.patches against closed forms and numpy's linear interpolation."""
import numpy as np

from fmir_jax.core import patches


def test_interp_matrix_reproduces_linear_functions():
  # Patch-grid feature linear in the patch coordinate -> exactly linear at the voxels.
  n_in, n_out = 7, 20
  offset, scale = -0.3, 0.31
  grid = np.arange(n_in, dtype=np.float64)
  w = patches.interp_matrix(n_out, n_in, offset, scale)
  assert w.shape == (n_out, n_in) and w.dtype == np.float32
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  coords = offset + scale * np.arange(n_out)
  inside = (coords >= 0) & (coords <= n_in - 1)
  np.testing.assert_allclose((w @ (3.0 - 2.0 * grid))[inside], 3.0 - 2.0 * coords[inside],
                             atol=1e-5)
  # Outside the grid, coordinates clamp to the edge patches.
  np.testing.assert_allclose((w @ grid)[~inside], np.clip(coords[~inside], 0, n_in - 1))
  # Oracle: numpy's linear interpolation.
  f = np.random.default_rng(0).standard_normal(n_in)
  np.testing.assert_allclose(w @ f, np.interp(coords, grid, f), atol=1e-5)


def test_patch_geometry_closed_form():
  g = patches.patch_geometry(pad_px=(8, 0), resize_factor=(4.0, 2.0), patch_size=16)
  # offset = (pad + r/2)/p - 1/2, scale = r/p
  np.testing.assert_allclose(g['offset'], [(8 + 2) / 16 - 0.5, 1 / 16 - 0.5])
  np.testing.assert_allclose(g['scale'], [0.25, 0.125])


def test_model_inputs_interpolate_the_patch_grid_at_the_voxels():
  # A feature linear in the patch coordinate is linear at the voxels (oracle: np.interp).
  geo = patches.patch_geometry(pad_px=(4, 0), resize_factor=(2.0, 2.0), patch_size=8)
  feat = np.random.default_rng(0).standard_normal((3, 5, 6, 2)).astype(np.float32)
  image = np.zeros((17, 20, 3), np.float64)
  x = patches.model_inputs(image, feat, geo)
  assert set(x) == {'image', 'feat', 'interp_h', 'interp_w'} and x['image'].dtype == np.float32
  coords = geo['offset'][0] + geo['scale'][0] * np.arange(17)
  col = feat[1, :, 2, 0]
  np.testing.assert_allclose(x['interp_h'] @ col, np.interp(coords, np.arange(5), col),
                             atol=1e-5)
  b = patches.model_inputs(image, feat, geo, batch=True)
  assert b['interp_w'].shape == (1, 20, 6) and b['feat'].shape == (1, 3, 5, 6, 2)
