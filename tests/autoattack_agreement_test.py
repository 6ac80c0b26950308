"""experiments/autoattack_agreement.py: its bounds (written before its run)
and its committed result within them."""

import json
import os
import sys

from absl.testing import absltest

from testutil import ROOT  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import autoattack_agreement  # pylint: disable=g-import-not-at-top,g-bad-import-order

ATTACKS = ('apgd-ce', 'apgd-t', 'fab-t', 'square')


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


RESULT = os.path.join(ROOT, 'results', 'autoattack_agreement_quick',
                      'autoattack_agreement.json')


# The checks the committed run fails (reported in docs/evaluation.md): after
# APGD-CE alone the MLP at eps 0.2 is 0.7 points above the reference (its
# final accuracy is within 0.1). A new failure, or this one gone, fails the
# test below until this set and the docs say so.
OUTSIDE_THE_BOUNDS = {('mnist_mlp_uta_at', 0.2, 'apgd-ce_within')}


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


if __name__ == '__main__':
  absltest.main()
