"""Trains a mixed program of runs once per run map and each compared run
alone (once, shared by the maps); prints, per map, the largest parameter
difference and the evaluation results of each, as JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=N \
      python tests/mixed_runs.py ROOT RUN_MAP[,RUN_MAP...]

Run by ``loop_test.MixedProgramTest`` in a subprocess per device count
(conftest fixes the test process at 4 devices).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from uta_jax import configs  # pylint: disable=g-import-not-at-top
from uta_jax import loop
from uta_jax import runs

# 320 embedded-MNIST images in batches of 32: 10 steps, LeNet.
SMALL = {'max_train_examples': 320, 'max_eval_examples': 32,
         'batch_size': 32, 'epochs': 1, 'checkpoint_every': 4,
         'log_every': 5, 'eval.pgd_restarts': 1, 'eval.pgd_steps': 2,
         'eval.uta_steps': 2, 'eval.eps': (0.1,), 'model.name': 'lenet'}


# (seed, objective, eps_train): each seed with each objective, each
# objective at each eps_train, each seed at each eps_train.
MIXED = ((0, 'pgd', 0.1), (0, 'uta', 0.2), (1, 'pgd', 0.2), (1, 'uta', 0.1))


def mixed_configs():
  """``MIXED`` (step size eps / 4) at K = 4: one program of 4 runs."""
  return [configs.get_config('mnist_embedded', dict(
      SMALL, seed=seed, **{'attack.name': name, 'attack.eps_train': eps,
                           'attack.step_size': eps / 4,
                           'attack.num_steps': 4}))
          for seed, name, eps in MIXED]


# The runs retrained alone: every run of the program.
COMPARED = tuple(range(len(MIXED)))


def main(root, run_maps):
  run_configs = mixed_configs()
  alone = {i: loop.train_and_evaluate(run_configs[i], f'{root}/alone/{i}')
           for i in COMPARED}
  out = {}
  for run_map in run_maps.split(','):
    folder = f'{root}/{run_map}'
    together = loop.train_and_evaluate_runs(
        run_configs, [f'{folder}/{i}' for i in range(len(run_configs))],
        run_map=run_map)
    out[run_map] = []
    for i in COMPARED:
      a = runs.load_run(f'{folder}/{i}').variables
      b = runs.load_run(f'{root}/alone/{i}').variables
      out[run_map].append({
          'run': i,
          'runs_in_program': together[i]['timings']['runs_in_program'],
          'max_param_diff': max(float(np.max(np.abs(x - y))) for x, y in zip(
              jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))),
          'together': {'clean': together[i]['clean_accuracy'],
                       'robust': together[i]['robust_accuracy']},
          'alone': {'clean': alone[i]['clean_accuracy'],
                    'robust': alone[i]['robust_accuracy']}})
  print(json.dumps({'devices': jax.device_count(), 'maps': out}))


if __name__ == '__main__':
  main(*sys.argv[1:])
