"""Adversarial training of your own Flax model, without a preset or a
built-in dataset: ``fit`` and ``evaluate``.

  variables = trainer.fit(Net(), (x, y), attack='uta', eps=0.1, epochs=5)
  trainer.evaluate(Net(), variables, (x_test, y_test), eps=0.1)

The model contract: ``model.apply(variables, x)`` maps a batch [B, ...] in
``bounds`` to logits [B, C]. A ``__call__`` may take ``train`` (dropout and
BatchNorm in training mode; BatchNorm keeps its statistics in the
``batch_stats`` collection, dropout draws from the ``'dropout'`` rng); one
that does not is wrapped (``adapt``) and trains as written. The step is the
library's (``steps.train_step``, Alg. 1): the attack runs on the model in
evaluation mode, then one optimiser step on the cross-entropy of the
perturbed batch; every random draw comes from ``seed``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uta_jax import attacks
from uta_jax import configs
from uta_jax import steps

ATTACKS = ('none', 'fgsm', 'rfgsm', 'pgd', 'uta')
Arrays = Tuple[np.ndarray, np.ndarray]  # images [N, ...], labels [N]
Data = Union[Arrays, Iterable[Arrays]]


class _TakesTrain(nn.Module):
  """A module whose ``__call__(self, x)`` has no ``train``: the same
  computation, with the keyword the training step passes ignored."""
  inner: nn.Module

  def __call__(self, x, train: bool = False):
    del train
    return self.inner(x)


def _accepts_train(model: nn.Module) -> bool:
  """Whether ``__call__`` takes ``train``; one without a default is refused:
  the attacks call the model as ``model.apply(variables, x)``."""
  params = inspect.signature(type(model).__call__).parameters
  train = params.get('train')
  if train is not None and train.default is inspect.Parameter.empty:
    raise TypeError(f'{type(model).__name__}.__call__ takes train without a '
                    'default: give it one (train: bool = False), the attacks '
                    'call the model in evaluation mode as model.apply('
                    'variables, x)')
  return train is not None or any(
      p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def adapt(model: nn.Module) -> Tuple[nn.Module, Callable, Callable]:
  """(model the step can call, wrap, unwrap): ``model`` itself when its
  ``__call__`` takes ``train``, else ``_TakesTrain(model)``; ``wrap`` and
  ``unwrap`` move variables between the user's and the adapted layout."""
  if not isinstance(model, nn.Module):
    raise TypeError(f'trainer needs a flax.linen Module, got '
                    f'{type(model).__name__}')
  if _accepts_train(model):
    same = lambda v: v
    return model, same, same
  wrap = lambda v: {col: {'inner': tree} for col, tree in v.items()}
  unwrap = lambda v: {col: tree['inner'] for col, tree in v.items()}
  return _TakesTrain(model), wrap, unwrap


def _attack_config(attack: str, eps: float, num_steps: int,
                   step_size: Optional[float]) -> configs.AttackConfig:
  if attack not in ATTACKS:
    raise ValueError(f'unknown attack {attack!r}; choose one of {ATTACKS}')
  if attack != 'none' and (num_steps < 1 or not eps > 0):
    raise ValueError(f'the attack needs num_steps >= 1 and eps > 0, got '
                     f'{num_steps} and {eps}')
  alpha = 2.5 * eps / num_steps if step_size is None else step_size
  return dataclasses.replace(configs.AttackConfig(), name=attack,
                             eps_train=eps, num_steps=num_steps,
                             step_size=alpha)


def _batches(data: Data, batch_size: int, epochs: int,
             key: jax.Array) -> Iterable[Arrays]:
  """Shuffled batches of (images, labels) arrays, a new order per epoch
  (the last partial batch dropped), or the user's own iterable as given."""
  if not (isinstance(data, tuple) and len(data) == 2 and
          hasattr(data[0], 'shape')):
    yield from data
    return
  images, labels = data
  if len(images) != len(labels):
    raise ValueError(f'{len(images)} images but {len(labels)} labels')
  if len(images) < batch_size:
    raise ValueError(f'{len(images)} examples are fewer than one batch of '
                     f'{batch_size}: lower batch_size')
  for epoch in range(epochs):
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(key, epoch), len(images)))
    for start in range(0, len(images) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield images[idx], labels[idx]


def fit(model: nn.Module, data: Data, *, attack: str = 'uta',
        eps: float = 0.1, num_steps: int = 10,
        step_size: Optional[float] = None, epochs: int = 1,
        batch_size: int = 128, optimizer: Optional[
            optax.GradientTransformation] = None,
        bounds: Optional[Tuple[float, float]] = (0.0, 1.0), seed: int = 0,
        callback: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Adversarially trains ``model``; returns its variables.

  Args:
    model: any flax.linen Module mapping [B, ...] to logits [B, C].
    data: (images [N, ...] float in ``bounds``, labels [N] int), shuffled
      into ``batch_size`` batches for ``epochs`` epochs; or any iterable of
      (images, labels) batches, used once as given.
    attack: 'uta' (the model's predictive entropy, Alg. 1), 'pgd', 'fgsm',
      'rfgsm' or 'none' (standard training).
    eps, num_steps, step_size: the L-inf attack: K steps of alpha (default
      2.5 eps / K, so the ball's edge is reached).
    optimizer: an optax transformation (default Adam 1e-3).
    bounds: the input box the attack stays in (None: unbounded).
    seed: initialisation, data order and every draw of the step.
    callback: ``callback(step, metrics)`` after every update ('loss',
      'accuracy' of the perturbed batch).
  """
  adapted, _, unwrap = adapt(model)
  run_attack = _attack_config(attack, eps, num_steps, step_size)
  tx = optimizer or optax.adam(1e-3)
  init_key, run_key, data_key = jax.random.split(jax.random.key(seed), 3)
  step_fn = jax.jit(lambda state, batch: steps.train_step(
      state, batch, model=adapted, tx=tx, attack=run_attack, ensemble=False,
      bounds=None if bounds is None else tuple(bounds)))
  state = None
  for images, labels in _batches(data, batch_size, epochs, data_key):
    batch = {'image': jnp.asarray(images, jnp.float32),
             'label': jnp.asarray(labels, jnp.int32)}
    if state is None:
      variables = adapted.init(init_key, batch['image'][:1])
      state = steps.TrainState(
          step=jnp.zeros((), jnp.int32), params=variables['params'],
          batch_stats=variables.get('batch_stats', {}),
          opt_state=tx.init(variables['params']),
          key=jax.random.key_data(run_key))
    state, metrics = step_fn(state, batch)
    if callback is not None:
      callback(int(state.step), jax.device_get(metrics))
  if state is None:
    raise ValueError('fit got no batches: pass (images, labels) arrays or '
                     'a non-empty iterable of batches')
  return unwrap(steps.variables_of(state))


def evaluate(model: nn.Module, variables: dict, data: Arrays, *,
             eps: float = 0.1, num_steps: int = 20,
             step_size: Optional[float] = None,
             bounds: Optional[Tuple[float, float]] = (0.0, 1.0),
             batch_size: int = 500) -> dict:
  """Clean, PGD-K and UTA-K accuracy (%) of ``model`` on (images,
  labels): PGD from the clean point on the cross-entropy, UTA on the
  predictive entropy; a point counts as robust only if also correct clean."""
  adapted, wrap, _ = adapt(model)
  v = wrap(variables)
  alpha = 2.5 * eps / num_steps if step_size is None else step_size
  logits_fn = lambda x: adapted.apply(v, x)
  common = dict(eps=eps, num_steps=num_steps, step_size=alpha,
                bounds=None if bounds is None else tuple(bounds))

  @jax.jit
  def correct(x, y):
    clean = jnp.argmax(logits_fn(x), -1) == y
    x_pgd = attacks.pgd(logits_fn, x, y, **common)
    x_uta = attacks.uta(lambda z: logits_fn(z)[None], x, **common)
    return jnp.stack([clean, clean & (jnp.argmax(logits_fn(x_pgd), -1) == y),
                      clean & (jnp.argmax(logits_fn(x_uta), -1) == y)])

  images, labels = data
  counts = np.zeros(3)
  for start in range(0, len(images), batch_size):
    counts += np.asarray(correct(
        jnp.asarray(images[start:start + batch_size], jnp.float32),
        jnp.asarray(labels[start:start + batch_size], jnp.int32))).sum(1)
  return dict(zip(('clean', 'pgd', 'uta'),
                  (100 * float(c) / len(images) for c in counts)))
