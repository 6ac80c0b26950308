"""End-to-end tests of the paper-reproduction scripts (subprocesses).

Each script runs as users run it, on real offline data (embedded MNIST,
Debian's Fashion-MNIST, the 2D toy) with tiny overrides, and must write its
markdown table, JSON (per-seed rows, seeds, verdicts) and PNG; rerunning
must reuse the finished runs and reproduce the JSON.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import pytest

from uta_jax import stats

import data_test  # pylint: disable=g-bad-import-order

from testutil import ROOT, run_script  # pylint: disable=g-bad-import-order

TINY = ['--max_train_examples=256', '--max_eval_examples=32',
        '--aa_examples=16', '--epochs=1']

# End-to-end: subprocesses, minutes. Deselect with -m "not slow".
pytestmark = pytest.mark.slow


class PaperScriptsTest(absltest.TestCase):

  def outputs(self, out, stem):
    for ext in ('md', 'json', 'png'):
      self.assertTrue(os.path.exists(os.path.join(out, f'{stem}.{ext}')), ext)
    with open(os.path.join(out, f'{stem}.json')) as f:
      return json.load(f)

  def test_table1_scores_are_aa_means_and_a_rerun_reuses_the_runs(self):
    out = self.create_tempdir().full_path
    args = ['--datasets=mnist_embedded', '--methods=pgd,uta',
            '--eps_train=0.1', '--seeds=0,1', f'--output_dir={out}', *TINY]
    proc = run_script('table1', *args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    payload = self.outputs(out, 'table1')
    rows = payload['rows']
    self.assertEqual([(r['seed'], r['method']) for r in rows],
                     [(0, 'pgd'), (0, 'uta'), (1, 'pgd'), (1, 'uta')])
    self.assertEqual(payload['seeds'], [0, 1])
    self.assertTrue(rows[0]['workdir'].endswith(os.path.join(
        'pgd_eps0.1', 'seed0')))
    # Different seeds train different models.
    self.assertNotEqual(rows[0]['clean_accuracy'], rows[2]['clean_accuracy'])
    # One eps_train: no "widens with eps_train" claim to decide.
    self.assertEqual([v['claim'].split(':')[0] for v in payload['verdicts']],
                     ['mnist_embedded'] * 3)
    self.assertFalse(any('widens' in v['claim'] for v in payload['verdicts']))
    for v in payload['verdicts']:
      self.assertEqual(set(v), {'claim', 'rule', 'statistic', 'effect', 'lo', 'hi',
                               'seeds', 'digits', 'signed', 'outcome',
                               'evidence'})
      self.assertEqual(v['seeds'], 2)
    clean = {(r['seed'], r['method']): r['clean_accuracy'] for r in rows}
    # One eps_train: the claim's statistic is the mean paired difference,
    # decided by where its interval lies.
    first = payload['verdicts'][0]
    self.assertAlmostEqual(first['effect'], sum(
        clean[s, 'uta'] - clean[s, 'pgd'] for s in (0, 1)) / 2, places=3)
    self.assertLess(first['lo'], first['effect'])
    self.assertEqual(first['outcome'], stats.outcome(stats.Estimate(
        first['effect'], first['lo'], first['hi'], 2)))
    # The quick AutoAttack: the standard APGD-CE and APGD-T only, in JAX.
    self.assertIn('including apgd-ce, apgd-t (JAX backend', proc.stderr)
    self.assertIn('robust accuracy after APGD-T', proc.stderr)
    self.assertNotIn('running fab', proc.stderr)
    self.assertNotIn('running square', proc.stderr)
    for r in rows:
      self.assertEqual(r['eps_test'], [0.05, 0.1, 0.2, 0.3])
      self.assertEqual(r['aa_examples'], 16)
      self.assertEqual(r['aa_version'], 'apgd')
      self.assertEqual(r['aa_backend'], 'jax')
      for robust, score in zip(r['aa_robust_accuracy'], r['score']):
        self.assertLessEqual(robust, r['aa_clean_accuracy'])
        self.assertAlmostEqual(score, (robust + r['aa_clean_accuracy']) / 2)
      self.assertEqual(len(r['paper_score']), 4)  # the paper's MNIST row
    with open(os.path.join(out, 'table1.md')) as f:
      self.assertIn('± ', f.read())  # mean ± std over the 2 seeds
    rerun = run_script('table1', *args)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertEqual(rerun.stderr.count('reusing finished run'), 4)
    self.assertNotIn('robust accuracy after', rerun.stderr)  # AA reused
    self.assertEqual(self.outputs(out, 'table1'), payload)

  def test_latent_space_trains_the_ensemble_and_attacks_in_input_space(self):
    out = self.create_tempdir().full_path
    proc = run_script('latent_space', '--methods=ls_uta', '--eps_train=0.2',
                      '--seeds=0', f'--output_dir={out}', *TINY)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    (row,) = self.outputs(out, 'latent_space')['rows']
    with open(os.path.join(row['workdir'], 'config.json')) as f:
      config = json.load(f)
    self.assertEqual(config['attack']['space'], 'latent')
    self.assertEqual(config['attack']['uncertainty'], 'ensemble')
    self.assertEqual(config['model'], {'name': 'lenet', 'dropout_rate': 0.0,
                                       'ensemble_size': 5})
    self.assertEqual(len(row['score']), 4)

  def test_catastrophic_overfitting_writes_curves(self):
    out = self.create_tempdir().full_path
    proc = run_script('catastrophic_overfitting', '--max_train_examples=512',
                      '--epochs=1', '--eval_every_steps=2', '--seeds=3',
                      '--max_eval_examples=32', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    payload = self.outputs(out, 'catastrophic_overfitting')
    rows = payload['rows']
    self.assertEqual([r['method'] for r in rows], ['fgsm', 'uta1'])
    for r in rows:
      self.assertEqual(r['seed'], 3)
      self.assertEqual(r['steps'], [2, 4])  # 4 steps: one mid-run, one final
      self.assertLen(r['fgsm'], 2)
      self.assertIn('collapse_step', r)
      self.assertEqual(r['lowest_pgd_after_best'],
                       min(r['pgd'][r['pgd'].index(r['best_pgd']):]))
    fgsm_collapsed, uta_kept, _ = payload['verdicts']
    # One seed: the statistic is its value; no interval, so no decision.
    self.assertAlmostEqual(fgsm_collapsed['effect'],
                           rows[0]['lowest_pgd_after_best'], places=3)
    self.assertAlmostEqual(uta_kept['effect'],
                           rows[1]['lowest_pgd_after_best'], places=3)
    for v in payload['verdicts']:
      self.assertEqual((v['lo'], v['hi'], v['outcome']),
                       (None, None, 'inconclusive'))

  def test_toy2d_reports_crossing_and_oscillations(self):
    out = self.create_tempdir().full_path
    args = ['--epochs=2', '--seeds=0,1', f'--output_dir={out}']
    proc = run_script('toy2d', *args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = self.outputs(out, 'toy2d')
    self.assertEqual(result['seeds'], [0, 1])
    self.assertLen(result['per_seed'], 2)
    for seed in result['per_seed']:
      for model in ('single', 'ensemble'):
        crossing = seed['attack']['crossing'][model]
        for method in ('pgd', 'uta'):
          for value in crossing[method].values():
            self.assertBetween(value, 0.0, 100.0)
        # Two classes: one step of UTA is one step of PGD on correct points.
        self.assertEqual(crossing['pgd']['one_step'],
                         crossing['uta']['one_step'])
      for method in ('standard', 'pgd', 'uta'):
        training = seed['training'][method]
        self.assertEqual(training['updates'], 16)  # 2 epochs x 512 / 64
        self.assertEqual(set(training['region_accuracy']), {'near', 'far'})
    osc = [s['training'][m]['mean_oscillations'] for s in result['per_seed']
           for m in ('pgd', 'uta')]
    crossing_verdicts, oscillation_verdict = (result['verdicts'][:2],
                                              result['verdicts'][2])
    self.assertLen(result['verdicts'], 3)
    self.assertAlmostEqual(oscillation_verdict['effect'],
                           (osc[1] - osc[0] + osc[3] - osc[2]) / 2, places=3)
    k_steps = lambda m: [s['attack']['crossing']['single'][m]['k_steps']
                         for s in result['per_seed']]
    self.assertAlmostEqual(crossing_verdicts[1]['effect'], sum(
        u - p for u, p in zip(k_steps('uta'), k_steps('pgd'))) / 2, places=3)
    rerun = run_script('toy2d', *args)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertEqual(rerun.stderr.count('reusing'), 2)
    self.assertEqual(self.outputs(out, 'toy2d'), result)
    # Steps that cannot reach eps are refused in one line.
    proc = run_script('toy2d', '--train_steps=5', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 2)
    self.assertIn('reach', proc.stderr.strip().splitlines()[-1])

  def test_toy2d_map_cells_frontiers_and_rules(self):
    out = self.create_tempdir().full_path
    args = ['--epochs=2', '--seeds=0,1', '--shapes=strips',
            '--ratios=0.5,1.5', '--spreads=1/8', f'--output_dir={out}']
    proc = run_script('toy2d_map', *args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = self.outputs(out, 'toy2d_map')
    rows = result['rows']
    self.assertEqual([(r['ratio'], r['seed']) for r in rows],
                     [(0.5, 0), (1.5, 0), (0.5, 1), (1.5, 1)])
    for r in rows:
      self.assertAlmostEqual(r['eps'], r['ratio'] * 0.3)
      self.assertGreaterEqual(r['steps'] * 0.05, 1.25 * r['eps'] - 1e-9)
      for method in ('standard', 'pgd', 'uta'):
        self.assertEqual(set(r[method]['last_quarter']), {'near', 'far'})
    # A seed's standard training is shared by its cells.
    self.assertEqual(rows[0]['standard'], rows[1]['standard'])
    self.assertLen(result['verdicts'], 4)
    rerun = run_script('toy2d_map', *args)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertEqual(rerun.stderr.count('reusing'), 2)
    self.assertEqual(self.outputs(out, 'toy2d_map'), result)

  def test_visual_appearance_grid(self):
    out = self.create_tempdir().full_path
    proc = run_script('visual_appearance', '--max_train_examples=256',
                      '--epochs=1', '--max_eval_examples=32', '--seeds=0,1',
                      '--attack_steps=50', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = self.outputs(out, 'visual_appearance')
    row, _ = result['rows']
    self.assertEqual(result['seeds'], [0, 1])
    for seed in (0, 1):  # the seeds trained as one program of two runs
      with open(os.path.join(out, 'runs', 'clean', f'seed{seed}',
                             'results.json')) as f:
        self.assertEqual(json.load(f)['timings']['runs_in_program'], 2)
    self.assertEqual(row['labels'], list(range(10)))
    for name in ('uta', 'pgd'):
      self.assertLen(row[name]['predictions'], 10)
      self.assertBetween(row[name]['mean_linf'], 0.0, 50 * 0.001 + 1e-6)
    (v,) = result['verdicts']
    self.assertAlmostEqual(v['effect'], sum(
        r['uta']['mean_l2'] - r['pgd']['mean_l2'] for r in result['rows']) / 2,
                           places=3)

  def test_a_sweep_checks_every_dataset_before_its_first_step(self):
    out = self.create_tempdir().full_path
    # SVHN is not prepared here: found before embedded MNIST trains.
    proc = run_script('table1', '--datasets=mnist_embedded,svhn',
                      '--seeds=0', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith('error: svhn: svhn_cropped is not '
                                    'prepared'), last)
    self.assertFalse(os.path.exists(os.path.join(out, 'runs')))
    # One IDX folder cannot stand in for both MNIST and Fashion-MNIST.
    idx = self.create_tempdir().full_path
    data_test.write_idx_folder(idx)
    proc = run_script('table1', '--datasets=mnist,fashion_mnist',
                      f'--data_dir={idx}', '--seeds=0', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn('--data_dir holds one IDX dataset',
                  proc.stderr.strip().splitlines()[-1])

  def test_bad_flags_give_one_line_errors(self):
    out = self.create_tempdir().full_path
    for script, flag in (('table1', '--datasets=cifar100'),
                         ('latent_space', '--methods=ls_fgsm'),
                         ('catastrophic_overfitting', '--settings=imagenet'),
                         ('toy2d', '--seeds=0,x'),
                         ('table1', '--seeds=-1'),
                         ('toy2d', '--methods=pgd'),
                         ('catastrophic_overfitting', '--eps_train=0.1'),
                         ('visual_appearance', '--aa_examples=10')):
      proc = run_script(script, flag, f'--output_dir={out}')
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertEqual(proc.stderr.strip().count('\n'), 0, proc.stderr)
      self.assertTrue(proc.stderr.startswith('error: '), proc.stderr)

  def test_ctrl_c_checkpoints_the_run_and_a_rerun_finishes_the_sweep(self):
    out = self.create_tempdir().full_path
    args = ['--datasets=mnist_embedded', '--methods=uta', '--eps_train=0.1',
            '--seeds=0', '--max_train_examples=1024', '--epochs=60',
            '--max_eval_examples=32', '--aa_examples=16',
            f'--output_dir={out}']
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'experiments', 'table1.py'),
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT)
    run_dir = os.path.join(out, 'runs', 'mnist_embedded', 'uta_eps0.1',
                           'seed0')
    checkpoints = os.path.join(run_dir, 'checkpoints')

    def wait_for(pattern):
      deadline = time.time() + 300
      while not glob.glob(pattern):
        self.assertIsNone(proc.poll(), 'finished before it could be stopped')
        self.assertLess(time.time(), deadline)
        time.sleep(0.05)

    # One writer per output folder: a second sweep there stops at once. Run
    # while the first starts up, so that it is still training after it.
    wait_for(run_dir)
    second = run_script('toy2d', f'--output_dir={out}', '--seeds=0')
    self.assertEqual(second.returncode, 2, second.stderr[-2000:])
    self.assertRegex(second.stderr.strip(),
                     r'^error: workdir .* is in use by pid \d+ .*table1\.py')
    # Stopped as soon as a checkpoint exists: inside training.
    wait_for(os.path.join(checkpoints, '[0-9]*'))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 130, stderr[-2000:])
    self.assertNotIn('Traceback', stderr)
    self.assertIn('rerun the same command to resume', stderr)
    self.assertFalse(os.path.exists(os.path.join(out, 'table1.json')))
    rerun = run_script('table1', *args)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-2000:])
    self.assertIn('resumed from step', rerun.stderr)
    self.assertTrue(os.path.exists(os.path.join(out, 'table1.json')))


if __name__ == '__main__':
  absltest.main()
