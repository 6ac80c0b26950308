"""Smoke tests: experiments/benchmark.py runs its sections and writes JSON."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
import pytest

from testutil import ROOT  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
from benchmarks import autoattack  # pylint: disable=g-import-not-at-top,g-bad-import-order
from benchmarks import loop  # pylint: disable=g-import-not-at-top,g-bad-import-order
from benchmarks import runs  # pylint: disable=g-import-not-at-top,g-bad-import-order


# End-to-end: subprocesses, minutes. Deselect with -m "not slow".
pytestmark = pytest.mark.slow


class BenchmarkTest(absltest.TestCase):

  def test_every_section_on_the_mlp(self):
    out = os.path.join(self.create_tempdir().full_path, 'bench.json')
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'experiments', 'benchmark.py'),
         '--sections=attacks,convs,autoattack', '--models=mlp', '--reps=1',
         '--batch_size=8', '--train_batch_size=8', '--aa_examples=16',
         '--aa_runs_examples=16', '--aa_runs=2', '--aa_train_steps=20',
         f'--output={out}'], capture_output=True,
        text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(out) as f:
      result = json.load(f)
    self.assertGreater(result['machine']['matmul_peak_gflops'], 0)
    workloads = [r['workload'] for r in result['attacks']]
    self.assertEqual(workloads, ['pgd10', 'uta10', 'uta10_mc5', 'at_step'])
    self.assertEqual(result['machine']['torch_device'], 'cpu')
    for row in result['attacks']:
      self.assertGreater(row['jax']['throughput'], 0)
      self.assertGreater(row['torch']['throughput'], 0)
      self.assertGreater(row['jax']['gflops'], 0)
    layers = [(r['layer'], r['op']) for r in result['convs']]
    self.assertEqual(len(layers), 8)
    self.assertEqual(layers[:2], [('lenet conv1', 'forward'),
                                  ('lenet conv1', 'input gradient')])
    for row in result['convs']:
      for impl in ('lax_ms', 'fast_ops_ms', 'torch_ms'):
        self.assertGreater(row[impl], 0)
    aa = result['autoattack']
    (standard,) = aa['standard']
    for key in ('jax_seconds', 'jax_warm_seconds', 'jax_cached_seconds',
                'bridge_seconds'):
      self.assertGreater(standard[key], 0)
    self.assertAlmostEqual(standard['speedup_cached_over_bridge'],
                           standard['bridge_seconds'] /
                           standard['jax_cached_seconds'])
    self.assertEqual(list(standard['per_attack']['jax']),
                     ['apgd-ce', 'apgd-t', 'fab-t', 'square'])
    # The bridge is the same network: AutoAttack finds nearly the same
    # points (APGD's and Square's draws differ).
    robust = standard['robust_accuracy']
    self.assertLessEqual(abs(robust['jax'] - robust['bridge']),
                         2 * 100 / 16 + 1e-6)
    self.assertEqual(robust['jax'], robust['jax_warm'])
    self.assertEqual(robust['jax'], robust['jax_cached'])
    self.assertEqual(aa['runs']['models'], 2)
    self.assertTrue(aa['runs']['same_accuracies'])
    self.assertGreater(aa['runs']['speedup'], 0)
    self.assertIn('one program', autoattack.markdown(aa))

  def test_loop_section_measures_the_loop_against_the_bare_step(self):
    tiny = {'tiny': ('mnist_embedded', {
        'max_train_examples': 256, 'batch_size': 32, 'epochs': 2,
        'checkpoint_every': 4, 'log_every': 2})}
    (row,) = loop.run(bare_seconds=0.1, runs=tiny, repeats=1)
    self.assertEqual(row['window_steps'], [2, 16])
    self.assertEqual(row['saves_in_window'], 4)  # steps 4, 8, 12, 16
    self.assertGreater(row['loop_images_per_sec'], 0)
    self.assertAlmostEqual(row['efficiency'], row['loop_images_per_sec'] /
                           row['bare_step_images_per_sec'])
    self.assertIn('| tiny |', loop.markdown([row]))

  def test_runs_section_times_every_run_map_against_plain_steps(self):
    (row,) = runs.step_rows(reps=1, sizes=(2,), mixed=False)
    self.assertEqual(row['runs'], 2)
    for key in ('vmap', 'unroll', 'plain'):
      self.assertGreater(row['images_per_sec'][key], 0)
    for key in ('vmap', 'unroll'):
      self.assertAlmostEqual(
          row['ratio'][key], row['images_per_sec'][key] /
          row['images_per_sec']['plain'])
    self.assertIn('| 2 runs, K = 10 |', runs.markdown({'steps': [row]}))


if __name__ == '__main__':
  absltest.main()
