"""APGD (Croce & Hein, ICML 2020): AutoAttack's L-inf APGD-CE and APGD-T in JAX.

A faithful port of the reference (``pyautoattack``'s ``autopgd_base.py``,
L-inf, one restart, as the standard AutoAttack runs it):

* random start ``x + eps * t / max|t|`` with ``t ~ U(-1, 1)``, clipped to
  [0, 1];
* 100 iterations of a sign step with momentum 0.75 (none on the first
  iteration), projected on the eps-ball and the [0, 1] box;
* initial step size ``2 * eps``, per example; at each checkpoint
  (``checkpoints``: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1}
  - 0.03, 0.06)) the step size of an example is halved and it restarts from
  its best point when its loss rose in at most ``rho`` = 0.75 of the steps
  since the last checkpoint, or when the step size was not halved at the last
  checkpoint and the best loss has not improved since;
* losses: cross-entropy (APGD-CE) and the targeted DLR loss (APGD-T) against
  each of the top-9 other classes of the clean logits, the targets a
  ``jax.vmap`` batch dimension.

All state is per example, the loop is one ``lax.fori_loop`` with static
length, and the result is deterministic given ``key``: example i draws its
random start from ``fold_in(key, example_ids[i])``, so a point's attack does
not depend on which batch or device it runs in.

  >>> logits_fn = lambda x: model.apply(variables, x)
  >>> robust, x_adv = apgd_ce(logits_fn, x, y, eps=0.1, key=key)
  >>> robust, x_adv = apgd_t(logits_fn, x, y, eps=0.1, key=key)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

LogitsFn = Callable[[jax.Array], jax.Array]  # x [B, ...] -> logits [B, C]

NUM_STEPS = 100  # the standard AutoAttack's n_iter
RHO = 0.75  # the oscillation threshold (``thr_decr``)
MOMENTUM = 0.75
NUM_TARGETS = 9  # APGD-T's top-9 target classes
LOSSES = ('ce', 'dlr', 'dlr-targeted')


# ------------------------------------------------------------------ losses


def _sorted_logits(logits: jax.Array) -> jax.Array:
  return jnp.sort(logits, axis=-1)  # ascending, as torch's x.sort(dim=1)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Untargeted DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) per example.

  ``logits`` [B, C], ``labels`` [B] -> [B]; z_pi1 >= z_pi2 >= ... are the
  sorted logits (at least 3 classes).
  """
  z = _sorted_logits(logits)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  top_is_y = jnp.argmax(logits, -1) == labels
  best_other = jnp.where(top_is_y, z[:, -2], z[:, -1])
  return -(z_y - best_other) / (z[:, -1] - z[:, -3] + 1e-12)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array,
                      targets: jax.Array) -> jax.Array:
  """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) per example.

  ``logits`` [B, C], ``labels`` and ``targets`` [B] -> [B] (at least 4
  classes).
  """
  z = _sorted_logits(logits)
  take = lambda idx: jnp.take_along_axis(logits, idx[:, None], axis=-1)[:, 0]
  return -(take(labels) - take(targets)) / (
      z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def _loss_fn(loss: str, labels: jax.Array,
             targets: Optional[jax.Array]) -> Callable[[jax.Array], jax.Array]:
  if loss == 'ce':
    return lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels)
  if loss == 'dlr':
    return lambda z: dlr_loss(z, labels)
  if targets is None:
    raise ValueError("loss='dlr-targeted' needs targets")
  return lambda z: targeted_dlr_loss(z, labels, targets)


# -------------------------------------------------------------- schedule


def checkpoints(num_steps: int = NUM_STEPS) -> Tuple[Tuple[int, int], ...]:
  """(iteration, window) of every step-size checkpoint, as the reference.

  The check after iteration i (0-based) looks at the ``window`` losses since
  the previous checkpoint. Windows start at 0.22 N and shrink by 0.03 N per
  checkpoint down to 0.06 N (integer parts, at least 1), so the checks fall
  after ceil(p_j N) iterations of the schedule p_j (for N = 100: 22, 41, 57,
  70, 80, 87, 93, 99).
  """
  window = max(int(0.22 * num_steps), 1)
  smallest = max(int(0.06 * num_steps), 1)
  shrink = max(int(0.03 * num_steps), 1)
  points, i = [], window - 1
  while i < num_steps:
    points.append((i, window))
    window = max(window - shrink, smallest)
    i += window
  return tuple(points)


def halve_step(rises: jax.Array, *, window: int, loss_best: jax.Array,
               loss_best_last_check: jax.Array,
               reduced_last_check: jax.Array,
               rho: float = RHO) -> jax.Array:
  """The checkpoint condition [B]: which examples halve their step size.

  ``rises`` [B] counts the iterations of the last ``window`` whose loss was
  above the one before (``count_rise``). An example halves when its loss
  rose in at most ``rho * window`` of them, or when it did not halve at the
  last checkpoint and its best loss has not improved since.
  """
  oscillating = rises <= window * rho
  stalled = ~reduced_last_check & (loss_best_last_check >= loss_best)
  return oscillating | stalled


def count_rise(rises: jax.Array, loss: jax.Array,
               previous_loss: jax.Array) -> jax.Array:
  """``rises`` plus one where ``loss`` [B] is above ``previous_loss``.

  The windows between checkpoints tile the iterations, so one counter, reset
  at each checkpoint, counts what the reference counts in its loss history.
  Before iteration 0 the reference compares with an unwritten (zero) row of
  that history, so ``previous_loss`` starts at zero.
  """
  return rises + (loss > previous_loss).astype(rises.dtype)


# ------------------------------------------------------------ the attack


class _State(NamedTuple):
  x_adv: jax.Array
  moved: jax.Array  # x_adv minus the previous iterate (the momentum term)
  ascent: jax.Array  # int8 sign of the loss gradient at x_adv
  x_best: jax.Array
  ascent_best: jax.Array
  loss_best: jax.Array  # [B]
  x_best_adv: jax.Array  # the last misclassified point
  robust: jax.Array  # [B] bool: correct at every iterate so far
  step_size: jax.Array  # [B]
  loss: jax.Array  # [B] at the last iterate
  rises: jax.Array  # [B] int32, since the last checkpoint
  loss_best_last_check: jax.Array  # [B]
  reduced_last_check: jax.Array  # [B] bool


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] broadcasting against ``like`` [B, ...]."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def random_start(key: jax.Array, x: jax.Array, *, eps: float,
                 example_ids: Optional[jax.Array] = None,
                 noise: Optional[jax.Array] = None) -> jax.Array:
  """x + eps * t / max|t| (t ~ U(-1, 1) per example), clipped to [0, 1].

  Example i draws ``t`` from ``fold_in(key, example_ids[i])`` (default: its
  position in the batch); ``noise`` [B, ...] gives t instead (to replay
  the reference's own ``2 * torch.rand - 1``).
  """
  if noise is not None:
    t = noise.astype(x.dtype)
  else:
    if example_ids is None:
      example_ids = jnp.arange(x.shape[0])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids)
    t = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0,
                                              1.0))(keys)
  scale = jnp.max(jnp.abs(t).reshape(t.shape[0], -1), axis=1)
  return jnp.clip(x + eps * t / (_per_example(scale, t) + 1e-12), 0.0, 1.0)


def apgd(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *, eps,
         key: jax.Array, loss: str = 'ce', targets: Optional[jax.Array] = None,
         num_steps: int = NUM_STEPS, rho: float = RHO,
         example_ids: Optional[jax.Array] = None,
         noise: Optional[jax.Array] = None
        ) -> Tuple[jax.Array, jax.Array]:
  """One run of L-inf APGD on images in [0, 1] (the reference's
  ``attack_single_run``).

  Args:
    logits_fn: the model in eval mode, ``x [B, ...] -> logits [B, C]``.
    x: clean images [B, ...] in [0, 1]; ``labels`` [B].
    eps: L-inf radius (may be traced).
    key: PRNG key of the random start (see ``random_start``).
    loss: 'ce', 'dlr' or 'dlr-targeted' (then ``targets`` [B]).
    num_steps: iterations N (static).
    rho: oscillation threshold of the step-size checkpoints.
    example_ids: [B] global ids of the examples, for their keys.
    noise: [B, ...] the random start's t instead of drawing it from ``key``
      (``random_start``).

  Returns:
    ``(robust, x_adv)``: robust [B] is True where the model classified every
    iterate (the random start included) correctly; ``x_adv`` [B, ...] is the
    last misclassified iterate where not robust, else ``x``.
  """
  if loss not in LOSSES:
    raise ValueError(f'unknown APGD loss {loss!r}; choose one of {LOSSES}')
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  x = jax.lax.stop_gradient(x)
  loss_of_logits = _loss_fn(loss, labels, targets)

  def loss_and_grad(x_):
    def total(xx):
      logits = logits_fn(xx)
      per_example = loss_of_logits(logits)
      return jnp.sum(per_example), (per_example, logits)
    (_, (per_example, logits)), grad = jax.value_and_grad(
        total, has_aux=True)(x_)
    return per_example, logits, grad

  def project(z):
    return jnp.clip(jnp.clip(z, x - eps, x + eps), 0.0, 1.0)

  # Static schedule: whether iteration i ends with a check, and its window.
  is_check = np.zeros(num_steps, bool)
  windows = np.ones(num_steps, np.int32)
  for i, window in checkpoints(num_steps):
    is_check[i], windows[i] = True, window
  is_check, windows = jnp.asarray(is_check), jnp.asarray(windows)

  x_adv = random_start(key, x, eps=eps, example_ids=example_ids, noise=noise)
  loss0, logits0, grad0 = loss_and_grad(x_adv)
  batch = x.shape[0]
  # L-inf steps use only the gradient's sign: keep that, not the gradient.
  ascent0 = jnp.sign(grad0).astype(jnp.int8)
  state = _State(
      x_adv=x_adv, moved=jnp.zeros_like(x_adv), ascent=ascent0, x_best=x_adv,
      ascent_best=ascent0, loss_best=loss0, x_best_adv=x_adv,
      robust=jnp.argmax(logits0, -1) == labels,
      step_size=jnp.full((batch,), 2.0, x.dtype) * eps,
      loss=jnp.zeros_like(loss0), rises=jnp.zeros((batch,), jnp.int32),
      loss_best_last_check=loss0,
      reduced_last_check=jnp.ones((batch,), bool))

  def iteration(i, s: _State) -> _State:
    momentum = jnp.where(i > 0, MOMENTUM, 1.0).astype(x.dtype)
    step = _per_example(s.step_size, x)
    z = project(s.x_adv + step * s.ascent.astype(x.dtype))
    z = project(s.x_adv + (z - s.x_adv) * momentum + s.moved * (1 - momentum))
    loss_i, logits, grad = loss_and_grad(z)
    ascent = jnp.sign(grad).astype(jnp.int8)
    correct = jnp.argmax(logits, -1) == labels
    improved = loss_i > s.loss_best
    better = _per_example(improved, x)
    x_best = jnp.where(better, z, s.x_best)
    ascent_best = jnp.where(better, ascent, s.ascent_best)
    loss_best = jnp.where(improved, loss_i, s.loss_best)
    rises = count_rise(s.rises, loss_i, s.loss)

    # Step-size checkpoint: where an example halves, it restarts from its
    # best point (the previous iterate, which ``moved`` is taken from, stays).
    # Elementwise selects, false after iterations that end no window, cost
    # less than a branch, whose operands XLA would copy.
    checking = is_check[i]
    halve = checking & halve_step(
        rises, window=windows[i], loss_best=loss_best,
        loss_best_last_check=s.loss_best_last_check,
        reduced_last_check=s.reduced_last_check, rho=rho)
    back = _per_example(halve, x)
    return _State(
        x_adv=jnp.where(back, x_best, z),
        moved=jnp.where(back, x_best, z) - s.x_adv,
        ascent=jnp.where(back, ascent_best, ascent), x_best=x_best,
        ascent_best=ascent_best, loss_best=loss_best,
        x_best_adv=jnp.where(_per_example(correct, x), s.x_best_adv, z),
        robust=s.robust & correct,
        step_size=jnp.where(halve, s.step_size / 2, s.step_size),
        loss=loss_i, rises=jnp.where(checking, 0, rises),
        loss_best_last_check=jnp.where(checking, loss_best,
                                       s.loss_best_last_check),
        reduced_last_check=jnp.where(checking, halve, s.reduced_last_check))

  state = jax.lax.fori_loop(0, num_steps, iteration, state)
  x_adv = jnp.where(_per_example(state.robust, x), x, state.x_best_adv)
  return state.robust, jax.lax.stop_gradient(x_adv)


def apgd_ce(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *, eps,
            key: jax.Array, num_steps: int = NUM_STEPS,
            example_ids: Optional[jax.Array] = None,
            noise: Optional[jax.Array] = None
           ) -> Tuple[jax.Array, jax.Array]:
  """APGD-CE: ``apgd`` on the cross-entropy; ``(robust [B], x_adv)``."""
  return apgd(logits_fn, x, labels, eps=eps, key=key, loss='ce',
              num_steps=num_steps, example_ids=example_ids, noise=noise)


def top_targets(logits: jax.Array, num_targets: int = NUM_TARGETS
               ) -> jax.Array:
  """[T, B]: target t is the (t + 2)-th largest class of ``logits`` [B, C]."""
  order = jnp.argsort(-logits, axis=-1)  # descending
  return order[:, 1:num_targets + 1].T


def apgd_t(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *, eps,
           key: jax.Array, num_targets: int = NUM_TARGETS,
           num_steps: int = NUM_STEPS,
           example_ids: Optional[jax.Array] = None
          ) -> Tuple[jax.Array, jax.Array]:
  """APGD-T: targeted-DLR APGD against each of the top ``num_targets``
  classes of the clean logits, the targets vmapped.

  Target t uses ``fold_in(key, t)``. An example is robust if it survives
  every target; ``x_adv`` is the point of the first target that fooled it.
  """
  num_classes = jax.eval_shape(logits_fn, x).shape[-1]
  if num_classes < 4:
    raise ValueError(f'APGD-T needs at least 4 classes, the model has '
                     f'{num_classes}')
  num_targets = min(num_targets, num_classes - 1)
  targets = top_targets(logits_fn(x), num_targets)  # [T, B]

  def one_target(t, target):
    return apgd(logits_fn, x, labels, eps=eps, key=jax.random.fold_in(key, t),
                loss='dlr-targeted', targets=target, num_steps=num_steps,
                example_ids=example_ids)

  robust, x_adv = jax.vmap(one_target)(jnp.arange(num_targets), targets)
  first_fooled = jnp.argmin(robust, axis=0)  # first False, 0 if all robust
  x_adv = jnp.take_along_axis(
      x_adv, _per_example(first_fooled, x_adv[0])[None], axis=0)[0]
  return jnp.all(robust, axis=0), x_adv
