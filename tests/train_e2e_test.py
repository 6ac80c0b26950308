"""End-to-end tests of experiments/train.py as users run it (subprocesses).

Every run here uses the 4 fake CPU devices that conftest sets in XLA_FLAGS
(inherited by the subprocesses), real embedded MNIST digits and small
settings.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np
import pytest

from uta_jax import backend
from uta_jax import config_json
from uta_jax import configs
from uta_jax import loop
from uta_jax import runs

from testutil import final_state  # pylint: disable=g-bad-import-order
from testutil import require
from testutil import run_train
from testutil import train_command
from testutil import wait_for_checkpoint

# End-to-end: subprocesses, minutes. Deselect with -m "not slow".
pytestmark = pytest.mark.slow


class MainJobTest(absltest.TestCase):

  def test_eps_written_as_fractions_train_and_report_in_255ths(self):
    workdir = self.create_tempdir().full_path
    proc = run_train(workdir, '--epochs=1', '--eps_train=8/255',
                     '--eval_eps=8/255,16/255')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn('robust accuracy (PGD, eps=0.03137 (8/255))', proc.stdout)
    self.assertIn('robust accuracy (PGD, eps=0.06275 (16/255))', proc.stdout)
    with open(os.path.join(workdir, runs.CONFIG)) as f:
      config = json.load(f)
    self.assertEqual(config['attack']['eps_train'], 8 / 255)  # exact
    self.assertEqual(config['eval']['eps'], [8 / 255, 16 / 255])

  def test_main_job_writes_config_metrics_results_and_plot(self):
    workdir = self.create_tempdir().full_path
    proc = run_train(workdir, '--epochs=2', '--eval_every=1')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn('eval at step 16: clean', proc.stderr)  # --eval_every
    self.assertIn('clean accuracy:', proc.stdout)
    self.assertIn('robust accuracy (PGD, eps=0.1 (25.5/255))', proc.stdout)
    self.assertRegex(proc.stderr, r'epoch [\d.]+ step \d+/32 loss [\d.]+ '
                     r'train acc [\d.]+% \d+ img/s ETA \d+s')
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    self.assertEqual(results['status'], 'finished')
    self.assertEqual(results['evaluation']['num_examples'], 64)
    for attack in ('pgd', 'uta'):
      self.assertEqual(sorted(results['robust_accuracy'][attack]),
                       ['0.1', '0.2'])
      for eps, robust in results['robust_accuracy'][attack].items():
        self.assertLessEqual(robust, results['clean_accuracy'])
        self.assertAlmostEqual(results['tradeoff'][attack][eps],
                               (robust + results['clean_accuracy']) / 2)
    self.assertGreater(results['clean_accuracy'], 50)  # it learned
    self.assertEqual(results['timings']['devices'], jax.device_count())
    saved = config_json.from_json(
        open(os.path.join(workdir, 'config.json')).read())
    self.assertEqual(saved.attack.eps_train, 0.1)
    lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
    self.assertGreaterEqual(len(lines), 8)
    evals = [json.loads(l) for l in lines if '"eval"' in l]
    self.assertEqual([e['step'] for e in evals], [16, 32])
    self.assertGreater(os.path.getsize(
        os.path.join(workdir, 'training_curves.png')), 1000)
    self.assertLen(glob.glob(os.path.join(workdir, 'tensorboard',
                                          'events.out.tfevents.*')), 1)

  def test_svhn_command_on_tfds_mock_data(self):
    tfds = require('tensorflow_datasets')
    config = configs.get_config('svhn', {'attack.name': 'uta', 'epochs': 1,
                                         'batch_size': 16,
                                         'eval.pgd_restarts': 1,
                                         'eval.pgd_steps': 2,
                                         'eval.eps': [0.01]})
    self.assertEqual(config.model.name, 'svhn_lenet')
    workdir = self.create_tempdir().full_path
    with tfds.testing.mock_data(num_examples=32), mock.patch.object(
        tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
      results = loop.train_and_evaluate(config, workdir)
    self.assertEqual(results['status'], 'finished')
    self.assertEqual(results['dataset_source'],
                     'tfds svhn_cropped, release order (by example id)')
    self.assertEqual(results['steps'], 2)

  def test_a_rerun_in_a_new_workdir_starts_sooner_from_the_compilation_cache(
      self):
    cache = self.create_tempdir().full_path
    first_step, compile_seconds = [], []
    for _ in range(2):  # the same configuration, a new workdir each time
      workdir = self.create_tempdir().full_path
      proc = run_train(workdir, '--epochs=1', '--eval_pgd_restarts=1',
                       f'--compilation_cache_dir={cache}')
      self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
      with open(os.path.join(workdir, 'results.json')) as f:
        timings = json.load(f)['timings']
      first_step.append(timings['first_step_seconds'])
      compile_seconds.append(timings['compile_seconds'])
      # the step is compiled ahead of time; its first step's time holds it
      self.assertGreaterEqual(first_step[-1], compile_seconds[-1])
      if len(first_step) == 1:
        self.assertNotEqual(os.listdir(cache), [])  # the programs stored
    self.assertLess(compile_seconds[1], compile_seconds[0])
    self.assertLess(first_step[1], first_step[0])

  def test_the_compilation_cache_can_be_turned_off(self):
    workdir = self.create_tempdir().full_path
    home = self.create_tempdir().full_path
    env = dict(os.environ, XDG_CACHE_HOME=home)
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
    proc = run_train(workdir, '--epochs=1', '--eval_pgd_restarts=1',
                     '--compilation_cache_dir=none', env=env)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertFalse(os.path.exists(os.path.join(home, 'uta_jax')))


class FaultToleranceTest(absltest.TestCase):

  def test_kill_9_and_rerun_gives_bitwise_the_uninterrupted_result(self):
    # 64 steps, with random crops and flips: their draws resume too.
    args = ('--epochs=4', '--checkpoint_every=4', '--augment')
    reference = self.create_tempdir().full_path
    self.assertEqual(run_train(reference, *args).returncode, 0)
    workdir = self.create_tempdir().full_path
    proc = subprocess.Popen(train_command(workdir, *args),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_checkpoint(workdir, proc, min_step=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertEqual(proc.returncode, -signal.SIGKILL)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'results.json')))
    resumed = run_train(workdir, *args)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
    self.assertIn('resumed from step', resumed.stderr)
    a, step_a = final_state(reference)
    b, step_b = final_state(workdir)
    self.assertEqual(step_a, step_b)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)

  @pytest.mark.slow  # two trainings of three runs
  def test_kill_9_of_a_program_of_seeds_and_rerun_gives_bitwise_the_result(
      self):
    # train.py --seeds: one program of 3 runs, each in <workdir>/seed<s>.
    args = ('--epochs=4', '--checkpoint_every=4', '--seeds=0,1,2')
    reference = self.create_tempdir().full_path
    first = run_train(reference, *args)
    self.assertEqual(first.returncode, 0, first.stderr[-2000:])
    self.assertIn('3 runs', first.stderr)
    workdir = self.create_tempdir().full_path
    proc = subprocess.Popen(train_command(workdir, *args),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_checkpoint(os.path.join(workdir, 'seed2'), proc, min_step=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(workdir, *args)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
    self.assertIn('resumed from step', resumed.stderr)
    for seed in range(3):
      a, step_a = final_state(os.path.join(reference, f'seed{seed}'),
                              {'seed': seed})
      b, step_b = final_state(os.path.join(workdir, f'seed{seed}'),
                              {'seed': seed})
      self.assertEqual(step_a, 64)
      self.assertEqual(step_b, 64)
      chex.assert_trees_all_equal(a.params, b.params)
      chex.assert_trees_all_equal(a.opt_state, b.opt_state)

  def test_disk_full_in_a_checkpoint_is_one_line_and_resumes_when_freed(self):
    mount = self.create_tempdir().full_path
    if os.geteuid() != 0 or subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', mount],
        capture_output=True).returncode != 0:
      self.skipTest('needs root to mount a small tmpfs (checkpointing_test '
                    'simulates the full disk)')
    self.addCleanup(subprocess.run, ['umount', '-l', mount])
    # The MLP's state (parameters + Adam moments) is ~2.4 MB: step 10 fits
    # in 3 MB, step 20 does not.
    args = ('--epochs=2', '--checkpoint_every=10')
    workdir = os.path.join(mount, 'run')
    proc = run_train(workdir, *args)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    self.assertLen(errors, 1)
    self.assertIn('No space left on device', errors[0])
    self.assertIn('rerun the same command to resume', errors[0])
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, 'checkpoints'))),
                     ['10', 'checksums.json'])  # the failed step is gone
    subprocess.run(['mount', '-o', 'remount,size=40m', mount], check=True)
    resumed = run_train(workdir, *args)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
    self.assertIn('resumed from step 10', resumed.stderr)
    reference = self.create_tempdir().full_path
    self.assertEqual(run_train(reference, *args).returncode, 0)
    a, step_a = final_state(reference)
    b, step_b = final_state(workdir)
    self.assertEqual(step_a, step_b)
    chex.assert_trees_all_equal(a.params, b.params)

  def test_sigterm_and_ctrl_c_checkpoint_exit_cleanly_and_resume(self):
    # SIGTERM is preemption (exit 0); Ctrl-C exits 130, as shells expect.
    for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
      with self.subTest(signal=sig.name):
        workdir = self.create_tempdir().full_path
        proc = subprocess.Popen(
            train_command(workdir, '--epochs=4', '--checkpoint_every=4'),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(workdir, proc, min_step=4)
        signalled = time.time()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        self.assertLess(time.time() - signalled, 10)
        self.assertEqual(proc.returncode, code, err[-2000:])
        self.assertIn(f'{sig.name} received', err)
        self.assertNotIn('Traceback', err)
        self.assertIn('preempted at step', out)
        self.assertIn('rerun the same command', out)
        self.assertFalse(os.path.exists(os.path.join(workdir,
                                                     'results.json')))
        _, step = final_state(workdir)
        self.assertLess(step, 64)
        resumed = run_train(workdir, '--epochs=4', '--checkpoint_every=4')
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
        self.assertIn(f'resumed from step {step}', resumed.stderr)
        self.assertTrue(os.path.exists(os.path.join(workdir,
                                                    'results.json')))

  def test_a_second_run_on_the_same_workdir_is_refused(self):
    workdir = self.create_tempdir().full_path
    # Long enough that it is still training when the second one starts,
    # however loaded the machine (it is killed at the end).
    first = subprocess.Popen(
        train_command(workdir, '--epochs=400', '--checkpoint_every=4'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.addCleanup(first.kill)
    wait_for_checkpoint(workdir, first, min_step=4)
    second = run_train(workdir, '--epochs=4', '--checkpoint_every=4')
    self.assertEqual(second.returncode, 2, second.stderr[-2000:])
    self.assertRegex(second.stderr.strip().splitlines()[-1],
                     f'^error: workdir .* is in use by pid {first.pid} on ')
    self.assertNotIn('Traceback', second.stderr)
    first.kill()
    first.wait()

  def test_non_finite_loss_stops_and_keeps_a_finite_checkpoint(self):
    workdir = self.create_tempdir().full_path
    proc = run_train(workdir, '--epochs=1', '--optimizer=sgd_nesterov',
                     '--learning_rate=1e30', '--checkpoint_every=1',
                     '--attack=none')
    self.assertEqual(proc.returncode, 2)
    self.assertIn('non-finite loss', proc.stderr)
    self.assertIn('Lower --learning_rate or --eps_train', proc.stderr)
    self.assertNotIn('Traceback', proc.stderr)
    state, _ = final_state(workdir, {'optimizer.name': 'sgd_nesterov'})
    self.assertTrue(all(np.all(np.isfinite(p))
                        for p in jax.tree_util.tree_leaves(state.params)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_agree_with_one(self):
    # No attack: its sign() would turn 1e-7 reduction-order differences into
    # discrete flips over 16 steps; the point is the cross-process mean.
    self._two_processes_agree_with_one(
        '--epochs=1', '--checkpoint_every=8', '--attack=none')

  def test_two_processes_agree_with_one_with_an_attack_and_dropout(self):
    # A few steps of R-FGSM with dropout: every random draw is keyed by the
    # example, so hosts and devices do not change the run.
    self._two_processes_agree_with_one(
        '--epochs=1', '--max_train_examples=128', '--checkpoint_every=4',
        '--attack=rfgsm', '--step_size=0.05', '--dropout_rate=0.3')

  def test_sigterm_to_one_host_stops_every_host_at_the_same_step(self):
    args = ('--epochs=4', '--checkpoint_every=4', '--attack=none')  # 64 steps
    single = self.create_tempdir().full_path
    self.assertEqual(run_train(single, *args).returncode, 0)
    workdir = self.create_tempdir().full_path
    env = dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=2')

    def launch():
      port = _free_port()
      return [subprocess.Popen(
          train_command(workdir, *args, f'--coordinator_address=127.0.0.1:'
                        f'{port}', '--num_processes=2', f'--process_id={i}'),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for i in range(2)]

    procs = launch()
    wait_for_checkpoint(workdir, procs[0], min_step=8)
    procs[1].send_signal(signal.SIGTERM)  # the preemption of one host
    outs = [p.communicate(timeout=300) for p in procs]
    stopped_at = []
    for p, (out, err) in zip(procs, outs):
      self.assertEqual(p.returncode, 0, err[-2000:])
      match = re.search(r'preempted at step (\d+)', out)
      self.assertIsNotNone(match, out[-2000:] + err[-2000:])
      stopped_at.append(int(match.group(1)))
    self.assertEqual(stopped_at[0], stopped_at[1])
    self.assertLess(stopped_at[0], 64)
    for p in launch():  # the same command resumes on both hosts
      out, err = p.communicate(timeout=300)
      self.assertEqual(p.returncode, 0, err[-2000:])
      self.assertIn(f'resumed from step {stopped_at[0]}', err)
    a, _ = final_state(single)
    b, _ = final_state(workdir)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-5)

  def _two_processes_agree_with_one(self, *args):
    # The single process runs with the scripts' default CPU device count
    # (XLA_FLAGS without one): one device per core.
    single = self.create_tempdir().full_path
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    proc = run_train(single, *args, env=env)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    with mock.patch.dict(os.environ, {}, clear=True):
      backend.use_cpu_cores_as_devices()
      default_count = os.environ['XLA_FLAGS'].rsplit('=', 1)[1]
    self.assertIn(f', {default_count} devices,', proc.stderr)
    workdir = self.create_tempdir().full_path
    env = dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=2')
    port = _free_port()
    procs = [subprocess.Popen(
        train_command(workdir, *args, f'--coordinator_address=127.0.0.1:'
                      f'{port}', '--num_processes=2', f'--process_id={i}'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    for p in procs:
      out, err = p.communicate(timeout=300)
      self.assertEqual(p.returncode, 0, err[-2000:])
    with open(os.path.join(workdir, 'results.json')) as f:
      # 2 processes x 2 CPU devices (XLA_FLAGS above)
      self.assertEqual(json.load(f)['timings']['devices'], 4)
    a, step_a = final_state(single)
    b, step_b = final_state(workdir)
    self.assertEqual(step_a, step_b)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-5)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('dataset', ['--dataset=imagenet'], "unknown --dataset 'imagenet'"),
      ('unknown_flag', ['--colour=red'], "Unknown command line flag 'colour'"),
      ('attack', ['--attack=cw'], "unknown --attack 'cw'"),
      ('negative_eps', ['--eps_train=-0.1'], 'eps_train must be a positive number'),
      ('zero_steps', ['--num_steps=0'], 'num_steps must be an integer >= 1'),
      ('batch', ['--batch_size=6'], 'multiple of 4'),
      ('data_dir', ['--dataset=mnist', '--data_dir=/nonexistent'],
       'not a readable folder'),
      ('eval_eps', ['--eval_eps=abc'], "--eval_eps=abc: 'abc' is not a number"),
      ('epochs', ['--epochs=two'], '--epochs=two'),
      ('eval_eps_range', ['--eval_eps=8'], r'outside \(0, 1\]'),
      ('offline_tfds', ['--dataset=svhn', '--data_dir=/tmp'],
       'TFDS_DATA_DIR'),
      ('workdir_under_a_file', ['--workdir=/etc/hostname/run'],
       'part of the path is a file'),
      ('seed_and_seeds', ['--seed=1', '--seeds=0,1'],
       '--seed and --seeds exclude each other'),
      ('bad_seeds', ['--seeds=0,x'], "--seeds takes non-negative integers"),
      ('runs_per_program', ['--seeds=0,1', '--max_runs_per_program=0'],
       'max_runs_per_program'),
      ('run_map', ['--run_map=pmap'], "--run_map"),
  )
  def test_one_line_and_exit_code_2(self, args, message):
    workdir = self.create_tempdir().full_path
    proc = run_train(workdir, *args)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Traceback', proc.stderr)
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    self.assertLen(errors, 1)
    self.assertRegex(errors[0], message)

  def test_incompatible_or_corrupt_workdir(self):
    workdir = self.create_tempdir().full_path
    self.assertEqual(run_train(workdir, '--epochs=1').returncode, 0)
    proc = run_train(workdir, '--epochs=1', '--model=lenet')
    self.assertEqual(proc.returncode, 2)
    self.assertRegex(proc.stderr, r'error: .*other settings \(--model\).*new '
                     '--workdir')
    with open(os.path.join(workdir, runs.CONFIG), 'w') as f:
      f.write('{garbage')
    proc = run_train(workdir, '--epochs=1')
    self.assertEqual(proc.returncode, 2)
    self.assertIn('unreadable', proc.stderr)
    self.assertNotIn('Traceback', proc.stderr)


if __name__ == '__main__':
  absltest.main()
