r"""Adversarial training with UTA, PGD, FGSM or R-FGSM; the main job.

  python experiments/train.py                          # embedded MNIST, UTA
  python experiments/train.py --dataset=svhn --attack=uta --eps_train=0.08
  python experiments/train.py --dataset=fashion_mnist --attack=pgd \
      --eps_train=0.3 --workdir=runs/fmnist_pgd_0.3

Defaults per dataset are the paper's (``uta_jax.configs``); flags override
them. Rerunning the same command in the same --workdir resumes. SIGTERM or
Ctrl-C checkpoints (or, during evaluation and AutoAttack, keeps what is
finished) and exits within seconds. Uses every local device with pmap; for
several hosts pass --coordinator_address, --num_processes, --process_id.
"""

import os
import sys

from absl import app
from absl import flags

# Runs from a checkout without installing: the package sits one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import loop
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import runs
from uta_jax import workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', 'mnist_embedded',
                    f'one of {", ".join(data.DATASETS)}')
flags.DEFINE_string('workdir', None,
                    'output folder; default runs/<dataset>_<attack>_eps<eps>')
flags.DEFINE_string('data_dir', None, 'IDX or TFDS data folder (else '
                    'TFDS_DATA_DIR)')
flags.DEFINE_string('attack', None, 'none, fgsm, rfgsm, pgd or uta')
flags.DEFINE_float('eps_train', None, 'training L-inf radius, in [0, 1] units')
flags.DEFINE_integer('num_steps', None, 'attack steps K')
flags.DEFINE_float('step_size', None, 'attack step size alpha')
flags.DEFINE_string('step_schedule', None, 'constant or triangular')
flags.DEFINE_string('uncertainty', None, 'single, mc_dropout or ensemble')
flags.DEFINE_integer('num_samples', None, 'M: MC-dropout samples or members')
flags.DEFINE_string('measure', None, 'entropy or mutual_information')
flags.DEFINE_string('space', None, 'input or latent')
flags.DEFINE_string('model', None, 'mlp, lenet, svhn_lenet or resnet18')
flags.DEFINE_float('dropout_rate', None, 'dropout probability of the model')
flags.DEFINE_string('optimizer', None, 'adam or sgd_nesterov')
flags.DEFINE_float('learning_rate', None, 'base learning rate')
flags.DEFINE_integer('epochs', None, 'training epochs')
flags.DEFINE_integer('batch_size', None, 'global batch size (all devices)')
flags.DEFINE_integer('seed', None, 'seed of init, data order and attacks')
flags.DEFINE_list('eval_eps', None, 'eps values of the final evaluation')
flags.DEFINE_integer('eval_pgd_steps', None, 'PGD steps in evaluation')
flags.DEFINE_integer('eval_pgd_restarts', None, 'PGD restarts in evaluation')
flags.DEFINE_integer('max_train_examples', None, 'use the first N train '
                     'examples')
flags.DEFINE_integer('max_eval_examples', None, 'use the first N test examples')
flags.DEFINE_integer('checkpoint_every', None, 'steps between checkpoints')
flags.DEFINE_integer('eval_every', None, 'epochs between evaluations (0: end)')
flags.DEFINE_integer('eval_every_steps', None, 'steps between evaluations '
                     '(0: off)')
flags.DEFINE_integer('log_every', None, 'steps between progress lines')
flags.DEFINE_bool('autoattack', False, 'after training, evaluate with '
                  'AutoAttack (as experiments/evaluate.py)')
flags.DEFINE_list('autoattack_eps', None, 'AutoAttack radii; default: the '
                  'first --eval_eps')
flags.DEFINE_integer('autoattack_examples', 1000, 'test points for AutoAttack')
flags.DEFINE_enum('autoattack_version', 'standard',
                  list(evaluation.VERSIONS), 'AutoAttack version; apgd: '
                  'APGD-CE + APGD-T only')
flags.DEFINE_enum('aa_backend', None, list(evaluation.BACKENDS),
                  'AutoAttack backend; default: jax for apgd, else torch')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 '
                    '(multi-host)')
flags.DEFINE_integer('num_processes', 1, 'processes in a multi-host run')
flags.DEFINE_integer('process_id', 0, 'index of this process')

OVERRIDES = [f for f in configs.FLAG_FIELDS if f != 'eval_batch_size']


def build_config() -> configs.Config:
  overrides = {name: getattr(FLAGS, name) for name in OVERRIDES}
  overrides['eval_eps'] = cli.parse_floats(FLAGS.eval_eps, 'eval_eps')
  return configs.get_config(FLAGS.dataset, **overrides)


def default_workdir(config: configs.Config) -> str:
  a = config.attack
  return os.path.join('runs', f'{config.dataset}_{a.name}_eps{a.eps:g}')


def main(argv):
  del argv
  cli.show_logs(sys.stderr, timestamps=True)
  try:
    config = build_config()
    parallel.initialize_distributed(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    aa_eps = (cli.parse_floats(FLAGS.autoattack_eps, 'autoattack_eps') or
              config.eval.eps[:1])
    for e in aa_eps:
      if not 0 < e <= 1:
        cli.fail(f'--autoattack_eps {e} is outside (0, 1]: images are in '
                 '[0, 1]')
    workdir = FLAGS.workdir or default_workdir(config)
    stop = cli.StopSignals()
    results = loop.train_and_evaluate(config, workdir, stop_requested=stop)
    autoattack = None
    if FLAGS.autoattack and results['status'] == 'finished':
      autoattack = runs.evaluate_workdir(
          workdir, eps=aa_eps, num_examples=FLAGS.autoattack_examples,
          version=FLAGS.autoattack_version, backend=FLAGS.aa_backend,
          jax_pgd=False, stop_requested=stop)
  except parallel.Stopped:
    print(f'stopped during AutoAttack: finished eps are in {workdir}/'
          f'{reporting.RESULTS}; rerun the same command to finish')
    sys.exit(stop.exit_code())
  except (configs.ConfigError, data.DataError, parallel.ParallelError,
          runs.RunError, workdir_lock.WorkdirError, ImportError,
          ValueError) as e:
    cli.fail(str(e))
  if results['status'] == 'preempted':
    print(f'preempted at step {results["step"]}: checkpoint saved in '
          f'{workdir}; rerun the same command to resume')
    sys.exit(stop.exit_code())
  for line in reporting.summary_lines(results):
    print(line)
  if autoattack:
    for line in reporting.autoattack_lines(autoattack):
      print(line)
  print(f'results: {os.path.join(workdir, reporting.RESULTS)}')


if __name__ == '__main__':
  app.run(main)
