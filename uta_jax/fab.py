"""FAB-T (Croce & Hein, ICML 2020), L-inf, as AutoAttack's standard version
runs it, in JAX.

The reference is ``pyautoattack``'s ``fab_base.py`` / ``fab_pt.py`` with
``fab_projections.projection_linf`` (targeted, one restart, so no random
start: deterministic; 100 iterations; ``alpha_max`` 0.1, ``eta`` 1.05,
``beta`` 0.9; targets the 2nd to 10th largest clean logits in turn, each on
the points no earlier target fooled within eps). One iteration, per point:

* linearise f = z_t - z_y at the current point x1 (value and input
  gradient g): the hyperplane {v: <g, v> = <g, x1> - f};
* project x1 and the clean x onto it within the [0, 1] box
  (``projection_linf``: sort, cumulative sums and a bisection per row);
* step to the convex combination (weight alpha = min(|d1| / (|d1| + |d2|),
  alpha_max), with the ``1e-8`` floor) of x1 + eta d1 and x + eta d2,
  clipped to the box;
* once it is misclassified (untargeted success), keep it if its L-inf
  distance beats the best so far, and pull x1 back towards x by beta.

eps enters only in the final check (fooled when the best distance is at
most eps), so ``fab_t`` runs every target on every point once and
``FabResult.robust_at`` answers for any eps: a point counts as fooled by
the first target whose best distance is within eps, as the reference's
sequence over targets would have it. Fixed shapes, per-point masks, one
``lax.fori_loop`` of static length per target.

  >>> result = fab.fab_t(logits_fn, x, y)
  >>> robust, x_adv = result.robust_at(0.1)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]  # x [B, ...] -> logits [B, K]

NUM_STEPS = 100  # the standard AutoAttack's n_iter
NUM_TARGETS = 9  # the 2nd .. 10th largest clean logits
ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9
NOT_FOUND = 1e10  # the reference's distance of a point not yet fooled
_ONE_BITS = 0x3F800000  # float32 1.0's bits: p in [0, 1] has bits <= it


def projection_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """The smallest L-inf step d [N, D] from each row of ``t`` [N, D] (in
  [0, 1]) onto the hyperplane <w, v> = b (``w`` [N, D], ``b`` [N]) with
  t + d kept in the box, as the reference computes it (its guards and its
  strict and non-strict comparisons kept); rows are independent.

  The reference sorts p (each coordinate's distance to its box face) and
  bisects over the sorted index k for the last k whose test
  b - (sb_k - s_k p_k) > 0 holds, sb_k - s_k p_k being
  b0 + sum over the k largest p of |w| (p - p_k). That sum depends on p_k's
  value only (a tie adds |w| * 0), so here the bisection runs over the value
  itself, as float32 bits (p >= 0, so the bits order as the values): the
  test at v, a masked sum of |w| (p - v) over p >= v, is monotone in v also
  in float arithmetic, and 30 halvings of [0, 1.0]'s bits find the smallest
  p where it holds exactly; the step then uses every p at or above it. No
  sort and no gather: 3x faster on XLA:CPU than the sort-and-bisect form.
  """
  sign = jnp.where(jnp.sum(w * t, 1) - b >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  b = b * sign
  a = (w < 0).astype(t.dtype)
  nonzero = (w != 0).astype(t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2 * a - 1) + 0.0  # in [0, 1]; + 0.0 turns -0.0 into 0.0
  b = b - jnp.sum(w * t, 1)
  b0 = jnp.sum(w * d, 1)
  absw = jnp.abs(w)
  bw = -w * d  # = |w| p
  s_last = jnp.sum(absw, 1)
  sb_last = jnp.sum(bw, 1) + b0
  b2 = sb_last - s_last * jnp.min(p, 1)
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & ~c_l

  def holds(v):  # the reference's test at the k largest p, p_k = v [N]
    above = jnp.where(p >= v[:, None], absw * (p - v[:, None]), 0.0)
    return b - b0 - jnp.sum(above, 1) > 0

  # Bits of the smallest value where the test holds: in (lo, hi]. It holds
  # at 1.0 (and at max p: an empty or all-zero sum) wherever c2 does.
  lo = jnp.zeros(b.shape, jnp.int32)
  hi = jnp.full(b.shape, _ONE_BITS, jnp.int32)
  for _ in range(_ONE_BITS.bit_length()):
    mid = lo + (hi - lo) // 2
    ok = holds(jax.lax.bitcast_convert_type(mid, t.dtype))
    hi = jnp.where(ok, mid, hi)
    lo = jnp.where(ok, lo, mid)
  threshold = jax.lax.bitcast_convert_type(hi, t.dtype)
  p_k = jnp.min(jnp.where(p >= threshold[:, None], p, 2.0), 1)
  incl = p >= p_k[:, None]  # the k largest, whole tie groups
  sb_k = jnp.sum(jnp.where(incl, bw, 0.0), 1) + b0
  s_k = jnp.sum(jnp.where(incl, absw, 0.0), 1)
  lmbd_l = jnp.maximum((b - sb_last) / (-s_last), 0.0)
  d_l = (2 * a - 1) * lmbd_l[:, None]
  lmbd_2 = jnp.maximum((b - sb_k) / (-s_k), 0.0)[:, None]
  d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nonzero


def _flat(v: jax.Array) -> jax.Array:
  return v.reshape(v.shape[0], -1)


def targeted_run(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array,
                 targets: jax.Array, *, num_steps: int = NUM_STEPS,
                 alpha_max: float = ALPHA_MAX, eta: float = ETA,
                 beta: float = BETA) -> Tuple[jax.Array, jax.Array]:
  """One target's run from the clean points: (best L-inf distance [B],
  ``NOT_FOUND`` where never misclassified; its point [B, ...], x there)."""
  def f_of(v):  # z_t - z_y summed: its gradient is each point's own
    z = logits_fn(v)
    f = (jnp.take_along_axis(z, targets[:, None], 1) -
         jnp.take_along_axis(z, labels[:, None], 1))[:, 0]
    return jnp.sum(f), f

  grad_f = jax.grad(f_of, has_aux=True)
  x0 = _flat(x)

  def body(_, state):
    x1, adv, res = state
    g, f = grad_f(x1)
    w = _flat(g)
    b = -f + jnp.sum(w * _flat(x1), 1)
    d3 = projection_linf(jnp.concatenate([_flat(x1), x0]),
                         jnp.concatenate([w, w]), jnp.concatenate([b, b]))
    d1 = d3[:x.shape[0]].reshape(x.shape)
    d2 = d3[x.shape[0]:].reshape(x.shape)
    a0 = jnp.maximum(jnp.max(jnp.abs(d3), 1), 1e-8)
    a1, a2 = a0[:x.shape[0]], a0[x.shape[0]:]
    alpha = jnp.minimum(jnp.maximum(a1 / (a1 + a2), 0.0), alpha_max)
    alpha = alpha.reshape((-1,) + (1,) * (x.ndim - 1))
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha,
                  0.0, 1.0)
    is_adv = jnp.argmax(logits_fn(x1), -1) != labels
    dist = jnp.max(jnp.abs(_flat(x1 - x)), 1)
    better = is_adv & (dist < res)
    expand = lambda m: m.reshape((-1,) + (1,) * (x.ndim - 1))
    adv = jnp.where(expand(better), x1, adv)
    res = jnp.where(better, dist, res)
    x1 = jnp.where(expand(is_adv), x + (x1 - x) * beta, x1)
    return x1, adv, res

  init = (x, x, jnp.full((x.shape[0],), NOT_FOUND, x.dtype))
  _, adv, res = jax.lax.fori_loop(0, num_steps, body, init)
  return res, adv


class FabResult(NamedTuple):
  """FAB-T of every target on every point: ``distances`` [T, B] (best L-inf
  distance per target, ``NOT_FOUND`` if none), ``points`` [T, B, ...], and
  ``clean`` [B] (correct when clean: the only points attacked)."""
  distances: np.ndarray
  points: np.ndarray
  clean: np.ndarray
  x: np.ndarray

  def robust_at(self, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """(robust [B], x_adv [B, ...]) at ``eps``: a point is fooled by the
    first target (in the reference's order) whose best distance is at most
    eps; its point is that target's."""
    fooled = (self.distances <= eps) & self.clean[None]  # [T, B]
    any_fooled = fooled.any(0)
    first = np.argmax(fooled, 0)
    x_adv = np.where(
        any_fooled.reshape((-1,) + (1,) * (self.x.ndim - 1)),
        self.points[first, np.arange(len(first))], self.x)
    return self.clean & ~any_fooled, x_adv


def target_classes(logits: jax.Array, num_targets: int = NUM_TARGETS
                   ) -> jax.Array:
  """[T, B]: the 2nd .. (T+1)-th largest class of each point's logits."""
  order = jnp.argsort(logits, axis=-1)  # ascending, as torch's sort
  return jnp.stack([order[:, -k] for k in range(2, num_targets + 2)])


def fab_t_at(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, eps, *,
             num_targets: int = NUM_TARGETS, num_steps: int = NUM_STEPS
             ) -> Tuple[jax.Array, jax.Array]:
  """(robust [B], x_adv) of FAB-T at ``eps``, traceable (the targets run
  side by side, ``jax.vmap``): what ``fab_t(...).robust_at(eps)`` gives."""
  logits = logits_fn(x)
  clean = jnp.argmax(logits, -1) == labels
  distances, points = jax.vmap(lambda t: targeted_run(
      logits_fn, x, labels, t, num_steps=num_steps))(
          target_classes(logits, num_targets))  # [T, B], [T, B, ...]
  fooled = (distances <= eps) & clean[None]
  hit = fooled.any(0)
  first = jnp.argmax(fooled, 0)
  chosen = points[first, jnp.arange(x.shape[0])]
  x_adv = jnp.where(hit.reshape((-1,) + (1,) * (x.ndim - 1)), chosen, x)
  return clean & ~hit, x_adv


def fab_t(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, *,
          num_targets: int = NUM_TARGETS, num_steps: int = NUM_STEPS
          ) -> FabResult:
  """FAB-T on ``x`` [B, ...] in [0, 1]: every target, every point (eps is
  applied by ``FabResult.robust_at``)."""
  logits = logits_fn(x)
  if logits.shape[-1] < num_targets + 1:
    raise ValueError(f'FAB-T with {num_targets} targets needs at least '
                     f'{num_targets + 1} classes, got {logits.shape[-1]}')
  clean = jnp.argmax(logits, -1) == labels
  # x and the labels are arguments, not constants baked into the program.
  run = jax.jit(lambda v, y, t: targeted_run(logits_fn, v, y, t,
                                             num_steps=num_steps))
  distances, points = [], []
  for targets in target_classes(logits, num_targets):  # in the ref's order
    res, adv = run(x, labels, targets)
    distances.append(np.asarray(res))
    points.append(np.asarray(adv))
  return FabResult(np.stack(distances), np.stack(points), np.asarray(clean),
                   np.asarray(x))
