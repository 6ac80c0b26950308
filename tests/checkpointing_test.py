"""Tests of uta_jax.checkpointing: round trip, corruption and fallback."""

import json
import os
import threading
from unittest import mock

from absl.testing import absltest
import chex
import jax
import numpy as np

from uta_jax import checkpointing
from uta_jax import classifier
from uta_jax import configs
from uta_jax import steps


def _state(seed=0):
  config = configs.get_config('mnist', {'seed': seed})
  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, 10)
  return jax.device_get(steps.create_train_state(config, model, tx,
                                                 (28, 28, 1)))


def _data_files(step_dir):
  """The array data files orbax wrote for one step (its ``d/`` folders)."""
  return [os.path.join(root, f) for root, _, files in os.walk(step_dir)
          if os.path.basename(root) == 'd' for f in files]


class CheckpointerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    self.state = _state()
    self.later = self.state.replace(
        step=np.int32(20),
        params=jax.tree_util.tree_map(lambda v: v + 1.0, self.state.params))

  def test_round_trip_is_bitwise(self):
    ck = checkpointing.Checkpointer(self.dir)
    ck.save(20, self.later)
    restored, step = ck.restore_latest(self.state)
    ck.close()
    self.assertEqual(step, 20)
    chex.assert_trees_all_equal(restored, self.later)
    self.assertIsInstance(restored, steps.TrainState)

  def test_empty_or_missing_directory_restores_nothing(self):
    ck = checkpointing.Checkpointer(os.path.join(self.dir, 'new'))
    self.assertEqual(ck.restore_latest(self.state), (None, None))
    ck.close()

  def test_flipped_bytes_fall_back_to_the_newest_valid_step(self):
    ck = checkpointing.Checkpointer(self.dir)
    ck.save(10, self.state)
    ck.save(20, self.later)
    ck.close()
    files = _data_files(os.path.join(self.dir, '20'))
    self.assertNotEmpty(files)
    for path in files:  # flip bytes in the middle of every data file
      with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    ck = checkpointing.Checkpointer(self.dir)
    with self.assertLogs('uta_jax', level='WARNING') as logs:
      restored, step = ck.restore_latest(self.state)
    ck.close()
    self.assertEqual(step, 10)
    chex.assert_trees_all_equal(restored, self.state)
    self.assertIn('step 20', ' '.join(logs.output))

  def test_an_unverified_step_is_removed_and_can_be_saved_again(self):
    # The kill window of old versions: orbax finished step 20, its checksum
    # was never written. Resuming from 10 must be able to save 20 again.
    ck = checkpointing.Checkpointer(self.dir)
    ck.save(10, self.state)
    ck.save(20, self.later)
    ck.close()
    path = os.path.join(self.dir, checkpointing.CHECKSUMS)
    with open(path) as f:
      sums = json.load(f)
    del sums['20']
    with open(path, 'w') as f:
      json.dump(sums, f)
    ck = checkpointing.Checkpointer(self.dir)
    with self.assertLogs('uta_jax', level='WARNING') as logs:
      _, step = ck.restore_latest(self.state)
    self.assertEqual(step, 10)
    self.assertIn('step 20 has no checksum', ' '.join(logs.output))
    self.assertEqual(ck.steps(), [10])
    ck.save(20, self.later)  # raised StepAlreadyExistsError before
    restored, step = ck.restore_latest(self.state)
    ck.close()
    self.assertEqual(step, 20)
    chex.assert_trees_all_equal(restored, self.later)

  def test_a_kill_inside_a_save_leaves_a_resumable_state(self):
    def killed(*args, **kwargs):
      del args, kwargs
      raise KeyboardInterrupt('killed')

    # Killed while writing the checksum, or while orbax writes the step.
    for target in ('_write_checksums', 'orbax'):
      with self.subTest(killed_in=target):
        directory = self.create_tempdir().full_path
        ck = checkpointing.Checkpointer(directory)
        ck.save(10, self.state)
        if target == 'orbax':
          ck._manager.save = killed  # pylint: disable=protected-access
        else:
          ck._write_checksums = killed  # pylint: disable=protected-access
        with self.assertRaises(KeyboardInterrupt):
          ck.save(20, self.later)
        ck.close()
        ck = checkpointing.Checkpointer(directory)
        restored, step = ck.restore_latest(self.state)
        self.assertEqual(step, 10)
        chex.assert_trees_all_equal(restored, self.state)
        ck.save(20, self.later)  # the rerun reaches step 20 again
        self.assertEqual(ck.restore_latest(self.state)[1], 20)
        ck.close()

  def test_a_failed_write_keeps_the_older_steps_and_raises_its_errno(self):
    # What orbax raises when the disk fills up while it writes a step.
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT '
                      'database: Failed to write 1499382 bytes to file 15: '
                      "No space left on device [os_error_code='28']")
    ck = checkpointing.Checkpointer(self.dir)
    ck.save(10, self.state)
    save = ck._manager.save  # pylint: disable=protected-access

    def fails_half_way(step, **kwargs):
      del kwargs
      os.makedirs(os.path.join(self.dir, f'{step}.orbax-checkpoint-tmp'))
      raise full

    ck._manager.save = fails_half_way  # pylint: disable=protected-access
    with self.assertRaises(OSError) as raised:
      ck.save(20, self.later)
    self.assertEqual(raised.exception.errno, 28)
    self.assertEqual(raised.exception.filename, self.dir)
    self.assertIs(raised.exception.__cause__, full)
    self.assertEqual(os.listdir(self.dir).count('20.orbax-checkpoint-tmp'), 0)
    self.assertEqual(ck.restore_latest(self.state)[1], 10)
    ck._manager.save = save  # pylint: disable=protected-access
    ck.save(20, self.later)  # space freed: the same step saves
    restored, step = ck.restore_latest(self.state)
    self.assertEqual(step, 20)
    chex.assert_trees_all_equal(restored, self.later)
    ck.close()

  def test_other_save_errors_pass_through(self):
    ck = checkpointing.Checkpointer(self.dir)

    def broken(*args, **kwargs):
      del args, kwargs
      raise TypeError('not a pytree')

    ck._manager.save = broken  # pylint: disable=protected-access
    with self.assertRaisesRegex(TypeError, 'not a pytree'):
      ck.save(10, self.state)
    ck.close()

  def test_temporary_folders_of_interrupted_saves_are_removed(self):
    ck = checkpointing.Checkpointer(self.dir)
    ck.save(10, self.state)
    ck.close()
    tmp = os.path.join(self.dir, '20.orbax-checkpoint-tmp-1234')
    os.makedirs(os.path.join(tmp, 'default'))
    ck = checkpointing.Checkpointer(self.dir)
    with self.assertLogs('uta_jax', level='WARNING') as logs:
      _, step = ck.restore_latest(self.state)
    ck.close()
    self.assertEqual(step, 10)
    self.assertFalse(os.path.exists(tmp))
    self.assertIn('interrupted', ' '.join(logs.output))

  def test_checksum_sees_every_byte(self):
    a = {'w': np.zeros(4, np.float32)}
    b = {'w': np.array([0, 0, 0, 1e-30], np.float32)}
    self.assertNotEqual(checkpointing.tree_checksum(a),
                        checkpointing.tree_checksum(b))


class BackgroundSaverTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.checkpointer = checkpointing.Checkpointer(
        self.create_tempdir().full_path)
    self.state = _state()

  def test_the_caller_goes_on_while_the_writer_saves(self):
    release = threading.Event()
    real_save = checkpointing.Checkpointer.save

    def blocked_save(checkpointer, step, state):
      self.assertTrue(release.wait(10))
      real_save(checkpointer, step, state)

    saver = checkpointing.BackgroundSaver(self.checkpointer)
    with mock.patch.object(checkpointing.Checkpointer, 'save', blocked_save):
      saver.submit(3, self.state)  # returns while the save waits
      self.assertTrue(saver.busy())
      self.assertEqual(self.checkpointer.steps(), [])
      release.set()
      saver.wait()
    self.assertFalse(saver.busy())
    self.assertEqual(self.checkpointer.steps(), [3])
    restored, step = self.checkpointer.restore_latest(self.state)
    self.assertEqual(step, 3)
    chex.assert_trees_all_equal(restored, self.state)
    saver.close()

  def test_a_refused_state_is_not_written_and_its_error_comes_back(self):
    def refuse(step, state):
      del state
      if step == 2:
        raise ValueError('non-finite parameters at step 2')

    saver = checkpointing.BackgroundSaver(self.checkpointer, validate=refuse)
    saver.submit(1, self.state)
    saver.submit(2, self.state)
    with self.assertRaisesRegex(ValueError, 'step 2'):
      saver.wait()
    self.assertEqual(self.checkpointer.steps(), [1])
    saver.submit(3, self.state)  # the error is reported once
    saver.wait()
    self.assertEqual(self.checkpointer.steps(), [1, 3])
    saver.close()

  def test_a_failed_write_is_raised_by_the_next_submit(self):
    saver = checkpointing.BackgroundSaver(self.checkpointer)
    with mock.patch.object(checkpointing.Checkpointer, 'save',
                           side_effect=OSError(28, 'No space left')):
      saver.submit(1, self.state)
      with self.assertRaises(OSError):
        saver.submit(2, self.state)
    saver.close()

  def test_in_the_callers_thread_when_not_in_the_background(self):
    saver = checkpointing.BackgroundSaver(self.checkpointer, background=False)
    with mock.patch.object(checkpointing.Checkpointer, 'save') as save:
      saver.submit(5, self.state)
      save.assert_called_once()
      self.assertFalse(saver.busy())
    saver.close()


if __name__ == '__main__':
  absltest.main()
