"""Every run the paper scripts would start is a valid config: the paper
presets (GPU scale, not run here) are checked without training."""

import os
import sys

from absl import flags
from absl.testing import absltest

from testutil import ROOT  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
# pylint: disable=g-import-not-at-top,g-bad-import-order
import catastrophic_overfitting
import latent_space
import sweep
import table1

FLAGS = flags.FLAGS


def restore_parsed_defaults():
  """Back to conftest's state: defaults, marked parsed (absltest's
  create_tempdir reads --test_tmpdir in later tests of this worker)."""
  FLAGS.unparse_flags()
  FLAGS.mark_as_parsed()


class PaperPresetTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    FLAGS(['presets_test'])  # every flag at its default
    self.addCleanup(restore_parsed_defaults)

  def test_catastrophic_overfitting_settings_follow_app_b(self):
    for preset in ('quick', 'paper'):
      for name, settings in catastrophic_overfitting.PRESETS[preset][
          'settings'].items():
        dataset, shared, methods = catastrophic_overfitting.SETTINGS[name]
        for method, values in methods.items():
          sweep.config(dataset, dict(settings, **shared, **values), 0)
    _, shared, methods = catastrophic_overfitting.SETTINGS['cifar10_cyclic']
    config = sweep.config('cifar10', dict(
        catastrophic_overfitting.PRESETS['paper']['settings'][
            'cifar10_cyclic'], **shared, **methods['uta2_mc5']), 0)
    self.assertEqual((config.epochs, config.optimizer.lr_schedule,
                      config.optimizer.learning_rate, config.augment,
                      config.attack.num_samples), (90, 'cyclic', 0.1, True, 5))
    _, shared, methods = catastrophic_overfitting.SETTINGS['cifar10_resnet18']
    config = sweep.config('cifar10', dict(
        catastrophic_overfitting.PRESETS['paper']['settings'][
            'cifar10_resnet18'], **shared, **methods['uta1_mc1']), 0)
    self.assertEqual((config.epochs, config.optimizer.lr_schedule,
                      config.attack.num_samples, config.attack.num_steps),
                     (200, 'piecewise', 1, 1))

  def test_table1_and_latent_space_cells_are_valid(self):
    for preset in ('quick', 'paper'):
      for dataset, setting in table1.PRESETS[preset]['datasets'].items():
        for method in setting['methods']:
          for eps in table1.EPS_TRAIN[dataset]:
            sweep.config(dataset, dict(setting['config'], eps_train=eps,
                                       **table1.method_overrides(method)), 0)
      p = latent_space.PRESETS[preset]
      for method, values in latent_space.METHODS.items():
        for eps in latent_space.EPS_TRAIN:
          config = sweep.config(p['dataset'], dict(
              p['config'], eps_train=eps, **latent_space.SHARED, **values), 0)
          self.assertEqual(config.attack.space, 'latent')


if __name__ == '__main__':
  absltest.main()
