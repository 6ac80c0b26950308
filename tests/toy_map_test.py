"""Tests of experiments/toy2d_map.py's analysis: keep-frontiers and the
map's four rules on synthetic rows whose answers are known."""

import os
import sys

from absl.testing import absltest

from testutil import ROOT  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
# pylint: disable=g-import-not-at-top,g-bad-import-order
import toy2d_map

RATIOS = (0.25, 0.5, 0.75, 1.0, 1.5)


def rows(near_of, spreads=(1 / 16,), seeds=(0, 1, 2, 3, 4)):
  """Rows whose near accuracy is ``near_of(method, spread, ratio)`` plus a
  small seed wobble (paired: the same for every method of a seed)."""
  out = []
  for s in spreads:
    for r in RATIOS:
      for seed in seeds:
        wobble = 0.2 * (seed - 2)
        cell = {'shape': 'strips', 'spread': s, 'ratio': r, 'seed': seed,
                'near_points': 256}
        for m in ('standard', 'pgd', 'uta'):
          cell[m] = {'last_quarter': {'near': near_of(m, s, r) + wobble}}
        out.append(cell)
  return out


def by_frontier(uta_up_to, pgd_up_to):
  """Near accuracy 100 up to a method's frontier, 50 beyond it."""
  limit = {'standard': lambda s: 10.0, 'uta': uta_up_to, 'pgd': pgd_up_to}
  return lambda m, s, r: 100.0 if r <= limit[m](s) else 50.0


class FrontierTest(absltest.TestCase):

  def test_frontier_is_the_last_ratio_kept_at_every_smaller_one(self):
    cells = toy2d_map.rows_by(rows(by_frontier(lambda s: 0.75,
                                               lambda s: 0.25)))
    row = cells['strips', 1 / 16]
    self.assertEqual(toy2d_map.frontier(row, 'uta'), (0.75, 0.75, 1.0))
    self.assertEqual(toy2d_map.frontier(row, 'pgd'), (0.25, 0.25, 0.5))

  def test_a_tie_cell_leaves_the_frontier_open(self):
    # At 0.5 UTA-AT is 3 points below standard, on the margin: undecided.
    near = lambda m, s, r: (97.0 if (m, r) == ('uta', 0.5) else
                            100.0 if m != 'uta' or r < 0.75 else 50.0)
    row = toy2d_map.rows_by(rows(near))['strips', 1 / 16]
    kept, possible, lost = toy2d_map.frontier(row, 'uta')
    self.assertEqual((kept, possible, lost), (0.25, 0.5, 0.75))


class MapRulesTest(absltest.TestCase):

  KEYS = ('UTA-AT tolerates a larger eps', 'a large eps never hurts UTA-AT',
          'PGD-AT performs poorly', 'the frontiers follow the analysis')

  def outcomes(self, near, spreads=(1 / 16,)):
    found = toy2d_map.verdicts(rows(near, spreads))
    self.assertLen(found, len(self.KEYS))
    return {key: v['outcome'] for key in self.KEYS for v in found
            if key in v['claim']}

  def test_the_analysis_holds_when_frontiers_match_its_prediction(self):
    # Predictions for spread 1/16: UTA 0.875, PGD 0.375.
    near = by_frontier(lambda s: 0.75, lambda s: 0.25)
    got = self.outcomes(near)
    self.assertEqual(got['UTA-AT tolerates a larger eps'], 'holds')
    self.assertEqual(got['a large eps never hurts UTA-AT'], 'fails')
    self.assertEqual(got['PGD-AT performs poorly'], 'holds')
    self.assertEqual(got['the frontiers follow the analysis'], 'holds')

  def test_equal_frontiers_fail_the_comparative_rule(self):
    near = by_frontier(lambda s: 0.5, lambda s: 0.5)
    got = self.outcomes(near)
    self.assertEqual(got['UTA-AT tolerates a larger eps'], 'fails')
    self.assertEqual(got['the frontiers follow the analysis'], 'fails')

  def test_uta_keeping_everywhere_holds_the_strong_rule(self):
    near = by_frontier(lambda s: 9.0, lambda s: 0.25)
    got = self.outcomes(near)
    self.assertEqual(got['a large eps never hurts UTA-AT'], 'holds')
    self.assertEqual(got['UTA-AT tolerates a larger eps'], 'holds')
    # Kept to the end of the map: past the prediction of 0.875.
    self.assertEqual(got['the frontiers follow the analysis'], 'fails')

  def test_every_spread_row_must_hold(self):
    near = by_frontier(lambda s: 0.75 if s < 0.1 else 0.25, lambda s: 0.25)
    got = self.outcomes(near, spreads=(1 / 16, 1 / 4))
    self.assertEqual(got['UTA-AT tolerates a larger eps'], 'fails')


if __name__ == '__main__':
  absltest.main()
