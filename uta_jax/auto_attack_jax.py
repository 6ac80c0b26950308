"""AutoAttack's attacks natively in JAX on R models at once (a run axis).

The engine of ``auto_attack.evaluate_runs`` (and of ``evaluate``, R = 1):
per eps, APGD-CE, APGD-T (``uta_jax.apgd``), FAB-T (``uta_jax.fab``) and
Square (``uta_jax.square``), each on the points still robust *for each
run* (per-run masks; a chunk holds each run's own next points, shorter
lists padded), in programs mapped over the runs (``programs.map_runs``)
and pmapped over the local devices, so Square's 5,000 sequential queries
are paid once for every run. FAB-T ignores eps but in its final norm check:
its per-target distances are computed once per (run, point) and serve
every eps. Each run is attacked as it would be alone: the same keys, the
same points (up to the order batched kernels sum in).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import apgd
from uta_jax import data
from uta_jax import evaluation
from uta_jax import fab
from uta_jax import parallel
from uta_jax import programs
from uta_jax import square

APGD_ATTACKS = ('apgd-ce', 'apgd-t')
# The attacks of each version, in AutoAttack's order; version='apgd' is the
# standard version without FAB-T and Square.
ATTACKS = {'apgd': APGD_ATTACKS,
           'standard': APGD_ATTACKS + ('fab-t', 'square')}
SQUARE_WARNING = 0.2  # points Square may take after the gradient attacks
# Chunk sizes per octave (``parallel.per_device_batch``) by platform. One
# attack call costs 100 to 5,000 model evaluations per slot: on a CPU,
# padding 538 points to 1,000 slots (one size per octave) costs more than
# the extra compilations of finer sizes; an accelerator's batch is wide.
SIZES_PER_OCTAVE = {'cpu': 4}


def _linf(x_adv: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1)


def _clean_program(variables, batch, *, model, ensemble):
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  return {'correct': jnp.argmax(logits_fn(batch['image']), -1) ==
                     batch['label']}


def _apgd_program(variables, batch, key, eps, *, model, ensemble, attack):
  """Per example: robust after ``attack`` (checked on the returned point, as
  AutoAttack does) and the L-inf size of its perturbation."""
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  x, y = batch['image'], batch['label']
  run = apgd.apgd_ce if attack == 'apgd-ce' else apgd.apgd_t
  robust, x_adv = run(logits_fn, x, y, eps=eps, key=key,
                      example_ids=batch['id'])
  robust &= jnp.argmax(logits_fn(x_adv), -1) == y
  return {'robust': robust, 'linf': _linf(x_adv, x)}


def _fab_program(variables, batch, *, model, ensemble):
  """Per example: FAB-T's best L-inf distance per target [B, T] in the
  reference's target order, ``fab.NOT_FOUND`` where the target's run found
  no point that is still misclassified when checked again."""
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  x, y = batch['image'], batch['label']
  targets = fab.target_classes(logits_fn(x))  # [T, B]
  distances, points = jax.vmap(
      lambda t: fab.targeted_run(logits_fn, x, y, t))(targets)
  fooled = jax.vmap(lambda p: jnp.argmax(logits_fn(p), -1) != y)(points)
  return {'distances': jnp.where(fooled, distances, fab.NOT_FOUND).T}


def _square_start(variables, batch, key, eps, *, model, ensemble):
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  return square.start_state(logits_fn, batch['image'], batch['label'], key,
                            batch['id'], eps=eps)


def _square_segment(variables, batch, state, key, eps, first, sides, *,
                    model, ensemble):
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  return square.segment_queries(logits_fn, batch['image'], batch['label'],
                                state, key, first, sides, eps=eps)


@functools.lru_cache(maxsize=16)
def _programs(devices: Tuple[Any, ...], model: nn.Module, ensemble: bool,
              run_map: str) -> Dict[str, Callable[..., Any]]:
  """Every attack's program over runs ([R] variables and batches, the rest
  shared) and ``devices``."""
  settings = dict(model=model, ensemble=ensemble)

  def compile_(fn, num_mapped, num_shared, **kwargs):
    over_runs = programs.map_runs(functools.partial(fn, **settings, **kwargs),
                                  run_map, num_mapped=num_mapped)
    return parallel.local_pmap(over_runs, devices, in_axes=(
        (0,) * num_mapped + (None,) * num_shared))

  progs = {'clean': compile_(_clean_program, 2, 0),
           'fab-t': compile_(_fab_program, 2, 0),
           'square-start': compile_(_square_start, 2, 2),
           'square-segment': compile_(_square_segment, 3, 4)}
  for attack in APGD_ATTACKS:
    progs[attack] = compile_(_apgd_program, 2, 2, attack=attack)
  return progs


def _square(progs, replicated, key, eps, stop_requested):
  """Square on one chunk of every run's points (``map_run_examples``'
  function): the start, then segments of queries until every point of
  every run is done or a stop is asked for."""
  def run(batch):
    state = progs['square-start'](replicated, batch, key, eps)
    height, width = batch['image'].shape[3:5]  # [D, R, P, H, W, C]
    sides = jnp.asarray(square.padded_sides(square.NUM_QUERIES, height,
                                            width))
    for first in range(0, int(sides.shape[0]), square.SEGMENT):
      if not np.any(np.asarray(state.margin_min) > 0.0):
        break
      if stop_requested is not None and stop_requested():
        raise parallel.Stopped(f'stopped during Square after {first} '
                               'queries')
      state = progs['square-segment'](replicated, batch, state, key, eps,
                                      jnp.int32(first), sides)
    x_best = np.asarray(state.x_best)
    linf = np.abs(x_best - batch['image']).reshape(
        x_best.shape[:3] + (-1,)).max(-1)
    return {'robust': np.asarray(state.margin_min) > 0.0, 'linf': linf}
  return run


def _fab_at(eps: float, distances: np.ndarray) -> Tuple[np.ndarray,
                                                          np.ndarray]:
  """(robust, linf) of points with FAB-T ``distances`` [n, T] at ``eps``:
  fooled by the first target (the reference's order) within eps."""
  fooled = distances <= eps
  first = np.argmax(fooled, 1)
  hit = fooled.any(1)
  return ~hit, np.where(hit, distances[np.arange(len(first)), first], 0.0)


def evaluate_runs(model: nn.Module, variables: Any, split: data.Split, *,
                  eps: Sequence[float], ensemble: bool, version: str,
                  batch_size: int, seed: int,
                  devices: Optional[Sequence[Any]] = None,
                  run_map: Optional[str] = None,
                  stop_requested: evaluation.StopFn = None,
                  on_eps: Optional[Callable[[float, List[Dict[str, Any]]],
                                            None]] = None,
                  logger: Optional[logging.Logger] = None
                 ) -> List[List[Dict[str, Any]]]:
  """``version``'s attacks on R models (``variables`` stacked [R, ...]) at
  each eps: a list per eps of a report per run (``auto_attack.evaluate``'s
  fields; ``seconds`` is the run's share of the program's time).
  ``on_eps(eps, reports)`` is called after each eps (to store it)."""
  attacks = ATTACKS[version]
  logger = logger or logging.getLogger(__name__)
  devices = tuple(devices or jax.local_devices())
  run_map = run_map or programs.default_eval_run_map(devices[0].platform)
  progs = _programs(devices, model, ensemble, run_map)
  num_runs = int(jax.tree_util.tree_leaves(variables)[0].shape[0])
  replicated = parallel.replicate(variables, devices)  # [D, R, ...]
  n = len(split)
  ids = parallel.host_indices(n)
  run = functools.partial(
      parallel.map_run_examples, fetch=lambda idx: data.get_batch(split, idx),
      num_devices=len(devices), stop_requested=stop_requested,
      sizes_per_octave=SIZES_PER_OCTAVE.get(devices[0].platform, 1))
  logger.info('using %s version including %s (JAX backend, %d run%s, %d '
              'devices x %d hosts)', version, ', '.join(attacks), num_runs,
              '' if num_runs == 1 else 's', len(devices), jax.process_count())
  start = time.time()
  correct = np.stack([o['correct'] for o in run(
      lambda b: progs['clean'](replicated, b), [ids] * num_runs,
      batch_size=batch_size)])  # [R, n on this host]
  clean = [100.0 * float(parallel.gather_examples(c, n).mean())
           for c in correct]
  fab_distances = np.full(correct.shape + (fab.NUM_TARGETS,), np.nan,
                          np.float32)  # [R, n, T]; nan: not run yet
  key = jax.random.key(seed)
  reports = []
  for e in eps:
    eps_start = time.time()
    logger.info('AutoAttack at eps=%g on %d points of %d run%s', e, n,
                num_runs, '' if num_runs == 1 else 's')
    robust, linf = correct.copy(), np.zeros(correct.shape, np.float32)
    per_attack = [{} for _ in range(num_runs)]
    after = [{} for _ in range(num_runs)]  # robust points after each attack
    for a, attack in enumerate(attacks):
      todo = [np.flatnonzero(r) for r in robust]
      if attack == 'fab-t':
        missing = [t[np.isnan(d[t, 0])] for t, d in zip(todo, fab_distances)]
        if any(len(m) for m in missing):
          out = run(lambda b: progs['fab-t'](replicated, b),
                    [ids[m] for m in missing],
                    batch_size=max(1, batch_size // fab.NUM_TARGETS))
          for r, m in enumerate(missing):
            fab_distances[r, m] = out[r]['distances']
        outs = [dict(zip(('robust', 'linf'), _fab_at(e, d[t])))
                for t, d in zip(todo, fab_distances)]
      elif any(len(t) for t in todo):
        attack_key = jax.random.fold_in(key, a)
        if attack == 'square':
          program = _square(progs, replicated, attack_key, jnp.float32(e),
                            stop_requested)
          size = batch_size
        else:
          program = (lambda b, attack=attack, attack_key=attack_key:
                     progs[attack](replicated, b, attack_key, jnp.float32(e)))
          size = batch_size if attack == 'apgd-ce' else max(
              1, batch_size // apgd.NUM_TARGETS)
        outs = run(program, [ids[t] for t in todo], batch_size=size)
      else:
        outs = [{'robust': np.zeros(0, bool), 'linf': np.zeros(0)}
                for _ in todo]
      for r, (t, out) in enumerate(zip(todo, outs)):
        robust[r, t] = out['robust']
        linf[r, t] = np.maximum(linf[r, t], out['linf'])
        after[r][attack] = parallel.gather_examples(robust[r], n)
        per_attack[r][attack] = 100.0 * float(after[r][attack].mean())
      logger.debug('robust accuracy after %s: %s (total time %.1f s)',
                   attack.upper(), ', '.join(
                       f"{p[attack]:.2f}%" for p in per_attack),
                   time.time() - start)
    seconds = time.time() - (start if e == eps[0] else eps_start)
    reports.append([_report(e, clean[r], after[r], linf[r], per_attack[r],
                            seconds / num_runs, num_runs, n, logger)
                    for r in range(num_runs)])
    if on_eps is not None:
      on_eps(e, reports[-1])
  return reports


def square_warning(after: Dict[str, np.ndarray], n: int) -> Optional[float]:
  """The points (%) Square took after the gradient-based attacks when more
  than ``SQUARE_WARNING`` (``checks.check_square_sr``: a sign of gradient
  masking), counted in points; else None. ``after``: robust points [n]
  after each attack."""
  if 'square' not in after:
    return None
  broken = int(after['fab-t'].sum()) - int(after['square'].sum())
  return 100.0 * broken / n if broken > SQUARE_WARNING / 100 * n else None


def _report(eps, clean, after, linf, per_attack, seconds, num_runs, n,
            logger) -> Dict[str, Any]:
  """One run's report at ``eps`` (``auto_attack.evaluate``'s fields, and
  ``robust_points_after`` each attack: bool [N] arrays, not JSON)."""
  taken = square_warning(after, n)
  if taken is not None:
    logger.warning('Square lowered the robust accuracy by %.2f points after '
                   'the gradient-based attacks (eps %g): a sign of gradient '
                   'masking; see flags_doc.md of AutoAttack', taken, eps)
  robust_points = list(after.values())[-1]
  return {
      'model_randomness': 'deterministic (dropout off)',
      'clean_accuracy': clean,
      'robust_accuracy': 100.0 * float(robust_points.mean()),
      'per_attack': per_attack,
      'max_perturbation': float(parallel.gather_examples(linf, n).max()),
      'seconds': seconds,
      'runs_in_program': num_runs,
      'robust_points': robust_points,
      'robust_points_after': after,
  }
