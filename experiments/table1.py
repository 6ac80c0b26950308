r"""Table 1 and Fig. 2: PGD-AT vs UTA-AT for each eps_train, AutoAttack.

  python experiments/table1.py                       # quick: F-MNIST, MNIST
  python experiments/table1.py --preset=paper        # + full MNIST, SVHN
  python experiments/table1.py --datasets=mnist_embedded --methods=pgd,uta

For each dataset, method and eps_train (§5.1: MNIST / Fashion-MNIST
K = eps/0.01 steps of 0.01; SVHN triangular steps) one run is trained with
``loop.train_and_evaluate``, then the standard AutoAttack (through the torch
bridge) attacks it at each eps_test. A cell is the mean of clean and robust
accuracy, as in the paper; the paper's number is shown beside it. Methods:
``pgd``, ``uta`` (single model) and ``uta_ensemble`` (5 models, App. C).
Writes table1.md / .json / .png (Fig. 2: clean accuracy against eps_train).
Rerunning reuses finished runs and AutoAttack reports.
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
from uta_jax import configs

METHODS = ('pgd', 'uta', 'uta_ensemble')
EPS_TRAIN = {
    'fashion_mnist': (0.1, 0.2, 0.3, 0.4),
    'mnist': (0.1, 0.2, 0.3, 0.4),
    'mnist_embedded': (0.1, 0.2, 0.3, 0.4),
    'svhn': (0.01, 0.04, 0.08, 0.12, 0.16),
}
# Per dataset: config overrides, AutoAttack points and methods of a preset.
QUICK = {
    'fashion_mnist': dict(config=dict(max_train_examples=10000, epochs=3,
                                      max_eval_examples=500,
                                      eval_pgd_restarts=2),
                          aa_examples=200, methods=('pgd', 'uta')),
    'mnist_embedded': dict(config=dict(max_eval_examples=500,
                                       eval_pgd_restarts=2),
                           aa_examples=500, methods=METHODS),
}
PAPER = {
    'fashion_mnist': dict(config={}, aa_examples=1000, methods=METHODS),
    'mnist': dict(config={}, aa_examples=1000, methods=('pgd', 'uta')),
    'svhn': dict(config={}, aa_examples=1000, methods=('pgd', 'uta')),
}
# Table 1 of the paper: (dataset, method, eps_train) -> scores per eps_test.
PAPER_TABLE1 = {
    ('fashion_mnist', 'pgd', 0.1): (79.6, 75.1, 44.6, 41.2),
    ('fashion_mnist', 'pgd', 0.2): (75.3, 73.1, 66.9, 40.4),
    ('fashion_mnist', 'pgd', 0.3): (70.7, 68.7, 63.8, 51.5),
    ('fashion_mnist', 'pgd', 0.4): (32.7, 31.7, 29.5, 26.5),
    ('fashion_mnist', 'uta', 0.1): (82.3, 71.9, 44.1, 43.9),
    ('fashion_mnist', 'uta', 0.2): (81.3, 77.1, 62.9, 42.5),
    ('fashion_mnist', 'uta', 0.3): (78.9, 75.3, 67.9, 47.1),
    ('fashion_mnist', 'uta', 0.4): (76.2, 72.7, 65.6, 56.3),
    ('mnist', 'pgd', 0.1): (97.3, 93.6, 61.7, 49.4),
    ('mnist', 'pgd', 0.2): (92.7, 89.4, 75.8, 50.1),
    ('mnist', 'pgd', 0.3): (64.4, 60.8, 53.0, 41.6),
    ('mnist', 'pgd', 0.4): (27.4, 26.4, 25.1, 24.0),
    ('mnist', 'uta', 0.1): (97.2, 92.5, 55.4, 49.5),
    ('mnist', 'uta', 0.2): (96.9, 94.3, 75.9, 50.3),
    ('mnist', 'uta', 0.3): (95.6, 93.1, 79.8, 52.0),
    ('mnist', 'uta', 0.4): (93.8, 90.6, 76.8, 53.0),
    ('svhn', 'pgd', 0.01): (86.6, 80.5, 65.7, 49.1),
    ('svhn', 'pgd', 0.04): (37.6, 36.5, 34.4, 29.9),
    ('svhn', 'pgd', 0.08): (19.6, 19.6, 19.6, 19.6),
    ('svhn', 'pgd', 0.12): (19.6, 19.6, 19.6, 19.6),
    ('svhn', 'pgd', 0.16): (19.6, 19.6, 19.6, 19.6),
    ('svhn', 'uta', 0.01): (86.0, 78.3, 61.1, 47.3),
    ('svhn', 'uta', 0.04): (84.8, 81.0, 71.8, 55.7),
    ('svhn', 'uta', 0.08): (79.3, 75.8, 68.7, 55.6),
    ('svhn', 'uta', 0.12): (72.9, 69.8, 63.7, 52.7),
    ('svhn', 'uta', 0.16): (65.7, 63.0, 57.8, 48.3),
}
# The embedded set is an MNIST subset: compare it with the paper's MNIST.
PAPER_DATASET = {'mnist_embedded': 'mnist'}

flags.DEFINE_list('datasets', None, 'default: the preset\'s datasets')
FLAGS = flags.FLAGS


def method_overrides(method: str) -> dict:
  if method == 'pgd':
    return {'attack': 'pgd'}
  if method == 'uta':
    return {'attack': 'uta'}
  return {'attack': 'uta', 'uncertainty': 'ensemble', 'num_samples': 5}


def run_dataset(dataset: str, setting: dict, out: str) -> list:
  """Trains and AutoAttacks every (method, eps_train); returns row dicts."""
  rows = []
  for method in sweep.methods(setting['methods'], METHODS):
    for eps in sweep.eps_grid(EPS_TRAIN[dataset]):
      config = configs.get_config(dataset, eps_train=eps, **sweep.overrides(
          dict(setting['config'], **method_overrides(method))))
      workdir = os.path.join(out, 'runs', dataset, f'{method}_eps{eps:g}')
      row = sweep.train_and_attack(
          config, workdir,
          aa_examples=sweep.aa_examples(setting['aa_examples']))
      paper = PAPER_TABLE1.get(
          (PAPER_DATASET.get(dataset, dataset), method, eps))
      rows.append(dict(row, dataset=dataset, method=method,
                       paper_score=list(paper) if paper else None))
  return rows


def markdown(rows: list) -> str:
  parts = []
  for dataset in dict.fromkeys(r['dataset'] for r in rows):
    rs = [r for r in rows if r['dataset'] == dataset]
    parts.append(
        f'### {dataset}: (clean + AutoAttack robust) / 2, %; paper in '
        f"parentheses; AutoAttack ({rs[0]['aa_version']}) on "
        f"{rs[0]['aa_examples']} test points\n\n"
        + sweep.score_table(rs))
  return '\n'.join(parts)


def figure(rows: list):
  """Fig. 2: clean accuracy against eps_train, one panel per dataset."""
  plt = sweep.pyplot()
  datasets = list(dict.fromkeys(r['dataset'] for r in rows))
  fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets),
                                                      3.5), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    for method in METHODS:
      rs = [r for r in rows if r['dataset'] == dataset and r['method'] ==
            method]
      if rs:
        ax.plot([r['eps_train'] for r in rs],
                [r['clean_accuracy'] for r in rs], marker='o', label=method)
    ax.set(title=dataset, xlabel='eps_train', ylabel='clean accuracy (%)')
    ax.legend()
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  out = sweep.start('table1')
  preset = QUICK if FLAGS.preset == 'quick' else PAPER
  datasets = FLAGS.datasets or list(preset)
  t0 = time.time()
  rows = []
  try:
    for dataset in datasets:
      if dataset not in EPS_TRAIN:
        cli.fail(f'unknown dataset {dataset!r} for Table 1; choose from '
                 f'{sorted(EPS_TRAIN)}')
      setting = preset.get(dataset, QUICK.get(dataset, PAPER.get(dataset)))
      rows += run_dataset(dataset, setting, out)
  except sweep.USER_ERRORS as e:
    cli.fail(str(e))
  sweep.write_outputs(out, 'table1', markdown=markdown(rows), payload={
      'preset': FLAGS.preset, 'rows': rows,
      'wall_seconds_this_invocation': time.time() - t0}, figure=figure(rows))


if __name__ == '__main__':
  app.run(main)
