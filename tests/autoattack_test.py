"""auto_attack.evaluate: the JAX backend against the reference, devices, stops."""

import logging
import subprocess
import sys

import pytest

from absl.testing import absltest
import jax
import numpy as np

from uta_jax import auto_attack
from uta_jax import auto_attack_jax
from uta_jax import configs
from uta_jax import data
from uta_jax import parallel
from uta_jax import programs
from uta_jax import steps

from testutil import require  # pylint: disable=g-bad-import-order


class JaxAutoAttackTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = configs.get_config('mnist_embedded', {'attack.name': 'pgd',
                                                   'attack.eps_train': 0.1,
                                                   'attack.num_steps': 5,
                                                   'attack.step_size': 0.03})
    cls.ds = data.load_dataset('mnist_embedded', max_eval_examples=200)
    cls.model, cls.variables = steps.fit(config, cls.ds.train, num_steps=300)

  def autoattack(self, split=None, variables=None, **kwargs):
    args = dict(eps=0.1, version='apgd', batch_size=128)
    args.update(kwargs)
    return auto_attack.evaluate(self.model, variables or self.variables,
                                split or self.ds.test, **args)

  @pytest.mark.slow
  def test_agrees_with_the_reference_through_the_bridge(self):
    require('pyautoattack')
    jax_report = self.autoattack(backend='jax')
    torch_report = self.autoattack(backend='torch')
    self.assertEqual(jax_report['clean_accuracy'],
                     torch_report['clean_accuracy'])
    self.assertGreater(jax_report['clean_accuracy'], 80)
    # The attack works: far below clean accuracy, far above zero.
    self.assertLess(torch_report['robust_accuracy'], 80)
    self.assertGreater(torch_report['robust_accuracy'], 20)
    self.assertAlmostEqual(jax_report['robust_accuracy'],
                           torch_report['robust_accuracy'], delta=1.5)
    for attack in ('apgd-ce', 'apgd-t'):
      self.assertAlmostEqual(jax_report['per_attack'][attack],
                             torch_report['per_attack'][attack], delta=1.5)
    same = np.mean(jax_report['robust_points'] ==
                   torch_report['robust_points'])
    self.assertGreaterEqual(same, 0.98)

  def test_logs_autoattack_lines_naming_the_backend(self):
    with self.assertLogs(auto_attack.LOGGER, logging.DEBUG) as logs:
      report = self.autoattack(backend='jax')
    text = '\n'.join(logs.output)
    self.assertIn('JAX backend', text)
    self.assertRegex(text, r'robust accuracy after APGD-CE: [\d.]+% \(total '
                     r'time [\d.]+ s\)')
    self.assertIn(f"robust accuracy after APGD-T: "
                  f"{report['robust_accuracy']:.2f}%", text)
    self.assertEqual(report['backend'], 'jax')
    self.assertLessEqual(report['max_perturbation'], 0.1 + 1e-6)
    self.assertEqual(report['per_attack']['apgd-t'],
                     report['robust_accuracy'])
    self.assertLessEqual(report['per_attack']['apgd-t'],
                         report['per_attack']['apgd-ce'])

  @pytest.mark.slow  # APGD compiled for 1 and 4 devices
  def test_one_device_and_four_devices_give_the_same_points(self):
    devices = jax.local_devices()
    one = self.autoattack(devices=devices[:1])
    four = self.autoattack(devices=devices)
    np.testing.assert_array_equal(one['robust_points'], four['robust_points'])
    self.assertEqual(one['per_attack'], four['per_attack'])

  def test_same_seed_same_points(self):
    a, b = self.autoattack(seed=5), self.autoattack(seed=5)
    np.testing.assert_array_equal(a['robust_points'], b['robust_points'])
    self.assertEqual(a['per_attack'], b['per_attack'])

  def test_stop_and_bad_settings(self):
    with self.assertRaises(parallel.Stopped):
      self.autoattack(stop_requested=lambda: True)
    with self.assertRaisesRegex(ValueError, "backend 'torch'"):
      self.autoattack(version='rand', backend='jax')
    with self.assertRaisesRegex(ValueError, 'unknown AutoAttack backend'):
      self.autoattack(backend='tf')
    with self.assertRaisesRegex(ValueError, r'outside \(0, 1\]'):
      self.autoattack(eps=1.5)
    self.assertEqual(auto_attack.default_backend('apgd'), 'jax')
    self.assertEqual(auto_attack.default_backend('standard'), 'jax')
    self.assertEqual(auto_attack.default_backend('rand'), 'torch')

  @pytest.mark.slow  # the standard version compiled for 1 and 4 devices
  def test_the_standard_version_in_jax(self):
    devices = jax.local_devices()
    split = data.Split(self.ds.test.images[:48], self.ds.test.labels[:48])
    with self.assertLogs(auto_attack.LOGGER, logging.DEBUG) as logs:
      four = self.autoattack(version='standard', devices=devices,
                             split=split)
    self.assertEqual(list(four['per_attack']),
                     ['apgd-ce', 'apgd-t', 'fab-t', 'square'])
    accs = list(four['per_attack'].values())
    self.assertEqual(accs, sorted(accs, reverse=True))  # never undone
    self.assertLessEqual(four['max_perturbation'], 0.1 + 1e-6)
    self.assertIn('robust accuracy after SQUARE', '\n'.join(logs.output))
    # Sharding does not change a point's attack (keys by example id).
    one = self.autoattack(version='standard', devices=devices[:1],
                          split=split)
    np.testing.assert_array_equal(one['robust_points'], four['robust_points'])

  @pytest.mark.slow
  def test_the_standard_version_agrees_with_the_reference(self):
    require('pyautoattack')
    # 128 points: APGD's random starts and Square's draws differ from the
    # reference's, so a few points may; FAB-T is exact (fab_test).
    split = data.Split(self.ds.test.images[:128], self.ds.test.labels[:128])
    jax_report = self.autoattack(version='standard', backend='jax',
                                 split=split)
    torch_report = self.autoattack(version='standard', backend='torch',
                                   split=split)
    self.assertGreater(jax_report['robust_accuracy'], 10)
    self.assertAlmostEqual(jax_report['robust_accuracy'],
                           torch_report['robust_accuracy'], delta=2.5)
    same = np.mean(jax_report['robust_points'] ==
                   torch_report['robust_points'])
    self.assertGreaterEqual(same, 0.97)

  @pytest.mark.slow  # the standard version on two models, and each alone
  def test_models_at_once_equal_each_model_alone(self):
    # A second model of the architecture: the first with noisy weights.
    other = jax.tree_util.tree_map(
        lambda w: w + 0.5 * np.std(w) * np.random.default_rng(0).normal(
            size=w.shape).astype(w.dtype), self.variables)
    split = data.Split(self.ds.test.images[:24], self.ds.test.labels[:24])
    eps = [0.05, 0.1]
    alone = [[self.autoattack(version='standard', split=split, eps=e,
                              variables=v) for v in (self.variables, other)]
             for e in eps]
    self.assertNotEqual(alone[0][0]['robust_accuracy'],
                        alone[0][1]['robust_accuracy'])
    for run_map in ('map', 'vmap'):
      stored = []
      together = auto_attack.evaluate_runs(
          self.model, programs.stack([self.variables, other]), split,
          eps=eps, version='standard', batch_size=128, run_map=run_map,
          on_eps=lambda e, reports: stored.append((e, len(reports))))
      self.assertEqual(stored, [(0.05, 2), (0.1, 2)])
      for got_eps, want_eps in zip(together, alone):
        for got, want in zip(got_eps, want_eps):
          np.testing.assert_array_equal(got['robust_points'],
                                        want['robust_points'], run_map)
          self.assertEqual(got['per_attack'], want['per_attack'])
          self.assertEqual(got['runs_in_program'], 2)
          self.assertEqual((got['eps'], got['backend']),
                           (want['eps'], 'jax'))

  def test_square_taking_more_than_0_2_points_warns(self):
    def after(fab_robust, square_robust, n=1000):
      return {'fab-t': np.arange(n) < fab_robust,
              'square': np.arange(n) < square_robust}
    warning = auto_attack_jax.square_warning
    self.assertIsNone(warning(after(413, 411), 1000))  # 0.2: not more
    self.assertAlmostEqual(warning(after(413, 410), 1000), 0.3)
    self.assertIsNone(warning({'apgd-t': np.ones(4, bool)}, 4))

  def test_the_standard_version_runs_without_torch(self):
    code = '''
import sys
sys.modules['torch'] = None  # import torch raises ImportError
import jax
from uta_jax import auto_attack, data, models
model = models.MLP()
variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
ds = data.load_dataset('mnist_embedded', max_eval_examples=16)
r = auto_attack.evaluate(model, variables, ds.test, eps=0.1)
print(r['backend'], sorted(r['per_attack']))
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("jax ['apgd-ce', 'apgd-t', 'fab-t', 'square']",
                  proc.stdout)

  def test_a_stop_during_square_is_honoured(self):
    class AfterFab(logging.Handler):
      seen = False

      def emit(self, record):
        AfterFab.seen |= 'after FAB-T' in record.getMessage()
    handler = AfterFab()
    logger = logging.getLogger(auto_attack.LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    self.addCleanup(logger.removeHandler, handler)
    small = data.Split(self.ds.test.images[:32], self.ds.test.labels[:32])
    # At a small eps points survive to Square, which stops at once.
    with self.assertRaises(parallel.Stopped):
      auto_attack.evaluate(self.model, self.variables, small, eps=0.02,
                           version='standard', batch_size=32,
                           stop_requested=lambda: AfterFab.seen)
    self.assertTrue(AfterFab.seen)


if __name__ == '__main__':
  absltest.main()
