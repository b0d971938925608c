"""Channel regularisation (SPEC.md section 3): random channel draws and PCA projection.

Training draws ``c'`` of the ``c`` feature channels uniformly without replacement per
forward pass (the same indices for moving and fixed). Inference projects onto a PCA basis
fitted once on training-set features (centred), streamed in float64 with numpy.

Features are channels-last: ``(..., c)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_CHUNK_ROWS = 1 << 16  # rows converted to float64 at a time in PCAAccumulator.update


def draw_channels(key: jax.Array, c: int, c_prime: int) -> jax.Array:
  """Draws ``c_prime`` distinct channel indices out of ``c``, uniformly.

  Usable inside ``jax.jit`` (``c`` and ``c_prime`` must be static Python ints).

  Args:
    key: a ``jax.random`` key.
    c: number of feature channels.
    c_prime: number to keep (``1 <= c_prime <= c``).

  Returns:
    int32 ``(c_prime,)`` distinct indices in ``[0, c)``, in random order.
  """
  c, c_prime = int(c), int(c_prime)
  if c_prime < 1:
    raise ValueError(f'c_prime must be >= 1, got {c_prime}.')
  if c < c_prime:
    raise ValueError(
        f'Cannot draw c_prime={c_prime} distinct channels from c={c}; use a backbone with '
        f'at least {c_prime} channels, lower c_prime, or pad the features explicitly.')
  return jax.random.permutation(key, c)[:c_prime].astype(jnp.int32)


def select_channels(feat: jax.Array, idx: jax.Array) -> jax.Array:
  """Keeps channels ``idx`` of ``feat``.

  Args:
    feat: ``(..., c)`` features.
    idx: int ``(c_prime,)`` indices (pass the same ``idx`` for moving and fixed).

  Returns:
    ``(..., c_prime)`` with ``out[..., j] = feat[..., idx[j]]``.
  """
  return jnp.take(feat, idx, axis=-1)


@dataclasses.dataclass(frozen=True)
class PCABasis:
  """A fitted PCA basis (float64 numpy).

  mean: ``(c,)`` feature mean.
  components: ``(c, c_prime)`` orthonormal columns, by decreasing variance; each column's
    entry of largest magnitude is positive (deterministic sign).
  explained_variance: ``(c_prime,)`` variances along the components (population, /n).
  n_samples: number of feature vectors the fit used.
  """
  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray
  n_samples: int

  def __post_init__(self):
    c = np.shape(self.mean)[0] if np.ndim(self.mean) == 1 else None
    comp_shape = np.shape(self.components)
    if (c is None or len(comp_shape) != 2 or comp_shape[0] != c
        or np.shape(self.explained_variance) != (comp_shape[1],)):
      raise ValueError(
          'PCABasis needs mean (c,), components (c, c_prime), explained_variance '
          f'(c_prime,); got {np.shape(self.mean)}, {comp_shape}, '
          f'{np.shape(self.explained_variance)}.')

  @property
  def c(self) -> int:
    return int(self.components.shape[0])

  @property
  def c_prime(self) -> int:
    return int(self.components.shape[1])

  def to_dict(self) -> dict[str, np.ndarray]:
    """Plain numpy arrays for checkpoints (``from_dict`` inverts it)."""
    return {'mean': np.asarray(self.mean, np.float64),
            'components': np.asarray(self.components, np.float64),
            'explained_variance': np.asarray(self.explained_variance, np.float64),
            'n_samples': np.asarray(self.n_samples, np.int64)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'PCABasis':
    """Rebuilds a basis saved by ``to_dict``."""
    missing = {'mean', 'components', 'explained_variance', 'n_samples'} - set(d)
    if missing:
      raise ValueError(f'PCA basis dict lacks {sorted(missing)}; it must come from '
                       'PCABasis.to_dict().')
    return cls(mean=np.asarray(d['mean'], np.float64),
               components=np.asarray(d['components'], np.float64),
               explained_variance=np.asarray(d['explained_variance'], np.float64),
               n_samples=int(np.asarray(d['n_samples'])))


class PCAAccumulator:
  """Streaming float64 sums (n, Σx, Σxxᵀ) for a centred PCA of ``c``-channel features."""

  def __init__(self, c: int):
    if int(c) < 1:
      raise ValueError(f'c must be >= 1, got {c}.')
    self.c = int(c)
    self.n = 0
    self.sum = np.zeros(self.c, np.float64)
    self.sum_sq = np.zeros((self.c, self.c), np.float64)

  def update(self, x: Any) -> 'PCAAccumulator':
    """Adds feature vectors.

    Args:
      x: ``(..., c)`` array of any real dtype (numpy, jax); leading axes are flattened.

    Returns:
      self.
    """
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] != self.c:
      raise ValueError(f'PCAAccumulator(c={self.c}).update expects (..., {self.c}), got '
                       f'shape {x.shape}.')
    x = x.reshape(-1, self.c)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
      chunk = x[start:start + _CHUNK_ROWS].astype(np.float64)
      if not np.all(np.isfinite(chunk)):
        raise ValueError('PCAAccumulator.update got non-finite features (NaN/inf); check '
                         'the feature store for corrupt shards.')
      self.n += chunk.shape[0]
      self.sum += chunk.sum(axis=0)
      self.sum_sq += chunk.T @ chunk
    return self

  def covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(mean (c,), cov (c, c))``, cov = Σxxᵀ/n - μμᵀ (population), symmetrised."""
    if self.n == 0:
      raise ValueError('PCAAccumulator has no samples; call update() with features first.')
    mean = self.sum / self.n
    cov = self.sum_sq / self.n - np.outer(mean, mean)
    return mean, 0.5 * (cov + cov.T)

  def finalize(self, c_prime: int) -> PCABasis:
    """Top-``c_prime`` principal components (np.linalg.eigh of the float64 covariance)."""
    c_prime = int(c_prime)
    if not 1 <= c_prime <= self.c:
      raise ValueError(f'c_prime must be in [1, c={self.c}], got {c_prime}; pad the '
                       'features explicitly for backbones with fewer channels.')
    if self.n < 2:
      raise ValueError(f'PCA needs at least 2 feature vectors, got {self.n}.')
    mean, cov = self.covariance()
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:c_prime]
    evals, evecs = evals[order], evecs[:, order]
    pivot = np.argmax(np.abs(evecs), axis=0)
    signs = np.sign(evecs[pivot, np.arange(c_prime)])
    evecs = evecs * np.where(signs == 0, 1.0, signs)
    return PCABasis(mean=mean, components=evecs,
                    explained_variance=np.maximum(evals, 0.0), n_samples=self.n)


def pca_project(feat: jax.Array, mean: jax.Array, components: jax.Array) -> jax.Array:
  """Projects features onto a PCA basis, in float32.

  Args:
    feat: ``(..., c)`` features (any float dtype).
    mean: ``(c,)``.
    components: ``(c, c_prime)``.

  Returns:
    ``(..., c_prime)`` float32 ``(feat - mean) @ components`` (full-precision matmul).
  """
  feat = jnp.asarray(feat)
  mean = jnp.asarray(mean, jnp.float32)
  components = jnp.asarray(components, jnp.float32)
  if feat.shape[-1:] != mean.shape or components.ndim != 2 or (
      components.shape[0] != mean.shape[0]):
    raise ValueError(f'pca_project: feat (..., c) {feat.shape}, mean (c,) {mean.shape} and '
                     f'components (c, c_prime) {components.shape} do not agree.')
  centred = feat.astype(jnp.float32) - mean
  return jnp.matmul(centred, components, precision=jax.lax.Precision.HIGHEST)
