"""Checkpoints that survive kills and detect corruption.

orbax's ``CheckpointManager`` writes each step atomically (a temporary folder
renamed when complete), so ``kill -9`` never leaves a half step that looks
finished. orbax does not notice flipped bytes inside a finished step, so we
store a SHA-256 of every saved state in ``checksums.json`` beside the steps
and verify it on restore; a step that fails to load or to verify is skipped
with a warning and the newest valid one is used. A step saved without its
checksum (killed in between) is not trusted either.
"""

from __future__ import annotations

import hashlib
import json
import logging

log = logging.getLogger('uta_jax')
import os
from typing import Any, Optional, Tuple

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKSUMS = 'checksums.json'


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
    """Saves ``state`` (host arrays or a flax struct) as ``step``."""
    tree = flax.serialization.to_state_dict(state)
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()
    checksums = {s: c for s, c in self._read_checksums().items()
                 if int(s) in self._manager.all_steps()}
    checksums[str(step)] = tree_checksum(tree)
    self._write_checksums(checksums)

  def steps(self) -> list:
    return sorted(self._manager.all_steps())

  def restore_latest(self, target: Any) -> Tuple[Optional[Any], Optional[int]]:
    """The newest step that loads and verifies, as ``target``'s type.

    Returns ``(None, None)`` when there is no valid step.
    """
    checksums = self._read_checksums()
    target_tree = flax.serialization.to_state_dict(target)
    for step in reversed(self.steps()):
      expected = checksums.get(str(step))
      if expected is None:
        log.warning('checkpoint step %d has no checksum (interrupted '
                        'save?); skipping it', step)
        continue
      try:
        tree = self._manager.restore(
            step, args=ocp.args.StandardRestore(target_tree))
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint step %d does not load (%s); falling back '
                        'to an older step', step, type(e).__name__)
        continue
      if tree_checksum(tree) != expected:
        log.warning('checkpoint step %d fails its checksum (corrupted '
                        'bytes); falling back to an older step', step)
        continue
      return flax.serialization.from_state_dict(target, tree), step
    return None, None

  def close(self) -> None:
    self._manager.close()
