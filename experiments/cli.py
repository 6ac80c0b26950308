"""What the experiment scripts share: one-line errors, log set-up, flag
parsing, and installing what the library provides before work starts (the
backend set-up, ``uta_jax.backend``; the stop signals,
``uta_jax.stopping``)."""

import fractions
import logging as std_logging
import sys
from typing import List, Optional, Sequence

from absl import flags
from absl import logging

from uta_jax import backend
from uta_jax import stopping

flags.DEFINE_string(
    'compilation_cache_dir', None,
    'JAX\'s persistent compilation cache, shared by every run and workdir of '
    'this user (a rerun, a new seed, a sweep\'s next run start without '
    'compiling again); default $JAX_COMPILATION_CACHE_DIR, else '
    '$XDG_CACHE_HOME/uta_jax/jax or ~/.cache/uta_jax/jax; "none" turns it '
    'off')

# Loggers whose lines users read: our progress, and AutoAttack's own wording.
USER_LOGGERS = ('uta_jax', 'auto-attack')


def fail(message: str) -> None:
  """One line on stderr, exit code 2, no traceback."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


class _RaisedInMainThread(std_logging.Filter):
  """Drops orbax's logs of an exception in its writer thread or in one of
  its write tasks (asyncio's 'Task exception was never retrieved', logged
  when the failed tasks are collected): tracebacks of the error orbax
  raises in the main thread, where the script turns it into one line (a
  full disk, say)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    if 'orbax' in record.pathname and 'raised an exception' in message:
      return False
    return not (record.name == 'asyncio' and 'orbax' in message and
                'Task exception was never retrieved' in message)


def _unraisablehook(unraisable):
  """After a failed checkpoint write, tensorstore's pending writes call back
  into orbax's finished event loop; Python reports each 'Event loop is
  closed' as an unraisable exception (a traceback): noise after the
  one-line error. Everything else is reported as usual."""
  if (unraisable.exc_type is RuntimeError and
      str(unraisable.exc_value) == 'Event loop is closed'):
    return
  sys.__unraisablehook__(unraisable)


def show_logs(stream, *, timestamps: bool) -> None:
  """User-facing loggers to ``stream``; libraries (orbax, absl) at WARNING."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_RaisedInMainThread())
  sys.unraisablehook = _unraisablehook
  fmt = '%(asctime)s %(message)s' if timestamps else '%(message)s'
  for name in USER_LOGGERS:
    handler = std_logging.StreamHandler(stream)
    handler.setFormatter(std_logging.Formatter(fmt, '%H:%M:%S'))
    logger = std_logging.getLogger(name)
    logger.setLevel(std_logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False


def set_up_backend() -> None:
  """What every script does before JAX starts: one CPU device per core
  (``backend.use_cpu_cores_as_devices``) and the compilation cache
  (``--compilation_cache_dir``)."""
  backend.use_cpu_cores_as_devices()
  try:
    backend.enable_compilation_cache(flags.FLAGS.compilation_cache_dir)
  except backend.BackendError as e:
    fail(f'--{e}')


def stop_signals(*, multihost: bool = False) -> stopping.StopSignals:
  """``stopping.StopSignals`` installed for this process."""
  return stopping.StopSignals(multihost=multihost).install()


def define_program_flags() -> None:
  """The flags of scripts that train many runs as few programs
  (``loop.train_and_evaluate_runs``)."""
  flags.DEFINE_integer('max_runs_per_program', None, 'train at most this '
                       'many runs as one program (default: as many as the '
                       'compiled program\'s memory analysis says fit)',
                       lower_bound=1)
  flags.DEFINE_enum('run_map', None, ['unroll', 'vmap'],
                    'how a program steps its runs: unroll (each run\'s step '
                    'written out) or vmap (batched); default unroll on CPUs, '
                    'vmap on accelerators')


def program_options() -> dict:
  """``define_program_flags``' values, as ``train_and_evaluate_runs``'
  keyword arguments."""
  f = flags.FLAGS
  return dict(max_runs_per_program=f.max_runs_per_program,
              run_map=f.run_map)


def parse_seeds(values: Sequence[str]) -> List[int]:
  """A --seeds list as distinct non-negative integers, or a one-line
  error."""
  chosen = []
  for text in values:
    if not text.strip().isdigit():
      fail(f'--seeds takes non-negative integers like 0,1,2; got {text!r}')
    if int(text) not in chosen:
      chosen.append(int(text))
  if not chosen:
    fail('--seeds needs at least one seed')
  return chosen


def parse_number(text: str) -> float:
  """A decimal or a fraction ('8/255'), as the nearest float."""
  try:
    return float(fractions.Fraction(text.strip()))
  except (ValueError, ZeroDivisionError) as e:
    raise ValueError(f'{text!r} is not a number (e.g. 0.1 or 8/255)') from e


def parse_floats(values: Optional[Sequence[str]],
                 flag: str) -> Optional[List[float]]:
  """A list flag as floats, decimals or fractions (None stays None), or a
  one-line error."""
  if values is None:
    return None
  try:
    return [parse_number(v) for v in values]
  except ValueError:
    fail(f'--{flag} must be numbers like 0.1 or 8/255, got '
         f'{",".join(values)}')


def parse_flags(argv: List[str]) -> List[str]:
  """``app.run``'s flags parser: a bad flag value is one ``error:`` line
  and exit code 2, as every other bad input (absl's own prints a FATAL
  line, a usage hint and exits 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
