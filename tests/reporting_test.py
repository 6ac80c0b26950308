"""Tests of uta_jax.reporting's pure helpers."""

import glob
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import numpy as np

from uta_jax import configs
from uta_jax import reporting

from testutil import ROOT, require, tensorboard_scalars  # pylint: disable=g-bad-import-order


class ReportingTest(absltest.TestCase):

  def test_markdown_table(self):
    table = reporting.markdown_table(['a', 'b'], [['x', 1.25], [2, 'y']])
    self.assertEqual(table, '| a | b |\n| --- | --- |\n| x | 1.2 |\n'
                     '| 2 | y |\n')

  def test_eps_is_shown_as_a_decimal_and_in_255ths(self):
    self.assertEqual(reporting.format_eps(8 / 255), '0.03137 (8/255)')
    self.assertEqual(reporting.format_eps(0.1), '0.1 (25.5/255)')
    self.assertEqual(reporting.format_eps(16 / 255), '0.06275 (16/255)')

  def test_robustbench_eps_is_a_short_decimal_where_one_is_exact(self):
    # 0.2 is also 51/255: RobustBench's MNIST eps stays '0.2', CIFAR's '8/255'.
    self.assertEqual([reporting.eps_text(e) for e in (0.2, 0.3, 0.1, 8 / 255)],
                     ['0.2', '0.3', '0.1', '8/255'])

  def test_robustbench_records_one_per_eps_in_its_conventions(self):
    config = configs.get_config('cifar10', {'attack.name': 'pgd'})
    report = {'num_examples': 1000, 'version': 'standard', 'backend': 'torch',
              'eps': {str(8 / 255): {'clean_accuracy': 84.2,
                                     'robust_accuracy': 50.123},
                      '0.1': {'clean_accuracy': 84.2,
                              'robust_accuracy': 20.0}}}
    first, second = reporting.robustbench_records(config, report)
    self.assertEqual(first, {
        'dataset': 'cifar10', 'threat_model': 'Linf', 'eps': '8/255',
        'clean_acc': '84.20', 'autoattack_acc': '50.12', 'n_examples': 1000,
        'autoattack_version': 'standard', 'autoattack_backend': 'torch',
        'architecture': 'ResNet-18', 'additional_data': False,
        'training': 'PGD-AT, eps_train 8/255, uta-jax'})
    self.assertEqual((second['eps'], second['autoattack_acc']), ('0.1', '20.00'))
    ensemble = configs.get_config('mnist', {'model.ensemble_size': 5})
    self.assertEqual(reporting.robustbench_records(ensemble, report)[0][
        'architecture'], '5 x MLP (ensemble)')

  def test_read_metrics_keeps_the_later_record_of_a_replayed_step(self):
    path = self.create_tempfile().full_path
    for record in ({'kind': 'train', 'step': 1, 'loss': 3.0},
                   {'kind': 'eval', 'step': 1, 'fgsm_accuracy': 9.0},
                   {'kind': 'train', 'step': 1, 'loss': 2.0}):
      reporting.append_metrics(path, record)
    records = reporting.read_metrics(path)
    self.assertLen(records, 2)
    self.assertEqual([r.get('loss') for r in records if r['kind'] == 'train'],
                     [2.0])


  def test_mean_std_is_numpys_sample_std(self):
    values = [71.4, 63.6, 52.0, 10.4]
    stats = reporting.mean_std(values)
    self.assertAlmostEqual(stats['mean'], np.mean(values))
    self.assertAlmostEqual(stats['std'], np.std(values, ddof=1))
    self.assertEqual(stats['n'], 4)
    self.assertEqual(reporting.mean_std([5.0]), {'mean': 5.0, 'std': 0.0,
                                                 'n': 1})
    self.assertEqual(reporting.format_mean_std([1.0, 2.0, 3.0]), '2.0 ± 1.0')
    self.assertEqual(reporting.format_mean_std([0.123], 2), '0.12')

  def test_group_rows_keeps_first_seen_order(self):
    rows = [{'m': 'pgd', 'e': 0.1, 'seed': 0}, {'m': 'uta', 'e': 0.1,
                                                 'seed': 0},
            {'m': 'pgd', 'e': 0.1, 'seed': 1}]
    groups = reporting.group_rows(rows, 'm', 'e')
    self.assertEqual(list(groups), [('pgd', 0.1), ('uta', 0.1)])
    self.assertEqual([r['seed'] for r in groups[('pgd', 0.1)]], [0, 1])

  def test_values_at_reads_one_nested_column(self):
    rows = [{'a': {'b': [1, 2]}}, {'a': {'b': [3, 4]}}]
    self.assertEqual(reporting.values_at(rows, 'a', 'b', 1), [2, 4])
    self.assertEqual(reporting.values_at(rows), rows)
    with self.assertRaises(KeyError):
      reporting.values_at(rows, 'c')


  def test_tensorboard_events_hold_each_metric_once_per_step(self):
    folder = self.create_tempdir().full_path
    path = os.path.join(folder, 'metrics.jsonl')
    for record in ({'kind': 'train', 'step': 20, 'loss': 3.0},
                   {'kind': 'train', 'step': 40, 'loss': 2.5,
                    'accuracy': 0.5},
                   {'kind': 'train', 'step': 40, 'loss': 2.0,  # replayed
                    'accuracy': 0.6},
                   {'kind': 'eval', 'step': 40, 'pgd_accuracy': 41.0}):
      reporting.append_metrics(path, record)
    board = os.path.join(folder, 'tensorboard')
    self.assertTrue(reporting.write_tensorboard(path, board))
    self.assertTrue(reporting.write_tensorboard(path, board))  # rewrites
    (events_file,) = glob.glob(os.path.join(board, 'events.out.tfevents.*'))
    scalars = sorted(tensorboard_scalars(events_file))
    self.assertEqual(scalars, [('eval/pgd_accuracy', 40, 41.0),
                               ('train/accuracy', 40, 0.6),
                               ('train/loss', 20, 3.0),
                               ('train/loss', 40, 2.0)])

  def test_tensorboard_events_are_written_without_importing_torch(self):
    # tensorboardX's writer imports torch when installed (2.4 s of a run's
    # start); the writer here keeps it out, and torch imports afterwards.
    require('torch')
    folder = self.create_tempdir().full_path
    script = (
        'import sys\n'
        'from uta_jax import reporting\n'
        f'path = {os.path.join(folder, "metrics.jsonl")!r}\n'
        "reporting.append_metrics(path, {'kind': 'train', 'step': 1, "
        "'loss': 2.0})\n"
        f'assert reporting.write_tensorboard(path, {folder!r} + "/tb")\n'
        "print('torch' in sys.modules)\n"
        'import torch\n'
        'print(torch.ones(2).sum().item())\n')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertEqual(out.stdout.split(), ['False', '2.0'])
    self.assertEqual(tensorboard_scalars(os.path.join(folder, 'tb')),
                     [('train/loss', 1, 2.0)])

  def test_metrics_log_shows_each_step_once_across_a_resume(self):
    folder = self.create_tempdir().full_path
    path, board = (os.path.join(folder, 'metrics.jsonl'),
                   os.path.join(folder, 'tensorboard'))
    first = reporting.MetricsLog(path, board, resumed_step=0)
    for step in (4, 8, 12):  # killed after step 12, checkpoint at 8
      first.append({'kind': 'train', 'step': step, 'loss': float(step)})
    first.close()
    resumed = reporting.MetricsLog(path, board, resumed_step=8)
    for step in (12, 16):  # step 12 replayed with another value
      resumed.append({'kind': 'train', 'step': step, 'loss': step + 0.5})
    resumed.append({'kind': 'eval', 'step': 16, 'clean_accuracy': 90.0})
    resumed.append({'kind': 'eval', 'step': 16, 'clean_accuracy': 91.0})
    resumed.close()
    self.assertEqual(sorted(tensorboard_scalars(board)), [
        ('eval/clean_accuracy', 16, 91.0), ('train/loss', 4, 4.0),
        ('train/loss', 8, 8.0), ('train/loss', 12, 12.5),
        ('train/loss', 16, 16.5)])
    self.assertEqual([r['step'] for r in reporting.read_metrics(path)],
                     [4, 8, 12, 16, 16])

  def test_metrics_log_appends_without_rewriting(self):
    folder = self.create_tempdir().full_path
    log = reporting.MetricsLog(os.path.join(folder, 'metrics.jsonl'),
                               os.path.join(folder, 'tensorboard'),
                               resumed_step=0)
    with mock.patch.object(reporting, 'write_tensorboard') as rewrite:
      for step in range(1, 50):
        log.append({'kind': 'train', 'step': step, 'loss': 1.0})
    log.close()
    rewrite.assert_not_called()
    self.assertLen(tensorboard_scalars(os.path.join(folder, 'tensorboard')),
                   49)

  def test_a_disabled_metrics_log_writes_nothing(self):
    folder = self.create_tempdir().full_path
    log = reporting.MetricsLog(os.path.join(folder, 'metrics.jsonl'),
                               os.path.join(folder, 'tensorboard'),
                               resumed_step=0, enabled=False)
    log.append({'kind': 'train', 'step': 1, 'loss': 1.0})
    log.close()
    self.assertEqual(os.listdir(folder), [])


if __name__ == '__main__':
  absltest.main()
