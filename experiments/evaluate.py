r"""Evaluate a trained workdir with AutoAttack and JAX-native PGD.

  python experiments/evaluate.py --workdir=runs/mnist_embedded_uta_eps0.2
  python experiments/evaluate.py --workdir=DIR --eps=0.1,0.3 --num_examples=1000
  python experiments/evaluate.py --workdir=DIR --aa_version=apgd   # JAX APGD
  python experiments/evaluate.py --workdir=DIR --aa_version=rand   # MC dropout, EoT
  python experiments/evaluate.py --workdir=runs/x/seed0,runs/x/seed1  # together

Restores the newest valid checkpoint, runs AutoAttack and PGD with restarts
at every eps on the first --num_examples test points, prints AutoAttack's own
log lines, and stores an 'autoattack' section in DIR/results.json after each
eps. The standard version (APGD-CE, APGD-T, FAB-T, Square) and
--aa_version=apgd (its first two) run natively in JAX on every device;
--aa_backend=torch runs the reference through uta_jax.torch_bridge (and
versions rand and plus). Several workdirs of one model architecture and
dataset (comma-separated: a ``train.py --seeds`` run's seed folders) are
evaluated together, in one program per attack. SIGTERM or Ctrl-C stops
within seconds; a rerun skips the eps already stored.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import config_flags  # pylint: disable=g-import-not-at-top
from uta_jax import auto_attack
from uta_jax import data
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import runs
from uta_jax import torch_bridge
from uta_jax import workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_list('workdir', None, 'a workdir written by experiments/train.py'
                  ', or several of one model (comma-separated): evaluated '
                  'together')
flags.DEFINE_enum('aa_version', 'standard', list(auto_attack.VERSIONS),
                  "AutoAttack version; 'rand' evaluates MC dropout with EoT; "
                  "'apgd' only the standard APGD-CE + APGD-T (cheap)")
flags.DEFINE_alias('version', 'aa_version')
flags.DEFINE_enum('aa_backend', None, list(auto_attack.BACKENDS),
                  "jax: natively in JAX, on every device (versions standard "
                  "and apgd); torch: the reference pyautoattack through the "
                  "bridge. Default: jax for standard and apgd, else torch")
flags.DEFINE_list('eps', None, 'L-inf radii in (0, 1]; default: the run\'s '
                  'eval_eps')
flags.DEFINE_integer('num_examples', 1000, 'first N test points')
flags.DEFINE_integer('batch_size', 500, 'AutoAttack batch size')
flags.DEFINE_integer('seed', 0, 'AutoAttack seed')
flags.DEFINE_bool('jax_pgd', True, 'also run the JAX-native PGD / UTA '
                  'evaluation on the same points')
flags.DEFINE_integer('torch_threads', 1, 'torch intra-op threads; 1 keeps '
                     "torch's OpenMP pool from competing with XLA's")


def parse_eps(values):
  """--eps as floats in (0, 1], or None for the run's own eval eps."""
  eps = cli.parse_floats(values, 'eps')
  for e in eps or ():
    if not 0 < e <= 1:
      cli.fail(f'--eps {e} is outside (0, 1]: images are in [0, 1], write '
               '8/255 as 0.0314')
  return eps


def main(argv):
  del argv
  cli.set_up_backend()
  cli.show_logs(sys.stdout, timestamps=False)
  if not FLAGS.workdir:
    cli.fail('--workdir is required: a folder written by experiments/train.py')
  eps = parse_eps(FLAGS.eps)
  backend = FLAGS.aa_backend or auto_attack.default_backend(FLAGS.aa_version)
  if backend == 'jax' and FLAGS.aa_version not in auto_attack.JAX_ATTACKS:
    cli.fail(f'--aa_backend=jax runs --aa_version='
             f'{" or ".join(sorted(auto_attack.JAX_ATTACKS))}; use '
             f'--aa_backend=torch for --aa_version={FLAGS.aa_version}')
  stop = cli.stop_signals()
  try:
    if backend == 'torch':
      torch = torch_bridge.require_torch()
      torch.set_num_threads(FLAGS.torch_threads)
    reports = runs.evaluate_workdirs(
        FLAGS.workdir, version=FLAGS.aa_version, backend=backend, eps=eps,
        num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed, jax_pgd=FLAGS.jax_pgd, stop_requested=stop)
  except parallel.Stopped:
    print(f'stopped: finished eps are in {" and ".join(FLAGS.workdir)} '
          f'({reporting.RESULTS}); rerun the same command to finish')
    sys.exit(stop.exit_code())
  except (ImportError, runs.RunError, data.DataError, ValueError,
          workdir_lock.WorkdirError) as e:
    cli.fail(config_flags.message(e))
  for workdir, report in zip(FLAGS.workdir, reports):
    if len(FLAGS.workdir) > 1:
      print(f'== {workdir}')
    for line in reporting.autoattack_lines(report):
      print(line)
    print(f'results: {os.path.join(workdir, reporting.RESULTS)}')

if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
