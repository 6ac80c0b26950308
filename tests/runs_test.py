"""Tests of uta_jax.runs: which stored run a sweep may reuse."""

import dataclasses

from absl.testing import absltest

from uta_jax import config_json
from uta_jax import configs
from uta_jax import runs


class FinishedResultsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self.create_tempdir().full_path
    self.config = configs.get_config('mnist_embedded', {'epochs': 2})

  def _store(self, status, config):
    runs.update_results(self.workdir, replace=True, status=status,
                        config=config_json.to_dict(config),
                        clean_accuracy=90.0)

  def test_a_finished_run_of_the_same_config_is_reused(self):
    self._store('finished', self.config)
    stored = runs.finished_results(self.workdir, self.config)
    self.assertEqual(stored['clean_accuracy'], 90.0)

  def test_no_results_an_unfinished_run_or_another_config_are_not(self):
    self.assertIsNone(runs.finished_results(self.workdir, self.config))
    self._store('preempted', self.config)
    self.assertIsNone(runs.finished_results(self.workdir, self.config))
    self._store('finished', dataclasses.replace(self.config, epochs=3))
    self.assertIsNone(runs.finished_results(self.workdir, self.config))


if __name__ == '__main__':
  absltest.main()
