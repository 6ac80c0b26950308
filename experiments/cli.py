"""What the experiment scripts share: one-line errors, log set-up, flag parsing."""

import logging as std_logging
import sys
from typing import List, Optional, Sequence

from absl import logging

# Loggers whose lines users read: our progress, and AutoAttack's own wording.
USER_LOGGERS = ('uta_jax', 'auto-attack')


def fail(message: str) -> None:
  """One line on stderr, exit code 2, no traceback."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def show_logs(stream, *, timestamps: bool) -> None:
  """User-facing loggers to ``stream``; libraries (orbax, absl) at WARNING."""
  logging.set_verbosity(logging.WARNING)
  fmt = '%(asctime)s %(message)s' if timestamps else '%(message)s'
  for name in USER_LOGGERS:
    handler = std_logging.StreamHandler(stream)
    handler.setFormatter(std_logging.Formatter(fmt, '%H:%M:%S'))
    logger = std_logging.getLogger(name)
    logger.setLevel(std_logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False


def parse_floats(values: Optional[Sequence[str]],
                 flag: str) -> Optional[List[float]]:
  """A list flag as floats (None stays None), or a one-line error."""
  if values is None:
    return None
  try:
    return [float(v) for v in values]
  except ValueError:
    fail(f'--{flag} must be numbers, got {",".join(values)}')
