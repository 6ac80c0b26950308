"""Every ```python block of the README and docs/ is a complete program: run
as written, from an empty folder, it exits 0 (fragments are ```text)."""

import glob
import os
import re
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from testutil import ROOT  # pylint: disable=g-bad-import-order

BLOCK = re.compile(r'^```python\n(.*?)^```', re.S | re.M)
PAGES = [os.path.join(ROOT, 'README.md')] + sorted(
    glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def python_blocks():
  """(page:line, code) of every python block of the pages."""
  found = []
  for page in PAGES:
    with open(page) as f:
      text = f.read()
    for match in BLOCK.finditer(text):
      line = text[:match.start()].count('\n') + 1
      found.append((f'{os.path.relpath(page, ROOT)}:{line}', match.group(1)))
  return found


class ReadmeBlocksTest(parameterized.TestCase):

  def test_the_readme_has_python_blocks(self):
    self.assertGreaterEqual(len(python_blocks()), 2)

  @parameterized.named_parameters(
      (where.replace('/', '_').replace('.', '_').replace(':', '_line'), where,
       code) for where, code in python_blocks())
  def test_block_runs_as_written(self, where, code):
    folder = self.create_tempdir().full_path
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    proc = subprocess.run([sys.executable, '-c', code], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=240)
    self.assertEqual(proc.returncode, 0,
                     f'{where} failed:\n{proc.stderr[-3000:]}')


if __name__ == '__main__':
  absltest.main()
