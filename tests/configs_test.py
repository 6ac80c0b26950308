"""Tests of uta_jax.configs: the paper's presets, overrides and validation."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized

from uta_jax import configs


class PresetTest(parameterized.TestCase):

  @parameterized.parameters((0.1, 10), (0.2, 20), (0.3, 30), (0.4, 40))
  def test_mnist_and_fashion_steps_are_eps_over_001(self, eps, k):
    for dataset in ('mnist', 'fashion_mnist'):
      c = configs.get_config(dataset, eps_train=eps)
      self.assertEqual((c.attack.num_steps, c.attack.step_size), (k, 0.01))

  def test_paper_models_and_optimisers(self):
    self.assertEqual(configs.get_config('mnist').model, 'mlp')
    fm = configs.get_config('fashion_mnist')
    self.assertEqual((fm.model, fm.optimizer.name, fm.optimizer.learning_rate,
                      fm.epochs), ('lenet', 'adam', 1e-3, 100))
    sv = configs.get_config('svhn')
    self.assertEqual((sv.model, sv.attack.step_schedule),
                     ('svhn_lenet', 'triangular'))
    self.assertEqual(sv.eval.eps, configs.SVHN_EVAL_EPS)
    cf = configs.get_config('cifar10')
    self.assertEqual((cf.model, cf.optimizer.name, cf.attack.uncertainty,
                      cf.attack.num_samples, cf.dropout_rate),
                     ('resnet18', 'sgd_nesterov', 'mc_dropout', 5, 0.2))

  def test_flags_override_and_num_steps_wins_over_the_rule(self):
    c = configs.get_config('fashion_mnist', attack='pgd', eps_train=0.3,
                           num_steps=7, eval_eps=[0.1])
    self.assertEqual((c.attack.name, c.attack.eps, c.attack.num_steps,
                      c.eval.eps), ('pgd', 0.3, 7, (0.1,)))

  def test_mc_dropout_turns_dropout_on(self):
    c = configs.get_config('mnist', uncertainty='mc_dropout', num_samples=5)
    self.assertGreater(c.dropout_rate, 0)

  def test_json_round_trip(self):
    c = configs.get_config('cifar10', seed=3)
    self.assertEqual(configs.from_json(configs.to_json(c)), c)
    with self.assertRaises(configs.ConfigError):
      configs.from_json('{not json')


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('dataset', dict(dataset='imagenet'), 'dataset'),
      ('attack', dict(attack='cw'), 'attack'),
      ('negative_eps', dict(eps_train=-0.1), 'eps_train'),
      ('zero_steps', dict(num_steps=0), 'num_steps'),
      ('schedule', dict(step_schedule='cosine'), 'step_schedule'),
      ('uncertainty', dict(uncertainty='gp'), 'uncertainty'),
      ('samples_single', dict(num_samples=3), 'num_samples'),
      ('mc_needs_uta', dict(attack='pgd', uncertainty='mc_dropout',
                            num_samples=5), 'attack=uta'),
      ('eval_eps', dict(eval_eps=[8.0]), r'\(0, 1\]'),
      ('epochs', dict(epochs=0), 'epochs'),
      ('eps_above_one', dict(eps_train=1.5), 'above 1'),
      ('negative_seed', dict(seed=-1), 'seed'),
      ('toy_with_conv_net', dict(dataset='toy2d', model='lenet'),
       'model=mlp'),
      ('unknown', dict(colour='red'), 'unknown settings'),
  )
  def test_bad_values_name_the_setting(self, overrides, pattern):
    overrides = dict(overrides)
    dataset = overrides.pop('dataset', 'mnist')
    with self.assertRaisesRegex(configs.ConfigError, pattern):
      configs.get_config(dataset, **overrides)

  def test_incompatibilities_ignore_resumable_settings(self):
    a = configs.get_config('mnist')
    b = dataclasses.replace(a, epochs=50, log_every=5)
    self.assertEqual(configs.incompatibilities(a, b), [])
    c = dataclasses.replace(a, model='lenet')
    self.assertEqual(configs.incompatibilities(a, c), ['model'])


if __name__ == '__main__':
  absltest.main()
