"""Plain JSON values from numpy data: the one converter behind the JSON files we write.

numpy only (no jax, no torch), so the PyTorch and the JAX stages can both use it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np


class Unsupported(TypeError):
  """A value JSON has no form for; ``args[0]`` is it."""


class NonFinite(ValueError):
  """NaN or inf where ``plain(..., finite_only=True)`` refuses them; ``args[0]`` is it."""


def plain(value: Any, *, finite_only: bool) -> Any:
  """numpy -> python, tuples -> lists, keys -> str; NaN/inf -> None unless ``finite_only``.

  Raises:
    Unsupported: a value other than None/bool/int/float/str, list/tuple, mapping, ndarray.
    NonFinite: a NaN/inf number when ``finite_only``.
  """
  if isinstance(value, Mapping):
    return {str(k): plain(v, finite_only=finite_only) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v, finite_only=finite_only) for v in value]
  if isinstance(value, np.ndarray):
    return plain(value.tolist(), finite_only=finite_only)
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    number = float(value)
    if math.isfinite(number):
      return number
    if finite_only:
      raise NonFinite(number)
    return None
  if value is None or isinstance(value, str):
    return value
  raise Unsupported(value)
