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


def _signs(key: jax.Array, shape, dtype) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, shape=shape), 1.0,
                   -1.0).astype(dtype)


def stripe_signs(key: jax.Array, example_ids: jax.Array, width: int,
                 channels: int, dtype=jnp.float32) -> jax.Array:
  """[B, 1, W, C] start signs, point i's from ``fold_in(key, id_i)``: a
  point's start does not depend on its batch or device."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(
      jax.random.fold_in(key, 0), example_ids)
  return jax.vmap(lambda k: _signs(k, (1, width, channels), dtype))(keys)


def query_draws(key: jax.Array, first, count: int, sides: jax.Array,
                shape: Tuple[int, int, int], dtype=jnp.float32
                ) -> Tuple[jax.Array, jax.Array]:
  """(corners [count, 2], channel signs [count, C]) of queries ``first`` ..
  ``first + count - 1`` (``first`` may be traced): query q's from
  ``fold_in(key, q)``, shared by every point (as the reference's), with its
  window side ``sides`` [count]; corner ``floor(U * (H - s))``."""
  height, width, channels = shape
  queries = first + jnp.arange(count)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(
      jax.random.fold_in(key, 1), queries)
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0),
                                            (2,)))(keys)
  room = jnp.stack([height - sides, width - sides], axis=1)
  corners = jnp.floor(u * room).astype(jnp.int32)
  signs = jax.vmap(lambda k: _signs(jax.random.fold_in(k, 1), (channels,),
                                    dtype))(keys)
  return corners, signs


def draw(key: jax.Array, x: jax.Array, num_queries: int,
         p_init: float = P_INIT,
         example_ids: Optional[jax.Array] = None) -> Draws:
  """Every draw of an attack on ``x`` from ``key`` (``stripe_signs``,
  ``query_draws``), with the reference's distributions."""
  batch, height, width, channels = x.shape
  ids = jnp.arange(batch) if example_ids is None else example_ids
  sides = jnp.asarray(window_sides(num_queries, height, width, p_init))
  corners, signs = query_draws(key, 0, num_queries, sides,
                               (height, width, channels), x.dtype)
  return Draws(stripes=stripe_signs(key, ids, width, channels, x.dtype),
               corners=corners, signs=signs)


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


def start_state(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array,
                key: jax.Array, example_ids: jax.Array, *, eps,
                bounds: Tuple[float, float] = (0.0, 1.0)) -> State:
  """The start of every point (``stripe_signs`` by example id), points
  misclassified when clean marked done (margin -1): traceable, for a
  sharded program (``auto_attack``)."""
  clean = margin(logits_fn(x), labels) > 0.0
  stripes = stripe_signs(key, example_ids, x.shape[2], x.shape[3], x.dtype)
  state = start(logits_fn, x, labels, stripes, eps=eps, bounds=bounds)
  return state._replace(margin_min=jnp.where(clean, state.margin_min, -1.0))


def padded_sides(num_queries: int, height: int, width: int,
                 segment: int = SEGMENT, p_init: float = P_INIT
                 ) -> np.ndarray:
  """``window_sides`` padded with side-0 windows (no change) to a whole
  number of segments."""
  sides = window_sides(num_queries, height, width, p_init)
  return np.pad(sides, (0, -num_queries % segment))


def segment_queries(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array,
                    state: State, key: jax.Array, first, sides: jax.Array,
                    *, segment: int = SEGMENT, eps,
                    bounds: Tuple[float, float] = (0.0, 1.0)) -> State:
  """Queries ``first`` .. ``first + segment - 1`` (``first`` traced; one
  compiled program for every segment), drawn from ``key`` by query index
  (``query_draws``); ``sides``: ``padded_sides``."""
  window = jax.lax.dynamic_slice(sides, (first,), (segment,))
  corners, signs = query_draws(key, first, segment, window, x.shape[1:],
                               x.dtype)
  return run_queries(logits_fn, x, labels, state, window, corners, signs,
                     eps=eps, bounds=bounds)


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
  # x and the labels are arguments, not constants baked into the program.
  segment_fn = jax.jit(lambda v, y, s, a, b, c: run_queries(
      logits_fn, v, y, s, a, b, c, eps=eps, bounds=bounds))
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
    state = segment_fn(x, labels, state, sides[lo:hi], corners[lo:hi],
                       signs[lo:hi])
  x_adv = jnp.where(clean.reshape((-1,) + (1,) * (x.ndim - 1)),
                    state.x_best, x)
  robust = np.asarray(clean & (state.margin_min > 0.0))
  return robust, x_adv
