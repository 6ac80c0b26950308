"""L-inf attacks as one projected sign-gradient ascent loop.

Every attack here is the same loop (``projected_sign_ascent``) on a different
objective, following Eq. PGD and Eq. UTA-PGD of the paper:

    x_{i+1} = Proj(x_i + alpha_i * sign(grad_x objective(x_i))),

where ``Proj`` clips to the L-inf ball of radius ``eps`` around the clean
point and, for images, to the pixel box [0, 1]. The loop is a
``lax.fori_loop`` with a static step count, so it jits once per shape.

Objectives are per-example: ``objective(x) -> [B]``; the gradient of their
sum is the per-example gradient because examples do not interact (models run
in eval mode).

* ``pgd``: cross-entropy against the label (Madry et al.); ``fgsm`` is one
  step of size eps; ``rfgsm`` a uniform random start plus one step.
* ``uta``: an uncertainty measure of M samples (entropy by default). It is
  label-free: the labels are not an argument.

Usage (input space):

  >>> logits_fn = lambda x: model.apply(variables, x)
  >>> x_adv = pgd(logits_fn, x, y, eps=0.1, num_steps=10, step_size=0.01)
  >>> sample_fn = uncertainty.single_model_sampler(model.apply, variables)
  >>> x_adv = uta(sample_fn, x, eps=0.1, num_steps=10, step_size=0.01)

Latent space (Eq. UTA with encoder E): run the same attack on
``z = encode(x)`` against the classifier head, with ``bounds=None`` (no pixel
box), and feed ``z_adv`` to the head:

  >>> z = model.apply(variables, x, method=model.encode)
  >>> head = lambda z: model.apply(variables, z, method=model.classify)
  >>> z_adv = pgd(head, z, y, eps=0.1, num_steps=10, step_size=0.01,
  ...             bounds=None)

Step sizes are a float or a schedule ``i -> alpha_i``
(``constant_schedule``, ``triangular_schedule``).

K is always a Python int: the loop's trip count is known when compiling
(a ``scan``, which XLA can unroll and an accelerator runs without asking
the host whether to go on). A program of many runs (``programs``) passes
eps and the step size as traced per-run values, and may choose PGD's or
UTA's objective per run on one forward (``selected_objective``).
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from uta_jax import uncertainty

Objective = Callable[[jax.Array], jax.Array]  # x [B, ...] -> [B]
Schedule = Callable[[jax.Array], jax.Array]  # step index i -> step size
StepSize = Union[float, Schedule]
Bounds = Optional[Tuple[float, float]]

PIXEL_BOUNDS: Tuple[float, float] = (0.0, 1.0)
TRIANGULAR_BASE_STEP = 0.005  # §5.1: first and last step size


# ----------------------------------------------------------- step schedules


def constant_schedule(step_size: float) -> Schedule:
  """alpha_i = step_size for every step."""
  return lambda i: jnp.asarray(step_size, jnp.float32)


def triangular_schedule(*, num_steps, eps,
                        base: float = TRIANGULAR_BASE_STEP) -> Schedule:
  """The paper's triangular step size (§5.1).

  Rises linearly from ``base`` at step 0 to ``max(base, eps / 5)`` at step
  K/2 and falls back to ``base`` at step K (K = ``num_steps``). The paper
  writes eps_test/5; the attack's own eps is what a training attack knows.
  eps may be traced (a program of runs).
  """
  peak = jnp.maximum(base, jnp.asarray(eps, jnp.float32) / 5.0)

  def schedule(i):
    t = jnp.asarray(i, jnp.float32) / num_steps  # in [0, 1]
    return base + (peak - base) * (1.0 - jnp.abs(2.0 * t - 1.0))

  return schedule


def as_schedule(step_size: StepSize) -> Schedule:
  """A float becomes a constant schedule; a schedule is returned as is."""
  if callable(step_size):
    return step_size
  return constant_schedule(step_size)


# ---------------------------------------------------------------- objectives


def cross_entropy_objective(logits_fn: Callable[[jax.Array], jax.Array],
                            labels: jax.Array) -> Objective:
  """Per-example cross-entropy of ``logits_fn(x)`` [B, C] against ``labels`` [B]."""
  return lambda x: optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(x), labels)


def uncertainty_objective(sample_fn: uncertainty.SampleFn,
                          measure: str = 'entropy') -> Objective:
  """Per-example uncertainty of ``sample_fn(x)`` [M, B, C]; uses no labels."""
  measure_fn = uncertainty.get_measure(measure)
  return lambda x: measure_fn(sample_fn(x))


def selected_objective(logits_fn: Callable[[jax.Array], jax.Array],
                       labels: jax.Array, *, use_uncertainty: jax.Array
                      ) -> Objective:
  """UTA's entropy (``use_uncertainty`` true) or PGD's cross-entropy of one
  model, chosen by a traced bool on one forward ``logits_fn(x)`` [B, C].

  Both come from one log-softmax, the cross-entropy as a one-hot product
  (its gradient elementwise: a label gather's is a scatter, ~8% of the main
  job's step on XLA:CPU). The select passes an exact zero cotangent to the
  branch not chosen, so a UTA run's gradient, and its attack, do not depend
  on ``labels``.
  """

  def objective(x):
    log_probs = jax.nn.log_softmax(logits_fn(x), axis=-1)  # [B, C]
    one_hot = jax.nn.one_hot(labels, log_probs.shape[-1],
                             dtype=log_probs.dtype)
    ce = -jnp.sum(one_hot * log_probs, axis=-1)
    entropy = uncertainty.entropy_from_log_probs(log_probs)
    return jnp.where(use_uncertainty, entropy, ce)

  return objective


# ---------------------------------------------------------------- the loop


def linf_project(x_adv: jax.Array, x: jax.Array, *, eps: float,
                 bounds: Bounds = PIXEL_BOUNDS) -> jax.Array:
  """Clips ``x_adv`` to the eps-ball around ``x`` intersected with ``bounds``."""
  lower, upper = x - eps, x + eps
  if bounds is not None:
    lower = jnp.maximum(lower, bounds[0])
    upper = jnp.minimum(upper, bounds[1])
  return jnp.clip(x_adv, lower, upper)


def is_key_batch(key: jax.Array) -> bool:
  """True for a batch of PRNG keys [B] (typed) or [B, 2] (raw uint32)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def example_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """One key per example [B]: ``fold_in(key, id)`` of its global index, so
  an example's draws do not depend on its batch, device or host."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, ids)


def uniform_noise(key: jax.Array, x: jax.Array, *, eps) -> jax.Array:
  """U(-eps, eps) noise of ``x``'s shape.

  With one key per example (``key`` [B]) example i draws from its own key,
  so its noise does not depend on the batch or device it is evaluated in.
  """
  if is_key_batch(key):
    return jax.vmap(lambda k: jax.random.uniform(
        k, x.shape[1:], x.dtype, -eps, eps))(key)
  return jax.random.uniform(key, x.shape, x.dtype, -eps, eps)


def _check_static(*, eps, num_steps, random_start: bool, key) -> None:
  if isinstance(num_steps, jax.Array):
    raise TypeError('num_steps must be a Python int (the loop\'s trip count '
                    'is fixed when compiling), got an array: bind it '
                    'statically, e.g. with functools.partial')
  if not isinstance(num_steps, numbers.Integral) or num_steps < 1:
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}')
  if isinstance(eps, numbers.Real) and not eps > 0:
    raise ValueError(f'eps must be > 0, got {eps!r}')
  if random_start and key is None:
    raise ValueError('random_start=True needs a PRNG key: pass key=...')
  if random_start and isinstance(eps, numbers.Real) and eps == float('inf'):
    raise ValueError('random_start needs a finite eps')


def projected_sign_ascent(objective: Objective, x: jax.Array, *, eps: float,
                          num_steps: int, step_size: StepSize,
                          bounds: Bounds = PIXEL_BOUNDS,
                          key: Optional[jax.Array] = None,
                          random_start: bool = False) -> jax.Array:
  """Maximises ``objective`` by K projected sign-gradient steps.

  Args:
    objective: per-example objective, ``x [B, ...] -> [B]``.
    x: clean points (images NHWC in [0, 1], or latent codes).
    eps: L-inf radius (``float('inf')`` for an unbounded attack).
    num_steps: K, a Python int >= 1 (static: the loop is a ``scan``).
    step_size: alpha as a float or a schedule ``i -> alpha_i``.
    bounds: box the result must stay in; ``None`` in latent space.
    key: PRNG key, needed only with ``random_start``; a batch of keys
      [B] gives every example its own start (``uniform_noise``).
    random_start: start from x + U(-eps, eps) (projected) instead of x.

  Returns:
    ``x_adv`` with ``|x_adv - x|_inf <= eps``, inside ``bounds``; no gradient
    flows through it.
  """
  _check_static(eps=eps, num_steps=num_steps, random_start=random_start,
                key=key)
  schedule = as_schedule(step_size)
  grad_fn = jax.grad(lambda x_: jnp.sum(objective(x_)))
  x = jax.lax.stop_gradient(x)  # the clean point is data, not a variable

  x_adv = x
  if random_start:
    x_adv = linf_project(x + uniform_noise(key, x, eps=eps), x, eps=eps,
                         bounds=bounds)

  def step(i, x_adv):
    ascent = jnp.sign(grad_fn(x_adv))
    alpha = schedule(i).astype(x.dtype)
    return linf_project(x_adv + alpha * ascent, x, eps=eps, bounds=bounds)

  x_adv = jax.lax.fori_loop(0, num_steps, step, x_adv)
  return jax.lax.stop_gradient(x_adv)


# ------------------------------------------------------------ the attacks


def fgsm(logits_fn, x, labels, *, eps: float,
         bounds: Bounds = PIXEL_BOUNDS) -> jax.Array:
  """FGSM (Goodfellow et al.): one step of size eps on the cross-entropy."""
  return projected_sign_ascent(
      cross_entropy_objective(logits_fn, labels), x, eps=eps, num_steps=1,
      step_size=eps, bounds=bounds)


def rfgsm(logits_fn, x, labels, *, key: jax.Array, eps: float,
          step_size: float, bounds: Bounds = PIXEL_BOUNDS) -> jax.Array:
  """R-FGSM (Eq. R-FGSM): xi ~ U(-eps, eps), then one projected step alpha.

  The gradient is taken at the randomly started point (Tramèr et al.; Wong
  et al.'s FGSM-RS), which is what makes the step differ from FGSM.
  """
  return projected_sign_ascent(
      cross_entropy_objective(logits_fn, labels), x, eps=eps, num_steps=1,
      step_size=step_size, bounds=bounds, key=key, random_start=True)


def pgd(logits_fn, x, labels, *, eps: float, num_steps: int,
        step_size: StepSize, bounds: Bounds = PIXEL_BOUNDS,
        key: Optional[jax.Array] = None,
        random_start: bool = False) -> jax.Array:
  """PGD-K (Madry et al.): K projected sign steps on the cross-entropy."""
  return projected_sign_ascent(
      cross_entropy_objective(logits_fn, labels), x, eps=eps,
      num_steps=num_steps, step_size=step_size, bounds=bounds, key=key,
      random_start=random_start)


def uta(sample_fn: uncertainty.SampleFn, x, *, eps: float, num_steps: int,
        step_size: StepSize, measure: str = 'entropy',
        bounds: Bounds = PIXEL_BOUNDS, key: Optional[jax.Array] = None,
        random_start: bool = False) -> jax.Array:
  """UTA-K (Eq. UTA-PGD): K projected sign steps on the model's uncertainty.

  ``sample_fn`` maps x to the logits of M samples, [M, B, C]
  (``uncertainty.single_model_sampler`` for M = 1, the maximum-entropy
  attack; ``mc_dropout_sampler`` or ``ensemble_sampler`` for M > 1). No
  label enters: the attack is unsupervised.
  """
  return projected_sign_ascent(
      uncertainty_objective(sample_fn, measure), x, eps=eps,
      num_steps=num_steps, step_size=step_size, bounds=bounds, key=key,
      random_start=random_start)
