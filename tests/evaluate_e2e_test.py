"""End-to-end tests of experiments/evaluate.py and train.py --autoattack."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import pytest

from testutil import ROOT, run_train  # pylint: disable=g-bad-import-order

EVALUATE = os.path.join(ROOT, 'experiments', 'evaluate.py')

# End-to-end: subprocesses, minutes. Deselect with -m "not slow".
pytestmark = pytest.mark.slow


def run_evaluate(*args):
  return subprocess.run([sys.executable, EVALUATE, *args], capture_output=True,
                        text=True, timeout=600)


class EvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp(prefix='uta_eval_')
    proc = run_train(cls.workdir, '--epochs=2', '--dropout_rate=0.3',
                     '--autoattack', '--autoattack_examples=24',
                     '--autoattack_eps=0.1,0.2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls.train_output = proc.stdout + proc.stderr
    with open(os.path.join(cls.workdir, 'results.json')) as f:
      cls.train_results = json.load(f)  # before other tests rewrite it

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.workdir, ignore_errors=True)
    super().tearDownClass()

  def results(self):
    with open(os.path.join(self.workdir, 'results.json')) as f:
      return json.load(f)

  def test_train_with_autoattack_reports_autoattack_lines_and_json(self):
    self.assertIn('robust accuracy after APGD-CE', self.train_output)
    self.assertIn('using standard version including apgd-ce, apgd-t, fab-t, '
                  'square', self.train_output)
    report = self.train_results['autoattack']
    self.assertEqual(report['num_examples'], 24)
    self.assertEqual(report['model_randomness'], 'deterministic (dropout off)')
    for eps in ('0.1', '0.2'):
      r = report['eps'][eps]
      self.assertEqual(sorted(r['per_attack']),
                       ['apgd-ce', 'apgd-t', 'fab-t', 'square'])
      self.assertLessEqual(r['robust_accuracy'], r['clean_accuracy'])
      # AutoAttack logs percentages with two decimals.
      self.assertAlmostEqual(r['robust_accuracy'], r['per_attack']['square'],
                             delta=0.005 + 1e-9)
      self.assertLessEqual(r['max_perturbation'], float(eps) + 1e-6)
    self.assertIn('clean_accuracy', self.train_results)  # training's kept

  def test_train_autoattack_defaults_to_the_first_eval_eps(self):
    workdir = self.create_tempdir().full_path
    proc = run_train(workdir, '--epochs=1', '--autoattack',
                     '--autoattack_version=apgd', '--autoattack_examples=16')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, 'results.json')) as f:
      report = json.load(f)['autoattack']
    self.assertEqual(sorted(report['eps']), ['0.1'])  # QUICK: --eval_eps=0.1,0.2
    self.assertEqual(report['backend'], 'jax')
    self.assertIn('robust accuracy after APGD-T', proc.stderr)

  def test_evaluate_rand_version_on_the_mc_dropout_model(self):
    proc = run_evaluate(f'--workdir={self.workdir}', '--version=rand',
                        '--eps=0.1', '--num_examples=12', '--nojax_pgd')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('using rand version including apgd-ce, apgd-dlr',
                  proc.stdout)
    report = self.results()['autoattack']
    self.assertEqual(report['version'], 'rand')
    self.assertIn('MC dropout', report['model_randomness'])
    self.assertEqual(sorted(report['eps']), ['0.1'])

  def test_evaluate_standard_with_jax_pgd_beside(self):
    proc = run_evaluate(f'--workdir={self.workdir}', '--eps=0.15',
                        '--num_examples=16')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    report = self.results()['autoattack']
    self.assertEqual(report['num_examples'], 16)
    jax_robust = report['jax']['robust_accuracy']['pgd']['0.15']
    self.assertLessEqual(jax_robust, report['jax']['clean_accuracy'])
    self.assertIn('JAX PGD robust accuracy', proc.stdout)

  def test_jax_pgd_of_a_stored_run_repeats_its_final_evaluation(self):
    # Keys come from the run's key (the 'evaluation' stream at the final
    # step), so the same points give the same PGD and UTA numbers.
    proc = run_evaluate(f'--workdir={self.workdir}', '--eps=0.1,0.2',
                        '--num_examples=64', '--version=apgd')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    report = self.results()['autoattack']
    for attack in ('pgd', 'uta'):
      self.assertEqual(report['jax']['robust_accuracy'][attack],
                       self.train_results['robust_accuracy'][attack])
    # A RobustBench-style record per eps, stored and printed.
    records = report['robustbench']
    self.assertEqual([r['eps'] for r in records], ['0.1', '0.2'])
    self.assertEqual(records[0]['autoattack_acc'],
                     f"{report['eps']['0.1']['robust_accuracy']:.2f}")
    self.assertEqual((records[0]['threat_model'], records[0]['n_examples']),
                     ('Linf', 64))
    self.assertIn('RobustBench record: {"dataset": "mnist_embedded"',
                  proc.stdout)

  def test_jax_apgd_stores_each_eps_and_a_rerun_skips_them(self):
    args = [f'--workdir={self.workdir}', '--aa_version=apgd', '--eps=0.1,0.2',
            '--num_examples=32', '--nojax_pgd']
    proc = run_evaluate(*args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('JAX backend', proc.stdout)
    self.assertEqual(proc.stdout.count('robust accuracy after APGD-T'), 2)
    report = self.results()['autoattack']
    self.assertEqual(report['backend'], 'jax')
    self.assertEqual(sorted(report['eps']), ['0.1', '0.2'])
    for r in report['eps'].values():
      self.assertEqual(sorted(r['per_attack']), ['apgd-ce', 'apgd-t'])
    rerun = run_evaluate(*args)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertEqual(rerun.stdout.count('skipped'), 2)
    self.assertNotIn('robust accuracy after', rerun.stdout)
    self.assertEqual(self.results()['autoattack']['eps'], report['eps'])
    wrong = run_evaluate(f'--workdir={self.workdir}', '--aa_backend=jax',
                         '--version=rand')
    self.assertEqual(wrong.returncode, 2)
    self.assertRegex(wrong.stderr.strip(), '^error: --aa_backend=jax runs '
                     '--aa_version=apgd or standard')

  def test_sigterm_during_autoattack_keeps_finished_eps_and_resumes(self):
    workdir = tempfile.mkdtemp(prefix='uta_eval_stop_')
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    shutil.copytree(self.workdir, workdir, dirs_exist_ok=True)
    args = [EVALUATE, f'--workdir={workdir}', '--eps=0.1,0.2',
            '--num_examples=100', '--nojax_pgd']  # standard: FAB-T, Square
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the second eps has started
      if 'at eps=0.2' in line:
        break
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    self.assertLess(time.time() - signalled, 10)
    self.assertEqual(proc.returncode, 0, err[-2000:])
    self.assertIn('rerun the same command to finish', out)
    with open(os.path.join(workdir, 'results.json')) as f:
      report = json.load(f)['autoattack']
    self.assertEqual(sorted(report['eps']), ['0.1'])
    rerun = subprocess.run([sys.executable, *args], capture_output=True,
                           text=True, timeout=600)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-2000:])
    self.assertEqual(rerun.stdout.count('skipped'), 1)
    with open(os.path.join(workdir, 'results.json')) as f:
      resumed = json.load(f)['autoattack']
    self.assertEqual(sorted(resumed['eps']), ['0.1', '0.2'])
    self.assertEqual(resumed['eps']['0.1'], report['eps']['0.1'])

  def test_several_workdirs_are_evaluated_together(self):
    copies = [tempfile.mkdtemp(prefix=f'uta_eval_runs{i}_') for i in range(3)]
    for copy in copies:
      self.addCleanup(shutil.rmtree, copy, ignore_errors=True)
      shutil.copytree(self.workdir, copy, dirs_exist_ok=True)
      os.remove(os.path.join(copy, 'results.json'))
    proc = run_evaluate(f'--workdir={copies[0]},{copies[1]}', '--eps=0.1',
                        '--num_examples=24', '--aa_version=apgd',
                        '--nojax_pgd')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn('of 2 runs', proc.stdout)
    self.assertEqual(proc.stdout.count('== '), 2)
    reports = []
    for copy in copies[:2]:
      with open(os.path.join(copy, 'results.json')) as f:
        reports.append(json.load(f)['autoattack']['eps']['0.1'])
    self.assertEqual(reports[0]['robust_accuracy'],
                     reports[1]['robust_accuracy'])  # the same model
    self.assertEqual(reports[0]['runs_in_program'], 2)
    # A run of other data cannot share the program: one line, exit 2.
    path = os.path.join(copies[2], 'config.json')
    with open(path) as f:
      config = json.load(f)
    config['dataset'] = 'mnist'
    with open(path, 'w') as f:
      json.dump(config, f)
    mixed = run_evaluate(f'--workdir={copies[0]},{copies[2]}', '--eps=0.1',
                         '--num_examples=24', '--aa_version=apgd')
    self.assertEqual(mixed.returncode, 2, mixed.stderr[-3000:])
    self.assertRegex(mixed.stderr.strip(), r'^error: .* have different '
                     r'models or data; evaluate them apart$')

  def test_bad_input_is_one_line_with_exit_code_2(self):
    empty = self.create_tempdir().full_path
    for args, message in (
        ([f'--workdir={empty}'], 'no run in'),
        ([f'--workdir={self.workdir}', '--eps=1.5'], r'outside \(0, 1\]'),
        ([f'--workdir={self.workdir}', '--eps=0'], r'outside \(0, 1\]'),
        ([], '--workdir is required'),
    ):
      with self.subTest(args=args):
        proc = run_evaluate(*args)
        self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
        self.assertNotIn('Traceback', proc.stderr)
        self.assertRegex(proc.stderr.strip().splitlines()[-1],
                         f'^error: .*{message}')


if __name__ == '__main__':
  absltest.main()
