"""Tests of uta_jax.config_json: the round-trip, reading older config.json
files, and what a resumption may change."""

import json

from absl.testing import absltest

from uta_jax import config_json
from uta_jax import configs


class ConfigJsonTest(absltest.TestCase):

  def test_json_round_trip(self):
    c = configs.get_config('cifar10', {'seed': 3})
    self.assertEqual(config_json.from_json(config_json.to_json(c)), c)
    self.assertEqual(config_json.from_dict(config_json.to_dict(c)), c)
    for text in ('{not json', '[1, 2]', '{"attack": 3}'):
      with self.assertRaises(configs.ConfigError):
        config_json.from_json(text)

  def test_config_json_of_older_runs_is_upgraded(self):
    # The layout before the model section: model and dropout at the top,
    # attack.eps, an ensemble's members in attack.num_samples.
    new = configs.get_config('fashion_mnist', {
        'attack.eps_train': 0.3, 'model.ensemble_size': 5,
        'model.dropout_rate': 0.1})
    old = config_json.to_dict(new)
    old['model'], old['dropout_rate'] = 'lenet', 0.1
    old['attack']['eps'] = old['attack'].pop('eps_train')
    old['attack']['num_samples'] = 5
    self.assertEqual(config_json.from_json(json.dumps(old)), new)

  def test_incompatibilities_ignore_resumable_settings(self):
    a = configs.get_config('mnist')
    b = configs.replace(a, {'epochs': 50, 'log_every': 5, 'eval.eps': [0.1]})
    self.assertEqual(config_json.incompatibilities(a, b), [])
    c = configs.replace(a, {'model.name': 'lenet', 'attack.eps_train': 0.3})
    self.assertEqual(config_json.incompatibilities(a, c),
                     ['model.name', 'attack.eps_train'])


if __name__ == '__main__':
  absltest.main()
