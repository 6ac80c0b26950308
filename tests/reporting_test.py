"""Tests of uta_jax.reporting's pure helpers."""

from absl.testing import absltest

from uta_jax import reporting


class ReportingTest(absltest.TestCase):

  def test_markdown_table(self):
    table = reporting.markdown_table(['a', 'b'], [['x', 1.25], [2, 'y']])
    self.assertEqual(table, '| a | b |\n| --- | --- |\n| x | 1.2 |\n'
                     '| 2 | y |\n')

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


if __name__ == '__main__':
  absltest.main()
