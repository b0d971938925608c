"""Phantom registration pairs with known smooth deformations (numpy + scipy + nibabel).

Fixed = a phantom (ACDC-like cardiac or CT-like abdomen, ``phantoms``); moving = the same
phantom warped by a random smooth diffeomorphism (a Gaussian-smoothed random velocity field
integrated by scaling and squaring), so the labels are exact ground truth. Three sets
(``set_specs``): cardiac (112x112x12 at 1.6x1.6x8 mm, deformation mostly in-plane), abdomen
(80x96x80 at 2 mm) and inverted (abdomen with the moving contrast inverted); with
``misaligned=True`` also each set's misaligned variant: the same pairs with the moving scan
placed elsewhere in world space by a random rotation (<= 15 degrees about each axis),
translation (<= 15 mm) and per-axis scale (+-10 %) of its header, as scans of two visits
arrive. Every pair has landmarks with known correspondences (CSV, RAS mm).

Used by ``bench/register_bench.py`` (the benchmark, seed 0) and by the general head's
out-of-domain validation (``fmir_jax.general``, another seed). ``random_deformation`` and
``sample`` are also the deformation model of the domain-randomised generator (``synth``).
Deterministic from the seed.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from feature_extract.synthetic import phantoms
from fmir_jax.core import nifti
from fmir_jax.core import metrics as metrics_lib

SQUARINGS = 6                 # scaling-and-squaring steps of the synthetic deformations
FAR_FIELD_CAP = 1.5           # synthetic velocity magnitude soft cap, x the peak over labels


@dataclasses.dataclass(frozen=True)
class SetSpec:
  """One benchmark set.

  phantom: 'cardiac' or 'abdomen'; shape (H, W, D) voxels at spacing_mm; factors: the fmir
  pyramid factors; invert: moving intensities inverted; similarity: instance optimisation
  similarity; max_disp_mm: range of the deformation's peak magnitude (mm); smooth_mm:
  Gaussian sigma of the random velocity (mm); through_plane: scale of its last-axis component.
  """
  name: str
  phantom: str
  shape: tuple[int, int, int]
  spacing_mm: tuple[float, float, float]
  factors: tuple[int, int, int]
  invert: bool = False
  similarity: str = 'ncc'
  max_disp_mm: tuple[float, float] = (5.0, 8.0)
  smooth_mm: float = 16.0
  through_plane: float = 1.0
  misalign: bool = False


MISALIGN = dict(rotation_deg=15.0, translation_mm=15.0, scale=0.10)   # the ranges
LANDMARKS = 20                # landmarks per pair, drawn inside the labelled structures


def set_specs(smoke: bool, misaligned: bool = False) -> list[SetSpec]:
  """The three sets at benchmark (or --smoke) size, then (``misaligned``) their misaligned
  variants ('<set>_misaligned': the same pairs, the moving header moved)."""
  if smoke:
    cardiac = dict(shape=(32, 32, 8), spacing_mm=(4.0, 4.0, 10.0))
    abdomen = dict(shape=(32, 32, 16), spacing_mm=(2.0, 2.0, 2.0), smooth_mm=10.0)
  else:
    cardiac = dict(shape=(112, 112, 12), spacing_mm=(1.6, 1.6, 8.0))
    abdomen = dict(shape=(80, 96, 80), spacing_mm=(2.0, 2.0, 2.0))
  sets = [SetSpec('cardiac', 'cardiac', factors=(2, 2, 1), through_plane=0.3, **cardiac),
          SetSpec('abdomen', 'abdomen', factors=(2, 2, 2), **abdomen),
          SetSpec('inverted', 'abdomen', factors=(2, 2, 2), invert=True, similarity='mind',
                  **abdomen)]
  if misaligned:
    sets += [dataclasses.replace(s, name=s.name + '_misaligned', misalign=True) for s in sets]
  return sets


def misalignment(shape, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random 4x4 world map about the grid's centre: rotation, translation, scale in
  ``MISALIGN``'s ranges (uniform)."""
  angles = rng.uniform(-1, 1, 3) * MISALIGN['rotation_deg']
  m = Rotation.from_euler('xyz', angles, degrees=True).as_matrix() @ np.diag(
      1 + rng.uniform(-1, 1, 3) * MISALIGN['scale'])
  centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
  out = np.eye(4)
  out[:3, :3] = m
  out[:3, 3] = centre + rng.uniform(-1, 1, 3) * MISALIGN['translation_mm'] - m @ centre
  return out


def cardiac_phantom(pid: int, seed: int, shape, spacing_mm
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """An ACDC-like ED frame on a given grid: (image float32 (H, W, D), labels uint8, affine).

  Orientation and body from ``phantoms.draw_acdc_phantom`` / ``write_acdc_phantoms``' recipe,
  heart drawn for this grid's depth. Uses phantoms' private frame renderer: the module has
  no public "render a phantom on this grid" function.
  """
  p = phantoms.draw_acdc_phantom(pid, seed)
  rot = p.affine[:3, :3] / np.asarray(p.spacing_mm)         # unit voxel axes (columns)
  affine = np.eye(4)
  affine[:3, :3] = rot * np.asarray(spacing_mm, float)
  affine[:3, 3] = p.affine[:3, 3]
  heart = phantoms._draw_heart(np.random.default_rng([seed, pid, 2]), shape[2],  # noqa: SLF001
                               spacing_mm[2])
  p = dataclasses.replace(p, shape=tuple(shape), spacing_mm=tuple(spacing_mm), affine=affine,
                          ed=heart)
  rng = np.random.default_rng([seed, pid, 1])
  nx, ny, s = shape[0], shape[1], spacing_mm[0]
  body = {'cx': rng.uniform(-10, 10), 'cy': rng.uniform(-10, 10),
          'ax': max(rng.uniform(0.44, 0.5) * nx * s, 110.0),
          'ay': max(rng.uniform(0.36, 0.44) * ny * s, 100.0),
          'tissue': rng.uniform(0.35, 0.5), 'gain': rng.uniform(200, 600),
          'bias': phantoms._waves(rng, 3, (300, 600))}  # noqa: SLF001
  texture = phantoms._waves(rng, 6, (8, 30))  # noqa: SLF001
  img, lab = phantoms._acdc_frame(p, heart, rng, texture, body)  # noqa: SLF001
  return img.astype(np.float32), lab.astype(np.uint8), affine


def abdomen_volume(scan_id: int, seed: int, shape, spacing_mm
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A CT-like abdomen phantom: (HU image float32 (H, W, D), labels uint8, affine), with
  the centred affine of ``phantoms.write_abdomen_phantoms`` and a torso that changes along
  the slice axis (``torso_profile``)."""
  img, lab = phantoms.abdomen_phantom(scan_id, seed, tuple(shape))
  img, lab = torso_profile(img, lab, np.random.default_rng([seed, scan_id, 3]))
  affine = np.diag([-spacing_mm[0], -spacing_mm[1], spacing_mm[2], 1.0])
  affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
  return img.astype(np.float32), lab.astype(np.uint8), affine


def torso_profile(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Gives ``abdomen_phantom`` a z profile: a barrel-shaped torso and two lung bases.

  That phantom's body is the same elliptic cylinder in every slice (only the organs change
  along z), which makes affine registration degenerate along z: ANTs' affine stage shrank
  z by 20-45% and SyN then fell below identity. Here each slice is scaled in-plane about
  the grid centre (x 0.85-0.9 at the ends, 1 in the middle) and air-filled lung bases are
  painted, outside the organs, into the upper lateral-posterior torso (label 0).
  img: (H, W, D) HU; lab: (H, W, D) labels. Returns the new (img, lab).
  """
  h, w, d = img.shape
  zn = np.linspace(-1.0, 1.0, d)
  scale = 1.0 + rng.uniform(0.1, 0.15) * zn ** 2          # sampling scale: > 1 shrinks
  ii, jj, kk = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in img.shape),
                           indexing='ij')
  ci, cj = (h - 1) / 2, (w - 1) / 2
  coords = np.stack([ci + (ii - ci) * scale[kk.astype(int)],
                     cj + (jj - cj) * scale[kk.astype(int)], kk])
  img = ndimage.map_coordinates(img, coords, order=1, mode='constant', cval=-1000.0)
  lab = ndimage.map_coordinates(lab, coords, order=0, mode='constant', cval=0)
  xn, yn = (ii - ci) / ci, (jj - cj) / cj
  for side in (-1.0, 1.0):
    centre = (side * rng.uniform(0.4, 0.5), rng.uniform(-0.25, -0.05), rng.uniform(0.9, 1.1))
    axes = (rng.uniform(0.25, 0.32), rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.5))
    inside = sum(((v - c) / a) ** 2 for v, c, a in zip((xn, yn, zn[None, None, :]), centre,
                                                        axes)) < 1
    lung = inside & (lab == 0) & (img > -900.0)
    img[lung] = -850.0 + rng.normal(0.0, 12.0, size=int(lung.sum()))
  return img, lab


def sample(volume: np.ndarray, disp_vox: np.ndarray, order: int) -> np.ndarray:
  """volume(x + disp_vox(x)): (H, W, D) and (H, W, D, 3) voxels -> (H, W, D); edge values
  outside (no black border from the synthetic deformation)."""
  grid = np.indices(volume.shape, dtype=np.float32)
  coords = grid + np.moveaxis(disp_vox, -1, 0)
  return ndimage.map_coordinates(volume, coords, order=order, mode='nearest')


def random_deformation(shape, spacing_mm, peak_mm: float, smooth_mm: float,
                       through_plane: float, mask: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
  """A smooth diffeomorphic displacement (H, W, D, 3) in voxels, component k along axis k.

  White noise smoothed by a Gaussian of ``smooth_mm`` (per axis in voxels), last-axis
  component scaled by ``through_plane``, scaled as a velocity so that its largest magnitude
  over ``mask`` (H, W, D bool: the labelled structures) is ``peak_mm`` (elsewhere softly
  capped near ``FAR_FIELD_CAP`` x ``peak_mm`` by a tanh of the magnitude), then integrated by
  scaling and squaring (``SQUARINGS`` steps). The result's peak over the mask is close to
  ``peak_mm`` (``write_pair`` records the exact values).
  """
  spacing = np.asarray(spacing_mm, float)
  sigma = smooth_mm / spacing
  v_mm = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode='reflect')
                   for _ in range(3)], -1)
  v_mm[..., 2] *= through_plane
  v_mm *= peak_mm / np.linalg.norm(v_mm[mask], axis=-1).max()
  # Soft cap (smooth) so that far from the structures the field stays of the same size.
  norm = np.maximum(np.linalg.norm(v_mm, axis=-1, keepdims=True), 1e-6)
  cap = FAR_FIELD_CAP * peak_mm
  v_mm *= cap * np.tanh(norm / cap) / norm
  v_mm *= peak_mm / np.linalg.norm(v_mm[mask], axis=-1).max()
  u = (v_mm / spacing / 2 ** SQUARINGS).astype(np.float32)
  for _ in range(SQUARINGS):
    u = u + np.stack([sample(u[..., k], u, 1) for k in range(3)], -1)
  return u


@dataclasses.dataclass
class Pair:
  """One written pair: NIfTI paths and the ground-truth deformation's size."""
  name: str
  fixed: str
  moving: str
  fixed_labels: str
  moving_labels: str
  fixed_landmarks: str
  moving_landmarks: str
  peak_mm: float
  peak_mm_volume: float
  gt_folding: float


def write_pair(spec: SetSpec, index: int, seed: int, folder: str) -> Pair:
  """Draws and writes pair ``index`` of a set: fixed = phantom, moving = phantom(x + u(x)),
  its header moved by ``misalignment`` for a misaligned set (moving voxel x then lies at
  world M A x). Landmarks: moving voxels x inside the moving labels at M A x, and their
  partners at A (x + u(x)) (RAS mm; row i matches row i).

  Volume ids: cardiac patient / abdomen scan ``index + 1`` (the inverted set uses scans
  101+, other subjects than the abdomen set). Deformation rng: [seed, set, index] (a
  misaligned set has its set's deformations); misalignment rng: [seed, set, index, 1].
  """
  set_id = {'cardiac': 0, 'abdomen': 1, 'inverted': 2}[spec.name.replace('_misaligned', '')]
  if spec.phantom == 'cardiac':
    img, lab, affine = cardiac_phantom(index + 1, seed, spec.shape, spec.spacing_mm)
  else:
    vid = index + (101 if spec.invert else 1)
    img, lab, affine = abdomen_volume(vid, seed, spec.shape, spec.spacing_mm)
  rng = np.random.default_rng([seed, set_id, index])
  u = random_deformation(spec.shape, spec.spacing_mm, rng.uniform(*spec.max_disp_mm),
                         spec.smooth_mm, spec.through_plane, lab > 0, rng)
  moving = sample(img, u, 1)
  if spec.invert:
    moving = moving.max() - moving
  name = f'pair{index + 1:02d}'
  paths = {k: os.path.join(folder, f'{name}_{k}.nii.gz')
           for k in ('fixed', 'moving', 'fixed_labels', 'moving_labels')}
  paths.update({k: os.path.join(folder, f'{name}_{k}.csv')
                for k in ('fixed_landmarks', 'moving_landmarks')})
  moved = np.eye(4)
  if spec.misalign:
    moved = misalignment(spec.shape, affine, np.random.default_rng([seed, set_id, index, 1]))
  nifti.save_nifti(paths['fixed'], img, affine)
  nifti.save_nifti(paths['moving'], moving.astype(np.float32), moved @ affine)
  nifti.save_nifti(paths['fixed_labels'], lab, affine, intent='label')
  moving_lab = sample(lab, u, 0)
  nifti.save_nifti(paths['moving_labels'], moving_lab, moved @ affine, intent='label')
  # moving(x) = fixed(x + u(x)): moving voxel x and fixed voxel x + u(x) are one point
  inside = np.argwhere(moving_lab > 0)
  picks = inside[np.random.default_rng([seed, set_id, index, 2]).choice(
      len(inside), min(LANDMARKS, len(inside)), replace=False)].astype(np.float64)
  partners = picks + np.stack([ndimage.map_coordinates(u[..., k], picks.T, order=1)
                               for k in range(3)], -1)
  to_world = lambda a, v: v @ a[:3, :3].T + a[:3, 3]  # noqa: E731
  for key, pts in (('fixed_landmarks', to_world(affine, partners)),
                   ('moving_landmarks', to_world(moved @ affine, picks))):
    with open(paths[key], 'w') as f:
      f.write('x_ras,y_ras,z_ras\n' + ''.join(f'{x:.4f},{y:.4f},{z:.4f}\n' for x, y, z in pts))
  norm_mm = np.linalg.norm(u * np.asarray(spec.spacing_mm, np.float32), axis=-1)
  return Pair(name, **paths, peak_mm=float(norm_mm[lab > 0].max()),
              peak_mm_volume=float(norm_mm.max()),
              gt_folding=metrics_lib.folding_fraction(u, crop=0))


def write_set(spec: SetSpec, n_pairs: int, seed: int, folder: str,
              progress: Callable[[str], None]) -> list[Pair]:
  """Writes the pairs of a set into ``folder`` (earlier files of the same names replaced)."""
  os.makedirs(folder, exist_ok=True)
  t0 = time.perf_counter()
  pairs = [write_pair(spec, i, seed, folder) for i in range(n_pairs)]
  peaks = [p.peak_mm for p in pairs]
  progress(f'[{spec.name}] wrote {n_pairs} pairs {spec.shape} at {spec.spacing_mm} mm into '
           f'{folder} (peak deformation {min(peaks):.1f}-{max(peaks):.1f} mm, '
           f'{time.perf_counter() - t0:.1f} s)')
  return pairs
