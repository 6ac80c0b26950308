"""Stopping long work cleanly on SIGTERM (preemption) and Ctrl-C.

``StopSignals`` is the ``stop_requested`` callable the loop, evaluation and
AutoAttack poll: after a signal, training checkpoints and returns,
evaluation and AutoAttack raise ``parallel.Stopped`` between batches,
keeping what is finished; a second signal ends the process at once. The
library only provides it: a program installs it (``install``), as the
scripts do.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

log = logging.getLogger('uta_jax')


class StopSignals:
  """Records SIGTERM / SIGINT; call the instance as ``stop_requested``.

  In a multi-host run (``multihost``, after ``jax.distributed``) JAX's
  coordination service owns SIGTERM and the training loop stops every host
  at one step (``parallel.preemption_reached``); Ctrl-C is passed on to it
  as SIGTERM, and nothing stops a single host alone (the others would wait
  for it in a collective).
  """

  def __init__(self, *, multihost: bool = False):
    self.multihost = multihost
    self.received: Optional[int] = None

  def install(self) -> 'StopSignals':
    """Installs the handlers (from the main thread); returns ``self``."""
    if self.multihost:
      signal.signal(signal.SIGINT, self._forward_to_coordinator)
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, self.handle)
    return self

  def _forward_to_coordinator(self, signum, frame):
    del signum, frame
    log.warning('SIGINT received: every host stops at the next '
                'synchronised step')
    os.kill(os.getpid(), signal.SIGTERM)

  def handle(self, signum, frame=None):
    """The handler: the first signal asks for a stop, a second exits now."""
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      # Straight to stderr: the process ends before any handler could.
      os.write(2, f'error: second {name}: exiting now, without saving\n'
               .encode())
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.received = signum
    log.warning('%s received: stopping at the next checkpoint (again to '
                'exit at once)', name)

  def __call__(self) -> bool:
    return self.received is not None

  def exit_code(self) -> int:
    """0 after SIGTERM (preemption is a normal end), 130 after Ctrl-C."""
    return 128 + signal.SIGINT if self.received == signal.SIGINT else 0
