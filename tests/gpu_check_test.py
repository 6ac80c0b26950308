"""Tests of experiments/gpu_check.sh and experiments/resume_check.py on the
CPU: the GPU check lists its parts within its time budget, and its parts
run (GPU_CHECK_PLATFORM=cpu)."""

import json
import os
import re
import subprocess

from absl.testing import absltest
import pytest

from testutil import ROOT  # pylint: disable=g-bad-import-order

SCRIPT = os.path.join(ROOT, 'experiments', 'gpu_check.sh')
PARTS = ('environment', 'tests', 'benchmark_attacks', 'benchmark_loop',
         'benchmark_runs', 'benchmark_autoattack', 'main_job', 'resume',
         'resume_deterministic')


def _check(*args, parts=None, timeout_scale=1):
  env = dict(os.environ, GPU_CHECK_PLATFORM='cpu',
             GPU_CHECK_TIMEOUT_SCALE=str(timeout_scale))
  if parts:
    env['GPU_CHECK_PARTS'] = ' '.join(parts)
  return subprocess.run(['bash', SCRIPT, *args], capture_output=True,
                        text=True, timeout=600, env=env, check=False)


class GpuCheckTest(absltest.TestCase):

  def test_a_dry_run_lists_every_part_within_ten_minutes(self):
    proc = _check('--dry-run', self.create_tempdir().full_path)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    listed = re.findall(r'^(\w+) \(timeout (\d+) s\): ', proc.stdout, re.M)
    self.assertEqual([name for name, _ in listed], list(PARTS))
    self.assertLessEqual(sum(int(s) for _, s in listed), 600)
    self.assertIn('--run_counts=1,8,24', proc.stdout)
    self.assertIn('-m accelerator', proc.stdout)

  @pytest.mark.slow  # three short trainings
  def test_the_resume_part_runs_and_is_bitwise_on_the_cpu(self):
    out = self.create_tempdir().full_path
    # The timeouts are sized for a GPU window; the suite shares its CPU.
    proc = _check(out, parts=('environment', 'resume'), timeout_scale=4)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    with open(os.path.join(out, 'parts.jsonl')) as f:
      parts = [json.loads(line) for line in f]
    with open(os.path.join(out, 'resume.log')) as f:
      log = f.read()
    self.assertEqual([(p['part'], p['rc']) for p in parts],
                     [('environment', 0), ('resume', 0)], log[-2000:])
    with open(os.path.join(out, 'resume.json')) as f:
      resume = json.load(f)
    self.assertEqual(resume['backend'], 'cpu')
    self.assertGreater(resume['timings']['killed']['killed_with_checkpoint'],
                       0)
    self.assertTrue(resume['bitwise_equal'])
    self.assertEqual(resume['max_param_diff'], 0.0)


if __name__ == '__main__':
  absltest.main()
