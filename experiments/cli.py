"""What the experiment scripts share: one-line errors, log set-up, flag
parsing, the backend set-up (CPU devices, the compilation cache), and
stopping on SIGTERM / Ctrl-C."""

import fractions
import logging as std_logging
import os
import signal
import sys
from typing import List, Optional, Sequence

from absl import flags
from absl import logging

flags.DEFINE_string(
    'compilation_cache_dir', None,
    'JAX\'s persistent compilation cache, shared by every run and workdir of '
    'this user (a rerun, a new seed, a sweep\'s next run start without '
    'compiling again); default $JAX_COMPILATION_CACHE_DIR, else '
    '$XDG_CACHE_HOME/uta_jax/jax or ~/.cache/uta_jax/jax; "none" turns it '
    'off')

# Loggers whose lines users read: our progress, and AutoAttack's own wording.
USER_LOGGERS = ('uta_jax', 'auto-attack')

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# The most CPU devices use_cpu_cores_as_devices makes: the count is a power
# of two (the batch sizes divide over it), at most 8 (>= 16 examples per
# device at the default batch of 128).
MAX_CPU_DEVICES = 8


def fail(message: str) -> None:
  """One line on stderr, exit code 2, no traceback."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


class _RaisedInMainThread(std_logging.Filter):
  """Drops orbax's log of an exception in its writer thread (a traceback):
  orbax raises the same error in the main thread, where the script turns it
  into one line (a full disk, say)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not ('orbax' in record.pathname and
                'raised an exception' in record.getMessage())


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


def use_cpu_cores_as_devices() -> None:
  """Lets XLA split the CPU into one device per core (rounded down to a
  power of two, at most ``MAX_CPU_DEVICES``) unless XLA_FLAGS sets a count.

  The scripts run every program data-parallel over the local devices, and
  two CPU devices ran the attacks and the AT step 1.1-1.7x faster than one
  on 2 cores (README, "CPU devices"); results do not depend on the device
  count. Only the CPU backend reads the flag, so accelerators are unchanged.
  Call before JAX starts a backend (the first ``jax.devices()``).
  """
  flags_now = os.environ.get('XLA_FLAGS', '')
  if DEVICE_COUNT_FLAG in flags_now:
    return
  cores = min(len(os.sched_getaffinity(0)), MAX_CPU_DEVICES)
  count = 1 << (cores.bit_length() - 1)
  os.environ['XLA_FLAGS'] = f'{flags_now} {DEVICE_COUNT_FLAG}={count}'.strip()


# The cache's size cap (least recently used entries go first). Setting one
# makes JAX lock the folder, so concurrent runs (a sweep, pytest -n) never
# read an entry another process is still writing.
COMPILATION_CACHE_BYTES = 4 << 30


def default_compilation_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else the per-user cache folder."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'uta_jax', 'jax')


def enable_compilation_cache(folder: Optional[str]) -> Optional[str]:
  """JAX's persistent compilation cache in ``folder`` (None: the default;
  'none' or '': off). Every program that took at least 0.2 s to compile is
  stored and reused by later processes. Returns the folder used, or None."""
  import jax  # pylint: disable=g-import-not-at-top
  if folder is None:
    folder = default_compilation_cache_dir()
  if folder.lower() in ('', 'none'):
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  folder = os.path.abspath(os.path.expanduser(folder))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    fail(f'--compilation_cache_dir {folder}: {e.strerror}; choose another '
         'folder, or "none"')
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_BYTES)
  return folder


def set_up_backend() -> None:
  """What every script does before JAX starts: one CPU device per core
  (``use_cpu_cores_as_devices``) and the compilation cache
  (``--compilation_cache_dir``)."""
  use_cpu_cores_as_devices()
  enable_compilation_cache(flags.FLAGS.compilation_cache_dir)


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


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) ask long loops to stop at their next check.

  Call the instance as ``stop_requested``: training checkpoints and returns,
  evaluation and AutoAttack raise ``parallel.Stopped`` between batches,
  keeping what is finished. A second signal ends the process at once.

  In a multi-host run (``multihost``, after ``jax.distributed``) JAX's
  coordination service owns SIGTERM and the training loop stops every host
  at one step (``parallel.preemption_reached``); Ctrl-C is passed on to it
  as SIGTERM, and nothing stops a single host alone (the others would wait
  for it in a collective).
  """

  def __init__(self, *, multihost: bool = False):
    self.received = None
    if multihost:
      signal.signal(signal.SIGINT, self._forward_to_coordinator)
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _forward_to_coordinator(self, signum, frame):
    del signum, frame
    print('SIGINT received: every host stops at the next synchronised step',
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      print(f'error: second {signal.Signals(signum).name}: exiting now, '
            'without saving', file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.received = signum
    print(f'{signal.Signals(signum).name} received: stopping at the next '
          'checkpoint (again to exit at once)', file=sys.stderr, flush=True)

  def __call__(self) -> bool:
    return self.received is not None

  def exit_code(self) -> int:
    """0 after SIGTERM (preemption is a normal end), 130 after Ctrl-C."""
    return 128 + signal.SIGINT if self.received == signal.SIGINT else 0
