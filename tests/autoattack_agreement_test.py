"""experiments/autoattack_agreement.py: its bounds (written before its run)
and its committed result within them."""

import json
import os
import sys

from absl.testing import absltest

from testutil import ROOT  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import agreement_diagnostics  # pylint: disable=g-import-not-at-top,g-bad-import-order
import autoattack_agreement  # pylint: disable=g-import-not-at-top,g-bad-import-order

ATTACKS = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
BOUND = autoattack_agreement.BOUNDS['accuracy_points']


def row(jax=(60.0, 50.0, 49.0, 48.0), ref=(60.0, 50.0, 49.0, 48.0),
        square_jax=48.0, square_ref=(47.9, 48.0, 48.2, 48.1, 48.0),
        jax_only=0, attacked=490):
  return {'jax_per_attack': dict(zip(ATTACKS, jax)),
          'reference_per_attack': dict(zip(ATTACKS, ref)),
          'jax_robust_accuracy': jax[-1], 'reference_robust_accuracy': ref[-1],
          'square_jax_accuracy': square_jax,
          'square_reference_accuracy': list(square_ref),
          'square_jax_only_robust': jax_only, 'square_attacked': attacked}


class BoundsTest(absltest.TestCase):

  def test_agreement_within_the_bounds_passes(self):
    self.assertTrue(all(autoattack_agreement.checks(row()).values()))
    # At the edges: 0.5 points, the seeds' range + 0.3, 0.3% of 1,000.
    edge = row(jax=(60.5, 50.0, 49.0, 48.5), square_jax=48.5,
               jax_only=3, attacked=1000)
    self.assertTrue(all(autoattack_agreement.checks(edge).values()))

  def test_each_bound_can_fail(self):
    checks = autoattack_agreement.checks
    self.assertFalse(checks(row(jax=(60.0, 50.6, 49.0, 48.0)))
                     ['apgd-t_within'])
    self.assertFalse(checks(row(jax=(60.0, 50.0, 49.0, 47.4)))
                     ['final_within'])
    self.assertFalse(checks(row(square_jax=48.6))['square_in_seed_range'])
    self.assertFalse(checks(row(square_jax=47.5))['square_in_seed_range'])
    self.assertFalse(checks(row(jax_only=2, attacked=490))
                     ['square_jax_only_few'])


class SpreadSummaryTest(absltest.TestCase):
  """The random-start diagnostic: explained only when the seed means agree
  within the bound, per attack."""

  def spread(self, shift_ce=0.0, shift_t=0.0):
    jax_ce = [38.3, 38.1, 37.8, 37.9, 38.1]
    ref_ce = [37.6, 38.0, 37.8, 37.9, 37.9]
    ref_t = [36.3, 36.1, 36.4, 36.2, 36.3]
    return {'jax': {'apgd-ce': [v + shift_ce for v in jax_ce],
                    'apgd-t': [v + shift_t for v in ref_t[::-1]]},
            'reference': {'apgd-ce': ref_ce, 'apgd-t': ref_t}}

  def test_the_same_distribution_is_explained(self):
    summary = agreement_diagnostics.spread_summary(self.spread(), BOUND)
    self.assertTrue(summary['explained'])
    ce = summary['difference']['apgd-ce']
    self.assertAlmostEqual(ce['effect'], 0.2)
    self.assertLess(ce['lo'], 0.0)  # seed 0 alone: 0.7 apart
    self.assertLess(ce['hi'], 0.5)
    self.assertAlmostEqual(summary['difference']['apgd-t']['effect'], 0.0)

  def test_a_shift_in_either_attack_is_not(self):
    self.assertFalse(agreement_diagnostics.spread_summary(
        self.spread(shift_ce=0.6), BOUND)['explained'])
    self.assertFalse(agreement_diagnostics.spread_summary(
        self.spread(shift_t=-0.8), BOUND)['explained'])


class OtherModelTest(absltest.TestCase):
  """A reused row must say when it was measured on another model than the
  run folder now holds (its diagnostics would describe another model)."""

  def test_the_recorded_checksum_decides(self):
    other_model = autoattack_agreement.other_model
    self.assertIsNone(other_model({'model_checksum': 'ab'}, 'ab'))
    self.assertIn('another model', other_model({'model_checksum': 'ab'}, 'cd'))
    self.assertIn('before rows recorded', other_model({}, 'ab'))


RESULT = os.path.join(ROOT, 'results', 'autoattack_agreement_quick',
                      'autoattack_agreement.json')


# The checks the committed run fails (reported in docs/evaluation.md): after
# APGD-CE alone the MLP at eps 0.2 is 0.7 points above the reference (its
# final accuracy is within 0.1). A new failure, or this one gone, fails the
# test below until this set and the docs say so.
OUTSIDE_THE_BOUNDS = {('mnist_mlp_uta_at', 0.2, 'apgd-ce_within')}
# Of those rows, the ones whose random-start diagnostic explains the failure
# (over seeds 0-9 the two sides' means agree within the bound; with the
# reference's own starts replayed, the same points are fooled).
EXPLAINED = {('mnist_mlp_uta_at', 0.2)}


class CommittedResultTest(absltest.TestCase):
  """The committed agreement run: every model of the set, at both eps, on
  1,000 points, within ``BOUNDS`` (each check recomputed from the row) but
  for ``OUTSIDE_THE_BOUNDS``."""

  def test_every_model_and_eps_within_the_bounds(self):
    with open(RESULT) as f:
      payload = json.load(f)
    self.assertEqual(payload['bounds'], autoattack_agreement.BOUNDS)
    self.assertEqual(payload['eps'], [0.1, 0.2])
    rows = payload['rows']
    self.assertEqual({(r['model'], r['eps']) for r in rows},
                     {(m, e) for m in autoattack_agreement.MODELS
                      for e in (0.1, 0.2)})
    outside = set()
    for r in rows:
      with self.subTest(model=r['model'], eps=r['eps']):
        self.assertEqual(r['num_examples'], 1000)
        self.assertEqual(tuple(r['jax_per_attack']), ATTACKS)
        self.assertEqual(tuple(r['reference_per_attack']), ATTACKS)
        self.assertLen(r['square_reference_accuracy'], 5)
        checks = autoattack_agreement.checks(r)
        self.assertEqual(checks, r['checks'])
        outside |= {(r['model'], r['eps'], name)
                    for name, ok in checks.items() if not ok}
    self.assertEqual(outside, OUTSIDE_THE_BOUNDS)

  def test_each_apgd_failure_has_its_random_start_diagnostic(self):
    with open(RESULT) as f:
      rows = json.load(f)['rows']
    explained = set()
    for r in rows:
      spread = r.get('apgd_seed_spread')
      # Exactly the rows outside the bounds after an APGD attack have them.
      self.assertEqual(spread is not None,
                       autoattack_agreement.apgd_failed(r), r['model'])
      self.assertEqual('apgd_replayed' in r, spread is not None, r['model'])
      if spread is None:
        continue
      self.assertEqual(spread['seeds'], list(range(10)))
      for side in ('jax', 'reference'):
        for attack in ('apgd-ce', 'apgd-t'):
          self.assertLen(spread['accuracy'][side][attack], 10)
      # Its summary is recomputed from the stored per-seed accuracies.
      summary = agreement_diagnostics.spread_summary(spread['accuracy'], BOUND)
      self.assertEqual(summary['explained'], spread['explained'])
      for attack, d in summary['difference'].items():
        for key in ('effect', 'lo', 'hi'):
          self.assertAlmostEqual(d[key], spread['difference'][attack][key])
      if spread['explained']:
        explained.add((r['model'], r['eps']))
      # APGD-CE with the reference's own seed-0 starts replayed: the
      # recording run reproduces the row's reference accuracy, and JAX
      # given those starts fools the same points.
      replayed = r['apgd_replayed']
      self.assertEqual(replayed['reference'],
                       r['reference_per_attack']['apgd-ce'])
      self.assertLessEqual(abs(replayed['jax'] - replayed['reference']),
                           autoattack_agreement.BOUNDS['accuracy_points'])
      self.assertGreaterEqual(replayed['same_verdict'], 0.99)
    self.assertEqual(explained, EXPLAINED)


if __name__ == '__main__':
  absltest.main()
