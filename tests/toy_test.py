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
