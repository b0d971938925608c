"""Synthetic phantoms in the official ACDC and Learn2Reg abdomen CT layouts (numpy only).

Deterministic from a seed (each subject draws from ``default_rng([seed, subject_id])``),
so a subject looks the same however many are written. Used by the demo and the tests; no
real data is needed.

ACDC: per patient an ED and an ES frame (+ ``_gt`` labels 1 RV, 2 MYO, 3 LV) and Info.cfg
under ROOT/training (ids 1-100) or ROOT/testing (ids 101-150). The left ventricle is an
elliptic cylinder tapering towards the apex, the myocardium a ring of varying thickness,
the RV a crescent on one side. ES = contracted LV cavity, thicker wall, smaller RV, a small
in-plane shift. Tissue texture moves with the heart; bias field and Rician noise do not.

Abdomen: CT-like HU volumes (air -1000, fat -100, muscle 40, organs 13 labels, bone 700)
at 2 mm, organs placed and sized differently per scan (inter-subject variation).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import nibabel as nib
import numpy as np

from fmir_jax.core import files

# ----------------------------------------------------------------------------- shared


def _write(path: str, data: np.ndarray, affine: np.ndarray) -> str:
  """Writes int16 images / uint8 labels (like the releases) with sform and qform set."""
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path


def _rotation_z(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotation_x(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _waves(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]
           ) -> tuple[np.ndarray, np.ndarray]:
  """Random plane waves: (n, 3) wave vectors (rad/mm) and (n,) phases."""
  dirs = rng.normal(size=(n, 3))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  k = 2 * np.pi / rng.uniform(*wavelength_mm, size=(n, 1))
  return dirs * k, rng.uniform(0, 2 * np.pi, size=n)


def _wave_field(points: Sequence[np.ndarray], kvec: np.ndarray, phase: np.ndarray
                ) -> np.ndarray:
  """Mean of sin(k . p + phase) over the waves.

  points: 3 broadcastable mm arrays; the first two must not vary along the last axis and
  the third only along it, so sin(a + b) = sin a cos b + cos a sin b needs only
  in-plane and 1D sines.
  """
  out = 0.0
  for kv, ph in zip(kvec, phase):
    a = (kv[0] * points[0] + kv[1] * points[1]).astype(np.float32)
    b = (kv[2] * points[2] + ph).astype(np.float32)
    out = out + np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)
  return out / len(kvec)


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
  n1 = rng.standard_normal(size=image.shape, dtype=np.float32)
  n2 = rng.standard_normal(size=image.shape, dtype=np.float32)
  return np.sqrt((image + sigma * n1) ** 2 + (sigma * n2) ** 2)

# ----------------------------------------------------------------------------- ACDC


@dataclasses.dataclass(frozen=True)
class HeartParams:
  """Heart geometry of one frame, in mm, in the stack's in-plane frame.

  centre: LV axis position (x, y) relative to the in-plane grid centre.
  angle: in-plane rotation of the LV ellipse (rad); aspect: minor/major axis ratio.
  base_mm, length_mm: base position along the slice axis and LV length to the apex.
  r_lv: LV cavity radius at the base; wall: mean wall thickness; wall_amp/wall_phase:
  thickness variation with angle. rv_angle: side of the RV (rad, heart frame);
  rv_gap: RV centre offset beyond the epicardium; rv_axes: (radial, tangential) RV half axes.
  """
  centre: tuple[float, float]
  angle: float
  aspect: float
  base_mm: float
  length_mm: float
  r_lv: float
  wall: float
  wall_amp: float
  wall_phase: float
  rv_angle: float
  rv_gap: float
  rv_axes: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class AcdcPhantom:
  """Everything drawn for one phantom patient."""
  patient_id: int
  shape: tuple[int, int, int]
  spacing_mm: tuple[float, float, float]
  affine: np.ndarray
  ed_frame: int
  es_frame: int
  ed: HeartParams
  es: HeartParams


def _taper(z_mm: np.ndarray, base: float, length: float) -> np.ndarray:
  """1 at the base, falling to 0 at the apex (ellipsoidal profile), 0 above the base."""
  zeta = (z_mm - base) / length
  return np.where(zeta >= 0, np.sqrt(np.clip(1 - zeta ** 2, 0, 1)), 0.0)


def heart_labels(h: HeartParams, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Labels (0 bg, 1 RV, 2 MYO, 3 LV) at in-plane mm positions (x, y) and slice mm z."""
  c, s = np.cos(h.angle), np.sin(h.angle)
  u0, v0 = x - h.centre[0], y - h.centre[1]
  u, v = c * u0 + s * v0, -s * u0 + c * v0
  e = np.sqrt(u ** 2 + (v / h.aspect) ** 2)
  tau = _taper(z, h.base_mm, h.length_mm)
  wall = h.wall + h.wall_amp * np.cos(np.arctan2(v, u) - h.wall_phase)
  endo = h.r_lv * tau
  epi = np.where(tau > 0, endo + wall * np.sqrt(tau), 0.0)
  lab = np.zeros(np.broadcast_shapes(u.shape, tau.shape), np.uint8)
  # RV ellipse centred beyond the epicardium on the rv_angle side, shorter than the LV.
  d = h.r_lv * tau + h.wall + h.rv_gap
  cr, sr = np.cos(h.rv_angle), np.sin(h.rv_angle)
  q1, q2 = cr * u + sr * v - d, -sr * u + cr * v
  tau_rv = _taper(z, h.base_mm, 0.85 * h.length_mm)
  rv = (q1 / h.rv_axes[0]) ** 2 + (q2 / h.rv_axes[1]) ** 2 < tau_rv ** 2
  lab[rv & (e >= epi)] = 1
  lab[(e >= endo) & (e < epi)] = 2
  lab[e < endo] = 3
  return lab


def _draw_heart(rng: np.random.Generator, n_slices: int, slice_mm: float) -> HeartParams:
  depth = n_slices * slice_mm
  return HeartParams(
      centre=tuple(rng.uniform(-20, 20, size=2)), angle=rng.uniform(0, np.pi),
      aspect=rng.uniform(0.8, 1.0), base_mm=rng.uniform(-0.3, 0.6) * slice_mm,
      length_mm=rng.uniform(0.75, 0.95) * depth, r_lv=rng.uniform(20, 28),
      wall=rng.uniform(7, 10), wall_amp=rng.uniform(0, 2.5),
      wall_phase=rng.uniform(0, 2 * np.pi), rv_angle=rng.uniform(-0.5, 0.5) + np.pi,
      rv_gap=rng.uniform(0, 6), rv_axes=(rng.uniform(14, 20), rng.uniform(28, 38)))


def _contract(rng: np.random.Generator, ed: HeartParams) -> HeartParams:
  """ES: smaller cavity, thicker wall, smaller RV, small shift and base descent."""
  f = rng.uniform(0.6, 0.75)
  rv = rng.uniform(0.72, 0.88)
  shift = rng.uniform(-3, 3, size=2)
  return dataclasses.replace(
      ed, centre=(ed.centre[0] + shift[0], ed.centre[1] + shift[1]), r_lv=ed.r_lv * f,
      wall=ed.wall * rng.uniform(1.25, 1.5), rv_axes=(ed.rv_axes[0] * rv, ed.rv_axes[1] * rv),
      base_mm=ed.base_mm + rng.uniform(0, 3), length_mm=ed.length_mm * rng.uniform(0.93, 1))


def draw_acdc_phantom(patient_id: int, seed: int,
                      inplane_size: tuple[int, int] = (160, 260)) -> AcdcPhantom:
  """Draws the geometry, grid and frame numbers of one phantom patient."""
  rng = np.random.default_rng([seed, patient_id])
  shape = (int(rng.integers(inplane_size[0], inplane_size[1] + 1)),
           int(rng.integers(inplane_size[0], inplane_size[1] + 1)), int(rng.integers(6, 13)))
  s, t = rng.uniform(1.2, 1.9), rng.uniform(5.0, 10.0)
  # Varied orientation: in-plane quarter turns + jitter, optional flip, oblique tilt.
  rot = (_rotation_x(rng.uniform(-0.5, 0.5))
         @ _rotation_z(rng.integers(4) * np.pi / 2 + rng.uniform(-0.3, 0.3)))
  if rng.random() < 0.5:
    rot = rot @ np.diag([-1.0, 1.0, 1.0])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag([s, s, t])
  affine[:3, 3] = rng.uniform(-150, 150, size=3)
  ed = _draw_heart(rng, shape[2], t)
  es = _contract(rng, ed)
  ed_frame = int(rng.integers(1, 3))
  es_frame = int(ed_frame + rng.integers(7, 15))
  return AcdcPhantom(patient_id, shape, (s, s, t), affine, ed_frame, es_frame, ed, es)


def _acdc_frame(p: AcdcPhantom, h: HeartParams, rng: np.random.Generator,
                texture: tuple[np.ndarray, np.ndarray], body: dict[str, float]
                ) -> tuple[np.ndarray, np.ndarray]:
  """(image float, labels uint8) of one frame on the phantom's voxel grid."""
  nx, ny, nz = p.shape
  s, _, t = p.spacing_mm
  x = ((np.arange(nx) - (nx - 1) / 2) * s)[:, None, None]
  y = ((np.arange(ny) - (ny - 1) / 2) * s)[None, :, None]
  z = (np.arange(nz) * t)[None, None, :]
  lab = heart_labels(h, x, y, z)
  # Torso ellipse with two lungs; values in arbitrary MR units.
  bx, by = (x - body["cx"]) / body["ax"], (y - body["cy"]) / body["ay"]
  inside = bx ** 2 + by ** 2 < 1
  lung = np.zeros(inside.shape, bool)
  for side in (-1, 1):
    lung |= ((bx - 0.5 * side) / 0.32) ** 2 + (by / 0.55) ** 2 < 1
  img = np.where(inside, body["tissue"], 0.02) * np.ones(lab.shape, np.float32)
  img = np.where(inside & lung, 0.08, img)
  values = np.array([0.0, 0.85, 0.3, 0.95], np.float32)
  img = np.where(lab > 0, values[lab], img)
  # Texture moves with the heart (same phase relative to the LV centre in both frames).
  tex = _wave_field((x - h.centre[0], y - h.centre[1], z), *texture)
  img = img * (1 + 0.12 * tex)
  bias = 1 + 0.25 * _wave_field((x, y, z), *body["bias"])
  img = _rician(rng, img * bias, 0.03)
  return img * body["gain"], lab


def n_frames(p: AcdcPhantom) -> int:
  """Frames of the phantom's cardiac cycle (Info.cfg's NbFrame)."""
  return p.es_frame + 12


def contraction(p: AcdcPhantom, frame: int) -> float:
  """How far frame ``frame`` (1-based) is from ED towards ES, in [0, 1]: a half cosine
  from ED (0) to ES (1), then back over the rest of the cycle (frame NbFrame + ED is ED
  again); frames before ED belong to the end of the previous cycle."""
  cycle = n_frames(p)
  t = frame if frame >= p.ed_frame else frame + cycle
  if t <= p.es_frame:
    return float(0.5 * (1 - np.cos(np.pi * (t - p.ed_frame) / (p.es_frame - p.ed_frame))))
  return float(0.5 * (1 + np.cos(np.pi * (t - p.es_frame) / (cycle + p.ed_frame - p.es_frame))))


def heart_at(p: AcdcPhantom, frame: int) -> HeartParams:
  """The heart of any frame: every parameter between ED's and ES's by ``contraction``."""
  w = contraction(p, frame)
  mix = lambda a, b: tuple(mix(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) \
      else (1 - w) * a + w * b                                    # noqa: E731
  return HeartParams(**{f.name: mix(getattr(p.ed, f.name), getattr(p.es, f.name))
                        for f in dataclasses.fields(HeartParams)})


def write_acdc_phantoms(root: str, n_patients: int, seed: int, first_id: int = 1, *,
                        inplane_size: tuple[int, int] = (160, 260),
                        cine: bool = False) -> list[AcdcPhantom]:
  """Writes phantom patients ``first_id .. first_id + n_patients - 1`` in the raw layout.

  ROOT/training/patientNNN (ids 1-100) or ROOT/testing/patientNNN (101-150), each with
  Info.cfg, patientNNN_frameFF.nii.gz (int16) and patientNNN_frameFF_gt.nii.gz (uint8) for
  the ED and ES frames. Patients 1-20 include the validation ids 18-20.

  Args:
    root: output folder (created).
    n_patients: how many patients.
    seed: random seed; patient ``i`` is the same for a given seed whatever ``n_patients``.
    first_id: first patient number (1-150).
    inplane_size: (min, max) in-plane voxel count per axis (smaller is faster).
    cine: also the whole cycle as ``patientNNN_4d.nii.gz`` (X, Y, Z, T; int16, as the
      release), NbFrame frames whose heart is ``heart_at`` each frame; its ED and ES
      frames are the frame files, voxel for voxel (the other frames' noise is drawn from
      a stream of their own, so the ED/ES files are the same with or without it).

  Returns:
    The drawn phantom parameters, one per patient.
  """
  last = first_id + n_patients - 1
  if n_patients < 1 or first_id < 1 or last > 150:
    raise ValueError(f"write_acdc_phantoms: ids {first_id}..{last} must lie in 1..150.")
  out = []
  for pid in range(first_id, last + 1):
    p = draw_acdc_phantom(pid, seed, inplane_size)
    rng = np.random.default_rng([seed, pid, 1])
    nx, ny, _ = p.shape
    s = p.spacing_mm[0]
    body = {"cx": rng.uniform(-10, 10), "cy": rng.uniform(-10, 10),
            "ax": rng.uniform(0.44, 0.5) * nx * s, "ay": rng.uniform(0.36, 0.44) * ny * s,
            "tissue": rng.uniform(0.35, 0.5), "gain": rng.uniform(200, 600),
            "bias": _waves(rng, 3, (300, 600))}
    body["ax"], body["ay"] = max(body["ax"], 110.0), max(body["ay"], 100.0)
    texture = _waves(rng, 6, (8, 30))
    folder = os.path.join(root, "training" if pid <= 100 else "testing", f"patient{pid:03d}")
    os.makedirs(folder, exist_ok=True)
    frames = {}
    for number, h in ((p.ed_frame, p.ed), (p.es_frame, p.es)):
      img, lab = _acdc_frame(p, h, rng, texture, body)
      stem = os.path.join(folder, f"patient{pid:03d}_frame{number:02d}")
      frames[number] = np.round(img).astype(np.int16)
      _write(stem + ".nii.gz", frames[number], p.affine)
      _write(stem + "_gt.nii.gz", lab, p.affine)
    if cine:
      cine_rng = np.random.default_rng([seed, pid, 2])
      series = [frames[t] if t in frames else np.round(
          _acdc_frame(p, heart_at(p, t), cine_rng, texture, body)[0]).astype(np.int16)
          for t in range(1, n_frames(p) + 1)]
      _write(os.path.join(folder, f"patient{pid:03d}_4d.nii.gz"), np.stack(series, -1),
             p.affine)
    with open(os.path.join(folder, "Info.cfg"), "w") as f:
      f.write(f"ED: {p.ed_frame}\nES: {p.es_frame}\nGroup: NOR\n"
              f"Height: {rng.uniform(150, 195):.1f}\nNbFrame: {n_frames(p)}\n"
              f"Weight: {rng.uniform(50, 100):.1f}\n")
    out.append(p)
  return out

# ----------------------------------------------------------------------------- Abdomen

# Label, centre (x, y, z) and half axes in body-normalised units, HU. x: patient left,
# y: anterior, z: superior. Painted in order, so small structures come last.
ABDOMEN_ORGANS = (
    (6, "liver", (-0.35, 0.05, 0.45), (0.38, 0.45, 0.3), 60.0),
    (1, "spleen", (0.5, -0.2, 0.4), (0.14, 0.2, 0.15), 50.0),
    (7, "stomach", (0.3, 0.2, 0.4), (0.2, 0.15, 0.15), 20.0),
    (2, "right kidney", (-0.38, -0.4, 0.0), (0.1, 0.13, 0.18), 150.0),
    (3, "left kidney", (0.38, -0.4, 0.05), (0.1, 0.13, 0.18), 150.0),
    (4, "gallbladder", (-0.28, 0.25, 0.15), (0.07, 0.08, 0.1), 10.0),
    (11, "pancreas", (0.1, 0.0, 0.1), (0.28, 0.06, 0.06), 45.0),
    (10, "portal and splenic vein", (0.0, 0.08, 0.2), (0.22, 0.035, 0.035), 130.0),
    (8, "aorta", (0.06, -0.35, 0.1), (0.055, 0.055, 0.75), 200.0),
    (9, "inferior vena cava", (-0.12, -0.3, 0.1), (0.055, 0.06, 0.7), 120.0),
    (5, "esophagus", (0.04, -0.25, 0.8), (0.04, 0.04, 0.2), 30.0),
    (12, "left adrenal gland", (0.25, -0.3, 0.32), (0.035, 0.035, 0.06), 35.0),
    (13, "right adrenal gland", (-0.24, -0.3, 0.32), (0.035, 0.035, 0.06), 35.0),
)


def _ellipsoid_into(img: np.ndarray, lab: np.ndarray, centre_vox: np.ndarray,
                    axes_vox: np.ndarray, value: float, label: int) -> None:
  """Paints an axis-aligned ellipsoid into img/lab, touching only its bounding box."""
  lo = np.maximum(np.floor(centre_vox - axes_vox).astype(int), 0)
  hi = np.minimum(np.ceil(centre_vox + axes_vox).astype(int) + 1, img.shape)
  if np.any(hi <= lo):
    return
  g = [np.arange(a, b)[tuple(slice(None) if i == k else None for i in range(3))]
       for k, (a, b) in enumerate(zip(lo, hi))]
  r2 = sum(((g[k] - centre_vox[k]) / axes_vox[k]) ** 2 for k in range(3))
  inside = r2 < 1
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  img[box][inside] = value
  lab[box][inside] = label


def abdomen_phantom(scan_id: int, seed: int, shape: tuple[int, int, int] = (192, 160, 256)
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(HU image float32, labels uint8) of one phantom scan on a (X, Y, Z) grid."""
  rng = np.random.default_rng([seed, scan_id])
  half = (np.asarray(shape, float) - 1) / 2
  # Body ellipse in normalised in-plane units, varied per scan.
  scale = np.array([rng.uniform(0.8, 0.95), rng.uniform(0.75, 0.92), 1.0])
  offset = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.06, 0.04), 0.0])
  xs = [(np.arange(n) - h) / h for n, h in zip(shape, half)]
  x, y = xs[0][:, None], xs[1][None, :]
  r2 = ((x - offset[0]) / scale[0]) ** 2 + ((y - offset[1]) / scale[1]) ** 2
  img2d = np.where(r2 < 1, -100.0, -1000.0)         # fat under the skin
  img2d = np.where(r2 < 0.8 ** 2, 40.0, img2d)      # muscle / soft tissue
  spine = ((x - offset[0]) / 0.12) ** 2 + ((y - offset[1] + 0.6 * scale[1]) / 0.12) ** 2 < 1
  img2d = np.where(spine & (r2 < 1), 700.0, img2d)
  img = np.repeat(img2d[:, :, None], shape[2], axis=2).astype(np.float32)
  lab = np.zeros(shape, np.uint8)
  for label, _, centre, axes, hu in ABDOMEN_ORGANS:
    c = np.asarray(centre) * scale + offset + rng.normal(0, 0.04, size=3)
    a = np.asarray(axes) * scale * rng.uniform(0.8, 1.2, size=3)
    _ellipsoid_into(img, lab, c * half + half, np.maximum(a * half, 0.6), hu, label)
  kvec, phase = _waves(rng, 4, (10, 40))
  grids = [np.arange(n, dtype=np.float32)[tuple(slice(None) if i == k else None
                                                for i in range(3))] * 2.0
           for k, n in enumerate(shape)]
  img += np.where(img > -900, 15.0 * _wave_field(grids, kvec, phase), 0.0).astype(np.float32)
  img += rng.normal(0, 12.0, size=shape).astype(np.float32)
  return img, lab


def write_abdomen_phantoms(root: str, n_scans: int, seed: int, layout: str = "img", *,
                           shape: tuple[int, int, int] = (192, 160, 256),
                           spacing_mm: float = 2.0, first_id: int = 1) -> list[str]:
  """Writes phantom CT scans ``first_id .. first_id + n_scans - 1``.

  Layouts: "img" -> ROOT/img/imgNNNN.nii.gz + ROOT/label/labelNNNN.nii.gz; "imagesTr" ->
  ROOT/imagesTr/AbdomenCTCT_NNNN_0000.nii.gz + ROOT/labelsTr/AbdomenCTCT_NNNN.nii.gz +
  ROOT/AbdomenCTCT_dataset.json. Images int16 HU, labels uint8 (0..13).

  Args:
    root: output folder.
    n_scans: number of scans.
    seed: random seed (scan ``i`` is the same whatever ``n_scans``).
    layout: "img" or "imagesTr".
    shape: voxel shape (X, Y, Z); small shapes are fine for tests.
    spacing_mm: isotropic voxel size.
    first_id: first scan number.

  Returns:
    The image paths written.
  """
  if layout not in ("img", "imagesTr"):
    raise ValueError(f"write_abdomen_phantoms: layout={layout!r}; use 'img' or 'imagesTr'.")
  affine = np.diag([-spacing_mm, -spacing_mm, spacing_mm, 1.0])
  affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
  img_dir, lab_dir = ("img", "label") if layout == "img" else ("imagesTr", "labelsTr")
  os.makedirs(os.path.join(root, img_dir), exist_ok=True)
  os.makedirs(os.path.join(root, lab_dir), exist_ok=True)
  paths, entries = [], []
  for n in range(first_id, first_id + n_scans):
    img, lab = abdomen_phantom(n, seed, tuple(shape))
    if layout == "img":
      names = (f"img{n:04d}.nii.gz", f"label{n:04d}.nii.gz")
    else:
      names = (f"AbdomenCTCT_{n:04d}_0000.nii.gz", f"AbdomenCTCT_{n:04d}.nii.gz")
    ip = _write(os.path.join(root, img_dir, names[0]), np.round(img).astype(np.int16), affine)
    _write(os.path.join(root, lab_dir, names[1]), lab, affine)
    paths.append(ip)
    entries.append({"image": f"./{img_dir}/{names[0]}", "label": f"./{lab_dir}/{names[1]}"})
  if layout == "imagesTr":
    meta = {"name": "AbdomenCTCT (phantom)", "tensorImageSize": "3D",
            "labels": {"0": "background", **{str(o[0]): o[1] for o in ABDOMEN_ORGANS}},
            "numTraining": len(entries), "training": entries}
    with open(os.path.join(root, "AbdomenCTCT_dataset.json"), "w") as f:
      json.dump(meta, f, indent=2)
  return paths
