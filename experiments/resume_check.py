r"""kill -9 in the middle of a run, rerun, compare with the uninterrupted run.

  python experiments/resume_check.py --output=resume.json
  XLA_FLAGS=--xla_gpu_deterministic_ops=true python experiments/resume_check.py \
      --output=resume_deterministic.json

Trains the main job (shortened by ``--epochs``) once uninterrupted, once
killed with SIGKILL as soon as a checkpoint at ``--kill_after_step`` or later
exists and then rerun to the end, in the same fresh folder; writes whether the
two final parameter sets are bitwise equal, their largest difference and
the XLA flags it ran with. On XLA:CPU they are bitwise equal (tested in
``train_e2e_test``); on a GPU this is what ``experiments/gpu_check.sh``
measures with XLA's deterministic-ops flag on and off.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from uta_jax import runs

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')

flags.DEFINE_string('output', 'resume_check.json', 'JSON result path')
flags.DEFINE_integer('epochs', 3, 'epochs of the main job (30 in its preset)')
flags.DEFINE_integer('kill_after_step', 50, 'SIGKILL once a checkpoint at '
                     'this step or later exists')
flags.DEFINE_integer('timeout', 600, 'seconds each training may take')
FLAGS = flags.FLAGS

ARGS = ('--checkpoint_every=25', '--max_eval_examples=100',
        '--eval_pgd_restarts=1', '--eval_eps=0.1')


def _newest_checkpoint(workdir: str) -> int:
  path = os.path.join(workdir, runs.CHECKPOINTS, 'checksums.json')
  try:
    with open(path) as f:
      return max((int(s) for s in json.load(f)), default=-1)
  except (OSError, ValueError):
    return -1


def _train(workdir: str, *, kill_at=None) -> dict:
  """One train.py call; with ``kill_at``, SIGKILLed once a checkpoint at
  that step exists. Returns its return code and seconds."""
  start = time.time()
  proc = subprocess.Popen(
      [sys.executable, TRAIN, f'--workdir={workdir}',
       f'--epochs={FLAGS.epochs}', *ARGS], stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  if kill_at is None:
    _, err = proc.communicate(timeout=FLAGS.timeout)
    if proc.returncode:
      cli.fail(f'train.py failed ({proc.returncode}): {err[-500:]}')
    return {'seconds': time.time() - start}
  while proc.poll() is None and _newest_checkpoint(workdir) < kill_at:
    if time.time() - start > FLAGS.timeout:
      proc.kill()
      cli.fail(f'no checkpoint at step {kill_at} within {FLAGS.timeout} s')
    time.sleep(0.01)
  if proc.poll() is not None:
    cli.fail(f'the run ended before a checkpoint at step {kill_at}: lower '
             '--kill_after_step or raise --epochs')
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return {'seconds': time.time() - start,
          'killed_with_checkpoint': _newest_checkpoint(workdir)}


def main(argv):
  del argv
  cli.show_logs(sys.stderr, timestamps=False)
  with tempfile.TemporaryDirectory() as tmp:
    whole, cut = os.path.join(tmp, 'whole'), os.path.join(tmp, 'cut')
    timings = {'uninterrupted': _train(whole),
               'killed': _train(cut, kill_at=FLAGS.kill_after_step),
               'resumed': _train(cut)}
    a, b = runs.load_run(whole), runs.load_run(cut)
    leaves = list(zip(jax.tree_util.tree_leaves(a.variables),
                      jax.tree_util.tree_leaves(b.variables)))
    result = {
        'backend': jax.default_backend(),
        'device_kind': jax.devices()[0].device_kind,
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'epochs': FLAGS.epochs, 'steps': [a.step, b.step],
        'bitwise_equal': all(np.array_equal(x, y) for x, y in leaves),
        'max_param_diff': max(float(np.max(np.abs(x - y))) for x, y in leaves),
        'timings': timings,
    }
  with open(FLAGS.output, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
