"""Evaluation: JAX-native clean / PGD-with-restarts / UTA, and AutoAttack.

As the paper tests (§5): PGD-20 with step 0.01 and 10 random restarts; a test
point counts as robust only if it is classified correctly clean and after
every restart. A UTA attack of the same budget gives the accuracy on
uncertainty-maximising points, and the mean predictive entropy is reported on
clean and attacked points. Batches are padded to one size and eps is a traced
argument, so the evaluation compiles once for all eps values.

``autoattack`` runs the reference AutoAttack (``pyautoattack``, PyTorch) on
the JAX model through ``torch_bridge``; torch is imported only there.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import attacks
from uta_jax import configs
from uta_jax import data
from uta_jax import steps
from uta_jax import uncertainty


# Attacks of ``evaluate``: PGD with restarts, UTA, and one-step FGSM (whose
# accuracy rising above PGD's is the sign of catastrophic overfitting).
EVAL_ATTACKS = ('pgd', 'uta', 'fgsm')


def _entropy(logits: jax.Array) -> jax.Array:
  return uncertainty.entropy_from_log_probs(jax.nn.log_softmax(logits))


@functools.partial(jax.jit, static_argnames=('model', 'ensemble',
                                             'eval_config', 'bounds'))
def _eval_batch(variables, x, y, key, eps, *, model: nn.Module,
                ensemble: bool, eval_config: configs.EvalConfig,
                bounds: Optional[Tuple[float, float]]) -> Dict[str, jax.Array]:
  """Per-example correctness and entropies on one batch at radius ``eps``."""
  logits_fn = functools.partial(steps.predict_logits, model, variables,
                                ensemble=ensemble)
  sample_fn = functools.partial(steps.member_logits, model, variables,
                                ensemble=ensemble)
  step_size = (eps / 4 if eval_config.pgd_step_size is None else
               eval_config.pgd_step_size)
  clean_logits = logits_fn(x)
  clean_correct = jnp.argmax(clean_logits, -1) == y

  def restart(r, carry):
    robust, _ = carry
    x_adv = attacks.pgd(logits_fn, x, y, eps=eps,
                        num_steps=eval_config.pgd_steps, step_size=step_size,
                        bounds=bounds, key=jax.random.fold_in(key, r),
                        random_start=True)
    logits = logits_fn(x_adv)
    return robust & (jnp.argmax(logits, -1) == y), _entropy(logits)

  pgd_robust, pgd_entropy = jax.lax.fori_loop(
      0, eval_config.pgd_restarts, restart,
      (clean_correct, jnp.zeros(y.shape, jnp.float32)))
  x_uta = attacks.uta(sample_fn, x, eps=eps, num_steps=eval_config.uta_steps,
                      step_size=step_size, bounds=bounds)
  uta_logits = logits_fn(x_uta)
  x_fgsm = attacks.fgsm(logits_fn, x, y, eps=eps, bounds=bounds)
  fgsm_logits = logits_fn(x_fgsm)
  return {
      'fgsm_correct': clean_correct & (jnp.argmax(fgsm_logits, -1) == y),
      'fgsm_entropy': _entropy(fgsm_logits),
      'clean_correct': clean_correct,
      'clean_entropy': _entropy(clean_logits),
      'pgd_correct': pgd_robust,
      'pgd_entropy': pgd_entropy,
      'uta_correct': clean_correct & (jnp.argmax(uta_logits, -1) == y),
      'uta_entropy': _entropy(uta_logits),
  }


def evaluate(model: nn.Module, variables: Any, split: data.Split, *,
             config: configs.Config, key: jax.Array) -> Dict[str, Any]:
  """Accuracies (%) and mean entropies on ``split`` for every eval eps.

  Returns ``{'num_examples', 'clean_accuracy', 'clean_entropy',
  'robust_accuracy': {attack: {eps: %}}, 'attacked_entropy': {attack: {eps:
  nats}}}`` for each attack of ``EVAL_ATTACKS``, with eps keys as strings.
  """
  ec = config.eval
  # Module-level jit with hashable static settings: one compilation per
  # model and batch shape, reused by every later evaluation of the run.
  fn = functools.partial(
      _eval_batch, model=model, ensemble=steps.is_ensemble(config),
      eval_config=ec, bounds=steps.input_bounds(config))
  n = len(split)
  batch = min(ec.batch_size, n)
  sums: Dict[float, Dict[str, float]] = {}
  for eps in ec.eps:
    totals: Dict[str, float] = {}
    for start in range(0, n, batch):
      idx = np.arange(start, min(start + batch, n))
      valid = len(idx)
      idx = np.pad(idx, (0, batch - valid), mode='edge')  # one shape
      b = data.get_batch(split, idx)
      out = jax.device_get(fn(variables, b['image'], b['label'],
                              jax.random.fold_in(key, start),
                              jnp.float32(eps)))
      for name, values in out.items():
        totals[name] = totals.get(name, 0.0) + float(
            np.sum(np.asarray(values, np.float64)[:valid]))
    sums[eps] = totals
  first = sums[ec.eps[0]]
  results = {
      'num_examples': n,
      'clean_accuracy': 100.0 * first['clean_correct'] / n,
      'clean_entropy': first['clean_entropy'] / n,
      'robust_accuracy': {a: {} for a in EVAL_ATTACKS},
      'attacked_entropy': {a: {} for a in EVAL_ATTACKS},
  }
  for eps, totals in sums.items():
    for attack in EVAL_ATTACKS:
      results['robust_accuracy'][attack][str(eps)] = (
          100.0 * totals[f'{attack}_correct'] / n)
      results['attacked_entropy'][attack][str(eps)] = (
          totals[f'{attack}_entropy'] / n)
  return results


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


# ------------------------------------------------------------- AutoAttack

AUTOATTACK_LOGGER = 'auto-attack'
# version='apgd': the standard version without FAB-T and Square.
APGD_ATTACKS = ('apgd-ce', 'apgd-t')
_AFTER = re.compile(r'robust accuracy after (\S+): ([\d.]+)%')


class _Recorder(logging.Handler):
  """Collects AutoAttack's 'robust accuracy after ATTACK: X%' lines."""

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.per_attack: Dict[str, float] = {}

  def emit(self, record):
    match = _AFTER.search(record.getMessage())
    if match:
      self.per_attack[match.group(1).lower()] = float(match.group(2))


def autoattack(model: nn.Module, variables: Any, split: data.Split, *,
               eps: float, ensemble: bool = False, version: str = 'standard',
               batch_size: int = 500, seed: int = 0) -> Dict[str, Any]:
  """Runs the standard AutoAttack (``pyautoattack``) on the JAX model.

  The model goes through ``torch_bridge``. With ``version='rand'`` a model
  with dropout is evaluated as the stochastic MC-dropout model (a new key
  per call, AutoAttack's EoT); otherwise dropout is off and the model is
  deterministic. AutoAttack's own checks and log lines are left as they are
  (logger ``'auto-attack'``). ``version='apgd'`` runs only the standard
  version's first two attacks (APGD-CE, APGD-T, same settings): the cheap
  subset for quick sweeps on a CPU.

  Returns clean and robust accuracy (%), the accuracy after each attack as
  AutoAttack reports it, the number of points and the wall time.
  """
  from uta_jax import torch_bridge  # pylint: disable=g-import-not-at-top
  torch = torch_bridge.require_torch()
  try:
    from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("AutoAttack needs pyautoattack: pip install "
                      "'uta-jax[torch]'") from e
  if not 0 < eps <= 1:
    raise ValueError(f'eps {eps} is outside (0, 1]: images are in [0, 1]')
  stochastic = version == 'rand'
  if stochastic:
    def apply(v, x, key):
      return steps.predict_logits(model, v, x, ensemble=ensemble,
                                  mc_dropout=True, rngs={'dropout': key})
  else:
    def apply(v, x):
      return steps.predict_logits(model, v, x, ensemble=ensemble)
  module = torch_bridge.bridge_module(apply, variables, stochastic=stochastic,
                                      seed=seed)
  x = torch.from_numpy(np.ascontiguousarray(
      data.to_float(split.images).transpose(0, 3, 1, 2)))
  y = torch.from_numpy(split.labels.astype(np.int64))
  recorder = _Recorder()
  logger = logging.getLogger(AUTOATTACK_LOGGER)
  logger.addHandler(recorder)
  start = time.time()
  try:
    if version == 'apgd':
      adversary = AutoAttack(module, eps=eps, seed=seed, version='custom',
                             attacks=list(APGD_ATTACKS))
      adversary.apgd.n_restarts = 1  # the standard version's settings
      adversary.apgd_targeted.n_target_classes = 9
    else:
      adversary = AutoAttack(module, eps=eps, seed=seed, version=version)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
  finally:
    logger.removeHandler(recorder)
  seconds = time.time() - start
  with torch.no_grad():
    clean = _torch_accuracy(module, x, y, batch_size)
    robust = _torch_accuracy(module, x_adv, y, batch_size)
  return {
      'eps': eps,
      'version': version,
      'model_randomness': ('MC dropout, a new key per call (EoT)' if
                           stochastic else 'deterministic (dropout off)'),
      'num_examples': len(split),
      'clean_accuracy': clean,
      'robust_accuracy': robust,
      'per_attack': recorder.per_attack,
      'max_perturbation': float((x_adv - x).abs().max()),
      'seconds': seconds,
  }


def _torch_accuracy(module, x, y, batch_size: int) -> float:
  correct = 0
  for start in range(0, len(y), batch_size):
    logits = module(x[start:start + batch_size])
    correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
  return 100.0 * correct / len(y)
