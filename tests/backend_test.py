"""Tests of uta_jax.backend: the CPU device count and the compilation
cache's folder."""

import os
import stat
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax

from uta_jax import backend


class CpuDevicesTest(parameterized.TestCase):

  def _devices_with(self, cores, xla_flags):
    env = {} if xla_flags is None else {'XLA_FLAGS': xla_flags}
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(
        os, 'sched_getaffinity', return_value=set(range(cores))):
      backend.use_cpu_cores_as_devices()
      return os.environ['XLA_FLAGS']

  @parameterized.parameters((1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8))
  def test_one_device_per_core_a_power_of_two_at_most_eight(self, cores,
                                                           devices):
    self.assertEqual(self._devices_with(cores, None),
                     f'{backend.DEVICE_COUNT_FLAG}={devices}')

  def test_other_xla_flags_are_kept(self):
    self.assertEqual(self._devices_with(2, '--xla_cpu_use_thunk_runtime'),
                     f'--xla_cpu_use_thunk_runtime {backend.DEVICE_COUNT_FLAG}=2')

  def test_a_count_the_user_set_wins(self):
    flags = f'{backend.DEVICE_COUNT_FLAG}=1'
    self.assertEqual(self._devices_with(16, flags), flags)



class CompilationCacheTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    before = {k: getattr(jax.config, k) for k in (
        'jax_enable_compilation_cache', 'jax_compilation_cache_dir',
        'jax_persistent_cache_min_compile_time_secs',
        'jax_compilation_cache_max_size')}
    self.addCleanup(lambda: [jax.config.update(k, v)
                             for k, v in before.items()])

  def test_a_folder_is_created_and_used(self):
    folder = os.path.join(self.create_tempdir().full_path, 'a', 'cache')
    self.assertEqual(backend.enable_compilation_cache(folder), folder)
    self.assertTrue(os.path.isdir(folder))
    self.assertTrue(jax.config.jax_enable_compilation_cache)
    self.assertEqual(jax.config.jax_compilation_cache_dir, folder)

  def test_none_turns_it_off(self):
    self.assertIsNone(backend.enable_compilation_cache('none'))
    self.assertFalse(jax.config.jax_enable_compilation_cache)

  def test_it_can_be_turned_on_and_off_after_compiling(self):
    # JAX decides at its first compilation whether to use the cache; a
    # benchmark times evaluations with and without it in one process.
    self.addCleanup(backend.enable_compilation_cache, 'none')
    backend.enable_compilation_cache('none')
    jax.jit(lambda x: x + 1)(1.0).block_until_ready()
    folder = self.create_tempdir().full_path
    backend.enable_compilation_cache(folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.jit(lambda x: x * 3 - 2)(1.0).block_until_ready()
    written = os.listdir(folder)
    self.assertNotEmpty(written)
    backend.enable_compilation_cache('none')
    jax.jit(lambda x: x * 5 - 4)(1.0).block_until_ready()
    self.assertCountEqual(os.listdir(folder), written)

  def test_switching_it_logs_nothing(self):
    # A script's stderr carries its one-line errors only.
    with self.assertNoLogs(backend.CACHE_LOGGER, level='INFO'):
      backend.enable_compilation_cache(self.create_tempdir().full_path)
      backend.enable_compilation_cache('none')

  def test_the_default_folder_follows_the_environment(self):
    with mock.patch.dict(os.environ, {'JAX_COMPILATION_CACHE_DIR': '/c'}):
      self.assertEqual(backend.default_compilation_cache_dir(), '/c')
    with mock.patch.dict(os.environ, {'XDG_CACHE_HOME': '/x'}, clear=True):
      self.assertEqual(backend.default_compilation_cache_dir(),
                       '/x/uta_jax/jax')

  def test_an_unusable_folder_is_an_error_naming_the_setting(self):
    if os.geteuid() == 0:
      parent = '/proc/1'  # root may write anywhere else
    else:
      parent = self.create_tempdir().full_path
      os.chmod(parent, stat.S_IRUSR | stat.S_IXUSR)
    with self.assertRaisesRegex(backend.BackendError,
                                r'^compilation_cache_dir .*: .*; choose '
                                'another folder, or "none"$'):
      backend.enable_compilation_cache(os.path.join(parent, 'cache'))


if __name__ == '__main__':
  absltest.main()
