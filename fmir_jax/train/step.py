"""Training library: model/optimiser construction, training modes, channel regularisation,
the jit-compiled train step (data-parallel over a device mesh) and the evaluation forward.

``train.py`` and ``eval.py`` are thin absl mains over this module; the notebook and the
``register`` command call the same functions.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmir_jax.model import channel_reg
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.ops import conv as conv_lib
from fmir_jax.train import distributed
from fmir_jax.core import errors
from fmir_jax.ops import losses
from fmir_jax.model import network as model_lib
from fmir_jax.model import slabs
from fmir_jax.core import store as store_lib


@dataclasses.dataclass(frozen=True)
class Mode:
  """A training mode (paper §2.4, §2.5): what the head sees at training and what the loss uses.

  random_channels: a random c'-of-c channel draw at training (else the PCA projection).
  dice: Dice on warped labels in the loss (weakly supervised).
  """
  name: str
  random_channels: bool
  dice: bool


MODE_TABLE = {m.name: m for m in (Mode('UN', random_channels=True, dice=False),
                                  Mode('WS', random_channels=True, dice=True),
                                  Mode('-CR', random_channels=False, dice=False))}
MODES = tuple(MODE_TABLE)


# ------------------------------------------------------------------------------ config checks

# A config value training cannot use: the message names ``--config.FIELD`` and the fix. The
# shared class (data and distributed raise it too), named here for the training path.
ConfigError = errors.ConfigError


# (field, minimum, what it is): integer fields and their smallest valid value.
_INT_FIELDS = (
    ('feature_channels', 1, "c', channels the head sees"),
    ('data.num_classes', 1, 'foreground labels'),
    ('data.prefetch', 0, 'batches read ahead'),
    ('model.n', 1, 'base channel width'),
    ('model.levels', 1, 'pyramid levels'),
    ('model.integration_steps', 0, 'scaling-and-squaring steps; 0 = none'),
    ('train.epochs', 0, 'epochs when train.num_steps is 0'),
    ('train.num_steps', 0, 'steps; 0 = train.epochs over the training pairs'),
    ('train.batch_size', 1, 'pairs per step'),
    ('train.seed', 0, 'random seed'),
    ('train.log_every', 1, 'logging period in steps'),
    ('train.checkpoint_every', 1, 'checkpoint period in steps'),
    ('train.keep_checkpoints', 1, 'checkpoints kept'),
    ('train.eval_every', 1, 'validation period in steps'),
    ('train.eval_pairs', 0, 'validation pairs; 0 = all'),
    ('train.pca_max_volumes', 0, 'volumes for the PCA fit; 0 = all'),
)
# (field, minimum, whether the minimum itself is allowed): finite real fields.
_REAL_FIELDS = (
    ('optim.lr', 0.0, False),
    ('optim.decay_power', 0.0, True),
    ('optim.grad_clip', 0.0, True),
    ('loss.ncc', 0.0, True),
    ('loss.dice', 0.0, True),
    ('loss.smooth', 0.0, True),
    ('loss.blur_sigma', 0.0, True),
)
_MAX_SEED = 2**31 - 1


def _choices() -> dict[str, tuple[str, ...]]:
  return {'mode': MODES, 'channel_norm': tuple(sorted(channel_reg.NORMS)),
          'model.activation': tuple(sorted(model_lib.ACTIVATIONS)),
          'model.kernel_init': tuple(sorted(model_lib.KERNEL_INITS)),
          'model.flow_init': tuple(sorted(model_lib.FLOW_INITS)),
          'model.conv_impl': tuple(conv_lib.IMPLS)}


def _field(config, path: str):
  """The value of a dotted config field, or ``_MISSING``."""
  node = config
  for part in path.split('.'):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return _MISSING
  return node


_MISSING = object()


def _as_int(value) -> int | None:
  """``value`` as an int when it is an integer (3, 3.0), else None (bools, 2.5, 'x', nan)."""
  if isinstance(value, bool):
    return None
  try:
    real = float(value)
  except (TypeError, ValueError):
    return None
  return int(real) if math.isfinite(real) and real == int(real) else None


def check_config(config) -> None:
  """Raises ConfigError for the first config value training cannot use: a number out of its
  range (``train.batch_size=0``, ``train.num_steps=-5``, ``optim.lr=-1`` or nan), an
  unknown choice (``mode``, ``model.kernel_init``, ...), pyramid factors or NCC windows that
  do not fit ``model.levels``, or a config that trains no step. Needs no store or device:
  ``train.py`` runs it before anything else. Fields a config lacks are skipped (runs from
  before them)."""
  for path, low, what in _INT_FIELDS:
    value = _field(config, path)
    if value is _MISSING:
      continue
    as_int = _as_int(value)
    high = _MAX_SEED if path == 'train.seed' else None
    if as_int is None or as_int < low or (high is not None and as_int > high):
      valid = f'an integer in [{low}, {high}]' if high is not None else f'an integer >= {low}'
      raise ConfigError(f'--config.{path}={value!r}: must be {valid} ({what})')
  for path, low, inclusive in _REAL_FIELDS:
    value = _field(config, path)
    if value is _MISSING:
      continue
    try:
      real = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
      real = math.nan
    if not (math.isfinite(real) and (real >= low if inclusive else real > low)):
      valid = f'>= {low:g}' if inclusive else f'> {low:g}'
      raise ConfigError(f'--config.{path}={value!r}: must be a finite number {valid}')
  for path, allowed in _choices().items():
    value = _field(config, path)
    if value is not _MISSING and value not in allowed:
      lower = {a.lower(): a for a in allowed}
      close = difflib.get_close_matches(str(value).lower(), list(lower), n=1)
      hint = f' (did you mean {lower[close[0]]!r}?)' if close else ''
      raise ConfigError(f'--config.{path}={value!r}: unknown; use one of '
                        f'{", ".join(allowed)}{hint}')
  train = config.train
  if not _as_int(train.get('num_steps', 0)) and not _as_int(train.get('epochs', 1)):
    raise ConfigError('--config.train.num_steps=0 and --config.train.epochs=0 train no step: '
                      'set either to at least 1')
  levels = _as_int(_field(config, 'model.levels'))
  factors = _field(config, 'model.factors')
  if levels is not None and factors is not _MISSING:
    _check_factors('model.factors', factors, levels)
  per_store = config.data.get('per_store')
  if levels is not None and per_store is not None and 'factors' in per_store:
    for i, f in enumerate(per_store['factors']):
      _check_factors(f'data.per_store.factors[{i}]', f, levels)
  windows = _field(config, 'loss.ncc_windows')
  if levels is not None and windows is not _MISSING:
    ints = [_as_int(w) for w in windows] if isinstance(windows, (list, tuple)) else [None]
    if any(w is None or w < 1 or w % 2 == 0 for w in ints) or len(ints) < levels:
      shown = tuple(windows) if isinstance(windows, (list, tuple)) else windows
      raise ConfigError(f'--config.loss.ncc_windows={shown!r}: needs an odd window size >= 1 '
                        f'for each of the {levels} pyramid levels (model.levels), finest first')


def _check_factors(path: str, factors, levels: int) -> None:
  """Pyramid factors as ``model.level_factors`` takes them: one positive (sx, sy, sz) triple,
  or ``levels - 1`` of them."""
  def triple(t):
    return (isinstance(t, (list, tuple)) and len(t) == 3
            and all(_as_int(v) is not None and _as_int(v) >= 1 for v in t))
  ok = isinstance(factors, (list, tuple)) and (
      triple(factors) or (len(factors) == levels - 1 and all(triple(t) for t in factors)))
  if not ok:
    raise ConfigError(f'--config.{path}={factors!r}: needs one triple of integers >= 1 '
                      f'(sx, sy, sz) or {levels - 1} of them for {levels} levels '
                      '(model.levels)')


# ----------------------------------------------------------------------------- config -> objects

def model_config(config, feature_channels_in: int) -> model_lib.FMIRConfig:
  """FMIRConfig from an ml_collections config; checks c' against the store's channels."""
  c_prime = int(config.feature_channels)
  if feature_channels_in < c_prime:
    raise ConfigError(
        f'the feature store has {feature_channels_in} channels but the config asks for '
        f"c'={c_prime}: set --config.feature_channels<={feature_channels_in} (channel "
        'regularisation selects or projects c\' of the c store channels)')
  m = config.model
  return model_lib.FMIRConfig(
      feature_channels=c_prime, n=int(m.n), levels=int(m.levels),
      factors=tuple(m.factors), integration_steps=int(m.integration_steps),
      activation=str(m.activation), head_instance_norm=bool(m.head_instance_norm),
      exact_feature_path=bool(m.exact_feature_path),
      kernel_init=str(m.get('kernel_init', 'torch')),
      conv_impl=str(m.get('conv_impl', 'auto')),
      flow_init=str(m.get('flow_init', 'torch')))


def mode_of(name: str) -> Mode:
  """The ``MODE_TABLE`` entry of a config's ``mode``, or a one-line error."""
  if name not in MODE_TABLE:
    raise ConfigError(f'unknown mode {name!r}: set --config.mode to one of {MODES}')
  return MODE_TABLE[name]


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """Adam (or AMSGrad) with polynomial decay (power 0.9) and global-norm clipping."""
  o = config.optim
  schedule = optax.polynomial_schedule(init_value=float(o.lr), end_value=0.0,
                                       power=float(o.decay_power),
                                       transition_steps=max(int(total_steps), 1))
  opt = optax.amsgrad(schedule) if o.amsgrad else optax.adam(schedule)
  if o.grad_clip and o.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), opt)
  return opt


# ------------------------------------------------------------------------- channel regularisation

def regularise_channels(feat_m, feat_f, *, key, c_prime: int, random_selection: bool,
                        pca: dict | None):
  """c -> c' on the patch grid, identically for moving and fixed.

  random_selection: draw c' of c channels from ``key`` (training in UN/WS modes), after
  ``(x - pca['draw_mean']) / pca['draw_scale']`` when ``pca`` is given; otherwise project on
  the PCA basis ``pca`` ({'mean': (c,), 'components': (c, c')}, ``pca_to_device``).
  When c == c' and no PCA is given, the features pass unchanged.
  """
  c = feat_m.shape[-1]
  feat_m = feat_m.astype(jnp.float32)
  feat_f = feat_f.astype(jnp.float32)
  if random_selection:
    if pca is not None and 'draw_mean' in pca:
      feat_m = (feat_m - pca['draw_mean']) / pca['draw_scale']
      feat_f = (feat_f - pca['draw_mean']) / pca['draw_scale']
    idx = channel_reg.draw_channels(key, c, c_prime)
    return (channel_reg.select_channels(feat_m, idx),
            channel_reg.select_channels(feat_f, idx))
  if pca is None:
    if c == c_prime:
      return feat_m, feat_f
    raise ValueError(f'a PCA basis is needed to reduce {c} channels to {c_prime}')
  return (channel_reg.pca_project(feat_m, pca['mean'], pca['components']),
          channel_reg.pca_project(feat_f, pca['mean'], pca['components']))


# -------------------------------------------------------------------------------------- losses

@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static loss settings (hashable, part of the compiled step)."""
  ncc: float = 1.0
  dice: float = 0.0
  smooth: float = 1.0
  windows: tuple = losses.NCC_WINDOWS
  blur_sigma: float = 1.0
  blur_in_plane_only: bool = True
  num_classes: int = 3

  @classmethod
  def from_config(cls, config, mode: str, num_classes: int | None = None,
                  blur_in_plane_only: bool | None = None) -> 'LossSpec':
    lc = config.loss
    return cls(ncc=float(lc.ncc), dice=float(lc.dice) if mode_of(mode).dice else 0.0,
               smooth=float(lc.smooth), windows=tuple(int(w) for w in lc.ncc_windows),
               blur_sigma=float(lc.blur_sigma),
               blur_in_plane_only=bool(lc.blur_in_plane_only if blur_in_plane_only is None
                                       else blur_in_plane_only),
               num_classes=int(config.data.num_classes if num_classes is None
                               else num_classes))


def registration_loss(out: model_lib.FMIROutput, moving, fixed, spec: LossSpec):
  """Multi-level NCC + Dice + diffusion (paper §2.5) for a model output."""
  shapes = tuple(tuple(v.shape[1:4]) for v in out.v_levels)
  img_m = losses.image_pyramid(moving['image'][..., None], shapes, spec.blur_sigma,
                               spec.blur_in_plane_only)
  img_f = losses.image_pyramid(fixed['image'][..., None], shapes, spec.blur_sigma,
                               spec.blur_in_plane_only)
  lab_m = lab_f = None
  if spec.dice > 0:
    k = spec.num_classes + 1
    lab_m = losses.label_pyramid(jax.nn.one_hot(moving['labels'], k), shapes)
    lab_f = losses.label_pyramid(jax.nn.one_hot(fixed['labels'], k), shapes)
  return losses.multilevel_loss(
      v_levels=out.v_levels, u_levels=out.u_levels, moving_levels=img_m,
      fixed_levels=img_f, moving_label_levels=lab_m, fixed_label_levels=lab_f,
      windows=spec.windows, lambdas=(spec.ncc, spec.dice, spec.smooth))


# ---------------------------------------------------------------------------------- train state

class TrainState(NamedTuple):
  step: jax.Array          # () int32
  params: Any              # nnx.State of the model's Params
  opt_state: Any
  key: jax.Array           # base PRNG key; the step's key is fold_in(key, step)


def create(config, feature_channels_in: int, total_steps: int):
  """(graphdef, TrainState, optimizer, FMIRConfig) for a fresh run."""
  mcfg = model_config(config, feature_channels_in)
  seed = int(config.train.seed)
  tx = make_optimizer(config, total_steps)

  def init():
    # 'rbg' keys draw with XLA's RngBitGenerator: the dozen differently shaped threefry
    # uniform draws of the conv initialisers compile several times slower on CPU. Same
    # distributions; the values are backend-specific (CPU vs GPU).
    model = model_lib.FMIR(mcfg, rngs=nnx.Rngs(jax.random.key(seed, impl='rbg')))
    return nnx.split(model, nnx.Param)

  graphdef = nnx.eval_shape(init)[0]
  params = jax.jit(lambda: init()[1])()
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                     opt_state=jax.jit(tx.init)(params),
                     key=jax.random.key_data(jax.random.PRNGKey(seed + 1)))
  return graphdef, state, tx, mcfg


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of all processes (data parallelism over the batch axis)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, ('data',))


def _step_fn(graphdef, tx, spec: LossSpec, c_prime: int, random_selection: bool,
             factors, state: TrainState, batch, pca):
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    fm, ff = regularise_channels(batch['moving']['feat'], batch['fixed']['feat'], key=key,
                                 c_prime=c_prime, random_selection=random_selection, pca=pca)
    moving = dict(batch['moving'], feat=fm)
    fixed = dict(batch['fixed'], feat=ff)
    out = model(moving, fixed, factors=factors)
    total, parts = registration_loss(out, moving, fixed, spec)
    return total, parts

  (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  metrics = dict(parts, loss=total, grad_norm=grad_norm)
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key)
  # A non-finite step changes nothing: the caller gets the last good state back to save.
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  return new, metrics, finite


def make_train_step(graphdef, tx, spec: LossSpec, *, c_prime: int, mode: str, mesh: Mesh,
                    factors=None):
  """jit-compiled ``step(state, batch, pca) -> (state, metrics, finite)``.

  The batch is sharded over the mesh's 'data' axis; parameters, optimiser state and PCA
  basis are replicated. The same program runs on 1 CPU, several GPUs or a TPU slice.
  """
  fn = functools.partial(_step_fn, graphdef, tx, spec, c_prime,
                         mode_of(mode).random_channels, factors)
  repl = replicated(mesh)
  batch_sharded = NamedSharding(mesh, P('data'))
  return jax.jit(fn, in_shardings=(repl, batch_sharded, repl),
                 out_shardings=(repl, repl, repl), donate_argnums=(0,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
  """Places a host batch on the mesh, split along the leading (batch) axis. In a multi-host
  run ``batch`` is this process's share of the global batch (``distributed.share``)."""
  n = mesh.devices.size
  b = jax.tree.leaves(batch)[0].shape[0] * jax.process_count()
  if b % n:
    raise ConfigError(f'batch of {b} pairs does not split over {n} devices: set '
                     f'--config.train.batch_size to a multiple of {n}')
  if jax.process_count() > 1:
    return distributed.global_array(batch, mesh)
  return jax.device_put(batch, NamedSharding(mesh, P('data')))


# ------------------------------------------------------------------------------ inference

def make_predict(graphdef, *, c_prime: int, factors=None, slab_rows='auto',
                 finest_level: int = 0):
  """jit-compiled ``predict(params, moving, fixed, pca) -> disp (B,H,W,D,3)`` (PCA path).

  slab_rows: rows per slab for the level-0 compressor and head (``slabs.forward_in_slabs``;
  same result, bounded memory), None for whole volumes, or 'auto' (``slabs.auto_slab_rows``:
  slabs only when a volume's widest level-0 activation would pass 256 MiB).
  finest_level: the finest pyramid level the head runs (``FMIR.level_loop``; 0: all).
  """

  def fn(params, moving, fixed, pca):
    model = nnx.merge(graphdef, params)
    fm, ff = regularise_channels(moving['feat'], fixed['feat'], key=None, c_prime=c_prime,
                                 random_selection=False, pca=pca)
    moving, fixed = dict(moving, feat=fm), dict(fixed, feat=ff)
    rows = slab_rows
    if rows == 'auto':
      rows = None if model.cfg.head_instance_norm else slabs.auto_slab_rows(
          moving['image'].shape[1:4], moving['image'].shape[0], model.cfg.n)
    if rows is None:
      return model(moving, fixed, factors=factors, finest=finest_level).disp
    return slabs.forward_in_slabs(model, moving, fixed, rows=rows, factors=factors,
                                  finest=finest_level).disp

  return jax.jit(fn)


def model_inputs(volume_item: dict) -> dict:
  """The arrays the model reads from a data.volume_item (adds nothing, drops labels)."""
  return {k: volume_item[k] for k in model_lib.INPUT_KEYS}


# ------------------------------------------------------------------------------- PCA on stores

def fit_pca(stores, c_prime: int, split: str = 'train', max_volumes: int = 0,
            progress=None, fit: str = 'centred') -> channel_reg.PCABasis:
  """PCA of the training stores' patch-grid features (float64 streaming sums).

  fit: ``channel_reg.Norm.fit`` ('centred', 'uncentred' or 'standardised').
  """
  c = stores[0].header['channels']
  acc = channel_reg.PCAAccumulator(c)
  keys = [(st, k) for st in stores for k in st.keys(split)]
  if max_volumes:
    keys = keys[:max_volumes]
  if not keys:
    paths = ', '.join(str(st.path) for st in stores)
    raise store_lib.StoreError(f'{paths}: no {split!r} volumes to fit the PCA basis on; '
                               f'extract features for the {split} split')
  for st, k in (progress(keys) if progress else keys):
    acc.update(np.asarray(st.features(k)))
  return acc.finalize(c_prime, fit=fit)


def channel_norm(config, override: str = '', run: str = 'the run') -> channel_reg.Norm:
  """The run's feature normalisation (``config.channel_norm``; runs before it: 'paper').

  override: another normalisation to see the run through at inference; it must share the
    run's PCA fit (``standardise`` and ``matched`` train identically). ``run`` names the
    run in the error.
  """
  own_name = config.get('channel_norm', 'paper')
  for name, where in ((own_name, '--config.channel_norm'), (override, '--channel_norm')):
    if name and name not in channel_reg.NORMS:
      raise ConfigError(f'unknown channel_norm {name!r} ({where}); use one of '
                        f'{sorted(channel_reg.NORMS)}')
  own = channel_reg.norm_of(own_name)
  if not override:
    return own
  norm = channel_reg.norm_of(override)
  if norm.fit != own.fit:
    same = sorted(k for k, v in channel_reg.NORMS.items() if v.fit == own.fit)
    raise ConfigError(f'--channel_norm {override} needs a {norm.fit} PCA but {run} was trained '
                      f'with {own_name} ({own.fit}); use one of {same}')
  return norm


def pca_to_device(basis: channel_reg.PCABasis | None, norm: channel_reg.Norm | None = None):
  """The device maps of ``channel_reg.head_inputs`` (norm None: the basis's own fit, raw
  draw, no whitening); None stays None."""
  if basis is None:
    return None
  if norm is None:
    norm = channel_reg.Norm(basis.fit, whiten=False, draw_standardised=False)
  if norm.fit != basis.fit:
    raise ckpt.RunError(f'PCA basis is a {basis.fit} fit but channel_norm needs {norm.fit}; '
                        'refit it (delete the pca/ file of the run)')
  return {k: jnp.asarray(v) for k, v in channel_reg.head_inputs(basis, norm).items()}
