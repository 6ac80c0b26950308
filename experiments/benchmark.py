r"""JAX vs PyTorch eager, side by side in one process, on the same device.

  python experiments/benchmark.py                       # attacks + AT steps
  python experiments/benchmark.py --sections=loop       # train.py's loop
  python experiments/benchmark.py --sections=autoattack # JAX vs reference
  python experiments/benchmark.py --sections=attacks --models=lenet --reps=9
  python experiments/benchmark.py --sections=convs      # per conv layer (CPU)
  python experiments/benchmark.py --sections=runs       # runs as one program

Sections, one module each in ``experiments/benchmarks/``: ``attacks`` (the
attacks and training steps of every model, ResNet-18's CIFAR-10 preset step
included), ``convs`` (each LeNet convolution), ``autoattack`` (the standard
AutoAttack in JAX vs the reference; 8 models in one program), ``loop`` (the loop efficiency of ``train.py``) and
``runs`` (R runs as one program vs R plain steps; ``train.py --seeds`` vs R
``train.py`` calls).

PyTorch runs on the device JAX computes on: CUDA, synchronised after every
call, when JAX runs on a GPU; the CPU otherwise. Matmuls and convolutions
are full float32 on both sides (TF32 off); the ``loop`` and ``runs``
sections run first, at the precision ``train.py`` uses (JAX's default). Repetitions are interleaved
(JAX, torch, JAX, torch, ...) after one warm-up call each; the tables give
medians, and ratios of medians. GFLOP/s use XLA's cost analysis of the JAX
program for both frameworks and are compared with a float32 1024x1024
matmul measured in the same run.
"""

import json
import logging
import os
import platform
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import flax.linen
import jax

from benchmarks import attacks  # pylint: disable=g-import-not-at-top
from benchmarks import autoattack
from benchmarks import common
from benchmarks import convs
from benchmarks import loop
from benchmarks import runs
from uta_jax import auto_attack
from uta_jax import fast_ops
from uta_jax import torch_bridge

SECTIONS = ('attacks', 'convs', 'autoattack', 'loop', 'runs')

FLAGS = flags.FLAGS
flags.DEFINE_list('sections', ['attacks'], ', '.join(SECTIONS))
flags.DEFINE_list('models', ['mlp', 'lenet', 'svhn_lenet', 'resnet18'],
                  'models to run (resnet18: its training step only)')
flags.DEFINE_integer('batch_size', 256, 'attack batch size')
flags.DEFINE_integer('train_batch_size', 128, 'AT-step batch size')
flags.DEFINE_integer('reps', 5, 'timed repetitions per implementation')
flags.DEFINE_integer('aa_examples', 1000, 'AutoAttack test points')
flags.DEFINE_float('aa_eps', 0.1, 'AutoAttack eps')
flags.DEFINE_integer('aa_batch_size', 500, 'AutoAttack batch size')
flags.DEFINE_integer('aa_reps', 1, 'timed AutoAttack runs per implementation')
flags.DEFINE_integer('aa_runs', autoattack.NUM_MODELS, 'MLPs (seeds) the '
                     'autoattack section evaluates at once')
flags.DEFINE_integer('aa_runs_reps', 1, 'timed runs of each side of the '
                     '--aa_runs models at once')
flags.DEFINE_integer('aa_runs_examples', 200, 'test points of the '
                     '--aa_runs models at once')
flags.DEFINE_integer('aa_train_steps', 300, 'PGD-AT steps of the MLPs '
                     'the autoattack section evaluates at once')
flags.DEFINE_string('aa_workdir', autoattack.AGREEMENT_LENET, 'the LeNet the '
                    'autoattack section times the standard version on '
                    '(trained like it here if missing)')
flags.DEFINE_string('output', 'benchmark_results.json', 'JSON output path')
flags.DEFINE_float('loop_bare_seconds', 5.0, 'seconds of each timing of the '
                   'bare train step (loop section)')
flags.DEFINE_list('run_counts', ['1', '3', '8'], 'runs section: the R of '
                  'the equal-K rows')
flags.DEFINE_integer('e2e_runs', 3, 'runs section: seeds of the end-to-end '
                     'comparison (0: skip it)')
flags.DEFINE_bool('plain_ops', False, 'run the models with plain lax '
                  'convolutions and nn.max_pool instead of uta_jax.fast_ops '
                  '(the "before" of the fast_ops A/B)')

def use_plain_ops() -> None:
  """Routes the models' convolution and pooling back to plain lax / flax."""
  fast_ops.conv_general_dilated = jax.lax.conv_general_dilated
  fast_ops.max_pool_2x2 = lambda x: flax.linen.max_pool(x, (2, 2),
                                                        strides=(2, 2))
  fast_ops.conv_max_pool_2x2 = lambda lhs, rhs, *args, **kwargs: (
      fast_ops.max_pool_2x2(jax.lax.conv_general_dilated(lhs, rhs, *args,
                                                         **kwargs)))


def main(argv):
  del argv
  cli.set_up_backend()  # as the scripts run: one CPU device per core
  torch = torch_bridge.require_torch()
  if FLAGS.plain_ops:
    use_plain_ops()
  unknown = set(FLAGS.sections) - set(SECTIONS)
  if unknown:
    cli.fail(f'unknown sections {sorted(unknown)}; choose from '
             f'{", ".join(SECTIONS)}')
  if 'autoattack' in FLAGS.sections and FLAGS.aa_runs < 2:
    cli.fail(f'--aa_runs {FLAGS.aa_runs}: models at once needs 2 or more')
  device = torch_bridge.torch_device()
  # The loop as train.py runs it, at JAX's default precision; the
  # comparisons with PyTorch after it at full float32 on both sides.
  loop_rows = (loop.run(bare_seconds=FLAGS.loop_bare_seconds)
               if 'loop' in FLAGS.sections else None)
  runs_result = None
  if 'runs' in FLAGS.sections:
    runs_result = {'steps': runs.step_rows(
        FLAGS.reps, sizes=[int(r) for r in FLAGS.run_counts])}
    if FLAGS.e2e_runs:
      runs_result['end_to_end'] = runs.end_to_end(FLAGS.e2e_runs)
  precision = common.set_matmul_precision(torch)
  peak = common.matmul_peak_gflops(torch, device)
  backend = jax.devices()[0].platform
  result = {
      'machine': {'processor': platform.processor() or platform.machine(),
                  'cpus': os.cpu_count(), 'jax': jax.__version__,
                  'torch': torch.__version__, 'jax_backend': backend,
                  'jax_devices': [str(d) for d in jax.devices()],
                  'device_kind': jax.devices()[0].device_kind,
                  'torch_device': device,
                  'torch_threads': torch.get_num_threads(),
                  'matmul_precision': precision,
                  'matmul_peak_gflops': peak},
      'settings': {'batch_size': FLAGS.batch_size,
                   'train_batch_size': FLAGS.train_batch_size,
                   'reps': FLAGS.reps, 'steps': attacks.K, 'eps': attacks.EPS,
                   'step_size': attacks.ALPHA, 'mc_samples': attacks.M,
                   'plain_ops': FLAGS.plain_ops},
  }
  print(f'float32 matmul peak: {peak:.1f} GFLOP/s; JAX {jax.__version__} on '
        f'{backend} ({jax.devices()[0].device_kind}), torch '
        f'{torch.__version__} on {device}; {precision}', flush=True)
  if 'attacks' in FLAGS.sections:
    result['attacks'] = attacks.run(torch, device, peak, FLAGS)
    print(attacks.markdown(result['attacks'], backend.upper()))
  if 'convs' in FLAGS.sections:
    result['convs'] = convs.run(torch, FLAGS)
    print(convs.markdown(result['convs']))
  if 'autoattack' in FLAGS.sections:
    # AutoAttack's own progress lines would drown the summary.
    logging.getLogger(auto_attack.LOGGER).propagate = False
    result['autoattack'] = autoattack.run(torch, FLAGS)
    print(autoattack.markdown(result['autoattack']))
  if loop_rows is not None:
    result['loop'] = loop_rows
    print(loop.markdown(loop_rows))
  if runs_result is not None:
    result['runs'] = runs_result
    print(runs.markdown(runs_result))
  with open(FLAGS.output, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'results: {FLAGS.output}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
