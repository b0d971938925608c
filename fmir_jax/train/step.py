"""The jit-compiled training step: training modes, the registration loss and one
data-parallel optimiser step over a device mesh (the batch split along its 'data' axis).

``train.loop`` runs it; the model and channel regularisation come from ``fmir_jax.model``,
the state from ``train.state``.
"""
from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmir_jax.core import errors
from fmir_jax.model import channel_reg
from fmir_jax.model import network as model_lib
from fmir_jax.ops import losses
from fmir_jax.train import distributed
from fmir_jax.train.state import TrainState

# A config value training cannot use (``errors.ConfigError``).
ConfigError = errors.ConfigError


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



def mode_of(name: str) -> Mode:
  """The ``MODE_TABLE`` entry of a config's ``mode``, or a one-line error."""
  if name not in MODE_TABLE:
    raise ConfigError(f'unknown mode {name!r}: set --config.mode to one of {MODES}')
  return MODE_TABLE[name]



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


def _step_fn(graphdef, tx, spec: LossSpec, c_prime: int, random_selection: bool,
             factors, state: TrainState, batch, pca):
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    fm, ff = channel_reg.regularise_channels(batch['moving']['feat'], batch['fixed']['feat'], key=key,
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

