"""Tests of uta_jax.toy: the 2D data set, grid, oscillation and crossing."""

from absl.testing import absltest
import numpy as np

from uta_jax import toy


class ToyTest(absltest.TestCase):

  def test_gaps_differ_between_the_regions(self):
    x, y = toy.make_toy2d(2000, seed=0)
    left = x[:, 0] < 0
    for region, gap in ((left, toy.NEAR_GAP), (~left, toy.FAR_GAP)):
      above = x[region & (y == 0), 1].mean()
      below = x[region & (y == 1), 1].mean()
      self.assertAlmostEqual(above - below, gap, delta=0.02)

  def test_blobs_are_gaussians_a_quarter_of_their_gap_wide(self):
    x, y = toy.make_toy2d(20000, seed=1, near_gap=0.4, far_gap=1.0,
                          shape='blobs')
    left = x[:, 0] < 0
    for region, gap, centre in ((left, 0.4, -1.75), (~left, 1.0, 1.75)):
      for label, sign in ((0, 1), (1, -1)):
        points = x[region & (y == label)]
        np.testing.assert_allclose(points.mean(0), [centre, sign * gap / 2],
                                   atol=0.03)
        np.testing.assert_allclose(points.std(0), [gap / 4, gap / 4],
                                   rtol=0.05)
    with self.assertRaisesRegex(ValueError, 'unknown toy shape'):
      toy.make_toy2d(10, seed=0, shape='rings')

  def test_region_accuracy_splits_at_x_zero(self):
    points = np.array([[-1, 0], [-2, 0], [1, 0], [2, 0]], np.float32)
    acc = toy.region_accuracy(points, [0, 1, 1, 1], [0, 0, 1, 0])
    self.assertEqual(acc, {'near': 50.0, 'far': 50.0})

  def test_grid_is_row_major_from_lo(self):
    g = toy.grid((-1.0, 0.0), (1.0, 2.0), 3)
    np.testing.assert_allclose(g[:3], [[-1, 0], [0, 0], [1, 0]])
    np.testing.assert_allclose(g[-1], [1, 2])
    self.assertEqual(g.shape, (9, 2))

  def test_oscillation_counts_count_changes_between_updates(self):
    predictions = np.array([[0, 1, 1],
                            [1, 1, 0],
                            [0, 1, 0],
                            [0, 1, 1]])
    np.testing.assert_array_equal(toy.oscillation_counts(predictions),
                                  [2, 0, 2])
    self.assertEqual(toy.oscillation_counts(predictions[:1]).sum(), 0)

  def test_crossing_fraction(self):
    self.assertAlmostEqual(toy.crossing_fraction([0, 1, 1, 0], [1, 1, 0, 0]),
                           0.5)


if __name__ == '__main__':
  absltest.main()
