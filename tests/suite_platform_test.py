"""Tests of tests/conftest.py: the suite runs on the platform it is given,
and stops in one line on a machine without it."""

import os
import subprocess
import sys

from absl.testing import absltest

from testutil import ROOT  # pylint: disable=g-bad-import-order


def _pytest(platform):
  env = dict(os.environ, JAX_PLATFORMS=platform)
  return subprocess.run(
      [sys.executable, '-m', 'pytest', '-n', '0', '-p', 'no:cacheprovider',
       os.path.join('tests', 'runs_test.py')],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
      check=False)


class PlatformTest(absltest.TestCase):

  def test_a_missing_platform_stops_the_suite_in_one_line(self):
    proc = _pytest('cuda' if 'cuda' not in os.environ.get(
        'JAX_PLATFORMS', 'cpu') else 'no_such_platform')
    self.assertEqual(proc.returncode, 4, proc.stdout + proc.stderr)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l]
    self.assertLen(lines, 1, lines)
    self.assertRegex(lines[0], r'JAX_PLATFORMS=\w+: this machine has no such '
                     'JAX platform .*; unset JAX_PLATFORMS to run on the CPU')

  def test_the_platform_given_is_the_one_the_tests_run_on(self):
    proc = _pytest('cpu')
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    self.assertIn('on cpu: 4 x cpu', proc.stdout)


if __name__ == '__main__':
  absltest.main()
