"""The trainable state of a run (model parameters, optimiser state, PRNG key) and how a
config builds it: what a checkpoint holds and what ``runs.load_run`` restores into."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmir_jax.core import errors
from fmir_jax.model import network as model_lib

# A config value training cannot use (``errors.ConfigError``).
ConfigError = errors.ConfigError


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
      flow_init=str(m.get('flow_init', 'torch')),
      finest_level=int(m.get('finest_level', 0)))


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

