"""One writer per workdir: an exclusive lock file naming its holder; and
the one error for a workdir that cannot be written.

A run (``loop.train_and_evaluate``) and an AutoAttack evaluation
(``runs.evaluate_workdir``) hold ``<workdir>/.lock`` while they write; a
second process on the same workdir stops at once with ``WorkdirBusy``,
whose message names the holder's host and pid. The lock is an
``fcntl.flock`` on that file, so the kernel releases it when the holder
exits in any way (``kill -9`` included): a stale lock cannot outlive its
process. In a multi-host run only process 0 takes it.

  >>> with hold(workdir):
  ...   train()

``write_error(e, workdir)`` turns an ``OSError`` met while writing a run
(disk full, read-only file system, no permission, a file where a folder
should be) into a ``WorkdirError`` whose one-line message names the file and
the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator

LOCK = '.lock'


class WorkdirError(RuntimeError):
  """The workdir cannot be locked; the message names the fix."""


class WorkdirBusy(WorkdirError):
  """Another live process holds the workdir; the message names it."""


_FIXES = {
    errno.ENOSPC: 'free disk space, then rerun the same command to resume '
                  'from the newest checkpoint',
    errno.EDQUOT: 'free space in your quota, then rerun the same command to '
                  'resume from the newest checkpoint',
    errno.EROFS: 'the file system is read-only: use a writable --workdir',
    errno.EACCES: 'make it writable or use another --workdir',
    errno.EPERM: 'make it writable or use another --workdir',
    errno.ENOTDIR: 'part of the path is a file, not a folder: use another '
                   '--workdir',
}


def write_error(e: OSError, workdir: str) -> WorkdirError:
  """A one-line ``WorkdirError`` for an ``OSError`` met writing ``workdir``."""
  where = repr(e.filename) if e.filename else f'to workdir {workdir!r}'
  reason = e.strerror or str(e)
  fix = _FIXES.get(e.errno, 'check the folder, then rerun the same command')
  return WorkdirError(f'cannot write {where} ({reason}): {fix}')


def _holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or '{}')
  except (OSError, ValueError):
    info = {}
  if not info:
    return 'another process'
  since = time.strftime('%Y-%m-%d %H:%M:%S',
                        time.localtime(info.get('since', 0)))
  return (f"pid {info.get('pid')} on {info.get('host')} "
          f"({info.get('what', 'a run')}, since {since})")


@contextlib.contextmanager
def hold(workdir: str, *, what: str = 'training', enabled: bool = True
        ) -> Iterator[None]:
  """Holds the lock of ``workdir`` (created if needed) for the block.

  Raises ``WorkdirBusy`` when another live process holds it, and
  ``WorkdirError`` when the lock file cannot be written. With
  ``enabled=False`` (the other processes of a multi-host run) does nothing.
  """
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f'cannot write to workdir {workdir!r} ({e.strerror}):'
                       ' make it writable or use another --workdir') from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(
          f'workdir {workdir!r} is in use by {_holder(fd)}: wait for it to '
          'finish or stop it, or use another --workdir') from None
    info = {'host': socket.gethostname(), 'pid': os.getpid(), 'what': what,
            'since': time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # no holder named once released
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
