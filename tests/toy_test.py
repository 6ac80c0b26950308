"""Tests of uta_jax.toy: the 2D data set and the toy's measurements; the
two-class identity that makes one step of UTA and of PGD the same."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import attacks
from uta_jax import toy
from uta_jax import uncertainty


class DataTest(absltest.TestCase):

  def test_gaps_differ_between_the_regions(self):
    x, y, near = toy.make_toy2d(2000, seed=0)
    for region, gap in ((near, toy.NEAR_GAP), (~near, toy.FAR_GAP)):
      above = x[region & (y == 0), 1].mean()
      below = x[region & (y == 1), 1].mean()
      self.assertAlmostEqual(above - below, gap, delta=0.02)

  def test_regions_are_the_drawn_clusters(self):
    x, _, near = toy.make_toy2d(2000, seed=0, shape='blobs', near_gap=0.3,
                                far_gap=3.0)
    # Blobs of the far region spill over x = 0; membership does not.
    self.assertTrue(np.all(np.abs(x[near, 0] - toy.NEAR_CENTRE_X) < 2))
    self.assertBetween(near.mean(), 0.45, 0.55)

  def test_spreads_are_set_per_region(self):
    x, y, near = toy.make_toy2d(40000, seed=1, near_gap=0.4, far_gap=1.0,
                                near_spread=0.02, far_spread=0.1,
                                shape='blobs')
    for region, gap, sd, centre in ((near, 0.4, 0.02, toy.NEAR_CENTRE_X),
                                    (~near, 1.0, 0.1, 1.75)):
      for label, sign in ((0, 1), (1, -1)):
        points = x[region & (y == label)]
        np.testing.assert_allclose(points.mean(0), [centre, sign * gap / 2],
                                   atol=0.01)
        np.testing.assert_allclose(points.std(0), [sd, sd], rtol=0.05)
    strips, labels, near = toy.make_toy2d(40000, seed=2, near_spread=0.03)
    across = strips[near & (labels == 0), 1]
    self.assertAlmostEqual(across.std(), 0.03, delta=0.002)
    with self.assertRaisesRegex(ValueError, 'unknown toy shape'):
      toy.make_toy2d(10, seed=0, shape='rings')
    with self.assertRaisesRegex(ValueError, 'non-negative spread'):
      toy.make_toy2d(10, seed=0, near_spread=-1.0)

  def test_default_blob_spread_is_a_quarter_of_the_gap(self):
    x, y, near = toy.make_toy2d(40000, seed=3, near_gap=0.4, shape='blobs')
    self.assertAlmostEqual(x[near & (y == 0), 1].std(), 0.1, delta=0.005)

  def test_splits_and_seeds_are_independent_draws(self):
    train = toy.make_toy2d(64, seed=0)[0]
    test = toy.make_toy2d(64, seed=0, split='test')[0]
    next_train = toy.make_toy2d(64, seed=1)[0]
    self.assertFalse(np.allclose(train, test))
    self.assertFalse(np.allclose(test, next_train))
    np.testing.assert_array_equal(train, toy.make_toy2d(64, seed=0)[0])
    with self.assertRaisesRegex(ValueError, 'unknown toy split'):
      toy.make_toy2d(10, seed=0, split='valid')


class MeasurementsTest(absltest.TestCase):

  def test_region_accuracy_uses_membership(self):
    near = np.array([True, True, False, False])
    acc = toy.region_accuracy(near, [0, 1, 1, 1], [0, 0, 1, 0])
    self.assertEqual(acc, {'near': 50.0, 'far': 50.0})

  def test_grid_and_line(self):
    g = toy.grid((-1.0, 0.0), (1.0, 2.0), 3)
    np.testing.assert_allclose(g[:3], [[-1, 0], [0, 0], [1, 0]])
    np.testing.assert_allclose(g[-1], [1, 2])
    self.assertEqual(g.shape, (9, 2))
    line = toy.vertical_line(-1.75, -1.0, 1.0, 5)
    np.testing.assert_allclose(line[:, 0], -1.75)
    np.testing.assert_allclose(line[:, 1], [-1, -0.5, 0, 0.5, 1])

  def test_oscillation_counts_count_changes_between_updates(self):
    predictions = np.array([[0, 1, 1],
                            [1, 1, 0],
                            [0, 1, 0],
                            [0, 1, 1]])
    np.testing.assert_array_equal(toy.oscillation_counts(predictions),
                                  [2, 0, 2])
    self.assertEqual(toy.oscillation_counts(predictions[:1]).sum(), 0)

  def test_crossing_counts_clean_correct_points_against_the_label(self):
    labels = np.array([0, 0, 1, 1, 0])
    clean = np.array([0, 0, 1, 0, 0])  # point 3 misclassified when clean
    at_k = np.array([1, 1, 1, 1, 0])  # point 3 moved back: no crossing
    at_k1 = np.array([1, 0, 1, 1, 0])  # point 1 oscillates back
    self.assertAlmostEqual(toy.crossing_fraction(labels, clean, at_k), 0.5)
    self.assertAlmostEqual(toy.crossing_fraction(labels, clean, at_k, at_k1),
                           0.25)
    self.assertEqual(toy.crossing_fraction(labels, 1 - labels, at_k), 0.0)
    with self.assertRaisesRegex(ValueError, 'perturbed predictions'):
      toy.crossing_fraction(labels, clean)

  def test_boundary_offset_interpolates_the_crossing_nearest_zero(self):
    ys = np.linspace(-1, 1, 21)
    # P(class 1) falls through 1/2 at y = 0.25 (linear in y).
    np.testing.assert_allclose(
        toy.boundary_offset(ys, 0.5 - (ys - 0.25)), 0.25, atol=1e-9)
    # Two crossings, at -0.55 and 0.15 (midway between grid points).
    two = np.where((ys > -0.55) & (ys < 0.15), 0.9, 0.1)
    self.assertAlmostEqual(toy.boundary_offset(ys, two), 0.15, places=6)
    self.assertEqual(toy.boundary_offset(ys, np.full(21, 0.9)), 1.0)
    self.assertEqual(toy.boundary_offset(ys, np.full(21, 0.1)), -1.0)


class TwoClassIdentityTest(absltest.TestCase):
  """For two classes grad H = (z_y - z_other) p_y grad CE: the entropy and
  the cross-entropy rise in the same direction wherever the point is
  classified correctly, so one sign step of UTA equals one of PGD there."""

  def setUp(self):
    super().setUp()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w1 = jax.random.normal(k1, (2, 16))
    w2 = jax.random.normal(k2, (16, 2))
    self.logits_fn = lambda x: jnp.tanh(x @ w1) @ w2
    self.x = jax.random.normal(k3, (256, 2))
    self.y = jnp.argmax(self.logits_fn(self.x), -1)  # all correct
    self.y = self.y.at[:64].set(1 - self.y[:64])  # the first 64 wrong

  def test_entropy_gradient_is_the_cross_entropy_gradient_scaled(self):
    def ce(x, y):
      return -jax.nn.log_softmax(self.logits_fn(x))[y]
    def entropy(x):
      return uncertainty.entropy_from_log_probs(
          jax.nn.log_softmax(self.logits_fn(x)))
    g_ce = jax.vmap(jax.grad(ce))(self.x, self.y)
    g_h = jax.vmap(jax.grad(entropy))(self.x)
    z = self.logits_fn(self.x)
    z_y = jnp.take_along_axis(z, self.y[:, None], 1)[:, 0]
    p_y = jnp.exp(z_y - jax.nn.logsumexp(z, -1))
    scale = (2 * z_y - z.sum(-1)) * p_y  # (z_y - z_other) p_y
    np.testing.assert_allclose(g_h, scale[:, None] * g_ce, rtol=1e-4,
                               atol=1e-6)

  def test_one_step_of_uta_and_pgd_agree_on_correct_points_only(self):
    common = dict(eps=0.5, num_steps=1, step_size=0.5, bounds=None)
    x_pgd = attacks.pgd(self.logits_fn, self.x, self.y, **common)
    x_uta = attacks.uta(lambda v: self.logits_fn(v)[None], self.x, **common)
    np.testing.assert_allclose(x_uta[64:], x_pgd[64:], atol=1e-6)
    # On misclassified points the entropy climbs back towards the label.
    self.assertTrue(np.all(np.any(np.abs(x_uta[:64] - x_pgd[:64]) > 0.5,
                                  axis=1)))


if __name__ == '__main__':
  absltest.main()
