r"""Adversarial training with UTA, PGD, FGSM or R-FGSM; the main job.

  python experiments/train.py                          # embedded MNIST, UTA
  python experiments/train.py --dataset=svhn --attack=uta --eps_train=0.08
  python experiments/train.py --dataset=fashion_mnist --attack=pgd \
      --eps_train=0.3 --workdir=runs/fmnist_pgd_0.3
  python experiments/train.py --seeds=0,1,2   # 3 runs as one program

Defaults per dataset are the paper's (``uta_jax.configs``); flags override
them. Rerunning the same command in the same --workdir resumes. With
--seeds the seeds train as one program (a run axis; ``uta_jax.programs``),
each in its own workdir <workdir>/seed<s>, as a run trained alone would.
SIGTERM or Ctrl-C checkpoints (or, during evaluation and AutoAttack, keeps
what is finished) and exits within seconds. Uses every local device with pmap; for
several hosts pass --coordinator_address, --num_processes, --process_id.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags

# Runs from a checkout without installing: the package sits one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import config_flags  # pylint: disable=g-import-not-at-top
from uta_jax import auto_attack
from uta_jax import configs
from uta_jax import data
from uta_jax import loop
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import runs
from uta_jax import workdir_lock

FLAGS = flags.FLAGS
config_flags.define()
flags.adopt_module_key_flags(config_flags)
flags.DEFINE_bool('print_config', False, 'print the resolved configuration '
                  '(the --dataset preset with the given flags) and exit')
flags.DEFINE_string('workdir', None,
                    'output folder; default runs/<dataset>_<attack>_eps<eps>')
flags.DEFINE_list('seeds', None, 'train these seeds (e.g. 0,1,2) as one '
                  'program, one workdir each: <workdir>/seed<s>')
cli.define_program_flags()
flags.adopt_module_key_flags(cli)  # --help lists --run_map, ... too
flags.DEFINE_bool('autoattack', False, 'after training, evaluate with '
                  'AutoAttack (as experiments/evaluate.py)')
flags.DEFINE_list('autoattack_eps', None, 'AutoAttack radii; default: the '
                  'first --eval_eps')
flags.DEFINE_integer('autoattack_examples', 1000, 'test points for AutoAttack')
flags.DEFINE_enum('aa_version', 'standard', list(auto_attack.VERSIONS),
                  'AutoAttack version; apgd: APGD-CE + APGD-T only')
flags.DEFINE_alias('autoattack_version', 'aa_version')
flags.DEFINE_enum('aa_backend', None, list(auto_attack.BACKENDS),
                  'AutoAttack backend; default: jax for standard and apgd, '
                  'torch for rand and plus')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 '
                    '(multi-host)')
flags.DEFINE_integer('num_processes', 1, 'processes in a multi-host run')
flags.DEFINE_integer('process_id', 0, 'index of this process')


def default_workdir(config: configs.Config) -> str:
  a = config.attack
  return os.path.join('runs', f'{config.dataset}_{a.name}_eps{a.eps_train:g}')


def main(argv):
  del argv
  cli.set_up_backend()
  cli.show_logs(sys.stderr, timestamps=True)
  try:
    config = config_flags.config(FLAGS.dataset)
    if FLAGS.print_config:
      print(config_flags.describe(config, config_flags.overrides()))
      return
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
    run_configs, workdirs = [config], [workdir]
    if FLAGS.seeds is not None:
      if FLAGS['seed'].present:
        cli.fail('--seed and --seeds exclude each other: drop one')
      seeds = cli.parse_seeds(FLAGS.seeds)
      run_configs = [dataclasses.replace(config, seed=s) for s in seeds]
      workdirs = [os.path.join(workdir, f'seed{s}') for s in seeds]
    stop = cli.stop_signals(multihost=FLAGS.num_processes > 1)
    results = loop.train_and_evaluate_runs(
        run_configs, workdirs, stop_requested=stop, **cli.program_options())
    autoattack = [None] * len(results)
    finished = [i for i, r in enumerate(results) if r['status'] == 'finished']
    if FLAGS.autoattack and finished:
      # The seeds' runs are one model: their AutoAttack is one program.
      reports = runs.evaluate_workdirs(
          [workdirs[i] for i in finished], eps=aa_eps,
          num_examples=FLAGS.autoattack_examples, version=FLAGS.aa_version,
          backend=FLAGS.aa_backend, jax_pgd=False, stop_requested=stop)
      for i, report in zip(finished, reports):
        autoattack[i] = report
  except parallel.Stopped:
    print(f'stopped during AutoAttack: finished eps are in each run\'s '
          f'{reporting.RESULTS}; rerun the same command to finish')
    sys.exit(stop.exit_code())
  except (configs.ConfigError, data.DataError, parallel.ParallelError,
          runs.RunError, workdir_lock.WorkdirError, ImportError,
          ValueError) as e:
    cli.fail(config_flags.message(e))
  failed = []
  for run_dir, result, report in zip(workdirs, results, autoattack):
    if len(workdirs) > 1:
      print(f'== {run_dir}')
    if result['status'] == 'failed':
      failed.append(f'{run_dir}: {config_flags.message(result["error"])}'
                    if len(workdirs) > 1 else
                    config_flags.message(result['error']))
      continue
    if result['status'] == 'preempted':
      where = ('not started' if result['step'] is None
               else f'preempted at step {result["step"]}: checkpoint saved')
      print(f'{where} in {run_dir}; rerun the same command to resume')
      continue
    for line in reporting.summary_lines(result):
      print(line)
    if report:
      for line in reporting.autoattack_lines(report):
        print(line)
    print(f'results: {os.path.join(run_dir, reporting.RESULTS)}')
  if failed:
    cli.fail('; '.join(failed))
  if any(r['status'] == 'preempted' for r in results):
    sys.exit(stop.exit_code())

if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
