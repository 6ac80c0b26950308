"""Evaluation: JAX-native clean / PGD-with-restarts / UTA / FGSM accuracy.

As the paper tests (§5): PGD-20 with step 0.01 and 10 random restarts; a test
point counts as robust only if it is classified correctly clean and after
every restart. A UTA attack of the same budget gives the accuracy on
uncertainty-maximising points, and the mean predictive entropy is reported on
clean and attacked points.

Everything is per example and sharded: each host takes its slice of the test
points, ``parallel.map_examples`` runs a pmapped program over the host's
devices in padded chunks of one shape (eps is a traced argument, so one
compilation serves every eps and every later evaluation of a run), and the
per-point results are gathered across hosts. Random starts come from
``fold_in(key, example index)``, so results do not depend on the number of
devices or hosts.

AutoAttack is ``uta_jax.auto_attack``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import attacks
from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import parallel
from uta_jax import uncertainty


# Attacks of ``evaluate``: PGD with restarts, UTA, and one-step FGSM (whose
# accuracy rising above PGD's is the sign of catastrophic overfitting).
EVAL_ATTACKS = ('pgd', 'uta', 'fgsm')

# The named key stream of a run's evaluations (``steps.stream_key``): during
# training, at its end, and of a stored run (``runs.evaluate_workdir``).
KEY_STREAM = 'evaluation'

Devices = Optional[Sequence[Any]]
StopFn = Optional[Callable[[], bool]]


def _entropy(logits: jax.Array) -> jax.Array:
  return uncertainty.entropy_from_log_probs(jax.nn.log_softmax(logits))


def logits_fns(model, variables, ensemble):
  logits_fn = functools.partial(classifier.predict_logits, model, variables,
                                ensemble=ensemble)
  sample_fn = functools.partial(classifier.member_logits, model, variables,
                                ensemble=ensemble)
  return logits_fn, sample_fn


# K steps of at least REACH * eps / K cross the eps-ball (Madry et al.'s
# 2.5 eps / K), so an attack can reach the eps it is reported at.
REACH = 2.5


def step_size(eps, eval_config: configs.EvalConfig, num_steps: int):
  """The step of a ``num_steps``-step evaluation attack at ``eps``: the
  configured one (preset None: eps / 4), raised to ``REACH * eps /
  num_steps`` where ``num_steps`` of it could not leave a smaller ball (UTA
  starts at the clean point: 20 steps of 0.01 never pass 0.2). ``eps`` may
  be traced (the programs take it as an argument)."""
  configured = (eps / 4 if eval_config.pgd_step_size is None else
                eval_config.pgd_step_size)
  return jnp.maximum(configured, REACH * eps / num_steps)


def example_runner(split: data.Split, devices: Tuple[Any, ...],
                    stop_requested: StopFn):
  """``run(fn, indices, batch_size=...)``: ``parallel.map_examples`` over
  ``devices`` on examples of ``split``."""
  return functools.partial(
      parallel.map_examples, fetch=lambda idx: data.get_batch(split, idx),
      num_devices=len(devices), stop_requested=stop_requested)


def _deterministic_attacks(variables, batch, eps, *, model, ensemble,
                           eval_config, bounds) -> Dict[str, jax.Array]:
  """Per-example clean, UTA and FGSM correctness and entropies [B]."""
  logits_fn, sample_fn = logits_fns(model, variables, ensemble)
  x, y = batch['image'], batch['label']
  clean_logits = logits_fn(x)
  clean_correct = jnp.argmax(clean_logits, -1) == y
  x_uta = attacks.uta(sample_fn, x, eps=eps, num_steps=eval_config.uta_steps,
                      step_size=step_size(eps, eval_config,
                                          eval_config.uta_steps),
                      bounds=bounds)
  uta_logits = logits_fn(x_uta)
  fgsm_logits = logits_fn(attacks.fgsm(logits_fn, x, y, eps=eps,
                                       bounds=bounds))
  return {
      'clean_correct': clean_correct,
      'clean_entropy': _entropy(clean_logits),
      'uta_correct': clean_correct & (jnp.argmax(uta_logits, -1) == y),
      'uta_entropy': _entropy(uta_logits),
      'fgsm_correct': clean_correct & (jnp.argmax(fgsm_logits, -1) == y),
      'fgsm_entropy': _entropy(fgsm_logits),
  }


def _pgd_restart(variables, batch, key, eps, restart, *, model, ensemble,
                 eval_config, bounds) -> Dict[str, jax.Array]:
  """One PGD restart from a random start per example: correct, entropy [B].

  Example i starts from ``fold_in(fold_in(key, id_i), restart)``.
  """
  logits_fn, _ = logits_fns(model, variables, ensemble)
  x, y = batch['image'], batch['label']
  keys = jax.vmap(jax.random.fold_in, (0, None))(
      attacks.example_keys(key, batch['id']), restart)
  x_adv = attacks.pgd(logits_fn, x, y, eps=eps,
                      num_steps=eval_config.pgd_steps,
                      step_size=step_size(eps, eval_config,
                                          eval_config.pgd_steps),
                      bounds=bounds,
                      key=keys, random_start=True)
  logits = logits_fn(x_adv)
  return {'correct': jnp.argmax(logits, -1) == y, 'entropy': _entropy(logits)}


@functools.lru_cache(maxsize=16)
def _eval_programs(devices: Tuple[Any, ...], model: nn.Module, ensemble: bool,
                   eval_config: configs.EvalConfig,
                   bounds: Optional[Tuple[float, float]]):
  """The two pmapped evaluation programs of a model, built once per run."""
  settings = dict(model=model, ensemble=ensemble, eval_config=eval_config,
                  bounds=bounds)
  return (
      parallel.local_pmap(
          functools.partial(_deterministic_attacks, **settings), devices,
          in_axes=(0, 0, None)),
      parallel.local_pmap(functools.partial(_pgd_restart, **settings),
                          devices, in_axes=(0, 0, None, None, None)))


def compiled_programs(model: nn.Module, variables: Any, split: data.Split,
                      *, config: configs.Config) -> Tuple[Any, Any]:
  """``evaluate``'s two programs on the local devices for ``split``,
  compiled from shapes (nothing placed on a device): their memory analysis
  sizes a program of runs, whose states stay alive while a run is
  evaluated (``training``), and ``evaluate(..., compiled=...)`` runs them
  without compiling again."""
  ec = config.eval
  devices = tuple(jax.local_devices())
  fixed, pgd = _eval_programs(devices, model, classifier.is_ensemble(config),
                              ec, classifier.input_bounds(config))
  per_device = parallel.per_device_batch(len(split), len(devices),
                                         ec.batch_size)
  batch = data.get_batch(split, np.zeros(per_device * len(devices), np.int64))
  batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((len(devices), per_device) + x.shape[1:],
                                     x.dtype), batch)
  replicated = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((len(devices),) + np.shape(x),
                                     x.dtype), variables)
  eps = jax.ShapeDtypeStruct((), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  restart = jax.ShapeDtypeStruct((), jnp.int32)
  return (fixed.lower(replicated, batch, eps).compile(),
          pgd.lower(replicated, batch, key, eps, restart).compile())


def evaluate(model: nn.Module, variables: Any, split: data.Split, *,
             config: configs.Config, key: jax.Array, devices: Devices = None,
             stop_requested: StopFn = None,
             compiled: Optional[Tuple[Any, Any]] = None) -> Dict[str, Any]:
  """Accuracies (%) and mean entropies on ``split`` for every eval eps.

  The points are split over hosts and over ``devices`` (default: every local
  device); every random draw is keyed by the example's index, so the result
  does not depend on the device count. PGD restarts run only on the points
  that survived the earlier ones; the PGD entropy is that of the first
  restart (all points). Raises ``parallel.Stopped`` between batches once
  ``stop_requested()`` is true. ``compiled``: ``compiled_programs`` of this
  model, config and split on the local devices, run instead of compiling.

  Returns ``{'num_examples', 'clean_accuracy', 'clean_entropy',
  'robust_accuracy': {attack: {eps: %}}, 'attacked_entropy': {attack: {eps:
  nats}}}`` for each attack of ``EVAL_ATTACKS``, with eps keys as strings.
  """
  ec = config.eval
  devices = tuple(devices or jax.local_devices())
  fixed, pgd = _eval_programs(devices, model, classifier.is_ensemble(config),
                              ec, classifier.input_bounds(config))
  replicated = parallel.replicate(variables, devices)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # one argument type: a typed key
  n = len(split)
  ids = parallel.host_indices(n)
  if compiled is not None:  # for chunks of every point: later PGD restarts
    # run on fewer points, in other shapes
    full = parallel.per_device_batch(len(ids), len(devices), ec.batch_size)
    fixed, pgd = (_precompiled(c, fn, full)
                  for c, fn in zip(compiled, (fixed, pgd)))
  run = functools.partial(example_runner(split, devices, stop_requested),
                          batch_size=ec.batch_size)
  gather = lambda v: parallel.gather_examples(v, n)
  results = {'num_examples': n,
             'robust_accuracy': {a: {} for a in EVAL_ATTACKS},
             'attacked_entropy': {a: {} for a in EVAL_ATTACKS}}
  for eps in ec.eps:
    e = jnp.float32(eps)
    out = {k: gather(v) for k, v in run(
        lambda b: fixed(replicated, b, e), ids).items()}
    robust = out['clean_correct'][ids]  # this host's points
    entropy = np.zeros(len(ids), np.float32)
    for r in range(ec.pgd_restarts):
      todo = ids if r == 0 else ids[robust]
      if not len(todo):
        break
      restart = run(lambda b: pgd(replicated, b, key, e, np.int32(r)), todo)
      if r == 0:
        robust &= restart['correct']
        entropy = restart['entropy']
      else:
        robust[robust] = restart['correct']
    out['pgd_correct'] = gather(robust)
    out['pgd_entropy'] = gather(entropy)
    results.setdefault('clean_accuracy',
                       100.0 * float(out['clean_correct'].mean()))
    results.setdefault('clean_entropy', float(out['clean_entropy'].mean()))
    for attack in EVAL_ATTACKS:
      results['robust_accuracy'][attack][str(eps)] = (
          100.0 * float(out[f'{attack}_correct'].mean()))
      results['attacked_entropy'][attack][str(eps)] = float(
          out[f'{attack}_entropy'].mean())
  return results


def _precompiled(compiled: Any, fn: Callable[..., Any],
                 per_device: int) -> Callable[..., Any]:
  """``compiled`` for batches of ``per_device`` points a device, else
  ``fn`` (which compiles for the other shapes)."""
  def call(variables, batch, *args):
    use = compiled if batch['image'].shape[1] == per_device else fn
    return use(variables, batch, *args)
  return call


def tradeoff(results: Dict[str, Any], attack: str = 'pgd') -> Dict[str, float]:
  """The paper's Table-1 score per eps: mean of clean and robust accuracy."""
  clean = results['clean_accuracy']
  return {eps: (clean + robust) / 2
          for eps, robust in results['robust_accuracy'][attack].items()}


def collapse_step(steps: Sequence[int], accuracies: Sequence[float], *,
                  drop: float = 0.25, floor: float = 10.0) -> Optional[int]:
  """First step of catastrophic overfitting in a robust-accuracy curve.

  The first evaluation at which the accuracy falls below ``drop`` times its
  best value so far and stays below it for the rest of the curve; None if it
  never does or the best value never exceeded ``floor`` (%).
  """
  best = -np.inf
  for i, (step, acc) in enumerate(zip(steps, accuracies)):
    best = max(best, acc)
    if best > floor and all(a < drop * best for a in accuracies[i:]):
      return step
  return None
