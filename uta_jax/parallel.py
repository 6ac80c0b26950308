"""Data parallelism: the only module that knows about pmap.

A run's global batch is split over hosts (``data.host_batch_indices``) and
each host's slice over its local devices (``shard``). ``pmap_train_step``
pmaps a pure step over the named axis ``AXIS``; the step averages with
``lax.pmean(..., AXIS)``, which spans every device of every host once
``initialize_distributed`` has connected the processes.

Evaluation is per example: each host takes its slice of the test points
(``host_indices``), ``map_examples`` runs a ``local_pmap``-ped program over
its devices in padded chunks, and ``gather_examples`` joins the hosts'
per-example results.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import multihost as ocp_multihost

from uta_jax import errors

AXIS = 'batch'


def preemption_reached(step: int) -> bool:
  """In a multi-host run: True on every host at the same ``step`` once any
  host got SIGTERM (orbax's synchronised check over JAX's coordination
  service, which owns SIGTERM there), so all hosts checkpoint the same step
  and none waits in a collective for a host that left. One host: False (its
  own signal handler stops it)."""
  if jax.process_count() == 1:
    return False
  return ocp_multihost.reached_preemption(step)


class ParallelError(errors.NamesSettings, ValueError):
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
        f'set batch_size to a multiple of {devices}' + (
            ' (or the CPU device count: XLA_FLAGS='
            '--xla_force_host_platform_device_count=N)'
            if jax.default_backend() == 'cpu' else ''), 'batch_size')


def shard(host_batch: Any, *, axis: int = 0) -> Any:
  """[B, ...] -> [local_devices, B / local_devices, ...] for every leaf;
  with ``axis=1`` (a program of runs) [R, B, ...] -> [local_devices, R,
  B / local_devices, ...]."""
  n = jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    shape = _sharded_shape(x.shape, axis, n)  # [n, ..., B / n, ...]
    return np.moveaxis(x.reshape(shape[1:axis + 1] + (n,) +
                                 shape[axis + 1:]), axis, 0)

  return jax.tree_util.tree_map(split, host_batch)


def _sharded_shape(shape: Sequence[int], axis: int, n: int) -> tuple:
  """``shape`` with ``shape[axis]`` split over ``n`` devices, the device
  axis first; a ``ParallelError`` when it does not divide."""
  shape = tuple(shape)
  if shape[axis] % n:
    raise ParallelError(f'host batch of {shape[axis]} does not divide '
                        f'over {n} local devices')
  return (n,) + shape[:axis] + (shape[axis] // n,) + shape[axis + 1:]


def _device_axis_sharding(devices: Sequence[Any]) -> jax.sharding.Sharding:
  """How ``pmap`` over ``AXIS`` shards its inputs and outputs: the leading
  axis over ``devices``."""
  return jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(list(devices)), (AXIS,)),
      jax.sharding.PartitionSpec(AXIS))


def device_batch(host_batch: Any, *, axis: int = 0) -> Any:
  """``shard``ed (along ``axis``) and sent to the local devices now
  (asynchronously), so the transfer overlaps the step the devices are
  computing."""
  sharded = shard(host_batch, axis=axis)
  if jax.process_count() > 1:
    return sharded  # pmap places each host's shards itself
  return jax.device_put(sharded, _device_axis_sharding(jax.local_devices()))


_copy_first = jax.jit(lambda tree: jax.tree_util.tree_map(lambda a: a[0],
                                                          tree))


def first_replica(tree: Any) -> Any:
  """A new copy, on the first local device, of the first replica of a
  replicated ``tree``: enqueued now, so a later step that donates ``tree``'s
  buffers does not change it. Fetch it with ``jax.device_get``."""
  shards = jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data,
                                  tree)
  return _copy_first(shards)


def replicate(tree: Any, devices: Optional[Sequence[Any]] = None) -> Any:
  """One copy of ``tree`` on every device of ``devices`` (default: every
  local device), stacked on a leading device axis.

  Sharded as a ``pmap`` over ``AXIS`` shards its outputs: the train step's
  second call (on its first call's output) then reuses the compiled step
  (flax's ``replicate`` shards over another mesh axis name, and JAX compiled
  the step twice). Across hosts, flax's per-process replication.
  """
  if jax.process_count() > 1:
    return flax.jax_utils.replicate(
        tree, devices=list(devices) if devices else None)
  devices = list(devices or jax.local_devices())
  sharding = _device_axis_sharding(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(_stacked(x, len(devices)), sharding), tree)


def _stacked(x: Any, num: int) -> Any:
  """``num`` copies of ``x`` on a new leading axis, broadcast on the host
  (a broadcast on a device compiles one program per leaf shape: 1.4 s of a
  quick run's start on a CPU); PRNG key arrays on their device."""
  if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
    return jnp.broadcast_to(x, (num,) + jnp.shape(x))
  return np.broadcast_to(np.asarray(x), (num,) + np.shape(x))


def replicated_shapes(tree: Any) -> Any:
  """The ``jax.ShapeDtypeStruct`` of each leaf of ``replicate(tree)`` on the
  local devices, sharded alike, without placing anything on a device."""
  devices = jax.local_devices()
  sharding = _device_axis_sharding(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((len(devices),) + jnp.shape(x),
                                     x.dtype, sharding=sharding), tree)


def device_batch_shapes(host_batch: Any, *, axis: int = 0) -> Any:
  """The ``jax.ShapeDtypeStruct`` of each leaf of ``device_batch``, without
  placing anything on a device (shapes only: ``host_batch`` may hold them)."""
  n = jax.local_device_count()
  sharding = _device_axis_sharding(jax.local_devices())
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(_sharded_shape(jnp.shape(x), axis, n),
                                     x.dtype, sharding=sharding), host_batch)


def unreplicate(tree: Any) -> Any:
  """The first device's copy, fetched to host NumPy arrays."""
  return jax.device_get(flax.jax_utils.unreplicate(tree))


def pmap_train_step(step_fn: Callable[..., Any]) -> Callable[..., Any]:
  """pmaps ``step_fn(state, batch)`` over ``AXIS``; the state is donated."""
  return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))


# ------------------------------------------------ evaluation over devices


class Stopped(Exception):
  """``stop_requested()`` turned true during a long evaluation."""


def host_indices(num_examples: int) -> np.ndarray:
  """This process's contiguous slice of ``range(num_examples)``."""
  return np.array_split(np.arange(num_examples),
                        jax.process_count())[jax.process_index()]


def gather_examples(values: np.ndarray, num_examples: int) -> np.ndarray:
  """Per-example ``values`` of this host's slice -> all ``num_examples``.

  The inverse of ``host_indices`` across processes (an all-gather); a no-op
  in a single-process run.
  """
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = [len(s) for s in np.array_split(np.arange(num_examples),
                                          jax.process_count())]
  padded = np.zeros((max(sizes),) + values.shape[1:], values.dtype)
  padded[:len(values)] = values
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([everyone[p, :size] for p, size in enumerate(sizes)])


def local_pmap(fn: Callable[..., Any], devices: Sequence[Any], *,
               in_axes: Any = 0,
               static_broadcasted_argnums: Tuple[int, ...] = ()
              ) -> Callable[..., Any]:
  """pmaps ``fn`` over ``devices`` of this host only: no cross-host
  collective, so hosts may run different numbers of calls."""
  return jax.pmap(fn, axis_name=AXIS, devices=list(devices), in_axes=in_axes,
                  static_broadcasted_argnums=static_broadcasted_argnums)


def per_device_batch(num_examples: int, num_devices: int,
                     batch_size: int, sizes_per_octave: int = 1) -> int:
  """Examples per device and call: at most ``batch_size``, else rounded up
  to the next of ``sizes_per_octave`` sizes between 8 times consecutive
  powers of two (1: 8, 16, 32, ...; 4: 8, 10, 12, 14, 16, 20, ...), so
  that the shrinking point sets of later PGD restarts (and of later
  evaluations) meet a handful of compiled shapes."""
  need = -(-num_examples // num_devices)
  octave = 8
  while 2 * octave < need:
    octave *= 2
  step = max(1, octave // sizes_per_octave)
  bucket = octave if need <= octave else -(-need // step) * step
  return max(1, min(batch_size, bucket))


def map_examples(fn: Callable[..., Dict[str, Any]], indices: np.ndarray,
                 fetch: Callable[[np.ndarray], Dict[str, np.ndarray]], *,
                 num_devices: int, batch_size: int,
                 stop_requested: Optional[Callable[[], bool]] = None
                ) -> Dict[str, np.ndarray]:
  """Runs a pmapped per-example ``fn`` over ``indices`` in padded chunks.

  ``fetch(idx)`` returns the host arrays of examples ``idx`` ([n, ...]
  each); they reach ``fn`` as ``[num_devices, per_device, ...]`` together
  with ``'id'`` (the example indices). ``fn`` returns per-example arrays of
  the same leading shape. Returns them for ``indices``, in order. Raises
  ``Stopped`` between chunks once ``stop_requested()`` is true.
  """
  def with_run_axis(batch):  # [D, 1, P, ...] <-> fn's [D, P, ...]
    out = fn({k: v[:, 0] for k, v in batch.items()})
    return {k: np.asarray(v)[:, None] for k, v in jax.device_get(out).items()}
  return map_run_examples(with_run_axis, [indices], fetch,
                          num_devices=num_devices, batch_size=batch_size,
                          stop_requested=stop_requested)[0]


def map_run_examples(fn: Callable[..., Dict[str, Any]],
                     indices: Sequence[np.ndarray],
                     fetch: Callable[[np.ndarray], Dict[str, np.ndarray]], *,
                     num_devices: int, batch_size: int,
                     stop_requested: Optional[Callable[[], bool]] = None,
                     sizes_per_octave: int = 1
                    ) -> List[Dict[str, np.ndarray]]:
  """``map_examples`` for R runs at once, run r on its own ``indices[r]``
  (chunks of ``per_device_batch(..., sizes_per_octave)`` per device).

  Chunk c holds each run's c-th slice of its indices (shorter lists padded
  with their last index, or example 0), reaching ``fn`` as ``[num_devices,
  R, per_device, ...]``; ``fn`` returns arrays of that leading shape.
  Returns per run the outputs for its indices, in order.
  """
  num_runs, longest = len(indices), max((len(i) for i in indices), default=0)
  per_device = per_device_batch(longest, num_devices, batch_size,
                                sizes_per_octave)
  chunk = per_device * num_devices
  outputs = []
  for start in range(0, longest, chunk):
    if stop_requested is not None and stop_requested():
      raise Stopped(f'stopped after {start} of {longest} examples')
    idx = np.stack([_padded(i[start:start + chunk], chunk) for i in indices])
    arrays = dict(fetch(idx.reshape(-1)), id=idx.reshape(-1).astype(np.int32))
    # [R * chunk, ...] -> [D, R, P, ...]: each device holds every run.
    sharded = {k: np.swapaxes(np.asarray(v).reshape(
        (num_runs, num_devices, per_device) + np.shape(v)[1:]), 0, 1)
               for k, v in arrays.items()}
    out = jax.device_get(fn(sharded))
    outputs.append({k: np.swapaxes(np.asarray(v), 0, 1).reshape(
        (num_runs, chunk) + np.shape(v)[3:]) for k, v in out.items()})
  if not outputs:
    return [{} for _ in indices]
  return [{k: np.concatenate([o[k][r] for o in outputs])[:len(i)]
           for k in outputs[0]} for r, i in enumerate(indices)]


def _padded(idx: np.ndarray, size: int) -> np.ndarray:
  """``idx`` padded to ``size`` with its last index (example 0 if empty):
  one shape for every chunk."""
  if not len(idx):
    return np.zeros(size, np.int64)
  return np.pad(idx, (0, size - len(idx)), mode='edge')
