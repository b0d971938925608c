"""The feature-store format: write, read (memory-mapped), validate, merge.

numpy + json only (the shard files are safetensors, written and read here directly so that the
bytes are deterministic and reads are zero-copy ``np.memmap`` views). No jax, no torch.

Layout of a store directory ``OUT``::

  OUT/index.json                                  manifest of the complete store
  OUT/shard-WWWWW-of-NNNNN-SSSSS.safetensors      W = worker index, N = workers, S = sequence
  OUT/index.worker-WWWWW-of-NNNNN.json            per-worker partial manifest (resume state)
  OUT/timings.json                                seconds of feature extraction per volume
  OUT/timings.worker-WWWWW-of-NNNNN.json          per-worker timings

Tensors in a shard, per volume key: ``<key>/features`` (D, h, w, c) on the patch grid (float16
by default), ``<key>/image`` (H, W, D) float32 in [0, 1], ``<key>/labels`` (H, W, D) uint8
(only when the volume has labels). The safetensors ``__metadata__`` holds ``format_version``
and ``keys`` (a JSON list of the volume keys in the shard).

Geometry contract: for in-plane array axis a in {0, 1}, voxel index i maps to the continuous
patch-grid coordinate ``offset[a] + scale[a] * i`` (patch centres at integer coordinates);
``fmir_jax.core.patches`` computes it and turns it into linear-interpolation weights.

Manifest (``index.json``): the header fields at the top level (backbone, layer, input_size,
resize, normalisation, feature_dtype, channels, patch_size, dataset, preprocessing, ...),
plus ``format_version``, ``num_workers``, ``volumes`` (sorted by key), ``pairs`` (per split,
lists of [moving_key, fixed_key]) and ``shards`` (file, keys, bytes, sha256). It is written
with sorted keys and canonical floats, so the same inputs give a byte-identical file.

Integrity: ``FeatureStore`` checks every shard"s size and safetensors header when it opens, and
its sha256 against the manifest the first time one of its arrays is read (once per process:
verified shards are remembered by absolute path, inode, size, mtime and digest). Opt out with
``FeatureStore(path, verify=False)`` or the environment variable ``FMIR_SKIP_SHARD_VERIFY=1``
(e.g. for a store on slow network storage you trust); ``FeatureStore.validate()`` hashes every
shard at once. A corrupt, truncated or missing shard is repaired in place by re-running the
extraction command that wrote the store: ``StoreWriter`` re-checks its shards on resume, drops
the bad ones (``StoreWriter.repairs``) and rewrites them under the same names.

Modules, by role (this package re-exports their public names; ``from fmir_jax.core import store``
and ``store.FeatureStore``, ``store.StoreWriter``, ``store.merge`` ... is the way to use them):

* ``format``: StoreError, format constants, file names, header fields and compatibility
  (``check_compatible``), canonical JSON (``dumps``), atomic writes, the safetensors shard codec.
* ``integrity``: shard size/header/sha256 checks (``shard_problem``), the repair hint, the
  ``FMIR_SKIP_SHARD_VERIFY`` opt-out.
* ``writer``: ``StoreWriter`` (one worker, resumable, atomic), ``ShardRepair``, ``assign_keys``.
* ``merging``: worker partial manifests -> index.json (``merge``, ``merge_when_complete``).
* ``reader``: ``FeatureStore`` (memory-mapped, verified reads), ``VolumeInfo``.
"""
# The public names of the store, one import each; callers use them as store.<name>.
from fmir_jax.core.store.format import (
    COMPAT_FIELDS, FORMAT_VERSION, INDEX_NAME, REQUIRED_HEADER_FIELDS, TIMINGS_NAME, StoreError,
    backbone_name, check_compatible, dataset_name, dumps, get_field, header_diff, partial_name,
    shard_name, timings_partial_name)
from fmir_jax.core.store.integrity import REPAIR_HINT, SKIP_VERIFY_ENV, shard_problem
from fmir_jax.core.store.merging import merge, merge_when_complete
from fmir_jax.core.store.reader import FeatureStore, VolumeInfo
from fmir_jax.core.store.writer import ShardRepair, StoreWriter, assign_keys

__all__ = [
    "COMPAT_FIELDS",
    "FORMAT_VERSION",
    "FeatureStore",
    "INDEX_NAME",
    "REPAIR_HINT",
    "REQUIRED_HEADER_FIELDS",
    "SKIP_VERIFY_ENV",
    "ShardRepair",
    "StoreError",
    "StoreWriter",
    "TIMINGS_NAME",
    "VolumeInfo",
    "assign_keys",
    "backbone_name",
    "check_compatible",
    "dataset_name",
    "dumps",
    "get_field",
    "header_diff",
    "merge",
    "merge_when_complete",
    "partial_name",
    "shard_name",
    "shard_problem",
    "timings_partial_name",
]
