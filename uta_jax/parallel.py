"""Data parallelism: the only module that knows about pmap.

A run's global batch is split over hosts (``data.host_batch_indices``) and
each host's slice over its local devices (``shard``). ``pmap_train_step``
pmaps a pure step over the named axis ``AXIS``; the step averages with
``lax.pmean(..., AXIS)``, which spans every device of every host once
``initialize_distributed`` has connected the processes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.jax_utils
import jax
import numpy as np

AXIS = 'batch'


class ParallelError(ValueError):
  """The batch cannot be split over the devices; the message names the fix."""


def initialize_distributed(*, coordinator_address: Optional[str],
                           num_processes: int, process_id: int) -> None:
  """Connects this process to the others of a multi-host run.

  On one machine nothing is needed (``num_processes == 1``). On CPU the
  collectives go through gloo.
  """
  if num_processes <= 1:
    return
  if not coordinator_address:
    raise ParallelError('a multi-process run needs --coordinator_address '
                        'host:port of process 0')
  # Only the CPU client reads this; it must be set before backends start.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)


def check_global_batch(global_batch: int) -> None:
  """The global batch must split evenly over every device of every host."""
  devices = jax.device_count()
  if global_batch % devices:
    raise ParallelError(
        f'batch size {global_batch} does not divide over {devices} devices: '
        f'use a multiple of {devices} for --batch_size')


def shard(host_batch: Any) -> Any:
  """[B, ...] -> [local_devices, B / local_devices, ...] for every leaf."""
  n = jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ParallelError(f'host batch of {x.shape[0]} does not divide over '
                          f'{n} local devices')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree_util.tree_map(split, host_batch)


def replicate(tree: Any) -> Any:
  """One copy of ``tree`` on every local device (leading device axis)."""
  return flax.jax_utils.replicate(tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy, fetched to host NumPy arrays."""
  return jax.device_get(flax.jax_utils.unreplicate(tree))


def pmap_train_step(step_fn: Callable[..., Any]) -> Callable[..., Any]:
  """pmaps ``step_fn(state, batch)`` over ``AXIS``; the state is donated."""
  return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
