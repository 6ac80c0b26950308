"""End-to-end tests of the paper-reproduction scripts (subprocesses).

Each script runs as users run it, on real offline data (embedded MNIST,
Debian's Fashion-MNIST, the 2D toy) with tiny overrides, and must write its
markdown table, JSON and PNG; rerunning must reuse the finished runs.
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--max_train_examples=256', '--max_eval_examples=32',
        '--aa_examples=16', '--epochs=1']


def run_script(name, *args, timeout=600):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', f'{name}.py'),
       *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class PaperScriptsTest(absltest.TestCase):

  def outputs(self, out, stem):
    for ext in ('md', 'json', 'png'):
      self.assertTrue(os.path.exists(os.path.join(out, f'{stem}.{ext}')), ext)
    with open(os.path.join(out, f'{stem}.json')) as f:
      return json.load(f)

  def test_table1_scores_are_aa_means_and_a_rerun_reuses_the_runs(self):
    out = self.create_tempdir().full_path
    args = ['--datasets=mnist_embedded', '--methods=pgd,uta',
            '--eps_train=0.1', f'--output_dir={out}', *TINY]
    proc = run_script('table1', *args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = self.outputs(out, 'table1')['rows']
    self.assertEqual([r['method'] for r in rows], ['pgd', 'uta'])
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
    rerun = run_script('table1', *args)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    self.assertEqual(rerun.stderr.count('reusing finished run'), 2)
    self.assertNotIn('robust accuracy after', rerun.stderr)  # AA reused
    self.assertEqual(self.outputs(out, 'table1')['rows'][0]['score'],
                     rows[0]['score'])

  def test_latent_space_trains_the_ensemble_and_attacks_in_input_space(self):
    out = self.create_tempdir().full_path
    proc = run_script('latent_space', '--methods=ls_uta', '--eps_train=0.2',
                      f'--output_dir={out}', *TINY)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    (row,) = self.outputs(out, 'latent_space')['rows']
    with open(os.path.join(row['workdir'], 'config.json')) as f:
      config = json.load(f)
    self.assertEqual(config['attack']['space'], 'latent')
    self.assertEqual(config['attack']['uncertainty'], 'ensemble')
    self.assertEqual(config['attack']['num_samples'], 5)
    self.assertEqual(config['model'], 'lenet')
    self.assertEqual(len(row['score']), 4)

  def test_catastrophic_overfitting_writes_curves(self):
    out = self.create_tempdir().full_path
    proc = run_script('catastrophic_overfitting', '--max_train_examples=512',
                      '--epochs=1', '--eval_every_steps=2',
                      '--max_eval_examples=32', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = self.outputs(out, 'catastrophic_overfitting')['rows']
    self.assertEqual([r['method'] for r in rows], ['fgsm', 'uta1'])
    for r in rows:
      self.assertEqual(r['steps'], [2, 4])  # 4 steps: one mid-run, one final
      self.assertLen(r['fgsm'], 2)
      self.assertIn('collapse_step', r)

  def test_toy2d_reports_crossing_and_oscillations(self):
    out = self.create_tempdir().full_path
    proc = run_script('toy2d', '--epochs=2', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = self.outputs(out, 'toy2d')
    self.assertLen(result['per_seed'], 3)
    for seed in result['per_seed']:
      for fraction in seed['crossing'].values():
        self.assertBetween(fraction, 0.0, 1.0)
      for method in ('pgd', 'uta'):
        training = seed['training'][method]
        self.assertEqual(training['updates'], 16)  # 2 epochs x 512 / 64
        self.assertBetween(training['mean_oscillations'], 0.0, 15.0)

  def test_visual_appearance_grid(self):
    out = self.create_tempdir().full_path
    proc = run_script('visual_appearance', '--max_train_examples=256',
                      '--epochs=1', '--max_eval_examples=32',
                      '--attack_steps=50', f'--output_dir={out}')
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = self.outputs(out, 'visual_appearance')
    self.assertEqual(result['labels'], list(range(10)))
    for row in ('uta', 'pgd'):
      self.assertLen(result[row]['predictions'], 10)
      self.assertBetween(result[row]['mean_linf'], 0.0, 50 * 0.001 + 1e-6)

  def test_bad_flags_give_one_line_errors(self):
    out = self.create_tempdir().full_path
    for script, flag in (('table1', '--datasets=cifar100'),
                         ('latent_space', '--methods=ls_fgsm'),
                         ('catastrophic_overfitting', '--settings=imagenet')):
      proc = run_script(script, flag, f'--output_dir={out}')
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertEqual(proc.stderr.strip().count('\n'), 0, proc.stderr)
      self.assertTrue(proc.stderr.startswith('error: '), proc.stderr)


if __name__ == '__main__':
  absltest.main()
