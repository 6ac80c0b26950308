"""Tests of uta_jax.loop in process: the device is not kept waiting by
checkpoint saves, and the outputs stay right across a resume."""

import json
import os
import shutil
import subprocess
import sys
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np
import pytest

from uta_jax import checkpointing
from uta_jax import configs
from uta_jax import loop
from uta_jax import programs
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


@pytest.mark.accelerator  # a short train with background saves
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
@pytest.mark.accelerator  # a short train, stopped and resumed
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


def _seed_configs(*seeds):
  return [configs.get_config('mnist_embedded', dict(OVERRIDES, seed=s))
          for s in seeds]


class ProgramOfRunsTest(absltest.TestCase):

  def _train_with_a_nan_batch(self, *, background):
    """Seeds 0 and 1 as one program, a checkpoint every step; seed 1's
    batch of step 5 is NaN, so its parameters turn non-finite at step 5
    (its loss of step 5 is read one step later). Returns the results, the
    workdirs and the reference run of seed 0 trained alone."""
    overrides = dict(OVERRIDES, checkpoint_every=1)
    good, bad = [configs.get_config('mnist_embedded', dict(overrides, seed=s))
                 for s in (0, 1)]
    root = self.create_tempdir().full_path
    reference = os.path.join(root, 'alone')
    loop.train_and_evaluate(good, reference)
    real_batch = training.global_batch

    def nan_batch(split, step, config):
      batch = real_batch(split, step, config)
      if config.seed == 1 and step == 4:  # the batch of step 5
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      return batch

    workdirs = [os.path.join(root, 'good'), os.path.join(root, 'bad')]
    with mock.patch.object(training, 'global_batch', nan_batch):
      results = loop.train_and_evaluate_runs([good, bad], workdirs,
                                             background_saves=background)
    return results, workdirs, reference, overrides

  def _assert_the_other_run_is_unchanged(self, results, workdirs, reference,
                                         overrides):
    self.assertEqual(results[0]['status'], 'finished')
    self.assertEqual(results[1]['status'], 'failed')
    self.assertIsInstance(results[1]['error'], training.TrainingError)
    a, _ = final_state(reference, overrides)
    b, step = final_state(workdirs[0], overrides)
    self.assertEqual(step, 16)
    chex.assert_trees_all_equal(a.params, b.params)
    self.assertEqual(results[0]['clean_accuracy'],
                     runs.read_results(reference)['clean_accuracy'])
    # The failed run keeps its last good checkpoint, step 4.
    state, step = final_state(workdirs[1], overrides)
    self.assertEqual(step, 4)
    self.assertTrue(all(np.isfinite(p).all() for p in
                        jax.tree_util.tree_leaves(state.params)))

  def test_a_refused_synchronous_save_stops_its_run_alone(self):
    # The saver of several hosts validates in the loop: its refusal of
    # step 5's parameters stops that run, not the program.
    results, *rest = self._train_with_a_nan_batch(background=False)
    self.assertIn('non-finite parameters at step 5', str(results[1]['error']))
    self._assert_the_other_run_is_unchanged(results, *rest)

  @pytest.mark.slow  # the same with the writer thread
  def test_a_run_turning_non_finite_stops_alone_with_background_saves(self):
    results, *rest = self._train_with_a_nan_batch(background=True)
    self.assertIn('non-finite', str(results[1]['error']))
    self._assert_the_other_run_is_unchanged(results, *rest)

  def test_a_stop_during_a_mid_training_evaluation_saves_that_step(self):
    # An evaluation every 3 steps, a checkpoint every 4: the stop comes
    # while step 3 is evaluated (the loop asks once per step, the
    # evaluation before each of its batches: the 4th question).
    config = configs.get_config('mnist_embedded',
                                dict(OVERRIDES, eval_every_steps=3))
    workdir = self.create_tempdir().full_path
    calls = []
    with self.assertLogs('uta_jax', level='INFO') as logs:
      stopped = loop.train_and_evaluate(
          config, workdir,
          stop_requested=lambda: calls.append(None) or len(calls) >= 4)
    self.assertEqual(stopped, {'status': 'preempted', 'step': 3})
    self.assertTrue(any('during evaluation: checkpointed step 3' in line
                        for line in logs.output), logs.output)
    _, step = final_state(workdir, dict(OVERRIDES, eval_every_steps=3))
    self.assertEqual(step, 3)

  @pytest.mark.slow  # two programs of three runs trained
  def test_max_runs_per_program_splits_the_runs(self):
    root = self.create_tempdir().full_path
    results = loop.train_and_evaluate_runs(
        _seed_configs(0, 1, 2), [os.path.join(root, s) for s in 'abc'],
        max_runs_per_program=2)
    self.assertEqual([r['timings']['runs_in_program'] for r in results],
                     [2, 2, 1])

  def test_a_program_that_does_not_fit_is_a_one_line_error(self):
    root = self.create_tempdir().full_path
    with self.assertRaisesRegex(programs.ProgramTooLarge,
                                r'^one run needs [\d.]+ MiB .* lower '
                                r'batch_size$'):
      loop.train_and_evaluate_runs(
          _seed_configs(0, 1), [os.path.join(root, s) for s in 'ab'],
          memory_limit_bytes=1)

  @pytest.mark.slow  # three trainings of two runs
  def test_runs_restored_at_different_steps_end_as_uninterrupted(self):
    # As after a kill between the two runs' saves of step 12: run 0 holds
    # step 12, run 1 step 8. Each trains to the end as a program of its
    # own; both end as the uninterrupted program's runs.
    run_configs = _seed_configs(0, 1)
    root = self.create_tempdir().full_path
    reference = [os.path.join(root, 'ref', s) for s in 'ab']
    loop.train_and_evaluate_runs(run_configs, reference)
    workdirs = [os.path.join(root, 'cut', s) for s in 'ab']
    calls = []
    stopped = loop.train_and_evaluate_runs(
        run_configs, workdirs,
        stop_requested=lambda: calls.append(None) or len(calls) >= 12)
    self.assertEqual([r['step'] for r in stopped], [12, 12])
    shutil.rmtree(os.path.join(workdirs[1], runs.CHECKPOINTS, '12'))
    results = loop.train_and_evaluate_runs(run_configs, workdirs)
    for ref, workdir, result in zip(reference, workdirs, results):
      self.assertEqual(result['status'], 'finished')
      a, _ = final_state(ref, OVERRIDES)
      b, step = final_state(workdir, OVERRIDES)
      self.assertEqual(step, 16)
      chex.assert_trees_all_equal(a.params, b.params)
      self.assertEqual(result['clean_accuracy'],
                       runs.read_results(ref)['clean_accuracy'])


def _mixed_runs(root, run_maps, devices):
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  script = os.path.join(os.path.dirname(__file__), 'mixed_runs.py')
  proc = subprocess.run(
      [sys.executable, script, root, ','.join(run_maps)],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 8 runs together and alone, per device count and map
class MixedProgramTest(parameterized.TestCase):
  """Run r of a program of 4 runs mixing 2 seeds, PGD/UTA and 2
  (eps_train, step size) at K = 4 (``mixed_runs.MIXED``: every pair of
  values side by side) ends as the run trained alone: parameters and
  evaluation, every run.

  unroll (the CPU default) writes each run's own step into the program:
  bitwise equal. vmap's batched kernels sum in another order; sign steps and
  Adam's first updates (~lr whatever the gradient's size) amplify a flipped
  near-zero gradient: every weight within 2 lr per step (10 steps: 0.02),
  evaluation accuracies within one of the 32 test points (3.125%).
  """

  # vmap on 1 device is covered at the step level
  # (programs_test.RunMappedStepTest); here the CPU default on 1 and 4
  # devices and vmap on 4 (the maps on 4 devices share the runs alone).
  @parameterized.parameters((('unroll',), 1), (('unroll', 'vmap'), 4))
  def test_each_run_of_a_mixed_program_equals_the_run_alone(self, run_maps,
                                                            devices):
    result = _mixed_runs(self.create_tempdir().full_path, run_maps, devices)
    self.assertEqual(result['devices'], devices)
    self.assertCountEqual(result['maps'], run_maps)
    for run_map, compared in result['maps'].items():
      self.assertLen(compared, 4)
      for r in compared:
        i = f'{run_map} run {r["run"]}'
        self.assertEqual(r['runs_in_program'], 4)
        if run_map == 'unroll':
          self.assertEqual(r['max_param_diff'], 0.0, i)
          self.assertEqual(r['together'], r['alone'], i)
          continue
        self.assertLessEqual(r['max_param_diff'], 2 * 1e-3 * 10, i)
        self.assertAlmostEqual(r['together']['clean'], r['alone']['clean'],
                               delta=100 / 32 + 1e-9, msg=i)
        for attack, accs in r['together']['robust'].items():
          for eps, acc in accs.items():
            self.assertAlmostEqual(acc, r['alone']['robust'][attack][eps],
                                   delta=100 / 32 + 1e-9, msg=i)


if __name__ == '__main__':
  absltest.main()
