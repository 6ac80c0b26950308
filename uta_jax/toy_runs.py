"""The 2D toy's experiments as pure functions: a seed's data, a training
tracked update by update, and the attacks' boundary crossing (§4.1, §4.3).

``experiments/toy2d.py`` (Fig. 1) and ``experiments/toy2d_map.py`` (the
geometry map) call these; they hold no I/O.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import attacks
from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import steps
from uta_jax import toy

# The near boundary's position is read on this vertical line through the
# near region's centre, every OFFSET_EVERY updates.
LINE_YS = np.linspace(-1.0, 1.0, 401)
OFFSET_EVERY = 10


def dataset(seed: int, **geometry) -> Tuple[data.Dataset, np.ndarray]:
  """A seed's training and (independent) test set of the toy with
  ``geometry`` (``toy.make_toy2d``'s keywords), and the test points' near
  region membership [N]."""
  train = toy.make_toy2d(data.TOY_TRAIN_SIZE, seed=seed, **geometry)
  test = toy.make_toy2d(data.TOY_TEST_SIZE, seed=seed, split='test',
                        **geometry)
  described = ', '.join(f'{k} {v}' for k, v in sorted(geometry.items()))
  return data.Dataset('toy2d', data.Split(*train[:2]), data.Split(*test[:2]),
                      data.NUM_CLASSES['toy2d'],
                      f'toy2d {described}'.strip()), test[2]


def attack_steps(eps: float, alpha: float, minimum: int = 15) -> int:
  """K with K * alpha >= 1.25 eps (at least ``minimum``): K steps of alpha
  can always reach the eps-ball's edge."""
  return max(minimum, math.ceil(1.25 * eps / alpha - 1e-9))


def check_reach(eps: float, alpha: float, num_steps: int) -> None:
  """Refuses an attack whose K steps of alpha cannot reach eps (a larger
  eps would change nothing)."""
  if num_steps * alpha < eps - 1e-9:
    raise configs.ConfigError(
        f'{num_steps} steps of {alpha:g} reach {num_steps * alpha:g} < eps '
        f'{eps:g}: raise the steps or the step size', 'eps')


def num_updates(config: configs.Config, split: data.Split) -> int:
  return config.epochs * data.steps_per_epoch(len(split), config.batch_size)


@functools.partial(jax.jit, static_argnums=0)
def _probs(model, variables, x):
  return jax.nn.softmax(model.apply(variables, x))[:, 1]  # P(class 1) [N]


def track_training(config: configs.Config, ds: data.Dataset,
                   near: np.ndarray, *, grid: Optional[np.ndarray] = None
                   ) -> Tuple[Any, Any, Dict[str, Any]]:
  """Trains ``config`` on ``ds`` (``steps.fit``): (model, variables,
  measurements), the measurements made with the test points' region
  ``near`` [N]:

  * ``clean_accuracy`` / ``region_accuracy``: after the last update;
  * ``last_quarter``: near and far accuracy averaged over every update of
    the last quarter of training (less noisy than the last update);
  * ``offset``: the near boundary's y on the line through the near region's
    centre (``toy.boundary_offset``), every ``OFFSET_EVERY`` updates, and its
    mean over the last quarter (``offset_last_quarter``);
  * ``changes``: prediction changes per test point over the last half, the
    mean per region (how much the boundary still moves);
  * with ``grid`` [G, 2]: its oscillation counts over all updates and the
    final P(class 1) on it (Fig. 1c-d).
  """
  total = num_updates(config, ds.train)
  x_test = jnp.asarray(ds.test.images)
  line = jnp.asarray(toy.vertical_line(toy.NEAR_CENTRE_X, LINE_YS[0],
                                       LINE_YS[-1], len(LINE_YS)))
  test_probs, line_probs, grid_pred = [], [], []

  def record(step, model, variables):
    test_probs.append(_probs(model, variables, x_test))
    if step % OFFSET_EVERY == 0:
      line_probs.append(_probs(model, variables, line))
    if grid is not None:
      grid_pred.append(_probs(model, variables, jnp.asarray(grid)) > 0.5)

  model, variables = steps.fit(config, ds.train, num_steps=total,
                               callback=record)
  pred = np.asarray(jax.device_get(jnp.stack(test_probs))) > 0.5  # [T, N]
  labels = ds.test.labels
  quarter, half = max(1, total // 4), max(2, total // 2)
  per_update = [toy.region_accuracy(near, labels, p) for p in pred[-quarter:]]
  offsets = [toy.boundary_offset(LINE_YS, p)
             for p in np.asarray(jax.device_get(line_probs))]
  changes = toy.oscillation_counts(pred[-half:])
  out = {
      'updates': total,
      'clean_accuracy': 100 * float(np.mean(pred[-1] == labels)),
      'region_accuracy': toy.region_accuracy(near, labels, pred[-1]),
      'last_quarter': {r: float(np.mean([a[r] for a in per_update]))
                       for r in ('near', 'far')},
      'offset': offsets,
      'offset_last_quarter': float(np.mean(
          offsets[-max(1, len(offsets) // 4):])) if offsets else None,
      'changes': {'near': float(changes[near].mean()),
                  'far': float(changes[~near].mean())},
  }
  if grid is not None:
    counts = toy.oscillation_counts(np.asarray(jax.device_get(grid_pred)))
    out.update(mean_oscillations=float(counts.mean()),
               max_oscillations=int(counts.max()),
               oscillations=counts.tolist(),
               prob=np.asarray(_probs(model, variables,
                                      jnp.asarray(grid))).tolist())
  return model, variables, out


def crossings(logits_fn, sample_fn, x: np.ndarray, y: np.ndarray, *,
              eps: float, alpha: float, num_steps: int
              ) -> Dict[str, Dict[str, Any]]:
  """PGD (the cross-entropy of ``logits_fn``) and UTA (the entropy of
  ``sample_fn``'s samples) on a fixed model, from the clean points: one
  step of size eps (the single-step attacks) and ``num_steps`` steps of
  ``alpha``. Per attack: the crossing fractions (``toy.crossing_fraction``:
  clean-correct points, against the label; K steps counted only if still
  across after K + 1) and the perturbed points [B, 2]."""
  check_reach(eps, alpha, num_steps)
  x, y = jnp.asarray(x), jnp.asarray(y)
  predict = lambda v: np.asarray(jnp.argmax(logits_fn(v), -1))
  clean = predict(x)
  common = dict(eps=eps, bounds=None)
  runs = {
      'pgd': lambda k, a: attacks.pgd(logits_fn, x, y, num_steps=k,
                                      step_size=a, **common),
      'uta': lambda k, a: attacks.uta(sample_fn, x, num_steps=k,
                                      step_size=a, **common),
  }
  out = {}
  for name, run in runs.items():
    one = run(1, eps)
    at_k, at_k1 = run(num_steps, alpha), run(num_steps + 1, alpha)
    out[name] = {
        'one_step': toy.crossing_fraction(y, clean, predict(one)),
        'k_steps': toy.crossing_fraction(y, clean, predict(at_k),
                                         predict(at_k1)),
        'perturbed_one_step': np.asarray(one),
        'perturbed_k_steps': np.asarray(at_k),
    }
  return out


def model_fns(model, variables, *, ensemble: bool = False):
  """(logits_fn, sample_fn) of a trained toy model (or stacked ensemble)."""
  return (functools.partial(classifier.predict_logits, model, variables,
                            ensemble=ensemble),
          functools.partial(classifier.member_logits, model, variables,
                            ensemble=ensemble))
