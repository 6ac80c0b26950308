"""Checkpoints that survive kills and detect corruption.

orbax's ``CheckpointManager`` writes each step atomically (a temporary folder
renamed when complete), so ``kill -9`` never leaves a half step that looks
finished. orbax does not notice flipped bytes inside a finished step, so we
store a SHA-256 of every saved state in ``checksums.json`` beside the steps
and verify it on restore. The checksum is recorded *before* orbax writes the
step: a kill at any instant leaves either the old newest step or the new one,
each with its checksum.

On restore, every step that has no checksum, does not load or fails its
checksum is removed with a warning naming it (a later save of the same step
would otherwise fail with orbax's ``StepAlreadyExistsError``), as are the
temporary folders of interrupted saves; the newest valid step is used.

``BackgroundSaver`` runs those saves on a writer thread, so that training
goes on while a step is fetched, checked, hashed and written.
"""

from __future__ import annotations

import concurrent.futures
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Optional, Tuple

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger('uta_jax')

CHECKSUMS = 'checksums.json'
TMP_PATTERN = '*.orbax-checkpoint-tmp*'  # orbax's in-progress step folders
# After a failed save, how long the step's temporary folder must stay gone
# (tensorstore can still finish writes of the failed step after orbax has
# raised, re-creating the folder), and the most time spent waiting for that.
QUIET_SECONDS, MAX_WAIT_SECONDS = 0.2, 5.0


def tree_checksum(tree: Any) -> str:
  """SHA-256 over the dtypes, shapes and bytes of a pytree's leaves."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    leaf = np.asarray(leaf)
    digest.update(f'{leaf.dtype}{leaf.shape}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


class Checkpointer:
  """Saves and restores a pytree state under ``directory``."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            create=True))

  # -- checksums ----------------------------------------------------------

  def _checksum_path(self) -> str:
    return os.path.join(self.directory, CHECKSUMS)

  def _read_checksums(self) -> dict:
    try:
      with open(self._checksum_path()) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def _write_checksums(self, checksums: dict) -> None:
    if jax.process_index() != 0:
      return
    tmp = self._checksum_path() + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(checksums, f, indent=1, sort_keys=True)
    os.replace(tmp, self._checksum_path())

  # -- save / restore -----------------------------------------------------

  def save(self, step: int, state: Any) -> None:
    """Saves ``state`` (host arrays or a flax struct) as ``step``.

    The checksum goes first: a step that exists always has one; a checksum
    whose step never got written is harmless and dropped by the next save.
    """
    tree = flax.serialization.to_state_dict(state)
    kept = set(self._manager.all_steps())
    checksums = {s: c for s, c in self._read_checksums().items()
                 if int(s) in kept}
    checksums[str(step)] = tree_checksum(tree)
    self._write_checksums(checksums)
    try:
      self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      # orbax reports a failed write (disk full, ...) as a ValueError from
      # tensorstore; drop the half-written step so that the older ones stay
      # the newest, and raise an OSError the caller can explain.
      self._discard_failed_save()
      self._manager.reload()
      raise _as_os_error(e, self.directory) from e

  def steps(self) -> list:
    return sorted(self._manager.all_steps())

  def restore_latest(self, target: Any) -> Tuple[Optional[Any], Optional[int]]:
    """The newest step that loads and verifies, as ``target``'s type.

    Returns ``(None, None)`` when there is no valid step.
    """
    self._remove_tmp_folders()
    checksums = self._read_checksums()
    target_tree = flax.serialization.to_state_dict(target)
    found = None
    for step in reversed(self.steps()):
      if found is not None:
        break  # older steps stay: they are only rotated out
      expected = checksums.get(str(step))
      if expected is None:
        self._remove(step, 'has no checksum (saved by an older version, or '
                     'its checksums.json entry is lost)')
        continue
      try:
        tree = self._manager.restore(
            step, args=ocp.args.StandardRestore(target_tree))
      except Exception as e:  # pylint: disable=broad-except
        self._remove(step, f'does not load ({type(e).__name__})')
        continue
      if tree_checksum(tree) != expected:
        self._remove(step, 'fails its checksum (corrupted bytes)')
        continue
      found = flax.serialization.from_state_dict(target, tree), step
    return found or (None, None)

  def _remove(self, step: int, why: str) -> None:
    """Deletes an unusable step so that training can write it again."""
    log.warning('checkpoint step %d %s: removed it, falling back to an '
                'older step', step, why)
    if jax.process_index() == 0:
      self._manager.delete(step)
    self._manager.reload()

  def _discard_failed_save(self) -> None:
    """Removes the failed step's temporary folder until it stays removed.

    orbax raises at the first failed write while tensorstore's other writes of
    that step are still in flight (in C++); one removal can race with them
    (3 runs in 10 on a full 3 MB tmpfs left ``20.orbax-checkpoint-tmp``
    behind).
    """
    deadline = time.monotonic() + MAX_WAIT_SECONDS
    self._remove_tmp_folders()
    while time.monotonic() < deadline:
      time.sleep(QUIET_SECONDS)
      if not glob.glob(os.path.join(self.directory, TMP_PATTERN)):
        return
      self._remove_tmp_folders()

  def _remove_tmp_folders(self) -> None:
    for path in glob.glob(os.path.join(self.directory, TMP_PATTERN)):
      log.warning('removing %s, the temporary folder of an interrupted '
                  'checkpoint save', path)
      if jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)

  def close(self) -> None:
    self._manager.close()


def _as_os_error(e: Exception, directory: str) -> Exception:
  """``e`` if it is not a write failure, else an ``OSError`` with its errno
  (orbax's tensorstore errors carry it as ``[os_error_code='28']``)."""
  if isinstance(e, OSError):
    return e
  code = re.search(r"os_error_code='?(\d+)", str(e))
  if code:
    number = int(code.group(1))
    return OSError(number, os.strerror(number), directory)
  if 'RESOURCE_EXHAUSTED' in str(e):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
  return e


class BackgroundSaver:
  """``Checkpointer.save`` on a writer thread: training goes on during a save.

  ``submit(step, state)`` takes a state that later steps will not touch
  (the training loop hands a device copy, made before the next step
  donates its buffers). The writer fetches it to the host, runs
  ``validate(step, host_state)`` (which raises to refuse it: a non-finite
  state is never written) and saves it with its checksum first, as
  ``Checkpointer.save`` does. One save is in flight at a time: a submit
  waits for the previous one. A failed save (disk full, a refused state)
  is raised by the next ``submit``, ``check`` or ``wait``.

  ``background=False`` saves in the caller's thread (multi-host runs, whose
  orbax saves synchronise the hosts).
  """

  def __init__(self, checkpointer: Checkpointer, *,
               validate: Callable[[int, Any], None] = lambda step, state: None,
               background: bool = True):
    self.checkpointer = checkpointer
    self._validate = validate
    self._pool = (concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='checkpoint-writer')
                  if background else None)
    self._in_flight: Optional[concurrent.futures.Future] = None

  def _save(self, step: int, state: Any) -> None:
    host_state = jax.device_get(state)
    self._validate(step, host_state)
    self.checkpointer.save(step, host_state)

  def submit(self, step: int, state: Any) -> None:
    self.wait()
    if self._pool is None:
      self._save(step, state)
    else:
      self._in_flight = self._pool.submit(self._save, step, state)

  def busy(self) -> bool:
    """A save is being written now."""
    return self._in_flight is not None and not self._in_flight.done()

  def check(self) -> None:
    """Raises the error of a finished failed save; never waits."""
    if self._in_flight is not None and self._in_flight.done():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises its error."""
    future, self._in_flight = self._in_flight, None
    if future is not None:
      future.result()

  def close(self) -> None:
    """Waits for the save in flight (its error is dropped: the caller is
    already ending, by another error or after ``wait``) and closes."""
    try:
      self.wait()
    except Exception:  # pylint: disable=broad-except
      pass
    if self._pool is not None:
      self._pool.shutdown(wait=True)
    self.checkpointer.close()
