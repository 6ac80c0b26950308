"""Tests of uta_jax.stats: the verdict rule's interval and outcomes."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats

from uta_jax import stats


class IntervalTest(parameterized.TestCase):

  def test_seeds_only_is_students_t_interval(self):
    # 3 seeds 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302652729911275.
    est = stats.interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)
    self.assertAlmostEqual(est.effect, 2.0)
    self.assertAlmostEqual(est.lo, 2.0 - half, places=9)
    self.assertAlmostEqual(est.hi, 2.0 + half, places=9)

  def test_identical_seeds_leave_the_binomial_normal_interval(self):
    # p = 0.5 on 400 points: variance 1e4 * 0.25 / 400 = 6.25 points^2.
    est = stats.accuracy([50.0, 50.0, 50.0], n=400)
    self.assertAlmostEqual(est.hi - est.effect, 1.959963984540054 * 2.5,
                           places=9)

  def test_satterthwaite_degrees_of_freedom(self):
    # s^2 / S = 1/3 and a test variance of 1/3: se^2 = 2/3 and
    # df = (2/3)^2 / ((1/3)^2 / 2) = 8, t(0.975, 8) = 2.306004135204166.
    est = stats.interval([1.0, 2.0, 3.0], test_variance=1 / 3)
    self.assertAlmostEqual(est.hi - 2.0, 2.306004135204166 * np.sqrt(2 / 3),
                           places=9)

  def test_one_seed_is_unbounded_and_inconclusive(self):
    est = stats.paired_difference([90.0], [10.0], n=10000)
    self.assertIsNone(est.lo)
    self.assertEqual(stats.outcome(est), 'inconclusive')
    self.assertEqual(est.text(), '+80.0 [?, ?]')

  def test_no_variance_at_all_is_a_point(self):
    est = stats.interval([9.7, 9.7, 9.7])
    self.assertEqual((est.lo, est.hi), (est.effect, est.effect))

  def test_bad_input_is_refused(self):
    with self.assertRaisesRegex(ValueError, 'paired seeds differ'):
      stats.paired_difference([1.0, 2.0], [1.0])
    with self.assertRaisesRegex(ValueError, 'at least one seed'):
      stats.interval([])
    with self.assertRaisesRegex(ValueError, 'side'):
      stats.outcome(stats.interval([1.0, 2.0]), side='>=')
    with self.assertRaisesRegex(ValueError, 'positive'):
      stats.binomial_variance(50.0, 0)


class UnpairedDifferenceTest(absltest.TestCase):
  """Welch's interval, against scipy's own t-test and a closed form."""

  def test_equals_scipys_welch_interval(self):
    rng = np.random.default_rng(0)
    a, b = rng.normal(38.0, 0.3, 10), rng.normal(37.8, 0.2, 7)
    est = stats.unpaired_difference(list(a), list(b))
    ref = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(
        0.95)
    self.assertAlmostEqual(est.effect, a.mean() - b.mean(), places=9)
    self.assertAlmostEqual(est.lo, ref.low, places=9)
    self.assertAlmostEqual(est.hi, ref.high, places=9)
    self.assertEqual(est.seeds, 7)

  def test_equal_spreads_and_sizes_closed_form(self):
    # 1, 2, 3 vs 0, 1, 2: difference 1, se^2 = 1/3 + 1/3, df = 4.
    est = stats.unpaired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    half = 2.7764451051977987 * np.sqrt(2 / 3)
    self.assertAlmostEqual(est.lo, 1.0 - half, places=9)
    self.assertAlmostEqual(est.hi, 1.0 + half, places=9)

  def test_no_spread_is_a_point_and_one_value_is_refused(self):
    est = stats.unpaired_difference([2.0, 2.0], [1.5, 1.5])
    self.assertEqual((est.effect, est.lo, est.hi), (0.5, 0.5, 0.5))
    with self.assertRaisesRegex(ValueError, '2 or more'):
      stats.unpaired_difference([1.0], [1.0, 2.0])


class OutcomeTest(parameterized.TestCase):
  """Synthetic cases: a tie, a large effect, the reverse."""

  def test_a_true_tie_is_inconclusive(self):
    # The embedded-MNIST case: 94.0/93.8/94.6 vs 94.4/93.4/94.4 on 500 points.
    est = stats.paired_difference([94.0, 93.8, 94.6], [94.4, 93.4, 94.4],
                                  n=500)
    self.assertEqual(stats.outcome(est, '>'), 'inconclusive')
    self.assertEqual(stats.outcome(est, '<'), 'inconclusive')

  def test_a_large_effect_holds_and_its_reverse_fails(self):
    uta, pgd = [57.6, 55.3, 56.5], [9.7, 9.7, 9.7]
    est = stats.paired_difference(uta, pgd, n=10000)
    self.assertEqual(stats.outcome(est, '>'), 'holds')
    self.assertEqual(stats.outcome(est, '<'), 'fails')
    reverse = stats.paired_difference(pgd, uta, n=10000)
    self.assertEqual(stats.outcome(reverse, '>'), 'fails')

  def test_a_threshold_claim(self):
    collapsed = stats.accuracy([9.7, 9.7, 9.8], n=10000)
    self.assertEqual(stats.outcome(collapsed, '<', 20.0), 'holds')
    self.assertEqual(stats.outcome(collapsed, '>', 20.0), 'fails')
    # Within 3 points of another model: effect > -3.
    close = stats.paired_difference([92.0, 92.2, 91.9], [92.1, 92.0, 92.3],
                                    n=10000)
    self.assertEqual(stats.outcome(close, '>', -3.0), 'holds')

  def test_conjunctions(self):
    self.assertEqual(stats.all_hold(['holds', 'holds']), 'holds')
    self.assertEqual(stats.all_hold(['holds', 'inconclusive']),
                     'inconclusive')
    self.assertEqual(stats.all_hold(['inconclusive', 'fails']), 'fails')
    with self.assertRaises(ValueError):
      stats.all_hold(['yes'])

  def test_a_conjunction_shows_its_weakest_part(self):
    strong = stats.paired_difference([80.0, 81.0, 82.0], [10.0, 10.0, 10.0],
                                     n=10000)
    tie = stats.paired_difference([50.0, 51.0, 50.5], [50.5, 50.0, 51.0],
                                  n=10000)
    below = stats.accuracy([9.7, 9.8, 9.7], n=10000)
    self.assertEqual(stats.conjunction([(strong, '>', 0), (tie, '>', 0)]),
                     ('inconclusive', 1))
    self.assertEqual(stats.conjunction([(below, '<', 20), (strong, '>', 0)]),
                     ('holds', 0))
    self.assertEqual(stats.margin(below, '<', 20), 20 - below.hi)


class CoverageTest(parameterized.TestCase):
  """The nominal 95% interval covers a known mean in 93-97% of draws."""

  @parameterized.product(
      seeds=(3, 5),
      # (test points, seed sd): the test set only, both, the seeds only.
      noise=((500, 0.0), (500, 1.5), (None, 2.0)))
  def test_coverage(self, seeds, noise):
    n, seed_sd = noise
    rng = np.random.default_rng(seeds * 100 + int(10 * seed_sd))
    pa, pb, draws, covered = 70.0, 65.0, 2000, 0
    for _ in range(draws):
      # The test sample's error is shared by every seed of a method; the
      # seed's data order and initialisation are shared by both methods.
      test_a, test_b = (rng.normal(0, np.sqrt(stats.binomial_variance(p, n)))
                        for p in (pa, pb))
      shared = rng.normal(0, seed_sd, seeds)
      a = pa + test_a + shared + rng.normal(0, seed_sd, seeds)
      b = pb + test_b + shared + rng.normal(0, seed_sd, seeds)
      est = stats.paired_difference(list(a), list(b), n=n)
      covered += est.lo <= pa - pb <= est.hi
    self.assertBetween(covered / draws, 0.93, 0.97)


if __name__ == '__main__':
  absltest.main()
