"""Config checks before any work: every field training reads, its type and range, with the
close matches of a misspelt name. One line per problem, naming ``--config.FIELD`` and the fix."""
from __future__ import annotations

import difflib
import math

from fmir_jax.core import errors
from fmir_jax.model import channel_reg
from fmir_jax.model import network as model_lib
from fmir_jax.ops import conv as conv_lib
from fmir_jax.train.step import MODES

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

