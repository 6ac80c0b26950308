r"""Table 2 and Fig. 13: latent-space PGD-AT vs latent-space UTA-AT.

  python experiments/latent_space.py                  # quick: embedded MNIST
  python experiments/latent_space.py --preset=paper   # full MNIST

LeNet split into encoder (convolutions + first fc layer, latent 120) and
classifier (last two fc layers), §5.2. LS-PGD-AT perturbs the code of one
model; LS-UTA-AT maximises the predictive entropy of a 5-model ensemble, each
member moving its own code (``steps.perturb``). Both use the triangular step
size (10 steps) at eps_train 0.1-0.4 and train encoder and classifier
together. Evaluation is in input space: the standard AutoAttack at eps_test
0.05-0.3 (cell = mean of clean and robust accuracy, paper in parentheses)
and JAX PGD-20 with restarts (Fig. 13, right). Writes latent_space.md /
.json / .png.
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

EPS_TRAIN = (0.1, 0.2, 0.3, 0.4)
METHODS = {
    'ls_pgd': dict(attack='pgd'),
    'ls_uta': dict(attack='uta', uncertainty='ensemble', num_samples=5),
}
SHARED = dict(model='lenet', space='latent', step_schedule='triangular',
              num_steps=10)
# Quick: the 5-member ensemble makes evaluation 5x dearer, so fewer points.
QUICK = dict(dataset='mnist_embedded', aa_examples=100,
             config=dict(epochs=15, max_eval_examples=200,
                         eval_pgd_restarts=1))
PAPER = dict(dataset='mnist', aa_examples=1000, config=dict(epochs=20))
# Table 2 of the paper (MNIST): (method, eps_train) -> scores per eps_test.
PAPER_TABLE2 = {
    ('ls_pgd', 0.1): (27.9, 22.7, 18.9, 18.9),
    ('ls_pgd', 0.2): (11.3, 11.3, 11.3, 11.3),
    ('ls_pgd', 0.3): (11.3, 11.3, 11.3, 11.3),
    ('ls_pgd', 0.4): (11.3, 11.3, 11.3, 11.3),
    ('ls_uta', 0.1): (94.1, 64.6, 49.6, 49.6),
    ('ls_uta', 0.2): (93.5, 66.0, 49.6, 49.6),
    ('ls_uta', 0.3): (93.8, 65.6, 49.6, 49.6),
    ('ls_uta', 0.4): (93.2, 67.0, 49.5, 49.5),
}

FLAGS = flags.FLAGS


def figure(rows: list):
  """Fig. 13: clean accuracy against eps_train; JAX PGD against eps_test."""
  plt = sweep.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  for method, style in (('ls_pgd', '-'), ('ls_uta', '-.')):
    rs = [r for r in rows if r['method'] == method]
    if not rs:
      continue
    left.plot([r['eps_train'] for r in rs], [r['clean_accuracy'] for r in rs],
              marker='o', ls=style, label=method)
    for r in rs:
      pgd = r['jax_pgd_accuracy']
      right.plot([float(e) for e in pgd], list(pgd.values()), marker='.',
                 ls=style, label=f"{method} eps_train={r['eps_train']:g}")
  left.set(xlabel='eps_train (latent)', ylabel='clean accuracy (%)')
  right.set(xlabel='eps_test (input)', ylabel='PGD-20 accuracy (%)')
  left.legend()
  right.legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  out = sweep.start('latent_space')
  preset = QUICK if FLAGS.preset == 'quick' else PAPER
  t0 = time.time()
  rows = []
  try:
    for method in sweep.methods(METHODS, METHODS):
      for eps in sweep.eps_grid(EPS_TRAIN):
        config = configs.get_config(preset['dataset'], eps_train=eps,
                                    **sweep.overrides(dict(
                                        preset['config'], **SHARED,
                                        **METHODS[method])))
        workdir = os.path.join(out, 'runs', f'{method}_eps{eps:g}')
        row = sweep.train_and_attack(
            config, workdir,
            aa_examples=sweep.aa_examples(preset['aa_examples']))
        paper = PAPER_TABLE2.get((method, eps))
        rows.append(dict(row, method=method,
                         paper_score=list(paper) if paper else None))
  except sweep.USER_ERRORS as e:
    cli.fail(str(e))
  markdown = (f"### {preset['dataset']}, LeNet, latent dimension 120: (clean "
              '+ input-space AutoAttack robust) / 2, %; paper (MNIST) in '
              f"parentheses; AutoAttack ({rows[0]['aa_version']}) on "
              f"{rows[0]['aa_examples']} test points\n\n" + sweep.score_table(rows))
  sweep.write_outputs(out, 'latent_space', markdown=markdown, payload={
      'preset': FLAGS.preset, 'rows': rows,
      'wall_seconds_this_invocation': time.time() - t0}, figure=figure(rows))


if __name__ == '__main__':
  app.run(main)
