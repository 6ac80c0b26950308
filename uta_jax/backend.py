"""How a process sets JAX up before it computes: one CPU device per core
and JAX's persistent compilation cache.

Both must run before JAX starts a backend (the first ``jax.devices()``);
the scripts call them first (``experiments/cli.set_up_backend``), a user's
own program may too.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from uta_jax import errors

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# The most CPU devices use_cpu_cores_as_devices makes: the count is a power
# of two (the batch sizes divide over it), at most 8 (>= 16 examples per
# device at the default batch of 128).
MAX_CPU_DEVICES = 8
# The cache's size cap (least recently used entries go first). Setting one
# makes JAX lock the folder, so concurrent runs (a sweep, pytest -n) never
# read an entry another process is still writing.
COMPILATION_CACHE_BYTES = 4 << 30
# Programs that compile faster than this are not worth a file.
MIN_COMPILE_SECONDS = 0.2
# JAX's logger of its persistent cache (it logs each reset at INFO).
CACHE_LOGGER = 'jax._src.compilation_cache'


class BackendError(errors.NamesSettings, OSError):
  """The compilation cache's folder cannot be used; names the fix."""


def use_cpu_cores_as_devices() -> None:
  """Lets XLA split the CPU into one device per core (rounded down to a
  power of two, at most ``MAX_CPU_DEVICES``) unless XLA_FLAGS sets a count.

  Every program runs data-parallel over the local devices, and two CPU
  devices ran the attacks and the AT step 1.1-1.7x faster than one on 2
  cores; results do not depend on the device count. Only the CPU backend
  reads the flag, so accelerators are unchanged.
  """
  flags_now = os.environ.get('XLA_FLAGS', '')
  if DEVICE_COUNT_FLAG in flags_now:
    return
  cores = min(len(os.sched_getaffinity(0)), MAX_CPU_DEVICES)
  count = 1 << (cores.bit_length() - 1)
  os.environ['XLA_FLAGS'] = f'{flags_now} {DEVICE_COUNT_FLAG}={count}'.strip()


def default_compilation_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else the per-user cache folder."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'uta_jax', 'jax')


def enable_compilation_cache(folder: Optional[str]) -> Optional[str]:
  """JAX's persistent compilation cache in ``folder`` (None: the default;
  'none' or '': off), shared by every run of the user: a rerun, a new seed
  or a sweep's next run starts without compiling again. Takes effect at
  the next compilation, also in a process that has compiled before (JAX
  decides once whether to use the cache: that decision is reset). Returns
  the folder used, or None; raises ``BackendError`` when it cannot be
  created."""
  import jax  # pylint: disable=g-import-not-at-top
  if folder is None:
    folder = default_compilation_cache_dir()
  if folder.lower() in ('', 'none'):
    jax.config.update('jax_enable_compilation_cache', False)
    _forget_cache_decision()
    return None
  folder = os.path.abspath(os.path.expanduser(folder))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise BackendError(f'compilation_cache_dir {folder}: {e.strerror}; '
                       'choose another folder, or "none"',
                       'compilation_cache_dir') from e
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    MIN_COMPILE_SECONDS)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_BYTES)
  _forget_cache_decision()
  return folder


def _forget_cache_decision() -> None:
  """Makes JAX decide again, at its next compilation, whether to use the
  cache (it decides once per process). Quietly: JAX logs the reset at INFO,
  which absl would print in every script's output (and its one-line
  errors)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  log = logging.getLogger(CACHE_LOGGER)
  level = log.level
  log.setLevel(logging.WARNING)
  try:
    compilation_cache.reset_cache()
  finally:
    log.setLevel(level)
