"""Tests of uta_jax.workdir_lock: one holder, named; released on any exit."""

import errno
import os
import subprocess
import sys
import textwrap

from absl.testing import absltest

from uta_jax import workdir_lock


class WorkdirLockTest(absltest.TestCase):

  def test_a_second_holder_is_refused_with_the_holder_named(self):
    workdir = self.create_tempdir().full_path
    # The other holder is another process (flock is per open file).
    holder = subprocess.Popen(
        [sys.executable, '-c', textwrap.dedent(f'''
            import sys, time
            from uta_jax import workdir_lock
            with workdir_lock.hold({workdir!r}, what='training'):
              print('held', flush=True)
              time.sleep(60)
            ''')], stdout=subprocess.PIPE, text=True)
    self.addCleanup(holder.kill)
    self.assertEqual(holder.stdout.readline().strip(), 'held')
    with self.assertRaisesRegex(workdir_lock.WorkdirBusy,
                                f'in use by pid {holder.pid} on .*training'):
      with workdir_lock.hold(workdir):
        pass
    holder.kill()  # as kill -9: the kernel drops the lock
    holder.wait()
    with workdir_lock.hold(workdir, what='evaluation'):
      pass  # free again, no stale lock

  def test_released_after_the_block_and_reentrant_in_sequence(self):
    workdir = self.create_tempdir().full_path
    with workdir_lock.hold(workdir):
      pass
    with workdir_lock.hold(workdir):
      pass
    self.assertTrue(os.path.exists(os.path.join(workdir, workdir_lock.LOCK)))

  def test_disabled_on_other_processes_and_unwritable_workdir(self):
    with workdir_lock.hold('/nonexistent/dir', enabled=False):
      pass
    with self.assertRaisesRegex(workdir_lock.WorkdirError,
                                'cannot write to workdir'):
      with workdir_lock.hold('/nonexistent/dir'):
        pass


  def test_write_errors_name_the_file_and_the_fix(self):
    cases = (
        (OSError(errno.ENOSPC, 'No space left on device', '/w/checkpoints'),
         "cannot write '/w/checkpoints' (No space left on device): free disk "
         'space, then rerun the same command to resume'),
        (OSError(errno.EROFS, 'Read-only file system', '/w/config.json.tmp'),
         'read-only: use a writable --workdir'),
        (OSError(errno.ENOTDIR, 'Not a directory', '/etc/hostname/run'),
         'part of the path is a file'),
        (OSError(errno.ENOSPC, 'No space left on device'),
         "cannot write to workdir '/w' (No space left on device)"),
    )
    for error, message in cases:
      e = workdir_lock.write_error(error, '/w')
      self.assertIsInstance(e, workdir_lock.WorkdirError)
      self.assertIn(message, str(e))
      self.assertNotIn('\n', str(e))


if __name__ == '__main__':
  absltest.main()
