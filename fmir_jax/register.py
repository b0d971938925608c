"""Register one NIfTI pair end to end with a trained FMIR run (the ``fmir register`` command).

Stages (each timed in the report): load + resample both images to one registration grid,
frozen 2D encoder on both (PyTorch, imported inside `encode`), head (JAX), optional instance
optimisation (Adam on the displacement), and writing the results on the fixed image's
ORIGINAL voxel grid.

Registration grid (``grid``):
  * "model": the checkpoint's training grid and preprocessing, planned from the fixed image
    exactly as the dataset reader does (ACDC: 1.8x1.8x10 mm, 128x128x16, centred on the
    fixed image centre; abdomen: the 2 mm 192x160x256 grid centred on the image, halved for
    ``resolution=half``; custom: the store's ``shape``/``spacing_mm``, centred). The moving
    image is resampled (through world coordinates) onto the same grid.
  * "native": the fixed image's own field of view at ``spacing_mm`` (default: the fixed
    spacing), padded (centred) to multiples of the product of the pyramid factors per axis.
  Intensities are normalised with the dataset's rule (ACDC/custom: clip to the 1st/99th
  percentiles of the source image, scale to [0, 1]; abdomen CT: clip to [-500, 800] HU).

Displacement convention of the outputs (``disp_mm.nii.gz``):
  * World coordinates are nibabel's RAS+ millimetres given by the fixed image's affine.
  * ``disp_mm[i, j, k, 0, :]`` is a RAS vector (mm) such that, with p = A_fixed @ (i, j, k, 1)
    the world point of fixed voxel (i, j, k), the warped moving image is the moving image
    sampled at the world point ``p + disp_mm``: warped(p) = moving(p + disp_mm(p)).
  * The file is a NIfTI-1 vector image of shape (X, Y, Z, 1, 3), float32, intent code
    NIFTI_INTENT_DISPVECT (1006), xyz units mm, with the fixed image's affine.
  * ITK/ANTs/SimpleITK describe points in LPS: an LPS displacement is
    (-disp_mm[..., 0], -disp_mm[..., 1], disp_mm[..., 2]) (negate x and y).
  * Outside the registration grid (e.g. beyond the model-grid crop) the displacement is 0.

Learn2Reg export (``l2r_dir``): ``disp_FFFF_MMMM.nii.gz`` (fixed id first, then moving id,
as the Learn2Reg evaluation script looks it up), shape (X, Y, Z, 3) on the fixed grid,
float32 (NIfTI-1 has no float16), in VOXELS: ``moving_voxel = fixed_voxel_index + disp``
(the script warps labels with ``map_coordinates(moving_seg, identity + disp)``). For
Learn2Reg tasks, where both scans share one grid, this is the voxel displacement; in
general it is inv(A_moving) (p + disp_mm) - index.

Arrays follow DESIGN.md: volumes (H, W, D) in NIfTI voxel order, JAX arrays channels-last,
``disp_vox`` (..., 3) in voxels of its grid with component k along array axis k.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from fmir_jax import files
from fmir_jax import io
from fmir_jax import metrics as metrics_lib

GRIDS = ('model', 'native')
DATASET_GRIDS = ('acdc', 'abdomen')
DISPVECT_INTENT = 1006
OUT_FILES = {'warped': 'warped_moving.nii.gz', 'warped_labels': 'warped_moving_labels.nii.gz',
             'disp': 'disp_mm.nii.gz', 'report': 'report.json'}
_CHUNK_VOXELS = 1 << 21   # fixed-grid voxels sampled per chunk (bounds host memory)


class RegisterError(ValueError):
  """Bad input to ``register``: the message names the argument/file and the fix."""


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class RegisterOptions:
  """Everything ``register`` needs besides the file paths.

  grid: "model" or "native"; dataset_grid: None (the run's dataset) or "acdc"/"abdomen".
  spacing_mm: native-grid voxel size (None: the fixed image's spacing).
  pyramid_factors: per-level factors override (one triple or levels-1 triples), or None.
  backbone/weights/layer: encoder override (None: the run's encoder).
  checkpoint_step: "best", "last" or a step number.
  io_steps/io_lr: instance optimisation (0 = off); Adam step size in voxels.
  """
  grid: str = 'model'
  dataset_grid: str | None = None
  spacing_mm: tuple[float, float, float] | None = None
  pyramid_factors: Any = None
  backbone: str | None = None
  weights: str | None = None
  layer: int | str | None = None
  checkpoint_step: str = 'best'
  device: str = 'auto'
  dtype: str = 'float32'
  batch_size: int = 16
  io_steps: int = 0
  io_lr: float = 0.1
  l2r_dir: str | None = None
  l2r_fixed_id: str | None = None
  l2r_moving_id: str | None = None
  overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A dataset's model grid and intensity rule.

  shape/spacing_mm: model grid (None when the dataset defines none).
  intensity: "percentile" (clip to ``percentiles`` of the source image) or "ct" (clip to
  ``ct_window`` HU); both scale to [0, 1]. half_resolution: abdomen half grid.
  background: value outside the source image before normalisation (air for CT); None:
  the source image's minimum (the custom reader's rule).
  """
  dataset: str
  shape: tuple[int, int, int] | None
  spacing_mm: tuple[float, float, float] | None
  intensity: str = 'percentile'
  percentiles: tuple[float, float] = (1.0, 99.0)
  ct_window: tuple[float, float] = (-500.0, 800.0)
  half_resolution: bool = False
  background: float | None = 0.0


def preprocessing_for(dataset: str, options: dict[str, Any] | None = None) -> Preprocessing:
  """The preprocessing of a dataset reader ("acdc", "abdomen", "custom") with its options."""
  options = dict(options or {})
  if dataset == 'acdc':
    from feature_extract.datasets import acdc  # numpy-only reader module
    shape = tuple(int(v) for v in options.get('shape', acdc.TARGET_SHAPE))
    spacing = tuple(float(v) for v in options.get('spacing_mm', acdc.TARGET_SPACING_MM))
    return Preprocessing('acdc', shape, spacing, 'percentile', acdc.PERCENTILES)
  if dataset == 'abdomen':
    from feature_extract.datasets import abdomen
    half = options.get('resolution', 'half') == 'half'
    return Preprocessing('abdomen', abdomen.HALF_SHAPE if half else abdomen.FULL_SHAPE,
                         None, 'ct', ct_window=abdomen.HU_WINDOW, half_resolution=half,
                         background=abdomen.AIR_HU)
  if dataset == 'custom':
    intensity = options.get('intensity', 'percentile')
    shape = options.get('shape')
    spacing = options.get('spacing_mm')
    return Preprocessing(
        'custom', tuple(int(s) for s in shape) if shape else None,
        tuple(float(s) for s in spacing) if spacing else None, intensity,
        tuple(options.get('percentiles', (1.0, 99.0))),
        tuple(options.get('ct_window', (-500.0, 800.0))),
        background=-1000.0 if intensity == 'ct' else None)
  raise RegisterError(f'the run was trained on dataset {dataset!r}, whose preprocessing is '
                      'unknown here: pass --dataset-grid acdc|abdomen or --grid native.')


def normalise(resampled: np.ndarray, source: np.ndarray, prep: Preprocessing,
              where: str) -> np.ndarray:
  """Dataset intensity rule: (H, W, D) resampled image -> float32 in [0, 1].

  Percentiles are computed on the whole source image (as the readers do).
  """
  from feature_extract import datasets as ds
  if prep.intensity == 'ct':
    out, _ = ds.window_scale(resampled, *prep.ct_window)
    return out
  try:
    out, _ = ds.percentile_scale(resampled, source, *prep.percentiles, where=where)
  except ds.DatasetError as e:
    raise RegisterError(str(e)) from e
  return out


# --------------------------------------------------------------------------- grids


def factors_product(factors, levels: int) -> tuple[int, int, int]:
  """Per-axis product of the pyramid factors over the levels-1 transitions."""
  from fmir_jax import model as model_lib
  fac = model_lib.level_factors(factors, levels)
  return tuple(int(np.prod([f[k] for f in fac])) for k in range(3))


def native_grid(shape: Sequence[int], affine: np.ndarray, src_spacing_mm: Sequence[float],
                spacing_mm: Sequence[float], multiple: Sequence[int]
                ) -> tuple[tuple[int, int, int], np.ndarray]:
  """The fixed image's field of view at ``spacing_mm``, padded to multiples (centred).

  Returns:
    (shape, affine) of the registration grid; each axis is a multiple of ``multiple``.
  """
  res_shape, res_affine = io.spacing_grid(shape, affine, src_spacing_mm, spacing_mm)
  if min(res_shape) < 2:
    fov_mm = [n * s for n, s in zip(shape[:3], src_spacing_mm)]
    raise RegisterError(
        f'--grid native: at {tuple(float(s) for s in spacing_mm)} mm the fixed image '
        f'({" x ".join(f"{f:.1f}" for f in fov_mm)} mm) gives a {res_shape} grid, with an axis '
        'of fewer than 2 voxels; pass a finer --spacing (at most '
        f'{",".join(f"{f / 2:.3g}" for f in fov_mm)} mm).')
  out = tuple(int(math.ceil(n / m) * m) for n, m in zip(res_shape, multiple))
  start = [-((o - n) // 2) for o, n in zip(out, res_shape)]
  return out, io.translate_affine(res_affine, start)


def model_grid(prep: Preprocessing, header: io.NiftiHeader
               ) -> tuple[tuple[int, int, int], np.ndarray]:
  """The model grid planned from the fixed image, as the dataset reader plans it."""
  if prep.dataset == 'abdomen':
    from feature_extract.datasets import abdomen
    full_affine, _ = abdomen.full_grid(header)
    if prep.half_resolution:
      return abdomen.HALF_SHAPE, abdomen.half_affine(full_affine)
    return abdomen.FULL_SHAPE, full_affine
  if prep.shape is None or prep.spacing_mm is None:
    raise RegisterError(f'dataset {prep.dataset!r} of the run records no model grid (shape '
                        'and spacing_mm): use --grid native.')
  centre = (np.asarray(header.shape, float) - 1) / 2
  gm = io.target_grid(header.shape, header.affine, header.spacing_mm, prep.spacing_mm,
                      prep.shape, centre)
  return gm.dst_shape, gm.dst_affine


# --------------------------------------------------------------------------- world space


def _voxel_world(shape: Sequence[int], affine: np.ndarray, k0: int, k1: int) -> np.ndarray:
  """World mm coordinates (H, W, k1-k0, 3) of voxels with last index in [k0, k1)."""
  ii, jj, kk = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(k0, k1),
                           indexing='ij')
  vox = np.stack([ii, jj, kk], -1).astype(np.float64)
  a = np.asarray(affine, np.float64)
  return vox @ a[:3, :3].T + a[:3, 3]


def disp_to_fixed_world(disp_vox: np.ndarray, reg_affine: np.ndarray,
                        fixed_shape: Sequence[int], fixed_affine: np.ndarray) -> np.ndarray:
  """Registration-grid voxel displacement -> RAS mm displacement on the fixed grid.

  Args:
    disp_vox: (H, W, D, 3) voxels of the registration grid (component k along axis k).
    reg_affine: 4x4 voxel -> world of the registration grid.
    fixed_shape, fixed_affine: the fixed image's original grid.

  Returns:
    (X, Y, Z, 3) float32 RAS mm, linearly interpolated in world space; 0 outside the
    registration grid (edge value within half a voxel of it).
  """
  disp_mm = io.disp_vox_to_mm(disp_vox, reg_affine)
  return np.stack([io.resample_to_grid(disp_mm[..., k], reg_affine, fixed_affine,
                                       fixed_shape, order=1, cval=0.0)
                   for k in range(3)], -1).astype(np.float32)


def warp_to_fixed(moving: np.ndarray, moving_affine: np.ndarray, fixed_shape: Sequence[int],
                  fixed_affine: np.ndarray, disp_mm: np.ndarray | None, order: int,
                  cval: float = 0.0) -> np.ndarray:
  """Samples the moving image at p + disp_mm(p) for every fixed voxel world point p.

  Args:
    moving: (Hm, Wm, Dm) image (order 1) or labels (order 0, dtype kept).
    moving_affine: its 4x4 voxel -> world (mm).
    fixed_shape, fixed_affine: output grid.
    disp_mm: (X, Y, Z, 3) RAS mm displacement on the fixed grid, or None (identity).
    order: 1 linear, 0 nearest.
    cval: value farther than half a voxel outside the moving image (``io.sample_voxels``).

  Returns:
    (X, Y, Z) array on the fixed grid (float32 for order 1, moving.dtype for order 0).
  """
  fixed_shape = tuple(int(s) for s in fixed_shape)
  inv = np.linalg.inv(np.asarray(moving_affine, np.float64))
  out = np.empty(fixed_shape, moving.dtype if order == 0 else np.float32)
  step = max(1, _CHUNK_VOXELS // max(1, fixed_shape[0] * fixed_shape[1]))
  for k0 in range(0, fixed_shape[2], step):
    k1 = min(fixed_shape[2], k0 + step)
    p = _voxel_world(fixed_shape, fixed_affine, k0, k1)
    if disp_mm is not None:
      p = p + disp_mm[:, :, k0:k1]
    vox = p @ inv[:3, :3].T + inv[:3, 3]
    out[:, :, k0:k1] = io.sample_voxels(moving, np.moveaxis(vox, -1, 0), order, cval)
  return out


def l2r_disp_vox(disp_mm: np.ndarray, fixed_affine: np.ndarray,
                 moving_affine: np.ndarray) -> np.ndarray:
  """Learn2Reg voxel field: inv(A_moving)(p + disp_mm) - fixed index, (X, Y, Z, 3) float32."""
  shape = disp_mm.shape[:3]
  inv = np.linalg.inv(np.asarray(moving_affine, np.float64))
  p = _voxel_world(shape, fixed_affine, 0, shape[2]) + disp_mm
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  return (p @ inv[:3, :3].T + inv[:3, 3] - idx).astype(np.float32)


def l2r_case(path: str, given: str | None, flag: str) -> tuple[str, str | None]:
  """(case id, modality id or None) of a scan for the Learn2Reg file names.

  ``given`` ("NNNN" or "NNNN_MMMM", from ``flag``) wins. Otherwise the name must be
  Learn2Reg's ``TASK_NNNN_MMMM.nii.gz`` or hold exactly one number (``img0001.nii.gz``);
  a name with several numbers (``patient101_frame10``) is ambiguous and refused.
  """
  if given is not None:
    m = re.fullmatch(r'(\d{1,4})(?:_(\d{1,4}))?', given)
    if not m:
      raise RegisterError(f'{flag} {given!r}: expected a case number NNNN or NNNN_MMMM '
                          '(case_modality).')
    return f'{int(m.group(1)):04d}', m.group(2) and f'{int(m.group(2)):04d}'
  name = re.sub(r'\.nii(\.gz)?$', '', os.path.basename(path))
  m = re.search(r'_(\d{4})_(\d{4})$', name)
  if m:
    return m.group(1), m.group(2)
  nums = re.findall(r'\d+', name)
  if len(nums) != 1:
    raise RegisterError(f'{path}: cannot tell the Learn2Reg case id from the file name '
                        f'({len(nums)} numbers in it); pass {flag} NNNN.')
  return f'{int(nums[0]):04d}', None


def l2r_names(fixed: tuple[str, str | None], moving: tuple[str, str | None]) -> list[str]:
  """File names under which the Learn2Reg evaluation code finds the field of this pair.

  It reads ``disp_FFFF_MMMM.nii.gz`` (fixed case first) when both scans share a modality
  (or are 0000 -> 0001), else ``disp_FFFF_fmod_MMMM_mmod.nii.gz``: the short name is written
  where it applies, the long one whenever both modality ids are known.
  """
  (f, fm), (m, mm) = fixed, moving
  names = []
  if fm is None or mm is None or fm == mm or (fm, mm) == ('0000', '0001'):
    names.append(f'disp_{f}_{m}.nii.gz')
  if fm is not None and mm is not None:
    names.append(f'disp_{f}_{fm}_{m}_{mm}.nii.gz')
  return names


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass
class LoadedPair:
  """Inputs read from disk. Images float32 (H, W, D); labels uint8/int32 or None."""
  fixed: np.ndarray
  fixed_affine: np.ndarray
  fixed_header: io.NiftiHeader
  moving: np.ndarray
  moving_affine: np.ndarray
  moving_header: io.NiftiHeader
  fixed_labels: np.ndarray | None
  moving_labels: np.ndarray | None


def _load_image(path: str, what: str) -> tuple[np.ndarray, np.ndarray, io.NiftiHeader]:
  data, affine, hdr = io.load_nifti(path, what=what)
  if min(hdr.shape) < 2:
    raise RegisterError(f'{path}: {what} has shape {hdr.shape}: a single slice is a 2D image; '
                        'registration needs a 3D volume with at least 2 voxels per axis.')
  return data, affine, hdr


def _load_labels(path: str | None, img_hdr: io.NiftiHeader) -> np.ndarray | None:
  if path is None:
    return None
  lab, lab_affine, lab_hdr = io.load_nifti(path, what='label')
  io.check_same_grid(img_hdr.path, img_hdr.affine, img_hdr.shape, lab_hdr.path, lab_affine,
                     lab_hdr.shape)
  return lab


def load_pair(fixed: str, moving: str, fixed_labels: str | None = None,
              moving_labels: str | None = None) -> LoadedPair:
  """Reads and validates the images and (optional) label maps."""
  f, fa, fh = _load_image(fixed, 'image')
  m, ma, mh = _load_image(moving, 'image')
  return LoadedPair(f, fa, fh, m, ma, mh, _load_labels(fixed_labels, fh),
                    _load_labels(moving_labels, mh))


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """A loaded training run: config, model graph and parameters, store header, step."""
  workdir: str
  config: Any
  graphdef: Any
  params: Any
  info: dict[str, Any]
  step: int

  @property
  def header(self) -> dict[str, Any]:
    return self.info['store_header']


def load_run(workdir: str, which: str = 'best') -> RunInfo:
  """Loads a training run directory with clear errors."""
  from fmir_jax import checkpoint as ckpt
  from fmir_jax import evaluation
  if not os.path.isdir(workdir):
    raise RegisterError(f'--checkpoint {workdir}: directory does not exist. Pass the '
                        '--workdir of a training run (train.py).')
  if not os.path.exists(os.path.join(workdir, ckpt.RUN_FILE)):
    raise RegisterError(f'--checkpoint {workdir}: no {ckpt.RUN_FILE}; this is not an fmir-jax '
                        'training run directory (train.py --workdir=... creates it).')
  try:
    config, graphdef, params, info, step = evaluation.load_run(workdir, which)
  except (FileNotFoundError, ValueError) as e:
    raise RegisterError(f'--checkpoint {workdir}: {e}') from e
  return RunInfo(workdir, config, graphdef, params, info, int(step))


def _dataset_of(header: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  ds = header.get('dataset', {})
  if isinstance(ds, dict):
    return str(ds.get('name', '')), dict(ds.get('options') or {})
  return str(ds), {}


def load_backbone(run: RunInfo, opts: RegisterOptions):
  """(Backbone, its store-style header) : the run's encoder or the requested one."""
  from feature_extract import backbones
  from feature_extract import run as extract_run
  from fmir_jax import store as store_lib
  header = run.header
  bb_rec = header.get('backbone', {})
  name = backbones.canonical_name(opts.backbone) if opts.backbone else bb_rec.get('name')
  same = name == bb_rec.get('name') and opts.weights is None \
      and opts.layer is None
  if name == 'mind':
    patch = int(header['patch_size']) if same else 4
    bb = backbones.load('mind', None, opts.layer, device=opts.device, dtype=opts.dtype,
                        mind_patch_size=patch,
                        mind_dilations=tuple(bb_rec.get('dilations', (1, 2, 4))) if same
                        else (1, 2, 4),
                        mind_radius=int(bb_rec.get('radius', 1)) if same else 1)
  else:
    weights = opts.weights or (bb_rec.get('weights') if same else None)
    layer = opts.layer if opts.layer is not None else (header.get('layer') if same else None)
    bb = backbones.load(name, weights, layer, device=opts.device, dtype=opts.dtype)
  dataset, options = _dataset_of(header)
  new_header = extract_run.make_header(
      bb, input_size=int(header['input_size']) if same else bb.required_input_size or 256,
      resize=header.get('resize', 'upsample'), pad_to=header.get('pad_to'),
      feature_dtype=header.get('feature_dtype', 'float16'), dataset=dataset,
      dataset_options=options)
  if same:
    try:
      store_lib.check_compatible(header, new_header, source=f'encoder {bb.label}')
    except store_lib.StoreError as e:
      raise RegisterError(f'{e} (the run {run.workdir} records weights sha256 '
                          f'{bb_rec.get("weights_sha256")}; pass the same --weights).') from e
  return bb, new_header


def pca_basis(run: RunInfo, header: dict[str, Any]):
  """The PCA basis of ``header``'s feature space saved in the run, or a clear refusal."""
  from fmir_jax import checkpoint as ckpt
  basis = ckpt.load_pca(run.workdir, header)
  if basis is None:
    bb = header.get('backbone', {})
    raise RegisterError(
        f'--checkpoint {run.workdir}: no PCA basis for backbone {bb.get("name")} (layer '
        f'{header.get("layer")}) in {ckpt.pca_path(run.workdir, header)}. Extract features of '
        'some training images with this backbone (feature_extract/run.py --backbone ...) and '
        f'fit one with: python eval.py --workdir={run.workdir} --features=STORE '
        '--pca_store=STORE (STORE: features of training images with this backbone; each '
        'backbone gets its own basis).')
  c_prime = int(run.config.feature_channels)
  if basis.components.shape != (int(header['channels']), c_prime):
    raise RegisterError(f'{run.workdir}: PCA basis has shape {basis.components.shape}, '
                        f'expected ({header["channels"]}, {c_prime}).')
  return basis


def encode(image: np.ndarray, bb, header: dict[str, Any], batch_size: int
           ) -> dict[str, np.ndarray]:
  """(H, W, D) image in [0, 1] -> model inputs with a batch axis of 1.

  Returns {'image': (1, H, W, D), 'feat': (1, D, h, w, c), 'interp_h': (1, H, h),
  'interp_w': (1, W, w)}.
  """
  from feature_extract import run as extract_run
  from fmir_jax import store as store_lib
  pad_to = header.get('pad_to')
  if pad_to is not None and pad_to < max(image.shape[:2]):
    pad_to = None   # the grid's slices exceed the training canvas: pad to the slice itself
  feats, geo = extract_run.encode_volume(image, bb, input_size=int(header['input_size']),
                                         resize=header.get('resize', 'upsample'),
                                         pad_to=pad_to, batch_size=batch_size)
  h, w = image.shape[:2]
  return {
      'image': image[None].astype(np.float32),
      'feat': feats[None].astype(np.float32),
      'interp_h': store_lib.interp_matrix(h, feats.shape[1], geo['offset'][0],
                                          geo['scale'][0])[None],
      'interp_w': store_lib.interp_matrix(w, feats.shape[2], geo['offset'][1],
                                          geo['scale'][1])[None],
  }


_PREDICT_CACHE: dict[tuple, Callable] = {}


def _predict_fn(run: RunInfo, factors) -> Callable:
  """The jitted head of a run, cached per (run, step, factors) so repeated calls in one
  process (a notebook, a batch of pairs) reuse compiled programs."""
  from fmir_jax import train_lib
  key = (os.path.abspath(run.workdir), run.step, repr(factors))
  if key not in _PREDICT_CACHE:
    _PREDICT_CACHE[key] = train_lib.make_predict(
        run.graphdef, c_prime=int(run.config.feature_channels), factors=factors)
  return _PREDICT_CACHE[key]


def instance_optimise(disp_vox: np.ndarray, moving: np.ndarray, fixed: np.ndarray, *,
                      steps: int, lr: float, window: int, smooth: float
                      ) -> tuple[np.ndarray, float, float]:
  """Adam on the displacement, from the network output, for this pair.

  Loss: -NCC(warp(moving, u), fixed) with the level-0 training window, plus
  ``smooth`` x diffusion (mean squared forward differences of u).

  Args:
    disp_vox: (H, W, D, 3) initial displacement (registration-grid voxels).
    moving, fixed: (H, W, D) normalised images.
    steps: Adam iterations; lr: step size (voxels).

  Returns:
    (optimised (H, W, D, 3) float32, loss before, loss after).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from fmir_jax import losses
  from fmir_jax import warp as W
  m = jnp.asarray(moving, jnp.float32)[None, ..., None]
  f = jnp.asarray(fixed, jnp.float32)[None, ..., None]

  def loss_fn(u):
    return (losses.ncc_loss(W.warp(m, u), f, window)
            + smooth * losses.diffusion_loss(u))

  tx = optax.adam(lr)

  @jax.jit
  def run(u0):
    def body(_, carry):
      u, state = carry
      grads = jax.grad(loss_fn)(u)
      updates, state = tx.update(grads, state, u)
      return optax.apply_updates(u, updates), state
    u, _ = jax.lax.fori_loop(0, steps, body, (u0, tx.init(u0)))
    return u, loss_fn(u0), loss_fn(u)

  u, before, after = run(jnp.asarray(disp_vox, jnp.float32)[None])
  return np.asarray(u[0]), float(before), float(after)


def dice_report(warped: np.ndarray, before: np.ndarray, fixed: np.ndarray,
                moving: np.ndarray) -> dict[str, Any]:
  """Dice of fixed vs warped (after) and vs unwarped (before) moving labels.

  Classes: foreground ids present in both the fixed and the moving label maps (Learn2Reg).
  """
  classes = sorted((set(np.unique(fixed).tolist()) & set(np.unique(moving).tolist())) - {0})
  if not classes:
    raise RegisterError('--fixed-labels and --moving-labels share no foreground class; Dice '
                        'cannot be computed (are these the segmentations of these images?).')
  d_before = metrics_lib.dice_per_class(before, fixed, classes)
  d_after = metrics_lib.dice_per_class(warped, fixed, classes)
  return {'classes': classes,
          'before': {str(c): d_before[c] for c in classes},
          'after': {str(c): d_after[c] for c in classes},
          'mean_before': metrics_lib.mean_dice(d_before),
          'mean_after': metrics_lib.mean_dice(d_after)}


# --------------------------------------------------------------------------- writing


def save_dispvect(path: str, disp_mm: np.ndarray, affine: np.ndarray) -> None:
  """(X, Y, Z, 3) RAS mm -> NIfTI (X, Y, Z, 1, 3) float32, intent DISPVECT (1006), mm."""
  img = nib.Nifti1Image(np.asarray(disp_mm, np.float32)[:, :, :, None, :], affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_intent(DISPVECT_INTENT, name='disp_mm_RAS')
  img.header.set_xyzt_units('mm')
  nib.save(img, path)


def save_l2r(path: str, disp_vox: np.ndarray, affine: np.ndarray) -> None:
  """Learn2Reg field (X, Y, Z, 3) float32, written atomically (temp file + rename)."""
  with files.atomic_path(path) as tmp:
    nib.save(nib.Nifti1Image(np.asarray(disp_vox, np.float32), affine), tmp)


def _tag(out: str) -> str:
  return os.path.basename(out)


def check_out_dir(out: str, overwrite: bool) -> None:
  """Refuses, before any work, an OUT that cannot be written or holds an earlier result.

  An existing OUT may hold other files: they are never touched. Earlier register outputs
  (the names in ``OUT_FILES``) are replaced only with ``overwrite``.
  """
  files.check_writable_dir(out, '--out')
  if not os.path.isdir(out) or overwrite:
    return
  taken = [n for n in OUT_FILES.values() if os.path.lexists(os.path.join(out, n))]
  if taken:
    raise RegisterError(f'--out {out}: holds an earlier result ({", ".join(taken)}); pass '
                        '--overwrite to replace those files (other files in it are kept) or '
                        'choose a new --out.')


def _earlier_outputs(out: str) -> set[str]:
  """Names of the files an earlier register run wrote in OUT, as its report.json lists them."""
  try:
    with open(os.path.join(out, OUT_FILES['report'])) as f:
      listed = json.load(f).get('files', {})
  except (OSError, ValueError, AttributeError):
    return set()
  names = {os.path.basename(str(p)) for p in listed.values()} if isinstance(listed, dict) \
      else set()
  return names & set(OUT_FILES.values())


def publish(tmp_dir: str, out: str, overwrite: bool) -> None:
  """Moves the finished files of ``tmp_dir`` into ``out``.

  A new OUT is the temp folder renamed (all or nothing). Into an existing OUT, register's
  own files are moved one by one (report.json last); files of an earlier register result
  that this run does not write again (e.g. warped labels) are removed, and nothing else in
  OUT is touched.
  """
  if not os.path.exists(out):
    os.replace(tmp_dir, out)
    return
  check_out_dir(out, overwrite)
  earlier = _earlier_outputs(out)
  names = sorted(os.listdir(tmp_dir), key=lambda n: n == OUT_FILES['report'])
  for name in names:
    os.replace(os.path.join(tmp_dir, name), os.path.join(out, name))
  for name in earlier - set(names):
    path = os.path.join(out, name)
    if os.path.isfile(path) and not os.path.islink(path):
      os.remove(path)
  os.rmdir(tmp_dir)


# --------------------------------------------------------------------------- entry point


def parse_triple(text: str | Sequence[float] | None, what: str, cast: Callable = float):
  """'a,b,c' -> (a, b, c) or None."""
  if text is None:
    return None
  parts = text.split(',') if isinstance(text, str) else list(text)
  try:
    vals = tuple(cast(p) for p in parts)
  except ValueError:
    raise RegisterError(f'{what} {text!r}: expected three comma-separated numbers.') from None
  if len(vals) != 3 or min(vals) <= 0:
    raise RegisterError(f'{what} {text!r}: expected three positive numbers.')
  return vals


def parse_factors(text: str | None):
  """'2,2,1' (all levels) or '2,2,1;2,2,2;...' (one per transition) -> factors or None."""
  if text is None:
    return None
  triples = [parse_triple(t, '--pyramid-factors', int) for t in text.split(';')]
  return triples[0] if len(triples) == 1 else tuple(triples)


def register(fixed: str, moving: str, checkpoint: str, out: str, *,
             fixed_labels: str | None = None, moving_labels: str | None = None,
             options: RegisterOptions = RegisterOptions(),
             log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Registers ``moving`` onto ``fixed`` and writes the results under ``out``.

  Returns the report dict (also written to OUT/report.json). Nothing is written under
  ``out`` unless every stage succeeded (results are assembled in a temporary directory next
  to it and renamed).

  Raises:
    RegisterError, io.NiftiError, BackboneError, StoreError: bad input (clear message).
  """
  import jax
  import jax.numpy as jnp
  from fmir_jax import model as model_lib
  from fmir_jax import train_lib

  opts = options
  if opts.grid not in GRIDS:
    raise RegisterError(f'--grid {opts.grid!r}: use one of {GRIDS}.')
  if opts.dataset_grid not in (None,) + DATASET_GRIDS:
    raise RegisterError(f'--dataset-grid {opts.dataset_grid!r}: use one of {DATASET_GRIDS}.')
  if opts.io_steps < 0 or not opts.io_lr > 0:
    raise RegisterError(f'--io-steps {opts.io_steps} / --io-lr {opts.io_lr}: need steps >= 0 '
                        'and a positive learning rate.')
  out = os.path.abspath(out)
  check_out_dir(out, opts.overwrite)
  l2r_files = []
  if opts.l2r_dir:
    files.check_writable_dir(opts.l2r_dir, '--l2r-export')
    l2r_files = l2r_names(l2r_case(fixed, opts.l2r_fixed_id, '--l2r-fixed-id'),
                          l2r_case(moving, opts.l2r_moving_id, '--l2r-moving-id'))
  for stale in files.remove_stale_temp_dirs(os.path.dirname(out), _tag(out)):
    log(f'removed {stale} (left by a killed earlier run)')
  times: dict[str, float] = {}

  t0 = time.perf_counter()
  pair = load_pair(fixed, moving, fixed_labels, moving_labels)
  run = load_run(checkpoint, opts.checkpoint_step)
  dataset, ds_options = _dataset_of(run.header)
  prep = preprocessing_for(opts.dataset_grid or dataset, ds_options)
  levels = int(run.config.model.levels)
  factors = opts.pyramid_factors
  try:
    model_lib.level_factors(factors if factors is not None else tuple(run.config.model.factors),
                            levels)
  except ValueError as e:
    raise RegisterError(f'--pyramid-factors: {e}') from e
  if opts.grid == 'model':
    reg_shape, reg_affine = model_grid(prep, pair.fixed_header)
  else:
    spacing = opts.spacing_mm or pair.fixed_header.spacing_mm
    mult = factors_product(factors if factors is not None
                           else tuple(run.config.model.factors), levels)
    reg_shape, reg_affine = native_grid(pair.fixed_header.shape, pair.fixed_affine,
                                        pair.fixed_header.spacing_mm, spacing, mult)
  images = {}
  for name, img, aff, path in (('fixed', pair.fixed, pair.fixed_affine, fixed),
                               ('moving', pair.moving, pair.moving_affine, moving)):
    cval = float(img.min()) if prep.background is None else prep.background
    res = io.resample_to_grid(img, aff, reg_affine, reg_shape, order=1, cval=cval)
    images[name] = normalise(res, img, prep, path)
  times['load_resample_s'] = time.perf_counter() - t0
  log(f'registration grid {reg_shape} at {io.voxel_spacing(reg_affine)} mm ({opts.grid})')

  t0 = time.perf_counter()
  bb, feat_header = load_backbone(run, opts)
  basis = pca_basis(run, feat_header)
  inputs = {k: encode(images[k], bb, feat_header, opts.batch_size) for k in images}
  times['features_s'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  predict = _predict_fn(run, factors)
  as_dev = lambda d: {k: jnp.asarray(v) for k, v in d.items()}  # noqa: E731
  disp = jax.block_until_ready(predict(run.params, as_dev(inputs['moving']),
                                       as_dev(inputs['fixed']),
                                       train_lib.pca_to_device(basis)))
  disp_vox = np.asarray(disp[0], np.float32)
  times['head_s'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  io_report = None
  if opts.io_steps:
    disp_vox, before, after = instance_optimise(
        disp_vox, images['moving'], images['fixed'], steps=opts.io_steps, lr=opts.io_lr,
        window=int(run.config.loss.ncc_windows[0]), smooth=float(run.config.loss.smooth))
    io_report = {'steps': opts.io_steps, 'lr': opts.io_lr, 'loss_before': before,
                 'loss_after': after,
                 'loss': f'-NCC(window {int(run.config.loss.ncc_windows[0])}) + '
                         f'{float(run.config.loss.smooth)} x diffusion(u), level 0'}
    log(f'instance optimisation: loss {before:.5f} -> {after:.5f}')
  times['io_s'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  fshape, faff = pair.fixed_header.shape, pair.fixed_affine
  disp_mm = disp_to_fixed_world(disp_vox, reg_affine, fshape, faff)
  warped = warp_to_fixed(pair.moving, pair.moving_affine, fshape, faff, disp_mm, order=1)
  warped_lab = dice = None
  if pair.moving_labels is not None:
    warped_lab = warp_to_fixed(pair.moving_labels, pair.moving_affine, fshape, faff, disp_mm,
                               order=0)
    if pair.fixed_labels is not None:
      unwarped = warp_to_fixed(pair.moving_labels, pair.moving_affine, fshape, faff, None,
                               order=0)
      dice = dice_report(warped_lab, unwarped, pair.fixed_labels, pair.moving_labels)
  crop = 2 if min(reg_shape) > 4 else 0
  report = {
      'fixed': os.path.abspath(fixed), 'moving': os.path.abspath(moving),
      'fixed_labels': fixed_labels and os.path.abspath(fixed_labels),
      'moving_labels': moving_labels and os.path.abspath(moving_labels),
      'checkpoint': os.path.abspath(checkpoint), 'checkpoint_step': run.step,
      'backbone': feat_header['backbone'], 'layer': feat_header['layer'],
      'grid': {'mode': opts.grid, 'preprocessing': dataclasses.asdict(prep),
               'shape': list(reg_shape), 'affine': np.asarray(reg_affine).tolist(),
               'spacing_mm': list(io.voxel_spacing(reg_affine)),
               'pyramid_factors': factors if factors is not None
               else list(run.config.model.factors)},
      'fixed_grid': {'shape': list(fshape), 'affine': np.asarray(faff).tolist()},
      'dice': dice,
      'jacobian': {'grid': 'registration grid', 'border_crop_vox': crop,
                   'folding_fraction': metrics_lib.folding_fraction(disp_vox, crop),
                   'sdlogj': metrics_lib.sdlogj(disp_vox, crop)},
      'instance_optimisation': io_report,
      'convention': 'disp_mm.nii.gz: RAS mm (fixed affine); warped(p) = moving(p + disp); '
                    'ITK/ANTs LPS: negate components 0 and 1',
      'files': {},
  }
  tmp = files.make_temp_dir(os.path.dirname(out), _tag(out))
  try:
    io.save_nifti(os.path.join(tmp, OUT_FILES['warped']), warped, faff)
    report['files']['warped'] = os.path.join(out, OUT_FILES['warped'])
    if warped_lab is not None:
      io.save_nifti(os.path.join(tmp, OUT_FILES['warped_labels']), warped_lab, faff,
                    intent='label')
      report['files']['warped_labels'] = os.path.join(out, OUT_FILES['warped_labels'])
    save_dispvect(os.path.join(tmp, OUT_FILES['disp']), disp_mm, faff)
    report['files']['disp'] = os.path.join(out, OUT_FILES['disp'])
    l2r_paths = [os.path.join(os.path.abspath(opts.l2r_dir), n) for n in l2r_files]
    if l2r_paths:
      report['files']['l2r'] = l2r_paths
      l2r_field = l2r_disp_vox(disp_mm, faff, pair.moving_affine)
    times['write_s'] = time.perf_counter() - t0
    report['times_s'] = times
    with open(os.path.join(tmp, OUT_FILES['report']), 'w') as f:
      json.dump(report, f, indent=2, default=_json_default)
    report['files']['report'] = os.path.join(out, OUT_FILES['report'])
    for path in l2r_paths:
      save_l2r(path, l2r_field, faff)
    publish(tmp, out, opts.overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return str(obj)


def summary_lines(report: dict[str, Any]) -> list[str]:
  """A short human-readable report."""
  t = report['times_s']
  lines = [f"grid {report['grid']['mode']} {tuple(report['grid']['shape'])} at "
           f"{tuple(round(s, 3) for s in report['grid']['spacing_mm'])} mm",
           'time (s): ' + ', '.join(f'{k[:-2]} {v:.2f}' for k, v in t.items())]
  if report['dice']:
    d = report['dice']
    lines.append(f"Dice: before {d['mean_before']:.4f}, after {d['mean_after']:.4f} "
                 f"(classes {d['classes']})")
  j = report['jacobian']
  lines.append(f"folding fraction {j['folding_fraction']:.5f}, SDlogJ {j['sdlogj']:.4f}")
  if report['instance_optimisation']:
    io_r = report['instance_optimisation']
    lines.append(f"instance optimisation ({io_r['steps']} steps): loss "
                 f"{io_r['loss_before']:.5f} -> {io_r['loss_after']:.5f}")
  paths = [p for v in report['files'].values() for p in (v if isinstance(v, list) else [v])]
  lines.append('outputs: ' + ', '.join(paths))
  return lines
