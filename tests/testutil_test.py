"""Tests of the shared test helpers: optional dependencies skip, not fail."""

import unittest
from unittest import mock

from absl.testing import absltest

import testutil  # pylint: disable=g-bad-import-order


class RequireTest(absltest.TestCase):

  def test_a_missing_optional_module_skips_naming_its_extra(self):
    with mock.patch('importlib.import_module', side_effect=ImportError):
      with self.assertRaisesRegex(unittest.SkipTest,
                                  r"needs torch: pip install torch==2.13.0"):
        testutil.require('torch')
      with self.assertRaisesRegex(unittest.SkipTest, r"uta-jax\[torch\]"):
        testutil.require('pyautoattack.checks')

  def test_a_present_module_is_returned(self):
    self.assertEqual(testutil.require('json').__name__, 'json')


if __name__ == '__main__':
  absltest.main()
