"""Many independent runs trained as one program: a leading run axis.

A sweep's runs (seeds, eps_train, PGD vs UTA) are small programs that leave
an accelerator mostly idle; stacked on a leading run axis R they train as
one. Run r keeps everything it has alone: its seed (initial weights, data
order, every key), optimiser state and evaluation key stream, so it ends as
the run trained alone does (up to the order batched kernels sum in).

Which runs share a program (``group``): equal configs but for the seed and
the attack values ``steps.RunAttack`` traces per run (eps_train, the step
size and, for ``steps.selectable_objective`` attacks, PGD's or UTA's
objective on one forward). K and everything else that decides control flow
or shapes is static, so runs of another K get another program (Table 1's
24 Fashion-MNIST runs, K = eps_train / 0.01: 4 programs of 6). MC-dropout
and ensemble UTA need their own forwards: they share a program with runs of
the same attack only.

How the step maps over runs (``RUN_MAPS``): ``vmap`` batches the runs;
``unroll`` writes each run's step into the program one after another. On
XLA:CPU (2 cores, ``benchmark.py --sections=runs``) ``unroll`` matches R
plain steps and ``vmap`` costs ~50% (vmapped weights become grouped
convolutions): ``unroll`` is the CPU default, ``vmap`` the accelerators'
(unmeasured here: no GPU was lent). A program of one run is the unrolled
step of that run.

Evaluation maps over runs too (``map_runs``; AutoAttack of many models,
``auto_attack.evaluate_runs``), where a loop is allowed: ``map``
(``lax.map``, one run's program compiled once) is its CPU default.

Memory: ``runs_that_fit`` sizes a program from ``loop_bytes``: the compiled
step's memory analysis and what the loop holds beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import classifier
from uta_jax import config_json
from uta_jax import configs
from uta_jax import errors
from uta_jax import steps

RUN_MAPS = ('vmap', 'unroll')  # the training step's (loop-free)
EVAL_RUN_MAPS = RUN_MAPS + ('map',)


def default_run_map(backend: str) -> str:
  """``unroll`` on XLA:CPU (measured), ``vmap`` on accelerators."""
  return 'unroll' if backend == 'cpu' else 'vmap'


def program_key(config: configs.Config) -> Hashable:
  """What the runs of one program share: the config with the seed and the
  per-run attack values (``steps.RunAttack``) blanked."""
  attack = config.attack
  blank = dict(eps_train=0.0, step_size=0.0)
  if steps.selectable_objective(attack, classifier.is_ensemble(config)):
    blank['name'] = 'pgd|uta'
  key = dataclasses.replace(
      config, attack=dataclasses.replace(attack, **blank),
      # the 2D toy's data are drawn from the seed: one program per seed
      seed=config.seed if config.dataset == 'toy2d' else 0)
  return config_json.to_json(key)


def group(run_configs: Sequence[configs.Config]) -> List[List[int]]:
  """The indices of ``run_configs`` that share a program, in first-seen
  order (each list in the order given)."""
  programs: Dict[Hashable, List[int]] = {}
  for i, config in enumerate(run_configs):
    programs.setdefault(program_key(config), []).append(i)
  return list(programs.values())


def stack(trees: Sequence[Any]) -> Any:
  """Runs' pytrees (host arrays) stacked on a leading run axis [R, ...]."""
  return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)


def unstack(tree: Any, run: int) -> Any:
  """Run ``run``'s slice of a stacked pytree."""
  return jax.tree_util.tree_map(lambda leaf: leaf[run], tree)


@functools.partial(jax.jit, static_argnums=1)
def unstack_all(tree: Any, num_runs: int) -> List[Any]:
  """Every run's slice of a stacked pytree on a device, as new buffers
  made by one program (a later step that donates ``tree`` leaves them)."""
  return [jax.tree_util.tree_map(lambda leaf: leaf[r], tree)
          for r in range(num_runs)]


def run_attacks(run_configs: Sequence[configs.Config]) -> steps.RunAttack:
  """The runs' ``steps.RunAttack``, stacked [R]."""
  return stack([jax.device_get(steps.RunAttack.of(c.attack))
                for c in run_configs])


def make_train_step(config: configs.Config, model, tx, *,
                    axis_name: Optional[str], run_map: str
                   ) -> Callable[..., Any]:
  """``(states [R, ...], batch [R, B, ...], runs [R]) -> (states, metrics
  [R])``: ``steps.train_step`` of every run of a program (``config``: any of
  its runs; the per-run attack settings come from ``runs``)."""
  if run_map not in RUN_MAPS:
    raise ValueError(f'run_map must be one of {RUN_MAPS}, got {run_map!r}')
  step = steps.make_train_step(config, model, tx, axis_name=axis_name)
  return map_runs(lambda state, batch, run: step(state, batch, run=run),
                  run_map, num_mapped=3)


def default_eval_run_map(backend: str) -> str:
  """How evaluation programs map over runs: ``map`` on XLA:CPU (one run's
  program compiled once, run R times: ``benchmark.py --sections=autoattack``),
  ``vmap`` on accelerators."""
  return 'map' if backend == 'cpu' else 'vmap'


def map_runs(fn: Callable[..., Any], run_map: str, *, num_mapped: int
            ) -> Callable[..., Any]:
  """``fn`` of one run over the leading run axis [R] of its first
  ``num_mapped`` arguments (the others shared by every run); outputs
  stacked [R, ...].

  ``run_map`` (``EVAL_RUN_MAPS``): ``vmap`` batches the runs, ``unroll``
  writes R copies of ``fn`` into the program, ``map`` loops over them
  (``lax.map``: one copy compiled; a loop, so not for the training step,
  which stays loop-free). One run is ``fn`` itself.
  """
  if run_map not in EVAL_RUN_MAPS:
    raise ValueError(f'run_map must be one of {EVAL_RUN_MAPS}, got '
                     f'{run_map!r}')

  def mapped(*args):
    per_run, shared = args[:num_mapped], args[num_mapped:]
    one = lambda *a: fn(*a, *shared)
    num = jax.tree_util.tree_leaves(per_run)[0].shape[0]
    if run_map == 'vmap' and num > 1:
      return jax.vmap(one)(*per_run)
    if run_map == 'map' and num > 1:
      return jax.lax.map(lambda a: one(*a), per_run)
    outs = [one(*unstack(per_run, r)) for r in range(num)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

  return mapped


# ------------------------------------------------------------------ memory


def device_memory_bytes(device: Any) -> int:
  """What one program may hold on ``device``: its allocator's limit on an
  accelerator; on a CPU, the machine's memory shared by its devices."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return total // max(1, len(jax.local_devices(backend=device.platform)))


def compiled_bytes(compiled: Any) -> int:
  """Peak bytes of one device's compiled program: arguments, outputs and
  temporaries (aliased donated buffers counted once)."""
  ma = compiled.memory_analysis()
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes +
             ma.temp_size_in_bytes - ma.alias_size_in_bytes)


MEMORY_HEADROOM = 0.8  # of the device's memory a program may plan for


class ProgramTooLarge(errors.NamesSettings, ValueError):
  """Not even one run fits the device's memory; names the fix."""


def tree_bytes(tree: Any) -> int:
  """Bytes of a pytree's leaves (arrays or ``jax.ShapeDtypeStruct``s)."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def loop_bytes(*, step_bytes: int, state_bytes: int, batch_bytes: int,
               eval_bytes: int) -> int:
  """Peak bytes on the first device of a program of runs as the loop runs
  it. Beside the compiled step (``step_bytes``: the R states, a batch,
  outputs, temporaries) the device holds the prefetched next batch
  (``batch_bytes``: one device's shard) and the last checkpoint's copy of
  the R states with its per-run slices (2 x ``state_bytes``, one replica),
  which the writer thread fetches while later steps run. A mid-training
  evaluation (``eval_bytes``: its compiled programs) runs between steps,
  the states and that copy alive."""
  during_step = step_bytes + batch_bytes
  during_eval = state_bytes + eval_bytes
  return 2 * state_bytes + max(during_step, during_eval)


def _out_of_memory(error: Exception) -> bool:
  """A compile-time or run-time out-of-memory error of XLA."""
  return 'RESOURCE_EXHAUSTED' in str(error) or 'out of memory' in str(
      error).lower()


def runs_that_fit(bytes_of: Callable[[int], int], num_runs: int, *,
                  limit_bytes: int) -> int:
  """The largest R <= ``num_runs`` whose program (``bytes_of(R)``: its
  peak bytes on a device, ``loop_bytes``) fits ``MEMORY_HEADROOM`` of
  ``limit_bytes``, halving from ``num_runs``; a ``bytes_of`` that raises
  XLA's out-of-memory error (the compiler's RESOURCE_EXHAUSTED) does not
  fit either. Raises ``ProgramTooLarge`` when one run does not fit."""
  budget = int(MEMORY_HEADROOM * limit_bytes)
  r = num_runs
  while True:
    try:
      need = bytes_of(r)
    except Exception as e:  # pylint: disable=broad-except
      if not _out_of_memory(e):
        raise
      if r == 1:
        raise ProgramTooLarge(
            'one run does not compile within the device memory '
            f'({str(e).splitlines()[0][:200]}): lower batch_size',
            'batch_size') from e
      r = max(1, r // 2)
      continue
    if need <= budget:
      return r
    if r == 1:
      raise ProgramTooLarge(
          f'one run needs {need / 2**20:.1f} MiB of device memory, more than '
          f'{MEMORY_HEADROOM:.0%} of the {limit_bytes / 2**20:.1f} MiB '
          'available: lower batch_size', 'batch_size')
    r = max(1, r // 2)


def split(items: Sequence[Any], size: int) -> List[List[Any]]:
  """``items`` in consecutive programs of at most ``size``."""
  return [list(items[i:i + size]) for i in range(0, len(items), size)]


def per_run_metrics(metrics: Any, run: int) -> Dict[str, float]:
  """Run ``run``'s scalars of a program's fetched metrics ([R] leaves)."""
  return {k: float(np.asarray(v)[run]) for k, v in metrics.items()}
