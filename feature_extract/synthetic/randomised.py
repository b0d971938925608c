"""Domain-randomised registration pairs for training a general head (numpy + scipy).

Shapes of no particular anatomy, contrasts of no particular scanner, so that a head trained
on them cannot fit one domain (the idea of SynthMorph, Hoffmann et al. 2022, for an
unsupervised NCC-trained head). Pair ``i`` of a setting is drawn from
``default_rng([seed, setting index, i])``, so it is the same however many are written:

1. **labels**: the argmax of K random smooth fields (K uniform in ``labels``; Gaussian blob
   scale uniform in ``blob_mm``): a label map of irregular blobs, filling the field of view
   or (probability ``p_body``) an irregular body outline in dark air;
2. **deformation**: a random smooth diffeomorphism (``phantom_pairs.random_deformation``:
   a smoothed random velocity integrated by scaling and squaring, peak uniform in
   ``disp_mm``); moving labels = fixed labels warped by it;
3. **intensities**: one random mean intensity per label, shared by the pair (mono-modal
   pairs, as the NCC loss needs), then per image its own texture, multiplicative bias field,
   gamma, blur and noise; with probability ``p_invert`` the moving image's contrast is
   inverted (the loss's squared local NCC and MIND-SSC features are both blind to the sign,
   so the head learns pairs of opposite contrast too).

Version 2 (the ``*2`` settings, configs/general_v2.py) adds, in the same stream: nested
cores, thin walls and tubes among the blobs (``add_structures``), a residual linear
misalignment composed after the deformation (``misalignment``, ``compose_linear``: the
few degrees, mm and per cent a linear stage leaves), and field-of-view cuts (``fov_cut``).

``write_pairs`` writes each setting's pairs as NIfTI (float32 images, uint8 labels, RAS
affines at the setting's spacing) and a ``pairs.csv`` for the "custom" reader, so features
are extracted by the normal path (``feature_extract/run.py --dataset custom``).
"""
from __future__ import annotations

import csv
import dataclasses
import os
import zlib

import numpy as np
from scipy import ndimage

from feature_extract.synthetic.phantom_pairs import random_deformation, sample
from fmir_jax.core import files
from fmir_jax.core import nifti


@dataclasses.dataclass(frozen=True)
class Setting:
  """One grid and its randomisation ranges (mm unless stated)."""
  name: str
  shape: tuple[int, int, int]
  spacing_mm: tuple[float, float, float]
  labels: tuple[int, int] = (6, 16)          # number of labels K (inclusive range)
  blob_mm: tuple[float, float] = (5.0, 14.0)  # Gaussian sigma of the label fields
  disp_mm: tuple[float, float] = (2.0, 10.0)  # peak displacement of the deformation
  smooth_mm: tuple[float, float] = (10.0, 20.0)   # Gaussian sigma of its velocity
  through_plane: float = 1.0                  # scale of the last-axis displacement
  p_invert: float = 0.3
  p_body: float = 0.6                         # probability of a body outline in air
  # Version 2 (``anatomy``): structures real anatomy has and blobs do not, and the residual
  # misalignment a linear stage leaves; all off in the version-1 settings, whose pairs stay
  # the same draw for draw.
  nested: tuple[int, int] = (0, 0)            # labels that grow an inner structure (core)
  shells: tuple[int, int] = (0, 0)            # labels that grow a thin wall (sheet, mm below)
  shell_mm: tuple[float, float] = (1.5, 3.0)
  tubes: tuple[int, int] = (0, 0)             # tubular structures (vessels, bowel, airways)
  tube_mm: tuple[float, float] = (1.5, 4.0)   # their radius
  misalign_deg: float = 0.0                   # residual rotation, uniform +- per axis
  misalign_mm: float = 0.0                    # residual translation, uniform +- per axis
  misalign_scale: float = 0.0                 # residual per-axis scale, uniform 1 +-
  p_fov_cut: float = 0.0                      # one image loses a slab of its field of view
  max_label: int = 15                         # labels 1..max_label (the Dice's classes)


SETTINGS = {
    # isotropic, the scale of abdomen CT / brain MR at 2 mm (a 96 mm cube)
    'iso': Setting('iso', (48, 48, 48), (2.0, 2.0, 2.0)),
    # anisotropic stacks of thick slices, the scale of cine cardiac MR
    'aniso': Setting('aniso', (80, 80, 12), (1.6, 1.6, 8.0), through_plane=0.3),
}
# Version 2 (configs/general_v2.py): fewer blobs, nested cores, thin walls and tubes among
# them, larger deformations, a residual linear misalignment of the size the linear stage
# leaves (a few degrees, mm and per cent), field-of-view cuts, and a third, moderately
# anisotropic grid between the two.
_V2 = dict(labels=(4, 9), nested=(0, 2), shells=(0, 2), tubes=(0, 3), disp_mm=(2.0, 14.0),
           misalign_deg=4.0, misalign_mm=4.0, misalign_scale=0.04, p_fov_cut=0.3)
SETTINGS.update({
    'iso2': Setting('iso2', (48, 48, 48), (2.0, 2.0, 2.0), **_V2),
    'aniso2': Setting('aniso2', (80, 80, 12), (1.6, 1.6, 8.0), through_plane=0.3, **_V2),
    'mid2': Setting('mid2', (56, 56, 28), (1.8, 1.8, 3.5), through_plane=0.6, **_V2),
})


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
  """Gaussian-smoothed white noise scaled to unit standard deviation (float32)."""
  f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox,
                              mode='reflect')
  return f / max(float(f.std()), 1e-8)


def label_map(rng: np.random.Generator, s: Setting) -> np.ndarray:
  """(H, W, D) uint8 labels 1..K: argmax of K smooth random fields; with probability
  ``p_body`` only inside a randomly placed, irregular ellipsoidal body (label 0 = air)."""
  k = int(rng.integers(s.labels[0], s.labels[1] + 1))
  sigma = rng.uniform(*s.blob_mm) / np.asarray(s.spacing_mm)
  fields = np.stack([_smooth_noise(rng, s.shape, sigma) for _ in range(k)])
  labels = (np.argmax(fields, axis=0) + 1).astype(np.uint8)
  if rng.uniform() < s.p_body:
    axes = [np.linspace(-1.0, 1.0, n) for n in s.shape]
    centre = rng.uniform(-0.2, 0.2, size=3)
    radii = rng.uniform(0.6, 1.0, size=3)
    if s.shape[2] * s.spacing_mm[2] > 1.5 * min(s.shape[0] * s.spacing_mm[0],
                                                 s.shape[1] * s.spacing_mm[1]):
      radii[2] = 2.0            # a long body axis crosses the whole field of view
    r = sum(((a.reshape([-1 if i == j else 1 for j in range(3)]) - c) / rad) ** 2
            for i, (a, c, rad) in enumerate(zip(axes, centre, radii)))
    wobble = 0.15 * _smooth_noise(rng, s.shape, 8.0 / np.asarray(s.spacing_mm))
    labels[np.sqrt(r) + wobble > 1.0] = 0
  return labels


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
  """A count uniform in ``bounds``; no draw when the feature is off (version-1 streams)."""
  return int(rng.integers(bounds[0], bounds[1] + 1)) if bounds[1] > 0 else 0


def add_structures(rng: np.random.Generator, labels: np.ndarray, s: Setting) -> np.ndarray:
  """Nested cores, thin walls and tubes as new labels K+1, ... (at most ``max_label``).

  core: the part of a label deeper than 35-65 % of its largest depth (mm); wall: the part
  of a label within ``shell_mm`` of another label (an enclosing sheet, at least a voxel
  thick in-plane); tube: the voxels within a radius of a random smooth curve, inside the body.
  """
  spacing = np.asarray(s.spacing_mm, float)
  out = labels.copy()
  next_id = int(labels.max()) + 1
  kinds = ['core'] * _count(rng, s.nested) + ['wall'] * _count(rng, s.shells) \
      + ['tube'] * _count(rng, s.tubes)
  for kind in kinds:
    if next_id > s.max_label:
      break
    if kind == 'tube':
      part = _tube(rng, s, spacing) & (labels > 0)
      rest = 8
    else:
      present = [int(k) for k in np.unique(out) if 0 < k <= labels.max()]
      region = out == int(rng.choice(present))
      depth = ndimage.distance_transform_edt(region, sampling=spacing)
      if kind == 'core':
        part = depth > rng.uniform(0.35, 0.65) * depth.max()
      else:
        part = region & (depth <= max(rng.uniform(*s.shell_mm), spacing.min()))
      rest = int((region & ~part).sum())      # a wall around nothing is a relabel
    if part.sum() >= 8 and rest >= 8:         # structures a Dice can see
      out[part] = next_id
      next_id += 1
  return out


def _tube(rng: np.random.Generator, s: Setting, spacing: np.ndarray) -> np.ndarray:
  """(H, W, D) bool: a tube of radius ``tube_mm`` around a smoothly turning random path."""
  extent = np.asarray(s.shape) * spacing
  step = 0.5 * spacing.min()
  n = int(rng.uniform(0.5, 1.5) * extent.max() / step)
  d0 = rng.standard_normal(3)
  dirs = d0 / np.linalg.norm(d0) + 0.05 * np.cumsum(rng.standard_normal((n, 3)), axis=0)
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  path_mm = rng.uniform(0.2, 0.8, 3) * extent + step * np.cumsum(dirs, axis=0)
  idx = np.round(path_mm / spacing).astype(int)
  idx = idx[np.all((idx >= 0) & (idx < np.asarray(s.shape)), axis=1)]
  centre = np.ones(s.shape, bool)
  centre[tuple(idx.T)] = False
  return ndimage.distance_transform_edt(centre, sampling=spacing) <= rng.uniform(*s.tube_mm)


def misalignment(rng: np.random.Generator, s: Setting) -> tuple[np.ndarray, np.ndarray]:
  """(M (3, 3), t_mm (3,)): a residual linear map about the grid centre, rotations about
  the in-plane axes scaled by ``through_plane`` (a tilt of the slice stack is small)."""
  ang = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * s.misalign_deg)
  ang[:2] *= s.through_plane
  c, n = np.cos(ang), np.sin(ang)
  rx = np.array([[1, 0, 0], [0, c[0], -n[0]], [0, n[0], c[0]]])
  ry = np.array([[c[1], 0, n[1]], [0, 1, 0], [-n[1], 0, c[1]]])
  rz = np.array([[c[2], -n[2], 0], [n[2], c[2], 0], [0, 0, 1]])
  scale = np.diag(1.0 + rng.uniform(-1.0, 1.0, 3) * s.misalign_scale)
  return rx @ ry @ rz @ scale, rng.uniform(-1.0, 1.0, 3) * s.misalign_mm


def compose_linear(u_vox: np.ndarray, m: np.ndarray, t_mm: np.ndarray,
                   spacing_mm) -> np.ndarray:
  """The displacement (voxels) of x -> A(x + u(x)), A(p) = M (p - c) + c + t in mm about
  the grid centre c: the deformation first, then the residual linear map."""
  spacing = np.asarray(spacing_mm, float)
  shape = u_vox.shape[:3]
  grid_mm = np.moveaxis(np.indices(shape, dtype=np.float64), 0, -1) * spacing
  centre = (np.asarray(shape) - 1) / 2 * spacing
  p = grid_mm + u_vox * spacing
  out_mm = (p - centre) @ m.T + centre + t_mm - grid_mm
  return (out_mm / spacing).astype(np.float32)


def fov_cut(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> None:
  """In place: a slab of 5-20 % of one axis at one side is outside this image's field of
  view (background 0, label 0), as a scan shorter than its partner's."""
  axis, side = int(rng.integers(3)), int(rng.integers(2))
  depth = max(1, int(round(rng.uniform(0.05, 0.2) * image.shape[axis])))
  cut = [slice(None)] * 3
  cut[axis] = slice(0, depth) if side == 0 else slice(image.shape[axis] - depth, None)
  image[tuple(cut)] = 0.0
  labels[tuple(cut)] = 0


def render(rng: np.random.Generator, labels: np.ndarray, means: np.ndarray,
           texture: np.ndarray, spacing_mm) -> np.ndarray:
  """One image of a label map: per-label means (K + 1,) + texture (H, W, D; it moves with
  the tissue), then this image's own bias field, gamma, blur and noise; float32 in [0, 1]."""
  spacing = np.asarray(spacing_mm, float)
  img = means[labels] + texture
  bias = np.exp(rng.uniform(0.0, 0.3) * _smooth_noise(rng, labels.shape, 40.0 / spacing))
  img = np.clip(img * bias, 0.0, None)
  img = (img / max(float(img.max()), 1e-6)) ** np.exp(rng.normal(0.0, 0.25))
  img = ndimage.gaussian_filter(img, rng.uniform(0.0, 1.2) * spacing.min() / spacing)
  img = img + rng.uniform(0.0, 0.04) * rng.standard_normal(img.shape).astype(np.float32)
  lo, hi = np.percentile(img, [0.5, 99.5])
  return np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def draw_pair(s: Setting, index: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(fixed image, moving image, fixed labels, moving labels, disp_vox (H, W, D, 3)):
  moving = fixed structures at x + disp_vox(x) (deformation, then the residual linear map
  when the setting has one). Random stream [seed, setting, index]."""
  stream = list(SETTINGS).index(s.name) if s.name in SETTINGS else zlib.crc32(s.name.encode())
  rng = np.random.default_rng([seed, stream, index])
  fixed_lab = label_map(rng, s)
  fixed_lab = add_structures(rng, fixed_lab, s)
  u = random_deformation(s.shape, s.spacing_mm, rng.uniform(*s.disp_mm),
                         rng.uniform(*s.smooth_mm), s.through_plane,
                         np.ones(s.shape, bool), rng)
  if s.misalign_deg or s.misalign_mm or s.misalign_scale:
    u = compose_linear(u, *misalignment(rng, s), s.spacing_mm)
  moving_lab = sample(fixed_lab, u, 0).astype(np.uint8)
  k = int(fixed_lab.max()) + 1
  means = rng.uniform(0.0, 1.0, size=k).astype(np.float32)
  means[0] = rng.uniform(0.0, 0.1)           # air (when there is a body outline)
  texture = (rng.uniform(0.0, 0.06, size=k).astype(np.float32)[fixed_lab]
             * _smooth_noise(rng, s.shape, 1.0))
  fixed = render(rng, fixed_lab, means, texture, s.spacing_mm)
  moving = render(rng, moving_lab, means, sample(texture, u, 1), s.spacing_mm)
  if rng.uniform() < s.p_invert:
    moving = 1.0 - moving
  if s.p_fov_cut and rng.uniform() < s.p_fov_cut:
    image, labels = ((fixed, fixed_lab), (moving, moving_lab))[int(rng.integers(2))]
    fov_cut(rng, image, labels)
  return fixed, moving, fixed_lab, moving_lab, u


def affine_for(s: Setting) -> np.ndarray:
  """RAS voxel -> mm affine at the setting's spacing, centred on the grid."""
  affine = np.diag([*s.spacing_mm, 1.0])
  affine[:3, 3] = -np.asarray(s.spacing_mm) * (np.asarray(s.shape) - 1) / 2
  return affine


def write_pairs(root: str, setting: str | Setting, n_pairs: int, seed: int,
                split: str = 'train', progress=lambda s: None) -> str:
  """Writes ``n_pairs`` pairs of a setting (a ``Setting`` or a name in ``SETTINGS``) under
  ROOT/<name>/ and their ``pairs.csv`` (columns of the "custom" reader); returns the CSV
  path. Pairs already on disk (all four files) are kept, so an interrupted call resumes."""
  s = SETTINGS[setting] if isinstance(setting, str) else setting
  folder = os.path.join(root, s.name)
  os.makedirs(folder, exist_ok=True)
  affine = affine_for(s)
  rows = []
  for i in range(n_pairs):
    names = {k: f'pair{i:04d}_{k}.nii.gz' for k in ('fixed', 'moving', 'fixed_labels',
                                                   'moving_labels')}
    if not all(os.path.exists(os.path.join(folder, n)) for n in names.values()):
      fixed, moving, fixed_lab, moving_lab, _ = draw_pair(s, i, seed)
      for key, arr in (('fixed', fixed), ('moving', moving), ('fixed_labels', fixed_lab),
                       ('moving_labels', moving_lab)):
        nifti.save_nifti(os.path.join(folder, names[key]), arr, affine,
                      intent='label' if key.endswith('labels') else None)
    rows.append({'moving': names['moving'], 'fixed': names['fixed'],
                 'moving_label': names['moving_labels'], 'fixed_label': names['fixed_labels'],
                 'split': split})
    if (i + 1) % 25 == 0 or i + 1 == n_pairs:
      progress(f'[synth {s.name}] {i + 1}/{n_pairs} pairs')
  path = os.path.join(folder, 'pairs.csv')
  with files.atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return path
