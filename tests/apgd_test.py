"""Tests of uta_jax.apgd against its formulas, its invariants and the reference.

The agreement with the reference ``pyautoattack`` (through the bridge) on a
trained model lives in ``autoattack_agreement_test.py``.
"""

import functools
import math

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uta_jax import apgd
from uta_jax import data
from uta_jax import models

from testutil import require, trained_mlp  # pylint: disable=g-bad-import-order

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator


def paper_checkpoints(num_steps):
  """Iterations after which APGD checks, from p_j of Croce & Hein (2020)."""
  p = [0.0, 0.22]
  while True:
    nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
    if nxt > 1:
      break
    p.append(nxt)
  # The check after ceil(p_j N) iterations ends iteration ceil(p_j N) - 1.
  return [math.ceil(round(q * num_steps, 6)) - 1 for q in p[1:]]


class LossTest(chex.TestCase):

  def test_targeted_dlr_matches_its_formula(self):
    logits = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    labels = np.arange(16) % 10
    targets = (labels + 3) % 10
    got = np.asarray(apgd.targeted_dlr_loss(jnp.asarray(logits),
                                            jnp.asarray(labels),
                                            jnp.asarray(targets)))
    for i in range(16):
      z = np.sort(logits[i])[::-1]  # descending: z[0] = pi_1
      want = -(logits[i, labels[i]] - logits[i, targets[i]]) / (
          z[0] - 0.5 * (z[2] + z[3]) + 1e-12)
      self.assertAlmostEqual(got[i], want, places=5)

  def test_untargeted_dlr_matches_its_formula(self):
    logits = np.random.default_rng(1).normal(size=(16, 10)).astype(np.float32)
    labels = np.argmax(logits, -1)
    labels[::2] = (labels[::2] + 1) % 10  # half misclassified
    got = np.asarray(apgd.dlr_loss(jnp.asarray(logits), jnp.asarray(labels)))
    for i in range(16):
      z = np.sort(logits[i])[::-1]
      best_other = np.max(np.delete(logits[i], labels[i]))
      want = -(logits[i, labels[i]] - best_other) / (z[0] - z[2] + 1e-12)
      self.assertAlmostEqual(got[i], want, places=5)

  def test_top_targets_are_the_second_to_tenth_largest_classes(self):
    logits = jnp.asarray([[0., 9., 1., 8., 2., 7., 3., 6., 4., 5.]])
    np.testing.assert_array_equal(
        np.asarray(apgd.top_targets(logits))[:, 0], [3, 5, 7, 9, 8, 6, 4, 2, 0])


class ScheduleTest(absltest.TestCase):

  def test_checkpoints_follow_the_paper_formula(self):
    iterations = [i for i, _ in apgd.checkpoints(100)]
    self.assertEqual(iterations, [21, 40, 56, 69, 79, 86, 92, 98])
    self.assertEqual(iterations, paper_checkpoints(100))

  def test_windows_shrink_to_six_percent(self):
    self.assertEqual([w for _, w in apgd.checkpoints(100)],
                     [22, 19, 16, 13, 10, 7, 6, 6])
    # The window is the distance from the previous checkpoint.
    points = apgd.checkpoints(100)
    for (i0, _), (i1, w1) in zip(points, points[1:]):
      self.assertEqual(i1 - i0, w1)


class HalvingTest(absltest.TestCase):

  def halve(self, rises, **kwargs):
    args = dict(window=10, loss_best=jnp.asarray([5.0, 5.0]),
                loss_best_last_check=jnp.asarray([1.0, 1.0]),
                reduced_last_check=jnp.asarray([True, True]))
    args.update(kwargs)
    return np.asarray(apgd.halve_step(jnp.asarray(rises), **args))

  def test_halves_when_the_loss_rose_in_at_most_rho_of_the_window(self):
    # rho * window = 7.5: 7 rises halve, 8 do not.
    np.testing.assert_array_equal(self.halve([7, 8]), [True, False])
    np.testing.assert_array_equal(self.halve([0, 10]), [True, False])

  def test_halves_when_not_halved_last_time_and_no_improvement(self):
    got = self.halve([10, 10], loss_best=jnp.asarray([3.0, 3.0]),
                     loss_best_last_check=jnp.asarray([3.0, 2.0]),
                     reduced_last_check=jnp.asarray([False, False]))
    np.testing.assert_array_equal(got, [True, False])
    # Halved at the last check: no halving for the stall alone.
    got = self.halve([10, 10], loss_best=jnp.asarray([3.0, 3.0]),
                     loss_best_last_check=jnp.asarray([3.0, 2.0]),
                     reduced_last_check=jnp.asarray([True, True]))
    np.testing.assert_array_equal(got, [False, False])

  def test_rise_counter_equals_the_reference_history_count(self):
    """The running count equals the reference's count over its loss history
    ``loss_steps`` [N, B], whose row -1 before the first write is zero."""
    rng = np.random.default_rng(0)
    n = 100
    losses = rng.normal(size=(n, 3)).astype(np.float32)
    losses[:, 2] = np.abs(losses[:, 2])  # positive: row 0 rises over zero
    history = np.zeros((n, 3), np.float32)  # the reference's loss_steps
    rises = jnp.zeros(3, jnp.int32)
    previous = jnp.zeros(3, jnp.float32)
    points = dict(apgd.checkpoints(n))
    for i in range(n):
      history[i] = losses[i]
      rises = apgd.count_rise(rises, jnp.asarray(losses[i]), previous)
      previous = jnp.asarray(losses[i])
      if i in points:
        k = points[i]
        reference = sum((history[i - c] > history[i - c - 1]).astype(int)
                        for c in range(k))  # index -1 wraps, as in torch
        np.testing.assert_array_equal(np.asarray(rises), reference)
        rises = jnp.zeros(3, jnp.int32)


class AttackTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = models.MLP()
    cls.variables = models.init_variables(cls.model, jax.random.PRNGKey(0),
                                          (28, 28, 1))
    rng = np.random.default_rng(0)
    cls.x = jnp.asarray(rng.uniform(size=(12, 28, 28, 1)).astype(np.float32))
    cls.y = jnp.asarray(np.argmax(np.asarray(
        cls.model.apply(cls.variables, cls.x)), -1))  # all correct

  def logits_fn(self, x):
    return self.model.apply(self.variables, x)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stays_in_the_ball_and_the_box(self):
    run = self.variant(lambda x, y, key: apgd.apgd_ce(
        self.logits_fn, x, y, eps=0.1, key=key, num_steps=10))
    robust, x_adv = run(self.x, self.y, jax.random.key(0))
    chex.assert_shape(robust, (12,))
    self.assertLessEqual(float(jnp.max(jnp.abs(x_adv - self.x))), 0.1 + 1e-6)
    self.assertGreaterEqual(float(jnp.min(x_adv)), 0.0)
    self.assertLessEqual(float(jnp.max(x_adv)), 1.0)
    # Non-robust points are misclassified where they are returned; robust
    # ones come back as the clean point.
    pred = np.argmax(np.asarray(self.logits_fn(x_adv)), -1)
    robust = np.asarray(robust)
    np.testing.assert_array_equal(pred[~robust] != np.asarray(self.y)[~robust],
                                  True)
    np.testing.assert_array_equal(np.asarray(x_adv)[robust],
                                  np.asarray(self.x)[robust])

  def test_random_start_is_on_the_ball_surface_per_example(self):
    x = jnp.full((3, 4, 4, 1), 0.5)
    start = apgd.random_start(jax.random.key(0), x, eps=0.1)
    np.testing.assert_allclose(
        np.max(np.abs(np.asarray(start - x)).reshape(3, -1), 1), 0.1,
        rtol=1e-5)
    # Example i draws from fold_in(key, id): the same id, the same start.
    again = apgd.random_start(jax.random.key(0), x[1:2], eps=0.1,
                              example_ids=jnp.asarray([1]))
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(start[1]))

  def test_same_key_same_result_other_key_other_start(self):
    run = jax.jit(lambda key: apgd.apgd_ce(self.logits_fn, self.x, self.y,
                                           eps=0.3, key=key, num_steps=5))
    chex.assert_trees_all_equal(run(jax.random.key(1)),
                                run(jax.random.key(1)))
    start = lambda k: apgd.random_start(k, self.x, eps=0.3)
    self.assertFalse(np.array_equal(start(jax.random.key(1)),
                                    start(jax.random.key(2))))

  def test_an_example_does_not_depend_on_its_batch(self):
    run = jax.jit(lambda x, y, ids: apgd.apgd_t(
        self.logits_fn, x, y, eps=0.2, key=jax.random.key(0), num_steps=8,
        example_ids=ids))
    whole = run(self.x, self.y, jnp.arange(12))
    half = run(self.x[6:], self.y[6:], jnp.arange(6, 12))
    np.testing.assert_array_equal(np.asarray(whole[0])[6:],
                                  np.asarray(half[0]))

  @pytest.mark.slow  # APGD-T compiled for the vmapped targets and per target
  def test_vmapped_targets_equal_a_loop_over_targets(self):
    key = jax.random.key(3)
    robust, _ = apgd.apgd_t(self.logits_fn, self.x, self.y, eps=0.2, key=key,
                            num_targets=4, num_steps=8)
    targets = apgd.top_targets(self.logits_fn(self.x), 4)
    looped = np.ones(12, bool)
    for t in range(4):
      r, _ = apgd.apgd(self.logits_fn, self.x, self.y, eps=0.2,
                       key=jax.random.fold_in(key, t), loss='dlr-targeted',
                       targets=targets[t], num_steps=8)
      looped &= np.asarray(r)
    np.testing.assert_array_equal(np.asarray(robust), looped)

  def test_stronger_than_its_random_start_and_monotone_in_eps(self):
    key = jax.random.key(0)
    accs = []
    for eps in (0.02, 0.1, 0.3):
      robust, _ = apgd.apgd_ce(self.logits_fn, self.x, self.y, eps=eps,
                               key=key, num_steps=20)
      accs.append(float(np.mean(robust)))
    self.assertEqual(accs, sorted(accs, reverse=True))
    self.assertEqual(accs[-1], 0.0)  # an untrained MLP at eps 0.3

  def test_bad_arguments_are_refused(self):
    with self.assertRaisesRegex(ValueError, 'unknown APGD loss'):
      apgd.apgd(self.logits_fn, self.x, self.y, eps=0.1,
                key=jax.random.key(0), loss='hinge')
    with self.assertRaisesRegex(ValueError, 'needs targets'):
      apgd.apgd(self.logits_fn, self.x, self.y, eps=0.1,
                key=jax.random.key(0), loss='dlr-targeted')
    three = lambda x: self.logits_fn(x)[:, :3]
    with self.assertRaisesRegex(ValueError, 'at least 4 classes'):
      apgd.apgd_t(three, self.x, self.y % 3, eps=0.1, key=jax.random.key(0))


class ReferenceReplayTest(absltest.TestCase):
  """The reference APGD-CE's own random starts, recorded and replayed: the
  same points fooled at the same adversarial images (the agreement in
  distribution, JAX's own draws, is ``autoattack_agreement_test``'s)."""

  def test_replayed_starts_give_the_reference_result(self):
    torch = require('torch')
    auto_attack = require('uta_jax.auto_attack')
    torch_bridge = require('uta_jax.torch_bridge')
    require('pyautoattack')
    model, variables, logits_fn, test = trained_mlp(96)
    x, y, eps = data.to_float(test.images), test.labels, 0.08
    module = torch_bridge.bridge_module(model.apply, variables)
    x_nchw = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
    # Two batches, each reseeded (as AutoAttack runs it).
    ref_robust, noise = auto_attack.reference_apgd_ce(
        module, x_nchw, torch.from_numpy(y.astype(np.int64)), eps=eps,
        batch_size=48)
    clean = np.argmax(np.asarray(logits_fn(jnp.asarray(x))), -1) == y
    attacked = np.abs(noise).reshape(len(y), -1).max(1) > 0
    np.testing.assert_array_equal(attacked, clean)
    robust, _ = jax.jit(functools.partial(apgd.apgd_ce, logits_fn, eps=eps))(
        jnp.asarray(x), jnp.asarray(y), key=jax.random.key(0),
        noise=jnp.asarray(np.transpose(noise, (0, 2, 3, 1))))
    robust = np.asarray(robust) & clean
    self.assertGreater(clean.sum() - ref_robust.sum(), 10)  # it fools some
    self.assertGreater(ref_robust.sum(), 10, clean.sum())  # and not all
    np.testing.assert_array_equal(robust, ref_robust)


if __name__ == '__main__':
  absltest.main()
