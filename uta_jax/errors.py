"""Errors whose messages name settings by their schema path.

The library knows no flag names: a message says ``batch_size`` or
``attack.eps_train`` and lists those paths in ``paths``; a front end writes
them as what its user typed (``experiments/config_flags.message``:
``--batch_size``, ``--eps_train``).
"""

from typing import Callable


class NamesSettings(Exception):
  """Base of the library's user-facing errors; ``paths``: the settings the
  message names."""

  def __init__(self, message: str, *paths: str):
    super().__init__(message)
    self.paths = paths

  def renamed(self, name: Callable[[str], str]) -> str:
    """The message with each of ``paths`` replaced by ``name(path)``."""
    text = str(self)
    for path in sorted(self.paths, key=len, reverse=True):
      text = text.replace(path, name(path))
    return text
