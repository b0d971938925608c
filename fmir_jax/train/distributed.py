"""Several JAX processes (one per host) training one model: start-up, roles and data shares.

A TPU pod slice, several GPU hosts or a SLURM allocation run one process per host; they
join through ``jax.distributed.initialize`` and then see every device of every host
(``jax.devices()``), of which each drives its own (``jax.local_devices()``). A global batch
is split over the processes in order: process p reads entries
``[p * B / P, (p + 1) * B / P)`` and ``global_array`` assembles them into one array sharded
over all devices. Files that describe the run (run.json, the PCA basis, logs, TensorBoard,
validation records) are written by process 0 alone; checkpoints are written by Orbax with
every process taking part.

One process (the default) needs none of this: every function here is then a no-op.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmir_jax.core import errors

# Environment of the launchers whose processes JAX finds on its own (cluster detection).
_AUTO_ENV = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(coordinator: str = '', num_processes: int = 0, process_id: int = -1, *,
               heartbeat_timeout_s: int = 100) -> bool:
  """Joins the processes of a multi-host run; True when this is one (more than 1 process).

  coordinator, num_processes, process_id: explicit start-up (``host:port`` of process 0, the
    process count, this process's index), as for ``jax.distributed.initialize``. Without
    them JAX detects SLURM (``srun``) and Cloud TPU pod slices itself; on a single machine
    with none of those nothing happens and the run is one process.
  heartbeat_timeout_s: a process that has not been heard from for this long is taken as
    dead, and the others stop with an error instead of waiting for it forever.

  On CPU the processes exchange gradients over Gloo (TCP). Call this before anything asks
  JAX for its devices.
  """
  explicit = bool(coordinator) or num_processes > 0 or process_id >= 0
  if explicit and not (coordinator and num_processes > 0 and process_id >= 0):
    raise errors.ConfigError('multi-host start-up needs all of --coordinator=HOST:PORT, '
                     '--num_processes=N and --process_id=I (0 <= I < N), or none of them '
                     '(SLURM and TPU pods are detected)')
  if explicit and not 0 <= process_id < num_processes:
    raise errors.ConfigError(f'--process_id={process_id} must lie in [0, --num_processes='
                     f'{num_processes})')
  auto = not explicit and (int(os.environ.get('SLURM_NTASKS', '1')) > 1
                           or any(v in os.environ for v in _AUTO_ENV[1:]))
  if not (explicit and num_processes > 1) and not auto:
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs: dict[str, Any] = {'heartbeat_timeout_seconds': int(heartbeat_timeout_s)}
  if explicit:
    kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  return jax.process_count() > 1


def define_flags(flags) -> None:
  """The multi-host start-up flags of train.py and eval.py (``absl.flags``)."""
  flags.DEFINE_string('coordinator', '', 'Multi-host: HOST:PORT of process 0 (with '
                      '--num_processes and --process_id; SLURM and TPU pods need none).')
  flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes (one per host).')
  flags.DEFINE_integer('process_id', -1, 'Multi-host: this process, 0..num_processes-1.')
  flags.DEFINE_integer('heartbeat_timeout', 100, 'Multi-host: seconds without news of a '
                       'process before the others stop with an error.')


def initialize_from_flags(flag_values) -> bool:
  """``initialize`` with the values of ``define_flags``'s flags."""
  return initialize(flag_values.coordinator, flag_values.num_processes,
                    flag_values.process_id, heartbeat_timeout_s=flag_values.heartbeat_timeout)


def launch_index(flag_values) -> int:
  """This process's index in a multi-host launch without joining it: --process_id, else the
  launcher's (SLURM_PROCID, TPU_WORKER_ID), else 0. For work done by one process alone."""
  if flag_values.process_id >= 0:
    return int(flag_values.process_id)
  for var in ('SLURM_PROCID', 'TPU_WORKER_ID', 'CLOUD_TPU_TASK_ID'):
    if os.environ.get(var, '').isdigit():
      return int(os.environ[var])
  return 0


def is_primary() -> bool:
  """True in the process that writes the run's shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached ``barrier(name)`` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def share(n: int, index: int | None = None, count: int | None = None) -> slice:
  """This process's contiguous part of ``n`` items (a global batch): entries
  ``[index * n / count, (index + 1) * n / count)``; ``n`` must split evenly."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if n % count:
    raise errors.ConfigError(f'a global batch of {n} does not split over {count} processes: set '
                     f'--config.train.batch_size to a multiple of {count}')
  per = n // count
  return slice(index * per, (index + 1) * per)


def global_array(local: Any, mesh: Mesh) -> Any:
  """One array per leaf of ``local`` (this process's rows of a batch), sharded along the
  leading axis of ``mesh``'s 'data' devices (every process passes its own rows, in order)."""
  sharding = NamedSharding(mesh, P('data'))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def local_copy(tree: Any) -> Any:
  """A replicated global array as an array on this process's first device (for code that
  runs on one device, e.g. validation of this process's pairs)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def allgather_rows(rows: np.ndarray) -> np.ndarray:
  """Every process's ``(n_p, k)`` float rows, concatenated in process order (n_p may differ)."""
  rows = np.asarray(rows, np.float64).reshape(len(rows), -1)
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils
  counts = multihost_utils.process_allgather(np.asarray([len(rows)], np.int64)).reshape(-1)
  width = rows.shape[1]
  padded = np.full((int(counts.max()), width), np.nan)
  padded[:len(rows)] = rows
  every = multihost_utils.process_allgather(padded).reshape(len(counts), -1, width)
  return np.concatenate([every[p, :int(c)] for p, c in enumerate(counts)])


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of all processes (data parallelism over the batch axis)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, ('data',))

