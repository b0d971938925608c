"""Channel regularisation (paper §2.4): random channel draws and PCA projection.

Training draws ``c'`` of the ``c`` feature channels uniformly without replacement per
forward pass (the same indices for moving and fixed). Inference projects onto a PCA basis
fitted once on training-set features, streamed in float64 with numpy.

Four feature normalisations (``NORMS``; ``config.channel_norm`` picks one):

* ``paper``: raw channels drawn at training; centred PCA at inference (paper §2.4 as written).
* ``release``: raw channels drawn; PCA of the UNCENTRED features (the authors' release,
  ``torch.svd_lowrank`` without centring).
* ``standardise``: every channel z-scored with training-set statistics before the draw and
  before a PCA of the z-scored features (the correlation matrix), whose components are
  whitened, so that training and inference inputs both have zero mean and unit variance.
* ``matched``: z-scored channels drawn at training, as ``standardise``; at inference the
  PCA components of the z-scored features are scaled by sqrt(c'/c) and mixed by one fixed
  reflection (``draw_matching_mix``) so that the head sees what a draw shows it: the
  spectrum of a random c'-channel draw and, in the sum of its inputs, the sum of the
  channels (scaled by c'/c) instead of one component per input. The mix is orthogonal, so
  the inputs carry exactly the PCA's information.

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
class Norm:
  """One feature normalisation: how the basis is fitted and what the head is shown.

  fit: 'centred' (covariance), 'uncentred' (second moment) or 'standardised' (correlation).
  whiten: divide each projected component by its standard deviation.
  draw_standardised: z-score channels before the training-time draw.
  match_draw: scale the components by sqrt(c'/c) and mix them by ``draw_matching_mix``.
  """
  fit: str
  whiten: bool
  draw_standardised: bool
  match_draw: bool = False


NORMS = {
    'paper': Norm('centred', whiten=False, draw_standardised=False),
    'release': Norm('uncentred', whiten=False, draw_standardised=False),
    'standardise': Norm('standardised', whiten=True, draw_standardised=True),
    'matched': Norm('standardised', whiten=False, draw_standardised=True, match_draw=True),
}


def norm_of(name: str) -> Norm:
  """The ``NORMS`` entry ``name``, or a one-line error listing the choices."""
  if name not in NORMS:
    raise ValueError(f'unknown channel_norm {name!r}; use one of {sorted(NORMS)}')
  return NORMS[name]


@dataclasses.dataclass(frozen=True)
class PCABasis:
  """A fitted PCA basis (float64 numpy).

  Features are mapped as ``((x - mean) / scale) @ components``.

  mean: ``(c,)`` shift: the feature mean (zeros for an uncentred fit).
  components: ``(c, c_prime)`` orthonormal columns, by decreasing variance; each column's
    entry of largest magnitude is positive (deterministic sign).
  explained_variance: ``(c_prime,)`` variances (second moments when uncentred) along the
    components (population, /n).
  n_samples: number of feature vectors the fit used.
  scale: ``(c,)`` per-channel divisor (the standard deviations for a standardised fit, else
    ones).
  fit: 'centred', 'uncentred' or 'standardised' (``Norm.fit``).
  """
  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray
  n_samples: int
  scale: np.ndarray | None = None
  fit: str = 'centred'

  def __post_init__(self):
    c = np.shape(self.mean)[0] if np.ndim(self.mean) == 1 else None
    comp_shape = np.shape(self.components)
    if (c is None or len(comp_shape) != 2 or comp_shape[0] != c
        or np.shape(self.explained_variance) != (comp_shape[1],)):
      raise ValueError(
          'PCABasis needs mean (c,), components (c, c_prime), explained_variance '
          f'(c_prime,); got {np.shape(self.mean)}, {comp_shape}, '
          f'{np.shape(self.explained_variance)}.')
    if self.scale is None:
      object.__setattr__(self, 'scale', np.ones(c, np.float64))
    elif np.shape(self.scale) != (c,):
      raise ValueError(f'PCABasis scale must be (c,)=({c},), got {np.shape(self.scale)}.')

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
            'n_samples': np.asarray(self.n_samples, np.int64),
            'scale': np.asarray(self.scale, np.float64),
            'fit': np.asarray(self.fit)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'PCABasis':
    """Rebuilds a basis saved by ``to_dict`` (files without scale/fit: a centred fit)."""
    missing = {'mean', 'components', 'explained_variance', 'n_samples'} - set(d)
    if missing:
      raise ValueError(f'PCA basis dict lacks {sorted(missing)}; it must come from '
                       'PCABasis.to_dict().')
    return cls(mean=np.asarray(d['mean'], np.float64),
               components=np.asarray(d['components'], np.float64),
               explained_variance=np.asarray(d['explained_variance'], np.float64),
               n_samples=int(np.asarray(d['n_samples'])),
               scale=np.asarray(d['scale'], np.float64) if 'scale' in d else None,
               fit=str(np.asarray(d['fit'])) if 'fit' in d else 'centred')


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

  def finalize(self, c_prime: int, fit: str = 'centred') -> PCABasis:
    """Top-``c_prime`` principal components (np.linalg.eigh, float64).

    fit: 'centred' (eigenvectors of the covariance), 'uncentred' (of the second moment
      Σxxᵀ/n, as ``torch.svd_lowrank`` of the raw features) or 'standardised' (of the
      correlation matrix; ``scale`` holds the channel standard deviations).
    """
    c_prime = int(c_prime)
    if not 1 <= c_prime <= self.c:
      raise ValueError(f'c_prime must be in [1, c={self.c}], got {c_prime}; pad the '
                       'features explicitly for backbones with fewer channels.')
    if self.n < 2:
      raise ValueError(f'PCA needs at least 2 feature vectors, got {self.n}.')
    mean, cov = self.covariance()
    scale = np.ones(self.c, np.float64)
    if fit == 'uncentred':
      mean, cov = np.zeros(self.c, np.float64), self.sum_sq / self.n
    elif fit == 'standardised':
      scale = np.sqrt(np.maximum(np.diag(cov), 0.0))
      scale = np.where(scale > 1e-12, scale, 1.0)     # constant channels stay as they are
      cov = cov / np.outer(scale, scale)
    elif fit != 'centred':
      raise ValueError(f"fit must be 'centred', 'uncentred' or 'standardised', got {fit!r}.")
    evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
    order = np.argsort(evals)[::-1][:c_prime]
    evals, evecs = evals[order], evecs[:, order]
    pivot = np.argmax(np.abs(evecs), axis=0)
    signs = np.sign(evecs[pivot, np.arange(c_prime)])
    evecs = evecs * np.where(signs == 0, 1.0, signs)
    return PCABasis(mean=mean, components=evecs,
                    explained_variance=np.maximum(evals, 0.0), n_samples=self.n,
                    scale=scale, fit=fit)


def draw_matching_mix(components: np.ndarray) -> np.ndarray:
  """The reflection ``H`` (c' x c', symmetric, orthogonal) of the ``matched`` inference map.

  ``H`` maps the unit vector along ``components.T @ 1`` to ``1 / sqrt(c')``. For the PCA
  scores ``s = components.T @ z`` of a (z-scored) feature vector ``z``, the entries of
  ``H @ s`` sum to ``sqrt(c') * 1.T @ P @ z / |components.T @ 1|`` (P: the projection onto
  the components), which is ``sqrt(c'/c) * 1.T @ z`` when the channel sum lies in their
  span; ``head_inputs``' factor sqrt(c'/c) makes it ``(c'/c) * 1.T @ z``, the mean over
  random draws of the sum of a draw's c' channels. Plain PCA scores put that shared part
  mostly into one input, a draw spreads it over all of them. Identity when the components
  carry none of the channel sum.
  """
  comp = np.asarray(components, np.float64)
  c, c_prime = comp.shape
  a = comp.T @ np.ones(c)
  if np.linalg.norm(a) < 1e-12 * np.sqrt(c):
    return np.eye(c_prime)
  v = a / np.linalg.norm(a) - np.full(c_prime, 1.0 / np.sqrt(c_prime))
  if np.linalg.norm(v) < 1e-12:
    return np.eye(c_prime)
  return np.eye(c_prime) - 2.0 * np.outer(v, v) / (v @ v)


def head_inputs(basis: PCABasis, norm: Norm) -> dict[str, np.ndarray]:
  """The float32 maps from ``c`` features to the head's ``c'`` inputs.

  Returns {'mean', 'components'} for ``pca_project`` (the basis's scale and, for
  ``norm.whiten``, the components' standard deviations folded into the matrix) and
  {'draw_mean', 'draw_scale'} applied before the training-time draw (zeros / ones for raw
  channels). ``norm.match_draw``: the components scaled by sqrt(c'/c) and mixed by
  ``draw_matching_mix``.
  """
  comp = np.asarray(basis.components, np.float64) / basis.scale[:, None]
  if norm.whiten:
    # Components with almost no variance (flat regions, constant channels) are amplified at
    # most 10x relative to the first, so that unseen data cannot blow up their values.
    ev = np.asarray(basis.explained_variance, np.float64)
    comp = comp / np.sqrt(np.maximum(ev, max(1e-2 * ev[0], 1e-12)))[None, :]
  if norm.match_draw:
    comp = comp * np.sqrt(basis.c_prime / basis.c) @ draw_matching_mix(basis.components)
  c = basis.c
  draw_mean = basis.mean if norm.draw_standardised else np.zeros(c)
  draw_scale = basis.scale if norm.draw_standardised else np.ones(c)
  f32 = lambda a: np.asarray(a, np.float32)
  return {'mean': f32(basis.mean), 'components': f32(comp), 'draw_mean': f32(draw_mean),
          'draw_scale': f32(draw_scale)}


def selection_inputs(maps: dict[str, Any], idx: Any) -> dict[str, np.ndarray]:
  """``head_inputs``-style maps whose projection equals the training-time draw ``idx``.

  ``pca_project(x, out['mean'], out['components']) == ((x - draw_mean) / draw_scale)[idx]``:
  evaluating with these shows the head the inputs it was trained on.
  """
  idx = np.asarray(idx)
  c = int(np.shape(maps['draw_mean'])[0])
  onehot = np.zeros((c, idx.shape[0]), np.float64)
  onehot[idx, np.arange(idx.shape[0])] = 1.0
  return dict(maps, mean=np.asarray(maps['draw_mean'], np.float32),
              components=np.asarray(onehot / np.asarray(maps['draw_scale'],
                                                        np.float64)[:, None], np.float32))


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


def regularise_channels(feat_m, feat_f, *, key, c_prime: int, random_selection: bool,
                        pca: dict | None):
  """c -> c' on the patch grid, identically for moving and fixed.

  random_selection: draw c' of c channels from ``key`` (training in UN/WS modes), after
  ``(x - pca['draw_mean']) / pca['draw_scale']`` when ``pca`` is given; otherwise project on
  the PCA basis ``pca`` ({'mean': (c,), 'components': (c, c')}, ``inference.pca_to_device``).
  When c == c' and no PCA is given, the features pass unchanged.
  """
  c = feat_m.shape[-1]
  feat_m = feat_m.astype(jnp.float32)
  feat_f = feat_f.astype(jnp.float32)
  if random_selection:
    if pca is not None and 'draw_mean' in pca:
      feat_m = (feat_m - pca['draw_mean']) / pca['draw_scale']
      feat_f = (feat_f - pca['draw_mean']) / pca['draw_scale']
    idx = draw_channels(key, c, c_prime)
    return (select_channels(feat_m, idx),
            select_channels(feat_f, idx))
  if pca is None:
    if c == c_prime:
      return feat_m, feat_f
    raise ValueError(f'a PCA basis is needed to reduce {c} channels to {c_prime}')
  return (pca_project(feat_m, pca['mean'], pca['components']),
          pca_project(feat_f, pca['mean'], pca['components']))

