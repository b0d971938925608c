"""Register NIfTI pairs with a trained FMIR run (the ``fmir register`` command).

A short pipeline of named stages, each a function with typed inputs and outputs:

  _check_outputs -> _load (load_pair, plan_grid, preprocess) -> _field (encode, head,
  refine) -> _resample (onto the fixed grid, label overlap) -> _report -> outputs.write_outputs

A ``Registrar`` holds what a batch of pairs shares: the run (restored once), the encoder
(loaded once), the PCA basis, and the compiled head and instance optimiser (compiled once per
grid shape, in this object, not in a module cache). ``register`` runs one pair,
``register_batch`` a CSV of pairs.

Registration grid (``grid``): "model" (the run's training grid) or "native" (the fixed
image's field of view), planned by ``register_grid``. Both images are resampled through
world coordinates and normalised by the reader's own ``preprocess`` (the function its
``load()`` uses), and sliced for the encoder at the training scale in encoder pixels per
voxel (``encode.encoding_for``).

Outputs on the fixed image's ORIGINAL grid: ``warped_moving.nii.gz``,
``warped_moving_labels.nii.gz``, ``disp_mm.nii.gz`` and ``report.json``; see
``nifti.save_dispvect`` for the displacement convention (RAS mm, warped(p) = moving(p + disp);
ITK/ANTs LPS: negate components 0 and 1) and ``nifti.l2r_names`` for the Learn2Reg export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable

import numpy as np

from fmir_jax.core import files
from fmir_jax.ops import pyramid
from fmir_jax.train import head_card
from fmir_jax.core import metrics as metrics_lib
from fmir_jax.core import pair_metrics
from fmir_jax.core import resample
from fmir_jax.register import encode as encode_lib
from fmir_jax.register import inputs
from fmir_jax.register import grid as register_grid
from fmir_jax.register import outputs
from fmir_jax.train import runs
from fmir_jax.core import world
from fmir_jax.core.errors import RegisterError  # noqa: F401  (re-exported: register.RegisterError)
from fmir_jax.register.grid import GRIDS, plan_grid
from fmir_jax.register.inputs import LoadedPair, PairFiles, load_pair  # noqa: F401 (re-exported)
from fmir_jax.register.records import GridRecord, PairReport
from fmir_jax.register.records import RegisterOptions  # noqa: F401  (re-exported)

DATASET_GRIDS = ('acdc', 'abdomen')
LINEAR = ('affine', 'rigid', 'none')   # the linear stage before the head (``linear``)
OUT_FILES = outputs.OUT_FILES   # the result files' names (one home: register.outputs)


# --------------------------------------------------------------------------- the pipeline


class Registrar:
  """Registers pairs with one trained run; restore, encoder load and compiles happen once.

  Args:
    checkpoint: training run directory (``train.py --workdir``), or None for the general
      head shipped with the package (``head_card.default_checkpoint``).
    options: ``RegisterOptions``.
    log: called with one line per notable event (grid, warnings, refinement).
  """

  def __init__(self, checkpoint: str | None, options: RegisterOptions = RegisterOptions(),
               log: Callable[[str], None] = lambda s: None):
    from feature_extract import datasets   # feature_extract: inside functions only (layers)
    from fmir_jax.model import inference   # jax: a Registrar is built, so the head will run
    from fmir_jax.register import linear, refine   # jax + optax, as the head
    if options.grid not in (None,) + GRIDS:
      raise RegisterError(f'--grid {options.grid!r}: use one of {GRIDS}.')
    if options.dataset_grid not in (None,) + DATASET_GRIDS:
      raise RegisterError(f'--dataset-grid {options.dataset_grid!r}: use one of '
                          f'{DATASET_GRIDS}.')
    if options.linear not in LINEAR:
      raise RegisterError(f'--linear {options.linear!r}: use one of {LINEAR}.')
    if options.linear_similarity not in linear.SIMILARITIES:
      raise RegisterError(f'--linear-similarity {options.linear_similarity!r}: use one of '
                          f'{linear.SIMILARITIES}.')
    if not options.linear_shape_weight >= 0:
      raise RegisterError(f'--linear-shape-weight {options.linear_shape_weight}: use a '
                          'number >= 0.')
    if options.io_init not in ('head', 'zero'):
      raise RegisterError(f'--io-init {options.io_init!r}: use head or zero.')
    if options.io_init == 'zero' and options.refine is None:
      raise RegisterError('--io-init zero starts instance optimisation from the identity: '
                          'add --io.')
    self.log = log
    if checkpoint is None:
      checkpoint = head_card.default_checkpoint()
      log(f'checkpoint: the general head shipped with fmir-jax: {checkpoint}')
    self.card = head_card.read_card(checkpoint)
    if self.card:
      log(f'head: {self.card["what"]}')
    self.checkpoint = os.path.abspath(checkpoint)
    t0 = time.perf_counter()
    self.run = runs.load_run(checkpoint, options.checkpoint_step)
    settings = self.run.store_settings
    # A run trained on several grids has no one model grid: register on the native grid.
    opts = self.options = dataclasses.replace(
        options, grid=options.grid or ('native' if len(settings) > 1 else 'model'))
    dataset, self.reader_options = self.run.dataset
    self.reader = datasets.get(opts.dataset_grid or dataset or 'custom')
    self.levels = self.run.model.levels
    if not 0 <= opts.head_finest_level < self.levels:
      raise RegisterError(f'--head-finest-level {opts.head_finest_level}: this head has '
                          f'{self.levels} levels, use 0..{self.levels - 1}.')
    if opts.pyramid_factors is not None:
      try:
        pyramid.level_factors(opts.pyramid_factors, self.levels)
      except ValueError as e:
        raise RegisterError(f'--pyramid-factors: {e}') from e
    self.backbone, self.header = encode_lib.load_backbone(
        self.run, opts.backbone, opts.weights, opts.layer, opts.device, opts.dtype)
    self.pca = inference.pca_to_device(runs.pca_basis(self.run, self.header),
                                       inference.channel_norm(self.run.config))
    self._make_predict = lambda factors: inference.make_predict(
        self.run.graphdef, c_prime=self.run.model.feature_channels, factors=factors,
        finest_level=opts.head_finest_level)
    self._compiled: dict[Any, Any] = {}
    self.refiner = None if opts.refine is None else refine.Refiner(opts.refine)
    self.aligner = None if opts.linear == 'none' else linear.LinearAligner(
        linear.LinearOptions(kind=opts.linear, similarity=opts.linear_similarity,
                             shape_weight=opts.linear_shape_weight))
    self.setup_s = time.perf_counter() - t0
    train_shape = self.reader.target_shape(**self.reader_options)
    self.train_slice = None if train_shape is None else tuple(train_shape[:2])
    self.train_spacings_mm = [s.spacing_mm for s in settings if s.spacing_mm is not None]
    self.train_factors = [s.factors for s in settings if s.spacing_mm is not None]
    if not self.train_spacings_mm:
      sp = self.reader_options.get('spacing_mm') or getattr(self.reader, 'TARGET_SPACING_MM',
                                                            None)
      self.train_spacings_mm = [] if sp is None else [tuple(float(v) for v in sp)]
      self.train_factors = [self.run.model.factors] * len(self.train_spacings_mm)

  def factors_for(self, spacing_mm) -> Any:
    """Pyramid factors for a registration grid of this voxel size
    (``register_grid.factors_for``)."""
    return register_grid.factors_for(
        spacing_mm, override=self.options.pyramid_factors, grid=self.options.grid,
        model_factors=self.run.model.factors, train_spacings_mm=self.train_spacings_mm,
        train_factors=self.train_factors)

  def _head(self, moving: dict, fixed: dict, factors) -> tuple[np.ndarray, float, float]:
    """(disp_vox (H, W, D, 3), compile seconds (0 when cached), run seconds)."""
    import jax
    import jax.numpy as jnp
    args = (self.run.params, {k: jnp.asarray(v) for k, v in moving.items()},
            {k: jnp.asarray(v) for k, v in fixed.items()}, self.pca)
    key = (str(factors),) + tuple((k, v.shape) for k, v in sorted(moving.items()))
    compile_s = 0.0
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = self._make_predict(factors).lower(*args).compile()
      compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    disp = jax.block_until_ready(self._compiled[key](*args))
    return np.asarray(disp[0], np.float32), compile_s, time.perf_counter() - t0

  def register(self, paths: PairFiles, out: str) -> PairReport:
    """Registers one pair into OUT; returns the report (also OUT/report.json).

    Nothing is written under OUT unless every stage succeeded.
    """
    out = os.path.abspath(out)
    l2r_names = self._check_outputs(paths, out)
    times: dict[str, float] = {}
    pair, grid, factors, images = self._load(paths, times)
    fixed_w = inputs.mask_on_grid(pair.fixed_mask, grid.shape, grid.affine, '--fixed-mask')
    t_mm, aligned = self._linear(pair, grid, images, times, fixed_w)
    masks = (None, None) if self.refiner is None else (fixed_w, inputs.mask_on_grid(
        pair.moving_mask, grid.shape, grid.affine, '--moving-mask', t_mm))  # as the image
    disp_vox, enc, refined = self._field(images, grid, factors, times, masks)
    # The write stage in three parts (report.json times_s): resampling onto the fixed grid,
    # the metrics (labels, landmarks, the field's regularity), then the files (outputs).
    t0 = time.perf_counter()
    times['write_resample_s'] = times['write_metrics_s'] = 0.0
    arrays, labels = self._resample(pair, grid, disp_vox, t_mm, times)
    faff = pair.fixed_header.affine
    l2r_field = world.l2r_disp_vox(arrays['disp_mm'], faff, pair.moving_header.affine) \
        if l2r_names else None
    t1 = time.perf_counter()
    landmarks = None if pair.fixed_points_mm is None else inputs.landmark_errors(
        pair.fixed_points_mm, pair.moving_points_mm, arrays['disp_mm'], faff, t_mm)
    report = self._report(paths, pair, grid, factors, enc, disp_vox, labels, landmarks,
                          aligned, refined, times)
    t2 = time.perf_counter()
    times['write_resample_s'] = t1 - t0 - times['write_metrics_s']   # less the label metrics
    times['write_metrics_s'] += t2 - t1
    times['write_s'] = t2 - t0
    outputs.write_outputs(out, report, arrays, faff, (l2r_names, l2r_field),
                          self.options.overwrite)
    return report

  def _check_outputs(self, paths: PairFiles, out: str) -> list[str]:
    """Refuses unwritable or foreign outputs before any work; the Learn2Reg paths (or [])."""
    opts = self.options
    outputs.check_out_dir(out, opts.overwrite)
    if (paths.fixed_mask or paths.moving_mask) and self.aligner is self.refiner is None:
      raise RegisterError('--fixed-mask/--moving-mask restrict the similarity of the linear '
                          'stage and of instance optimisation (the head sees whole images): '
                          'drop --linear none, or add --io.')
    l2r_names = []
    if opts.l2r_dir:
      files.check_writable_dir(opts.l2r_dir, '--l2r-export')
      l2r_names = outputs.l2r_paths(opts.l2r_dir, paths.fixed, paths.moving,
                                    opts.l2r_fixed_id, opts.l2r_moving_id)
      outputs.check_l2r(l2r_names, opts.overwrite)
    for stale in files.remove_stale_temp_dirs(os.path.dirname(out), os.path.basename(out)):
      self.log(f'removed {stale} (left by a killed earlier run)')
    return l2r_names

  def register_arrays(self, pair: LoadedPair, times: dict[str, float] | None = None,
                      log_grid: bool = True, encoded: dict | None = None,
                      field_only: bool = False):
    """One pair already in memory (``fmir track``'s frames): the stages of ``register``
    (grid, linear stage, head, instance optimisation, resampling), no files and no report.

    Returns (arrays on the fixed image's grid: disp_mm, warped, jacobian_det and, with
    moving labels, warped_labels; the label overlap before/after or None; times).
    ``encoded``: as ``_field``'s; ``field_only``: disp_mm alone (no warping, no metrics).
    """
    times = {} if times is None else times
    t0 = time.perf_counter()
    grid, factors, images = self._grid_and_images(pair, times, t0, log_grid)
    t_mm, _ = self._linear(pair, grid, images, times, None)
    disp_vox, _, _ = self._field(images, grid, factors, times, encoded=encoded)
    if field_only:
      deform = world.disp_to_fixed_world(disp_vox, grid.affine, pair.fixed_header.shape,
                                         pair.fixed_header.affine)
      disp_mm = deform if t_mm is None else world.after_linear(
          deform, pair.fixed_header.affine, t_mm)
      return {'disp_mm': disp_mm}, None, times
    arrays, labels = self._resample(pair, grid, disp_vox, t_mm, times)
    return arrays, labels, times

  def _load(self, paths: PairFiles, times: dict[str, float]):
    """(pair, registration grid, pyramid factors, both images preprocessed on the grid)."""
    t0 = time.perf_counter()
    pair = load_pair(paths)
    grid, factors, images = self._grid_and_images(pair, times, t0)
    return pair, grid, factors, images

  def _encode(self, image: np.ndarray, enc, encoded: dict | None) -> dict[str, np.ndarray]:
    if encoded is None:
      return encode_lib.encode(image, self.backbone, enc, self.options.batch_size)
    key = (image.shape, hashlib.sha1(np.ascontiguousarray(image).data).hexdigest())
    value = encoded.pop(key, None)           # least recently used first: the reference stays
    if value is None:
      while len(encoded) >= 3:
        encoded.pop(next(iter(encoded)))
      value = encode_lib.encode(image, self.backbone, enc, self.options.batch_size)
    encoded[key] = value
    return value

  def _grid_and_images(self, pair: LoadedPair, times: dict[str, float], t0: float,
                       log_grid: bool = True):
    """(registration grid, pyramid factors, both images preprocessed on the grid)."""
    opts = self.options
    factors = self.factors_for(opts.spacing_mm or pair.fixed_header.spacing_mm)
    grid = plan_grid(pair.fixed_header, self.reader, self.reader_options, opts, factors,
                     self.levels, self.train_spacings_mm)
    grid = register_grid.check_inputs(grid, pair.fixed_header, pair.moving_header, factors,
                                      self.levels, self.backbone)
    images = {name: self.reader.preprocess(img, hdr, grid.shape, grid.affine,
                                           **self.reader_options)[0]
              for name, img, hdr in (('fixed', pair.fixed, pair.fixed_header),
                                     ('moving', pair.moving, pair.moving_header))}
    times['load_preprocess_s'] = time.perf_counter() - t0
    if log_grid:
      self.log(f'registration grid {grid.shape} at '
               f'{tuple(round(s, 3) for s in grid.spacing_mm)} mm ({grid.mode})')
      for w in grid.warnings:
        self.log(f'warning: {w}')
    return grid, factors, images

  def _linear(self, pair: LoadedPair, grid, images: dict[str, np.ndarray],
              times: dict[str, float], fixed_w: np.ndarray | None):
    """(4x4 fixed -> moving world map or None, its record or None): the linear stage on the
    grid's images (``fixed_w``: the fixed mask on the grid, or None); the moving one is then
    preprocessed again from the original through the map (so the head sees it aligned, and
    the output is still one interpolation)."""
    times['linear_s'] = 0.0
    if self.aligner is None:
      return None, None
    t0 = time.perf_counter()
    # Each image's field of view weights the similarity too: where the moving scan has no
    # data (0 after resampling) is no evidence, least of all for an inverted contrast.
    moving_w = inputs.mask_on_grid(pair.moving_mask, grid.shape, grid.affine, '--moving-mask')
    masks = []
    for is_moving, hdr, mask in ((False, pair.fixed_header, fixed_w),
                                 (True, pair.moving_header, moving_w)):
      fov = self.aligner.field_of_view(
          resample.resample_to_grid(np.ones(hdr.shape, np.float32), hdr.affine, grid.affine,
                                    grid.shape, order=1, cval=0.0),
          grid.spacing_mm, moving=is_moving)
      masks.append(fov if mask is None else fov * mask)
    t_mm, rec = self.aligner.align(images['moving'], images['fixed'], grid.affine, *masks)
    header = dataclasses.replace(pair.moving_header,
                                 affine=np.linalg.inv(t_mm) @ pair.moving_header.affine)
    # Where the map leaves the moving scan but the fixed one has data, the nearest value
    # inside the moving scan: the reader's fill (the image's minimum) would add an edge the
    # fixed scan lacks (a dark slab beside the bright background of an inverted contrast)
    # and the head and --io would follow it. Where neither has data (the grid's padding)
    # both keep the fill.
    moved = self.reader.preprocess(pair.moving, header, grid.shape, grid.affine,
                                   **self.reader_options)[0]
    inside_m = resample.inside_grid(header.shape[:3], header.affine, grid.shape, grid.affine)
    inside_f = resample.inside_grid(pair.fixed_header.shape[:3], pair.fixed_header.affine,
                                    grid.shape, grid.affine)
    images['moving'] = np.where(inside_f & ~inside_m, resample.fill_nearest(moved, inside_m),
                                moved)
    times['linear_s'] = time.perf_counter() - t0 - rec.compile_seconds
    times['compile_s'] = rec.compile_seconds
    self.log(f'linear ({rec.kind}, from the {rec.start}): shift '
             + ', '.join(f'{v:.1f}' for v in rec.translation_mm) + ' mm, rotation '
             + ', '.join(f'{v:.1f}' for v in rec.rotation_deg) + ' deg, scale '
             + ', '.join(f'{v:.3f}' for v in rec.scale))
    return t_mm, rec

  def _field(self, images: dict[str, np.ndarray], grid, factors, times: dict[str, float],
             masks=(None, None), encoded: dict | None = None):
    """(disp_vox (H, W, D, 3) on the registration grid, encoder input, IO result or None):
    encode -> head -> instance optimisation (its similarity over the masks). ``encoded``:
    a dict the caller keeps across pairs, the encoder's inputs by image content (a series'
    reference frame is encoded once)."""
    opts = self.options
    t0 = time.perf_counter()
    enc = encode_lib.encoding_for(grid.shape[:2], self.header, self.train_slice,
                                  self.backbone.required_input_size, self.backbone.patch_size)
    compile_s = times.setdefault('compile_s', 0.0)
    if opts.io_init == 'zero':         # instance optimisation from the identity: no head
      times['features_s'], times['head_s'] = 0.0, 0.0
      disp_vox = np.zeros(grid.shape + (3,), np.float32)
    else:
      inputs = {k: self._encode(v, enc, encoded) for k, v in images.items()}
      times['features_s'] = time.perf_counter() - t0
      disp_vox, head_compile_s, times['head_s'] = self._head(inputs['moving'],
                                                             inputs['fixed'], factors)
      times['compile_s'] = compile_s + head_compile_s
    refined, times['refine_s'] = None, 0.0
    if self.refiner is not None:
      disp_vox, refined = self.refiner.refine(images['moving'], images['fixed'],
                                              grid.spacing_mm, disp_vox, *masks)
      times['compile_s'] += refined.compile_seconds
      times['refine_s'] = refined.seconds_total
      self.log('instance optimisation, loss per scale (coarse to fine): ' + ', '.join(
          f'{b:.4f} -> {a:.4f}' for b, a in zip(refined.loss_before, refined.loss_after)))
    return disp_vox, enc, refined

  def _resample(self, pair: LoadedPair, grid, disp_vox: np.ndarray, t_mm,
                times: dict[str, float]):
    """(arrays on the fixed image's original grid: disp_mm (the whole map), warped,
    warped_labels; the label overlap before/after or None) from the field on the registration
    grid and the linear map (or None); the overlap's seconds go to times['write_metrics_s']."""
    fshape, faff = pair.fixed_header.shape, pair.fixed_header.affine
    deform = world.disp_to_fixed_world(disp_vox, grid.affine, fshape, faff)
    disp_mm = deform if t_mm is None else world.after_linear(deform, faff, t_mm)
    arrays = {'disp_mm': disp_mm, 'warped': world.warp_to_fixed(
        pair.moving, pair.moving_header.affine, fshape, faff, disp_mm, order=1)}
    arrays['jacobian_det'] = world.jacobian_det_mm(disp_mm, faff)
    if t_mm is not None:            # the ITK pair: the deformable part, then the linear map
      arrays['itk_warp'], arrays['itk_affine'] = deform, t_mm
    labels = None
    if pair.moving_labels is not None:
      arrays['warped_labels'] = world.warp_to_fixed(
          pair.moving_labels, pair.moving_header.affine, fshape, faff, disp_mm, order=0)
      if pair.fixed_labels is not None:
        initial = world.warp_to_fixed(pair.moving_labels, pair.moving_header.affine, fshape,
                                      faff, None, order=0)
        t0 = time.perf_counter()
        try:
          labels = pair_metrics.label_overlap_before_after(
              arrays['warped_labels'], initial, pair.fixed_labels, pair.fixed_header.spacing_mm)
        except ValueError as e:
          raise RegisterError(f'--fixed-labels/--moving-labels: {e}') from e
        times['write_metrics_s'] += time.perf_counter() - t0
    return arrays, labels

  def _report(self, paths: PairFiles, pair: LoadedPair, grid, factors, enc, disp_vox,
              labels, landmarks, aligned, refined, times: dict[str, float]) -> PairReport:
    """The report of one pair (``files`` filled in when they are written)."""
    opts = self.options
    crop = 2 if min(grid.shape) > 4 else 0
    return PairReport(
        **{k: v and os.path.abspath(v) for k, v in dataclasses.asdict(paths).items()},
        checkpoint=self.checkpoint, checkpoint_step=self.run.step,
        head=self.card and self.card['what'], head_finest_level=opts.head_finest_level,
        backbone=self.header['backbone'], layer=self.header['layer'],
        encoder_input=dataclasses.asdict(enc),
        grid=GridRecord(mode=grid.mode, reader=self.reader.NAME,
                        reader_options=self.reader_options, shape=list(grid.shape),
                        affine=grid.affine.tolist(), spacing_mm=list(grid.spacing_mm),
                        pyramid_factors=factors),
        warnings=list(grid.warnings),
        fixed_grid={'shape': list(pair.fixed_header.shape),
                    'affine': np.asarray(pair.fixed_header.affine).tolist()},
        dice=labels, landmarks=landmarks,
        jacobian={'grid': 'registration grid', 'border_crop_vox': crop,
                  **metrics_lib.field_regularity(disp_vox, crop)},
        linear=aligned and dataclasses.asdict(aligned),
        instance_optimisation=refined and {
            'options': dataclasses.asdict(self.refiner.options), 'init': opts.io_init,
            **dataclasses.asdict(refined)},
        convention='disp_mm.nii.gz: RAS mm (fixed affine); warped(p) = moving(p + disp); '
                   'ITK/ANTs LPS: negate components 0 and 1',
        times_s=times)

def register(fixed: str, moving: str, checkpoint: str | None, out: str, *,
             options: RegisterOptions = RegisterOptions(),
             log: Callable[[str], None] = lambda s: None, **optional: str | None
             ) -> PairReport:
  """Registers ``moving`` onto ``fixed`` into ``out`` (one pair; see ``Registrar``);
  ``optional``: the other ``PairFiles`` fields (labels, masks, landmarks)."""
  return Registrar(checkpoint, options, log).register(
      PairFiles(fixed, moving, **optional), out)

