"""Tests of uta_jax.claims: verdict records, their tables, conjunctions."""

from absl.testing import absltest

from uta_jax import claims
from uta_jax import stats


class VerdictTest(absltest.TestCase):

  def test_a_record_and_its_table(self):
    est = stats.paired_difference([60.0, 62.0, 61.0], [50.0, 51.0, 52.0],
                                  n=10000)
    v = claims.verdict('c', 'r', 's', est, stats.outcome(est), 'e')
    self.assertEqual(v['outcome'], 'holds')
    self.assertAlmostEqual(v['effect'], 10.0)
    self.assertEqual(claims.interval_text(v), est.text())
    self.assertIn(f'| c | r | s | {est.text()} | holds | e |',
                  claims.verdicts_markdown([v]))
    unsigned = claims.verdict('c', 'r', 's', stats.accuracy([9.7, 9.8]),
                              'holds', 'e', signed=False)
    self.assertFalse(claims.interval_text(unsigned).startswith('+'))

  def test_outcomes_are_marked(self):
    self.assertEqual([claims.outcome_text({'outcome': o})
                      for o in stats.OUTCOMES],
                     ['holds', '**fails**', '*inconclusive*'])

  def test_carry_previous_takes_old_yes_no_or_the_carried_one(self):
    new = [{'claim': 'a', 'outcome': 'holds'},
           {'claim': 'b', 'outcome': 'fails'},
           {'claim': 'c', 'outcome': 'inconclusive'}]
    old = [{'claim': 'a', 'holds': False},  # the rule before stats
           {'claim': 'b', 'outcome': 'fails', 'previous': True}]
    carried = claims.carry_previous(new, old)
    self.assertEqual([v.get('previous') for v in carried],
                     [False, True, None])
    self.assertEqual([claims.previous_text(v) for v in carried],
                     ['no', 'yes', ''])
    self.assertEqual(claims.carry_previous(new, None), new)

  def test_paired_rows_keep_shared_seeds_in_order(self):
    a = [{'seed': 2, 'x': 'a2'}, {'seed': 0, 'x': 'a0'}, {'seed': 5}]
    b = [{'seed': 0, 'x': 'b0'}, {'seed': 2, 'x': 'b2'}]
    left, right = claims.paired_rows(a, b)
    self.assertEqual([r['x'] for r in left], ['a0', 'a2'])
    self.assertEqual([r['x'] for r in right], ['b0', 'b2'])

  def test_every_shows_the_weakest_part_and_lists_all(self):
    strong = stats.paired_difference([80.0, 81.0, 82.0], [10.0, 10.0, 10.0],
                                     n=10000)
    tie = stats.paired_difference([50.0, 51.0, 50.5], [50.5, 50.0, 51.0],
                                  n=10000)
    v = claims.every('c', 'r', [('0.1', 'd', strong, '>', 0),
                                ('0.4', 'd', tie, '>', 0)])
    self.assertEqual(v['outcome'], 'inconclusive')
    self.assertEqual(v['statistic'], 'd (0.4, the weakest)')
    self.assertAlmostEqual(v['effect'], tie.effect, places=3)
    self.assertEqual(v['evidence'],
                     f'0.1: {strong.text()}; 0.4: {tie.text()}')


if __name__ == '__main__':
  absltest.main()
