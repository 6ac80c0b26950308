"""Tests of uta_jax.loop in process: the device is not kept waiting by
checkpoint saves, and the outputs stay right across a resume."""

import os
import shutil
import time
from unittest import mock

from absl.testing import absltest
import chex
import pytest

from uta_jax import checkpointing
from uta_jax import configs
from uta_jax import loop
from uta_jax import training
from uta_jax import reporting
from uta_jax import runs

from testutil import final_state  # pylint: disable=g-bad-import-order
from testutil import tensorboard_scalars

# 512 embedded-MNIST images in batches of 32 (over conftest's 4 devices):
# 16 steps, a checkpoint every 4 and a progress record every 2.
OVERRIDES = {'max_train_examples': 512, 'max_eval_examples': 32,
             'batch_size': 32, 'epochs': 1, 'checkpoint_every': 4,
             'log_every': 2, 'attack.eps_train': 0.1,
             'eval.pgd_restarts': 1, 'eval.pgd_steps': 2, 'eval.uta_steps': 2,
             'eval.eps': (0.1,)}
SAVE_SECONDS = 0.5  # the slow writer's time per save


def _config():
  return configs.get_config('mnist_embedded', OVERRIDES)


class SlowWriterTest(absltest.TestCase):

  def test_training_steps_advance_while_a_save_is_in_flight(self):
    queued, seen_during_save = [], {}
    real_queued = training.Progress.queued  # pylint: disable=protected-access
    real_save = checkpointing.Checkpointer.save

    def record_queued(progress, step, metrics):
      queued.append(step)
      real_queued(progress, step, metrics)

    def slow_save(checkpointer, step, state):
      before = queued[-1]
      time.sleep(SAVE_SECONDS)
      seen_during_save[step] = (before, queued[-1])
      real_save(checkpointer, step, state)

    workdir = self.create_tempdir().full_path
    with mock.patch.object(training.Progress, 'queued', record_queued), \
        mock.patch.object(checkpointing.Checkpointer, 'save', slow_save):  # pylint: disable=protected-access
      results = loop.train_and_evaluate(_config(), workdir)
    self.assertEqual(results['status'], 'finished')
    self.assertEqual(sorted(seen_during_save), [4, 8, 12, 16])
    # While step s was written, the loop queued later steps (the last save
    # has no later steps; each save waits for the one before it).
    for step in (4, 8, 12):
      before, after = seen_during_save[step]
      self.assertGreater(after, before, f'no step queued while saving {step}')
    # Every save landed, verified: the newest restores as the final state.
    state, step = final_state(workdir, OVERRIDES)
    self.assertEqual(step, 16)
    self.assertEqual(int(state.step), 16)


@pytest.mark.slow  # three trainings
class ResumeOutputsTest(absltest.TestCase):

  def test_a_replayed_run_ends_equal_and_shows_each_step_once(self):
    reference = self.create_tempdir().full_path
    loop.train_and_evaluate(_config(), reference)
    workdir = self.create_tempdir().full_path
    calls = []

    def stop_at_step_14():
      calls.append(None)
      return len(calls) >= 14

    stopped = loop.train_and_evaluate(_config(), workdir,
                                      stop_requested=stop_at_step_14)
    self.assertEqual(stopped, {'status': 'preempted', 'step': 14})
    # As after a kill -9 at step 14: the newest checkpoint is step 12, so
    # the rerun replays steps 13 and 14, whose records already exist.
    shutil.rmtree(os.path.join(workdir, runs.CHECKPOINTS, '14'))
    loop.train_and_evaluate(_config(), workdir)
    a, _ = final_state(reference, OVERRIDES)
    b, _ = final_state(workdir, OVERRIDES)
    chex.assert_trees_all_equal(a.params, b.params)
    board = tensorboard_scalars(os.path.join(workdir, reporting.TENSORBOARD))
    shown = [(tag, step) for tag, step, _ in board]
    self.assertEqual(len(shown), len(set(shown)), 'a step shown twice')
    records = reporting.read_metrics(os.path.join(workdir,
                                                  reporting.METRICS))
    expected = sorted(
        (f"{r['kind']}/{k}", r['step']) for r in records for k, v in r.items()
        if k not in ('kind', 'step') and isinstance(v, (int, float)))
    self.assertEqual(sorted(shown), expected)
    self.assertIn(('train/loss', 14), shown)


if __name__ == '__main__':
  absltest.main()
