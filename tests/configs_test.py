"""Tests of uta_jax.configs: the schema, the paper's presets, overrides and
validation."""

from absl.testing import absltest
from absl.testing import parameterized

from uta_jax import configs


class PresetTest(parameterized.TestCase):

  @parameterized.parameters((0.1, 10), (0.2, 20), (0.3, 30), (0.4, 40))
  def test_mnist_and_fashion_steps_are_eps_over_001(self, eps, k):
    for dataset in ('mnist', 'fashion_mnist'):
      c = configs.get_config(dataset, {'attack.eps_train': eps})
      self.assertEqual((c.attack.num_steps, c.attack.step_size), (k, 0.01))

  def test_paper_models_and_optimisers(self):
    self.assertEqual(configs.get_config('mnist').model.name, 'mlp')
    fm = configs.get_config('fashion_mnist')
    self.assertEqual((fm.model.name, fm.optimizer.name,
                      fm.optimizer.learning_rate, fm.epochs),
                     ('lenet', 'adam', 1e-3, 100))
    sv = configs.get_config('svhn')
    self.assertEqual((sv.model.name, sv.attack.step_schedule),
                     ('svhn_lenet', 'triangular'))
    self.assertEqual(sv.eval.eps, configs.SVHN_EVAL_EPS)
    cf = configs.get_config('cifar10')
    self.assertEqual((cf.model.name, cf.optimizer.name, cf.attack.uncertainty,
                      cf.attack.num_samples, cf.model.dropout_rate),
                     ('resnet18', 'sgd_nesterov', 'mc_dropout', 5, 0.2))

  def test_overrides_and_num_steps_wins_over_the_rule(self):
    c = configs.get_config('fashion_mnist', {
        'attack.name': 'pgd', 'attack.eps_train': 0.3, 'attack.num_steps': 7,
        'eval.eps': [0.1], 'seed': None})
    self.assertEqual((c.attack.name, c.attack.eps_train, c.attack.num_steps,
                      c.eval.eps, c.seed), ('pgd', 0.3, 7, (0.1,), 0))

  def test_mc_dropout_turns_dropout_on(self):
    c = configs.get_config('mnist', {'attack.uncertainty': 'mc_dropout',
                                     'attack.num_samples': 5})
    self.assertGreater(c.model.dropout_rate, 0)

  def test_only_cifar10_augments_by_default(self):
    for dataset in configs.data.DATASETS:
      self.assertEqual(configs.get_config(dataset).augment,
                       dataset == 'cifar10', dataset)
    self.assertFalse(configs.get_config('cifar10', {'augment': False}).augment)
    with self.assertRaisesRegex(configs.ConfigError, 'augment'):
      configs.get_config('toy2d', {'augment': True})

  def test_other_attacks_drop_the_presets_mc_dropout_sampling(self):
    for attack in ('pgd', 'fgsm', 'none'):
      c = configs.get_config('cifar10', {'attack.name': attack})
      self.assertEqual((c.attack.uncertainty, c.attack.num_samples,
                        c.model.dropout_rate), ('single', 1, 0.2))

  def test_ensemble_size_is_a_model_property_and_implies_the_attack(self):
    a = configs.get_config('mnist', {'model.ensemble_size': 3})
    self.assertEqual((a.attack.uncertainty, a.attack.num_samples), (
        'ensemble', 1))
    b = configs.get_config('mnist', {'attack.uncertainty': 'ensemble'})
    self.assertEqual(b.model.ensemble_size, configs.PAPER_ENSEMBLE_SIZE)


class SchemaTest(absltest.TestCase):

  def test_every_leaf_is_listed_once_with_its_type_and_help(self):
    s = {x.path: x for x in configs.settings()}
    self.assertLen(s, len(list(configs.settings())))
    self.assertEqual((s['attack.eps_train'].kind, s['eval.eps'].kind,
                      s['max_train_examples'].kind,
                      s['max_train_examples'].optional),
                     ('float', 'floats', 'int', True))
    self.assertEqual(s['attack.name'].choices, configs.ATTACKS)
    self.assertTrue(all(x.help for x in s.values()))
    # Every field of every section is a leaf: nothing is defined twice.
    self.assertIn('model.ensemble_size', s)
    self.assertIn('optimizer.lr_boundaries_epochs', s)

  def test_get_and_replace_address_a_leaf_by_its_path(self):
    c = configs.get_config('mnist')
    d = configs.replace(c, {'optimizer.learning_rate': 0.5, 'epochs': 3})
    self.assertEqual((configs.get(d, 'optimizer.learning_rate'),
                      configs.get(d, 'epochs'), d.optimizer.name),
                     (0.5, 3, c.optimizer.name))

  def test_errors_can_name_settings_as_the_front_end_writes_them(self):
    with self.assertRaises(configs.ConfigError) as e:
      configs.get_config('mnist', {'attack.name': 'pgd',
                                   'attack.uncertainty': 'mc_dropout',
                                   'attack.num_samples': 5})
    self.assertIn('attack.name', e.exception.paths)
    self.assertEqual(
        e.exception.renamed(lambda p: '--' + p.replace('.', '_')),
        '--attack_uncertainty=mc_dropout needs --attack_name=uta')


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('dataset', 'imagenet', {}, 'dataset'),
      ('attack', 'mnist', {'attack.name': 'cw'}, 'attack.name'),
      ('negative_eps', 'mnist', {'attack.eps_train': -0.1},
       'attack.eps_train'),
      ('zero_steps', 'mnist', {'attack.num_steps': 0}, 'attack.num_steps'),
      ('schedule', 'mnist', {'attack.step_schedule': 'cosine'},
       'step_schedule'),
      ('uncertainty', 'mnist', {'attack.uncertainty': 'gp'}, 'uncertainty'),
      ('samples_single', 'mnist', {'attack.num_samples': 3}, 'num_samples'),
      ('mc_needs_uta', 'mnist', {'attack.name': 'pgd',
                                 'attack.uncertainty': 'mc_dropout',
                                 'attack.num_samples': 5}, 'attack.name=uta'),
      ('ensemble_of_one', 'mnist', {'attack.uncertainty': 'ensemble',
                                    'model.ensemble_size': 1},
       'ensemble_size >= 2'),
      ('single_with_members', 'mnist', {'attack.uncertainty': 'single',
                                        'model.ensemble_size': 3},
       'ensemble_size'),
      ('eval_eps', 'mnist', {'eval.eps': [8.0]}, r'\(0, 1\]'),
      ('epochs', 'mnist', {'epochs': 0}, 'epochs'),
      ('eps_above_one', 'mnist', {'attack.eps_train': 1.5}, 'above 1'),
      ('negative_seed', 'mnist', {'seed': -1}, 'seed'),
      ('model', 'mnist', {'model.name': 'vgg'}, 'model.name'),
      ('toy_with_conv_net', 'toy2d', {'model.name': 'lenet'},
       'model.name=mlp'),
      ('unknown', 'mnist', {'colour': 'red'}, 'unknown settings'),
      ('dataset_as_override', 'mnist', {'dataset': 'svhn'},
       'first argument'),
  )
  def test_bad_values_name_the_setting(self, dataset, overrides, pattern):
    with self.assertRaisesRegex(configs.ConfigError, pattern):
      configs.get_config(dataset, overrides)


if __name__ == '__main__':
  absltest.main()
