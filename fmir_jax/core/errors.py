"""Exception types and the --layer check shared by ``fmir_jax`` and ``feature_extract``.

A low module (standard library only: no torch, no jax), so that the ``fmir`` command can
name these errors and parse its flags without importing the PyTorch stage. The types are
re-exported where they were first defined (``feature_extract.backbones.BackboneError``,
``feature_extract.datasets.base.DatasetError``); either name catches the same class.
"""
from __future__ import annotations


class UserError(Exception):
  """The base of every error a user can fix: bad input, flag, file or output path.

  Its message names the argument or file and the fix. Entry points catch this class only
  (one line on stderr, exit status 2); anything else is a bug and keeps its traceback.
  """


class ConfigError(UserError, ValueError):
  """A setting (flag or config field) that cannot work: the message names it and the range."""


class BackboneError(UserError, RuntimeError):
  """A backbone cannot be loaded or used as asked (message says how to fix it)."""


class DatasetError(UserError, ValueError):
  """Bad input data: the message names the file and what is wrong (and the fix)."""


class RegisterError(UserError, ValueError):
  """Bad input to ``fmir register``: the message names the argument/file and the fix."""


class RunError(UserError, ValueError):
  """A run directory, checkpoint or PCA file that cannot be used; the message names the path
  and the fix."""


class RunNotFoundError(RunError, FileNotFoundError):
  """The folder is not a training run, or holds no checkpoint yet."""


class CheckpointMismatchError(RunError):
  """A checkpoint whose arrays do not fit the model its run.json describes."""


def one_line(e: BaseException) -> str:
  """An exception's first sentence on one short line (TensorStore's span many lines)."""
  text = ' '.join(str(e).split()).split('. ')[0] or type(e).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def parse_layer(layer: int | str | None, num_layers: int | None = None,
                label: str = '') -> int | str | None:
  """A --layer value -> a ``hidden_states`` index or "last"; None stays None (the default).

  With ``num_layers`` the index must lie in 0..num_layers. ``label`` (a backbone name)
  prefixes the message. Raises BackboneError.
  """
  if layer is None or layer == 'last':
    return layer
  prefix = f'{label}: ' if label else ''
  try:
    index = int(layer)
  except (TypeError, ValueError):
    raise BackboneError(f'{prefix}--layer must be an int or "last", got {layer!r}.') from None
  if num_layers is not None and not 0 <= index <= num_layers:
    raise BackboneError(f'{prefix}--layer {index} out of range; hidden_states has indices '
                        f'0..{num_layers} (0 = embeddings, i = after block i) or "last".')
  return index
