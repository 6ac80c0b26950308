"""Tests of experiments/cli.py: the CPU device count the scripts choose."""

import os
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from testutil import ROOT  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import cli  # pylint: disable=g-import-not-at-top,g-bad-import-order


class CpuDevicesTest(parameterized.TestCase):

  def _devices_with(self, cores, xla_flags):
    env = {} if xla_flags is None else {'XLA_FLAGS': xla_flags}
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(
        os, 'sched_getaffinity', return_value=set(range(cores))):
      cli.use_cpu_cores_as_devices()
      return os.environ['XLA_FLAGS']

  @parameterized.parameters((1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8))
  def test_one_device_per_core_a_power_of_two_at_most_eight(self, cores,
                                                           devices):
    self.assertEqual(self._devices_with(cores, None),
                     f'{cli.DEVICE_COUNT_FLAG}={devices}')

  def test_other_xla_flags_are_kept(self):
    self.assertEqual(self._devices_with(2, '--xla_cpu_use_thunk_runtime'),
                     f'--xla_cpu_use_thunk_runtime {cli.DEVICE_COUNT_FLAG}=2')

  def test_a_count_the_user_set_wins(self):
    flags = f'{cli.DEVICE_COUNT_FLAG}=1'
    self.assertEqual(self._devices_with(16, flags), flags)


if __name__ == '__main__':
  absltest.main()
