"""Tests of uta_jax.evaluation (the JAX-native part; AutoAttack is e2e)."""

import dataclasses

from absl.testing import absltest
import jax
import numpy as np
import pytest

from uta_jax import attacks
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import parallel
from uta_jax import steps

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator


class StepSizeTest(absltest.TestCase):

  def test_every_preset_attack_can_reach_every_eps_it_reports(self):
    for dataset in data.DATASETS:
      config = configs.get_config(dataset)
      for eps in config.eval.eps:
        for k in (config.eval.pgd_steps, config.eval.uta_steps):
          reach = k * float(evaluation.step_size(eps, config.eval, k))
          self.assertGreaterEqual(reach, eps - 1e-7, (dataset, eps, k))

  def test_the_configured_step_is_kept_where_it_reaches(self):
    config = configs.get_config('mnist_embedded').eval  # 0.01, 20 steps
    self.assertAlmostEqual(float(evaluation.step_size(0.05, config, 20)),
                           0.01)
    self.assertAlmostEqual(float(evaluation.step_size(0.3, config, 20)),
                           0.0375)


class PerDeviceBatchTest(absltest.TestCase):

  def test_remainders_share_a_few_bucketed_shapes(self):
    sizes = {parallel.per_device_batch(n, 2, 250) for n in range(1, 1001)}
    self.assertEqual(sizes, {8, 16, 32, 64, 128, 250})
    self.assertEqual(parallel.per_device_batch(300, 4, 500), 128)
    self.assertEqual(parallel.per_device_batch(3, 1, 2), 2)

  def test_finer_sizes_bound_the_padding_with_a_few_more_shapes(self):
    sizes = {n: parallel.per_device_batch(n, 2, 250, sizes_per_octave=4)
             for n in range(1, 1001)}
    self.assertEqual(sorted(set(sizes.values())), [
        8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
        160, 192, 224, 250])
    for n, size in sizes.items():  # every chunk's padding within 25%
      need = -(-n // 2)
      self.assertGreaterEqual(size, min(need, 250), n)
      if need > 8 and size < 250:
        self.assertLessEqual(size, 1.25 * need, n)
    # AutoAttack's 538 clean points on 2 devices: 640 slots, not 1,000.
    self.assertEqual(parallel.per_device_batch(538, 2, 500, 4), 320)


class MapRunExamplesTest(absltest.TestCase):
  """``parallel.map_run_examples``: each run on its own points, sharded."""

  def test_each_run_gets_its_own_points_in_order(self):
    devices = jax.local_devices()
    values = np.arange(100, dtype=np.float32) * 10
    fetch = lambda idx: {'value': values[idx]}
    seen_shapes = []

    def fn(batch):  # [D, R, P]: run r adds r to its points' values
      seen_shapes.append(batch['value'].shape)
      runs = np.arange(batch['value'].shape[1])[None, :, None]
      return {'out': batch['value'] + runs, 'id': batch['id']}

    indices = [np.arange(0, 37), np.array([], np.int64), np.arange(90, 95)]
    outs = parallel.map_run_examples(fn, indices, fetch,
                                     num_devices=len(devices), batch_size=4)
    for r, idx in enumerate(indices):
      np.testing.assert_array_equal(outs[r]['out'], values[idx] + r)
      np.testing.assert_array_equal(outs[r]['id'], idx)
    self.assertEqual({s[:2] for s in seen_shapes}, {(len(devices), 3)})
    # One run: what map_examples gives.
    single = parallel.map_examples(
        lambda b: {'out': b['value'] * 2}, indices[0], fetch,
        num_devices=len(devices), batch_size=4)
    np.testing.assert_array_equal(single['out'], values[indices[0]] * 2)


class EvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = configs.get_config('mnist_embedded', {'attack.name': 'none',
                                                       'eval.pgd_restarts': 2,
                                                       'eval.pgd_steps': 5,
                                                       'eval.eps': [0.05, 0.3],
                                                       'eval.batch_size': 100})
    cls.ds = data.load_dataset('mnist_embedded', max_eval_examples=150)
    cls.model, cls.variables = steps.fit(cls.config, cls.ds.train,
                                         num_steps=100)

  def evaluate(self, seed=0):
    return evaluation.evaluate(self.model, self.variables, self.ds.test,
                               config=self.config,
                               key=jax.random.PRNGKey(seed))

  def test_accuracies_are_ordered_and_tradeoff_is_their_mean(self):
    r = self.evaluate()
    self.assertEqual(r['num_examples'], 150)  # 150 = 1 full + 1 padded batch
    self.assertGreater(r['clean_accuracy'], 70)
    pgd = r['robust_accuracy']['pgd']
    self.assertLessEqual(pgd['0.3'], pgd['0.05'])
    self.assertLess(pgd['0.3'], r['clean_accuracy'])
    for attack in ('pgd', 'uta'):
      for eps, robust in r['robust_accuracy'][attack].items():
        self.assertLessEqual(robust, r['clean_accuracy'])
        self.assertAlmostEqual(evaluation.tradeoff(r, attack)[eps],
                               (robust + r['clean_accuracy']) / 2)

  def test_fgsm_accuracy_matches_a_direct_fgsm(self):
    r = self.evaluate()
    x, y = data.to_float(self.ds.test.images), self.ds.test.labels
    logits_fn = lambda inputs: self.model.apply(self.variables, inputs)
    for eps in (0.05, 0.3):
      x_adv = attacks.fgsm(logits_fn, x, y, eps=eps)
      correct = ((np.argmax(logits_fn(x), -1) == y) &
                 (np.argmax(logits_fn(x_adv), -1) == y))
      self.assertAlmostEqual(r['robust_accuracy']['fgsm'][str(eps)],
                             100 * correct.mean(), places=4)

  def test_uta_column_is_a_direct_uta_that_reaches_its_eps(self):
    r = self.evaluate()
    x, y = data.to_float(self.ds.test.images), self.ds.test.labels
    _, sample_fn = evaluation.logits_fns(self.model, self.variables, False)
    logits_fn = lambda inputs: self.model.apply(self.variables, inputs)
    steps_k = self.config.eval.uta_steps
    x_adv = attacks.uta(sample_fn, x, eps=0.3, num_steps=steps_k,
                        step_size=2.5 * 0.3 / steps_k, bounds=(0.0, 1.0))
    correct = ((np.argmax(logits_fn(x), -1) == y) &
               (np.argmax(logits_fn(x_adv), -1) == y))
    self.assertAlmostEqual(r['robust_accuracy']['uta']['0.3'],
                           100 * correct.mean(), places=4)
    # It leaves the 0.2-ball that 20 steps of the configured 0.01 kept it in.
    self.assertGreater(float(np.abs(x_adv - x).max()), 0.2 + 1e-3)

  def test_collapse_step_finds_the_first_lasting_drop(self):
    steps_ = [0, 50, 100, 150, 200, 250]
    self.assertEqual(evaluation.collapse_step(
        steps_, [10.0, 40.0, 45.0, 8.0, 3.0, 2.0]), 150)
    # A dip that recovers is not a collapse; nor is a slow decline.
    self.assertIsNone(evaluation.collapse_step(
        steps_, [10.0, 40.0, 5.0, 41.0, 42.0, 40.0]))
    self.assertIsNone(evaluation.collapse_step(
        steps_, [10.0, 40.0, 38.0, 35.0, 31.0, 30.0]))
    # Never above the floor: nothing to collapse from.
    self.assertIsNone(evaluation.collapse_step(steps_, [1.0, 2.0, 0.0, 0.0,
                                                        0.0, 0.0]))

  def test_later_evaluations_reuse_the_compiled_programs(self):
    # Later PGD restarts run on the surviving points, so a new key may meet
    # a new (bucketed) shape; the same evaluation again compiles nothing.
    self.evaluate(seed=1)
    self.evaluate(seed=2)
    compiles = []
    def listener(event, duration, **kwargs):
      del duration, kwargs
      if 'backend_compile' in event:
        compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      self.evaluate(seed=1)  # as --eval_every does during training
      self.evaluate(seed=2)
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
    self.assertEqual(compiles, [])

  def test_precompiled_programs_give_the_same_result(self):
    # As a program of runs evaluates: with the programs its sizing
    # compiled. Chunks of every point run them; a later PGD restart on the
    # surviving points may need another shape, compiled on demand.
    compiled = evaluation.compiled_programs(self.model, self.variables,
                                            self.ds.test, config=self.config)
    calls = []

    def counting(name, fn):
      def call(*args):
        calls.append(name)
        return fn(*args)
      return call

    got = evaluation.evaluate(
        self.model, self.variables, self.ds.test, config=self.config,
        key=jax.random.PRNGKey(4),
        compiled=(counting('fixed', compiled[0]),
                  counting('pgd', compiled[1])))
    self.assertEqual(got, evaluation.evaluate(
        self.model, self.variables, self.ds.test, config=self.config,
        key=jax.random.PRNGKey(4)))
    # 150 points in one chunk per eps: the deterministic attacks and the
    # first PGD restart ran the precompiled programs.
    self.assertEqual(calls.count('fixed'), 2)
    self.assertGreaterEqual(calls.count('pgd'), 2)

  def test_one_device_and_every_device_give_the_same_result(self):
    devices = jax.local_devices()
    if len(devices) < 2:
      self.skipTest('one local device: nothing to compare (the CPU suite '
                    'fakes 4)')
    one = evaluation.evaluate(self.model, self.variables, self.ds.test,
                              config=self.config, key=jax.random.PRNGKey(3),
                              devices=devices[:1])
    four = evaluation.evaluate(self.model, self.variables, self.ds.test,
                               config=self.config, key=jax.random.PRNGKey(3),
                               devices=devices)
    self.assertEqual(one, four)

  def test_pgd_restarts_use_the_key_and_restarts_only_lower_accuracy(self):
    one = dataclasses.replace(self.config, eval=dataclasses.replace(
        self.config.eval, pgd_restarts=1))
    accs = {}
    for name, config in (('one', one), ('two', self.config)):
      accs[name] = evaluation.evaluate(
          self.model, self.variables, self.ds.test, config=config,
          key=jax.random.PRNGKey(0))['robust_accuracy']['pgd']
    for eps in accs['one']:
      self.assertLessEqual(accs['two'][eps], accs['one'][eps])
    # A different key draws other random starts (and usually other results
    # at the large eps); the same key repeats them exactly.
    again = self.evaluate(seed=0)['robust_accuracy']['pgd']
    self.assertEqual(again, accs['two'])

  def test_stop_requested_raises_between_batches(self):
    with self.assertRaises(parallel.Stopped):
      evaluation.evaluate(self.model, self.variables, self.ds.test,
                          config=self.config, key=jax.random.PRNGKey(0),
                          stop_requested=lambda: True)


if __name__ == '__main__':
  absltest.main()
