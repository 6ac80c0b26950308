"""Executes every notebook headless (nbclient) on small settings.

``UTA_NOTEBOOK_FAST=1`` makes the toy walkthrough and the own-model
notebook train for a few epochs.
"""

import glob
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import nbclient
import nbformat
import pytest

from testutil import ROOT  # pylint: disable=g-bad-import-order

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))

# End-to-end: subprocesses, minutes. Deselect with -m "not slow".
pytestmark = pytest.mark.slow


class NotebooksTest(parameterized.TestCase):

  def test_there_are_notebooks(self):
    names = {os.path.basename(p) for p in NOTEBOOKS}
    self.assertContainsSubset({'toy2d_walkthrough.ipynb', 'own_model.ipynb'},
                              names)

  @parameterized.named_parameters(
      (os.path.basename(p).replace('.ipynb', ''), p) for p in NOTEBOOKS)
  def test_is_committed_executed_so_it_renders_on_a_code_host(self, path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == 'code']
    self.assertTrue(all(c.get('execution_count') for c in code),
                    f'{path} has unexecuted cells: see the README\'s '
                    'notebook command')
    self.assertTrue(any('image/png' in o.get('data', {}) for c in code
                        for o in c.get('outputs', [])))
    self.assertFalse(any(o.get('output_type') == 'error' for c in code
                         for o in c.get('outputs', [])))

  @parameterized.named_parameters(
      (os.path.basename(p).replace('.ipynb', ''), p) for p in NOTEBOOKS)
  def test_runs_without_errors(self, path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name='python3',
        resources={'metadata': {'path': os.path.dirname(path)}})
    with mock.patch.dict(os.environ, {'UTA_NOTEBOOK_FAST': '1'}):
      client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
               for o in cell.get('outputs', [])]
    self.assertTrue(any('image/png' in o.get('data', {}) for o in outputs),
                    'the notebook drew no figure')
    self.assertFalse(any(o.get('output_type') == 'error' for o in outputs))


if __name__ == '__main__':
  absltest.main()
