"""Tests of uta_jax.stopping: a signal asks for a stop, the exit code says
which one, and only ``install`` touches the process's handlers."""

import os
import signal
import subprocess
import sys
import textwrap

from absl.testing import absltest

from uta_jax import stopping


class StopSignalsTest(absltest.TestCase):

  def test_a_signal_asks_for_a_stop_and_names_itself(self):
    for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
      stop = stopping.StopSignals()
      self.assertFalse(stop())
      with self.assertLogs('uta_jax', level='WARNING') as logs:
        stop.handle(sig)
      self.assertTrue(stop())
      self.assertEqual(stop.exit_code(), code)
      self.assertIn(f'{sig.name} received: stopping at the next checkpoint',
                    logs.output[0])

  def test_creating_one_installs_nothing(self):
    before = signal.getsignal(signal.SIGTERM)
    stopping.StopSignals()
    self.assertIs(signal.getsignal(signal.SIGTERM), before)

  def test_installed_a_first_signal_stops_and_a_second_exits_at_once(self):
    program = textwrap.dedent('''
        import os, signal, time
        from uta_jax import stopping
        stop = stopping.StopSignals().install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print('stop requested:', stop(), flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print('not reached')
    ''')
    proc = subprocess.run([sys.executable, '-c', program], text=True,
                          capture_output=True, timeout=60, check=False)
    self.assertEqual(proc.stdout, 'stop requested: True\n')
    self.assertEqual(proc.returncode, 128 + signal.SIGINT)
    self.assertIn('error: second SIGINT: exiting now, without saving',
                  proc.stderr)


if __name__ == '__main__':
  absltest.main()
