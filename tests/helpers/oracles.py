"""Independent reference implementations ("oracles") that the tests compare the library
against, each written once.

They are independent of the code under test: this module imports no fmir_jax (or
feature_extract) module, only numpy, scipy and (inside the function that needs it) torch, so
an error in the library cannot leak into the answer it is checked against.

Conventions (the project's): arrays are channels-last, (H, W, D) or (H, W, D, C); a
displacement field is (H, W, D, 3) in voxels, component k along array axis k; warps pull,
out(x) = vol(x + disp(x)).

- warp: scipy.ndimage.map_coordinates pull warp, linear by default and zero outside
  (mode='grid-constant', the library's zero padding); the reference for ops.warp.warp,
  compose/integrate, the bench's torch warp and the synthetic data generators. The scipy
  boundary mode, the dtype the volume is sampled in and the dtype of the sample coordinates
  are parameters because the tests' copies differed in them (kept as they were).
- warp_nearest: the same with order 0, for label maps (scipy's mode='constant' by default,
  as most copies had); the reference for ops.warp.warp_nearest and label scoring (Dice).
- resample_at: sampling at arbitrary voxel coordinates with the world resampler's edge rule
  (within half a voxel outside the grid the edge value, farther out cval); the reference
  for core.resample.resample_to_grid and core.world.warp_to_fixed.
- resize: trilinear resize with aligned corners (output index i of an n-long axis samples
  the input at i (m - 1) / (n - 1)), by torch.nn.functional.interpolate or by scipy
  map_coordinates; the reference for ops.warp.resize and the image / field pyramids.
- jacobian_det: det(I + grad u) by numpy central differences, with np.gradient's one-sided
  differences at the border or Learn2Reg's zero-padded correlate there; the reference for
  metrics.jacobian_determinant, the refiner's fold penalty and diffeomorphism checks.
- hd95: the Hausdorff percentile distance from an explicit face-neighbour surface and a
  brute-force KD-tree; the reference for metrics.hd95.
- torch_conv3d_same: torch.nn.functional.conv3d with 'same' zero padding on channels-last
  arrays, returning torch tensors so callers can back-propagate; the reference for
  ops.conv.conv3d_same and the upsample-then-conv feature path.
"""
import numpy as np
from scipy import ndimage


def warp(vol, disp, *, order=1, mode='grid-constant', cval=0.0, dtype=None,
         coord_dtype=np.float64):
  """vol(x + disp(x)) by scipy.ndimage.map_coordinates.

  vol: (H, W, D) or channels-last (H, W, D, C) (each channel warped alike); disp:
  (H, W, D, 3) voxels, component k along axis k. mode / cval: scipy's boundary handling
  ('grid-constant' with cval 0 is zero outside, linear up to the border). dtype: cast vol to
  it before sampling (None keeps vol's dtype, which is also the output's). coord_dtype: the
  dtype of the identity grid the displacement is added to (numpy promotion decides the
  coordinates' dtype).
  """
  vol = np.asarray(vol)
  disp = np.asarray(disp)
  if dtype is not None:
    vol = vol.astype(dtype)
  coords = np.indices(disp.shape[:3], dtype=coord_dtype) + np.moveaxis(disp, -1, 0)
  sample = lambda v: ndimage.map_coordinates(v, coords, order=order, mode=mode, cval=cval)
  if vol.ndim == disp.ndim - 1:
    return sample(vol)
  return np.stack([sample(vol[..., c]) for c in range(vol.shape[-1])], -1)


def warp_nearest(labels, disp, *, mode='constant', coord_dtype=np.float64):
  """Nearest-neighbour label warp labels(x + disp(x)), 0 outside (scipy order 0)."""
  return warp(labels, disp, order=0, mode=mode, cval=0, coord_dtype=coord_dtype)


def resample_at(vol, coords, *, order=1, cval=0.0):
  """vol sampled at voxel coordinates coords (3, ...): scipy mode='nearest' (the edge value)
  within half a voxel outside the grid, cval farther out. Returns (values, inside), inside
  the mask of coordinates within [-0.5, n - 0.5] on every axis."""
  coords = np.asarray(coords)
  out = ndimage.map_coordinates(vol, coords, order=order, mode='nearest')
  top = np.reshape(np.shape(vol), (3,) + (1,) * (coords.ndim - 1)) - 0.5
  inside = np.all((coords >= -0.5) & (coords <= top), 0)
  out[~inside] = cval
  return out, inside


def resize(vol, out_shape, *, backend='torch'):
  """Trilinear resize of channels-last (B, H, W, D, C) or (H, W, D, C) to out_shape (3,)
  with aligned corners.

  backend='torch': torch.nn.functional.interpolate(mode='trilinear', align_corners=True) in
  vol's dtype; 'scipy': map_coordinates (order 1) at i (m - 1) / (n - 1) along each axis.
  """
  vol = np.asarray(vol)
  out_shape = tuple(int(n) for n in out_shape)
  if vol.ndim == 4:
    return resize(vol[None], out_shape, backend=backend)[0]
  if backend == 'torch':
    import torch  # pylint: disable=import-outside-toplevel
    out = torch.nn.functional.interpolate(torch.from_numpy(np.moveaxis(vol, -1, 1)),
                                          size=out_shape, mode='trilinear',
                                          align_corners=True)
    return np.moveaxis(out.numpy(), 1, -1)
  if backend != 'scipy':
    raise ValueError(f'backend must be torch or scipy, not {backend!r}')
  pos = np.meshgrid(*[np.arange(n) * (m - 1) / (n - 1) if n > 1 else np.zeros(1)
                      for n, m in zip(out_shape, vol.shape[1:4])], indexing='ij')
  return np.stack([np.stack([ndimage.map_coordinates(item[..., c], pos, order=1)
                             for c in range(vol.shape[-1])], -1) for item in vol])


def jacobian_det(u, *, edges='one-sided'):
  """det(I + grad u), (H, W, D), of a (H, W, D, 3) voxel field by central differences.

  edges='one-sided': np.gradient (one-sided differences on the border voxels); 'zero':
  Learn2Reg's scoring code, scipy correlate with [-0.5, 0, 0.5] and zero padding. The two
  agree away from the border.
  """
  u = np.asarray(u)
  if edges == 'one-sided':
    grads = np.stack([np.stack(np.gradient(u[..., k]), -1) for k in range(3)], -2)
  elif edges == 'zero':
    kernel = np.array([-0.5, 0.0, 0.5])
    grads = np.empty(u.shape[:3] + (3, 3))
    for i in range(3):
      for j in range(3):
        shape = [1, 1, 1]
        shape[j] = 3
        grads[..., i, j] = ndimage.correlate(u[..., i], kernel.reshape(shape),
                                             mode='constant', cval=0.0)
  else:
    raise ValueError(f"edges must be 'one-sided' or 'zero', not {edges!r}")
  return np.linalg.det(grads + np.eye(3))


def surface_points_mm(mask, spacing):
  """Surface of a mask: its voxels with a face neighbour outside it (the array edge counts
  as outside), as (N, 3) positions in mm."""
  padded = np.pad(mask, 1)
  core = padded[1:-1, 1:-1, 1:-1]
  inner = core.copy()
  for axis in range(3):
    for step in (-1, 1):
      inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
  return np.argwhere(core & ~inner) * np.asarray(spacing)


def hd95(a, b, spacing, q=95.0, mode='union'):
  """q-th percentile Hausdorff distance (mm) between the surfaces of masks a and b, by a
  brute-force KD-tree. mode='union': percentile of both directed distance sets together
  (medpy's definition); 'max': the larger of the two directed percentiles."""
  from scipy.spatial import cKDTree  # pylint: disable=import-outside-toplevel
  pa, pb = surface_points_mm(a, spacing), surface_points_mm(b, spacing)
  d_ab = cKDTree(pb).query(pa)[0]
  d_ba = cKDTree(pa).query(pb)[0]
  if mode == 'union':
    return np.percentile(np.concatenate([d_ab, d_ba]), q)
  return max(np.percentile(d_ab, q), np.percentile(d_ba, q))


def torch_conv3d_same(x, kernel, *, dtype='float64', requires_grad=False):
  """torch.nn.functional.conv3d with 'same' zero padding.

  x: channels-last (B, H, W, D, Cin); kernel: (kH, kW, kD, Cin, Cout). Returns the torch
  tensors (xt, wt, y) in torch's layout, xt (B, Cin, H, W, D), wt (Cout, Cin, kH, kW, kD),
  y (B, Cout, H, W, D), in torch dtype `dtype`; with requires_grad, y.backward(...) fills
  xt.grad and wt.grad.
  """
  import torch  # pylint: disable=import-outside-toplevel
  dt = getattr(torch, dtype)
  xt = torch.tensor(np.moveaxis(np.asarray(x), -1, 1), dtype=dt, requires_grad=requires_grad)
  wt = torch.tensor(np.transpose(np.asarray(kernel), (4, 3, 0, 1, 2)), dtype=dt,
                    requires_grad=requires_grad)
  y = torch.nn.functional.conv3d(xt, wt, padding='same')
  return xt, wt, y
