"""Start-up cost every process pays: scripts, and the suite's subprocesses.

A quick ``train.py`` run is a few seconds, a third of it imports, and the
suite starts well over a hundred such processes; a dependency that becomes
slow to import costs minutes of CI. Measured in a fresh interpreter, the
import alone (not the interpreter's start).
"""

import subprocess
import sys

from absl.testing import absltest

# ml_dtypes 0.6.0 imports in ~15 ms here, 0.7.0 in 0.7-1.0 s (setup.cfg).
ML_DTYPES_SECONDS = 0.25


def _import_seconds(module: str, after: str = 'numpy') -> float:
  """Seconds a fresh interpreter spends importing ``module`` once ``after``
  is imported."""
  code = (f'import time, {after}\n'
          't = time.perf_counter()\n'
          f'import {module}\n'
          'print(time.perf_counter() - t)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=120, check=True)
  return float(proc.stdout.strip().splitlines()[-1])


class StartupTest(absltest.TestCase):

  def test_ml_dtypes_imports_fast(self):
    seconds = min(_import_seconds('ml_dtypes') for _ in range(2))
    self.assertLess(seconds, ML_DTYPES_SECONDS,
                    'ml_dtypes is slow to import (0.7.0 spends ~0.7 s '
                    'registering ufunc loops): install the version setup.cfg '
                    'asks for')


if __name__ == '__main__':
  absltest.main()
