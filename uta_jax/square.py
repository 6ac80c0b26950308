"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf, as AutoAttack's
standard version runs it, in JAX.

The reference is ``pyautoattack``'s ``square.py`` (``norm='Linf'``,
``loss='margin'``, untargeted, one restart, ``p_init`` 0.8, 5,000 queries,
the schedule of p not rescaled to the query budget):

* start: vertical stripes, ``x + eps * s`` with one random sign s per
  (column, channel), clipped to [0, 1];
* query i: a window of side ``s_i = max(round(sqrt(p_i * H * W)), 1)`` (p_i
  halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000: the
  static table ``window_sides``) at a random position, the same for the
  whole batch, never starting at the last possible row or column (the
  reference draws ``floor(U * (H - s))``), set to ``2 eps`` times one random
  sign per channel; the candidate is projected on the eps-ball and the box;
* a point takes the candidate when its margin ``z_y - max_{k != y} z_k``
  drops strictly below its best, or when the candidate is misclassified
  (margin <= 0); a point stops once it is misclassified.

Fixed shapes throughout: every point is queried every iteration and the
finished ones are masked, and the queries run as ``lax.fori_loop`` segments
of static length, between which a stop request is honoured and the loop
ends once no point is left. The random draws come from ``key`` (one
window and channel signs per query, as the reference, but not its
``torch.rand`` stream); ``Draws`` replays given ones (the tests replay the
reference's and match it point for point).

  >>> robust, x_adv = square.square_linf(logits_fn, x, y, eps=0.1, key=key)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import parallel

LogitsFn = Callable[[jax.Array], jax.Array]  # x [B, H, W, C] -> [B, K]

NUM_QUERIES = 5000  # the standard AutoAttack's n_queries
P_INIT = 0.8
SEGMENT = 250  # queries per compiled segment: a stop waits at most this
# The schedule of p: p_init halved after each of these iterations.
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, p_init: float = P_INIT) -> float:
  """The fraction of the image a window covers at iteration ``i``."""
  return p_init / 2 ** sum(i > t for t in P_HALVINGS)


def window_sides(num_queries: int, height: int, width: int,
                 p_init: float = P_INIT) -> np.ndarray:
  """[num_queries] int32: the window side of each iteration (static)."""
  sides = [min(max(int(round(math.sqrt(p_schedule(i, p_init) * height *
                                       width))), 1), min(height, width))
           for i in range(num_queries)]
  return np.asarray(sides, np.int32)


class Draws(NamedTuple):
  """The attack's random draws: stripe signs [B, 1, W, C] of the start,
  window corners [Q, 2] (row, column) and channel signs [Q, C] per query."""
  stripes: jax.Array
  corners: jax.Array
  signs: jax.Array


def draw(key: jax.Array, x: jax.Array, num_queries: int,
         p_init: float = P_INIT) -> Draws:
  """Draws from ``key`` with the reference's distributions: +-1 signs, and a
  corner ``floor(U * (H - s))`` for the window of side s of each query."""
  batch, height, width, channels = x.shape
  k_start, k_corner, k_sign = jax.random.split(key, 3)
  sign = lambda k, shape: jnp.where(jax.random.bernoulli(k, shape=shape),
                                    1.0, -1.0).astype(x.dtype)
  sides = jnp.asarray(window_sides(num_queries, height, width, p_init))
  room = jnp.stack([height - sides, width - sides], axis=1)  # [Q, 2]
  u = jax.random.uniform(k_corner, (num_queries, 2))
  corners = jnp.floor(u * room).astype(jnp.int32)
  return Draws(stripes=sign(k_start, (batch, 1, width, channels)),
               corners=corners, signs=sign(k_sign, (num_queries, channels)))


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{k != y} z_k per point [B] (the reference's margin loss)."""
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[1], dtype=bool),
                     -jnp.inf, logits)
  return z_y - others.max(axis=1)


class State(NamedTuple):
  x_best: jax.Array  # [B, H, W, C]
  margin_min: jax.Array  # [B]
  loss_min: jax.Array  # [B]


def _project(x_new, x, eps, bounds):
  return jnp.clip(jnp.clip(x_new, x - eps, x + eps), *bounds)


def _query(logits_fn, x, labels, state: State, side, corner, signs, *, eps,
           bounds) -> State:
  """One query of every point still classified correctly."""
  height, width = x.shape[1:3]
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  window = ((rows >= corner[0]) & (rows < corner[0] + side) &
            (cols >= corner[1]) & (cols < corner[1] + side))  # [H, W]
  delta = jnp.where(window[..., None], 2.0 * eps * signs, 0.0)  # [H, W, C]
  x_new = _project(state.x_best + delta, x, eps, bounds)
  new = margin(logits_fn(x_new), labels)
  active = state.margin_min > 0.0
  improved = active & (new < state.loss_min)
  take = improved | (active & (new <= 0.0))
  expand = lambda m: m.reshape((-1,) + (1,) * (x.ndim - 1))
  return State(x_best=jnp.where(expand(take), x_new, state.x_best),
               margin_min=jnp.where(take, new, state.margin_min),
               loss_min=jnp.where(improved, new, state.loss_min))


def start(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array,
          stripes: jax.Array, *, eps: float,
          bounds: Tuple[float, float] = (0.0, 1.0)) -> State:
  """The striped start and its margins."""
  x_best = jnp.clip(x + eps * stripes, *bounds)
  m = margin(logits_fn(x_best), labels)
  return State(x_best=x_best, margin_min=m, loss_min=m)


def run_queries(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array,
                state: State, sides: jax.Array, corners: jax.Array,
                signs: jax.Array, *, eps: float,
                bounds: Tuple[float, float] = (0.0, 1.0)) -> State:
  """``len(sides)`` queries (a static trip count) from ``state``."""
  def body(i, s):
    return _query(logits_fn, x, labels, s, sides[i], corners[i], signs[i],
                  eps=eps, bounds=bounds)
  return jax.lax.fori_loop(0, sides.shape[0], body, state)


def square_linf(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *,
                eps: float, key: Optional[jax.Array] = None,
                num_queries: int = NUM_QUERIES, p_init: float = P_INIT,
                draws: Optional[Draws] = None, segment: int = SEGMENT,
                bounds: Tuple[float, float] = (0.0, 1.0),
                stop_requested: Optional[Callable[[], bool]] = None
                ) -> Tuple[np.ndarray, jax.Array]:
  """Square Attack on ``x`` [B, H, W, C] in ``bounds``: (robust [B] bool:
  correct when clean and after the attack, x_adv [B, H, W, C]).

  Points misclassified when clean are not attacked (robust False, x_adv =
  x). ``draws`` (default ``draw(key, ...)``) fixes every random choice.
  Raises ``parallel.Stopped`` between segments once ``stop_requested()`` is
  true.
  """
  if num_queries < 1:
    raise ValueError(f'num_queries must be >= 1, got {num_queries}')
  if draws is None:
    if key is None:
      raise ValueError('square_linf needs a key (or draws)')
    draws = draw(key, x, num_queries, p_init)
  clean = margin(logits_fn(x), labels) > 0.0
  sides = jnp.asarray(window_sides(num_queries, x.shape[1], x.shape[2],
                                   p_init))
  state = start(logits_fn, x, labels, draws.stripes, eps=eps, bounds=bounds)
  # Misclassified when clean: out of the attack from the start.
  state = state._replace(margin_min=jnp.where(clean, state.margin_min, -1.0))
  segment_fn = jax.jit(lambda s, a, b, c: run_queries(
      logits_fn, x, labels, s, a, b, c, eps=eps, bounds=bounds))
  # Every segment has ``segment`` queries (one compiled shape): the last is
  # padded with windows of side 0, which change nothing.
  pad = -num_queries % segment
  sides = jnp.pad(sides, (0, pad))
  corners = jnp.pad(draws.corners, ((0, pad), (0, 0)))
  signs = jnp.pad(draws.signs, ((0, pad), (0, 0)))
  for lo in range(0, num_queries, segment):
    if not bool(jnp.any(state.margin_min > 0.0)):
      break  # every point misclassified: the reference stops here too
    if stop_requested is not None and stop_requested():
      raise parallel.Stopped(f'Square stopped after {lo} of {num_queries} '
                             'queries')
    hi = lo + segment
    state = segment_fn(state, sides[lo:hi], corners[lo:hi], signs[lo:hi])
  x_adv = jnp.where(clean.reshape((-1,) + (1,) * (x.ndim - 1)),
                    state.x_best, x)
  robust = np.asarray(clean & (state.margin_min > 0.0))
  return robust, x_adv
