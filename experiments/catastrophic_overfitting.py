r"""Catastrophic overfitting (Fig. 4, Fig. 9): one-step AT, accuracy curves.

  python experiments/catastrophic_overfitting.py              # F-MNIST LeNet
  python experiments/catastrophic_overfitting.py --preset=paper \
      --settings=fmnist_lenet,cifar10_resnet18

Trains each method with ``loop.train_and_evaluate`` and evaluates every
``eval_every_steps`` iterations on held-out points: clean accuracy, FGSM
accuracy and PGD accuracy (F-MNIST: PGD-20, step 0.01, eps 0.2 as in Fig. 4;
CIFAR-10: PGD-10, step eps/4, eps 8/255 as in Fig. 9). The script flags the
iteration where PGD accuracy collapses (``evaluation.collapse_step``: it
falls below a quarter of its best value and never recovers). Writes
catastrophic_overfitting.md / .json / .png.
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
from uta_jax import evaluation
from uta_jax import reporting

CIFAR_EPS = 8 / 255
# setting -> (dataset, shared overrides, {method: overrides}).
SETTINGS = {
    'fmnist_lenet': ('fashion_mnist', dict(
        eps_train=0.2, eval_eps=[0.2], eval_pgd_steps=20,
        eval_pgd_restarts=1), {
            'fgsm': dict(attack='fgsm'),
            'uta1': dict(attack='uta', num_steps=1, step_size=0.2),
        }),
    'cifar10_resnet18': ('cifar10', dict(
        eps_train=CIFAR_EPS, eval_eps=[CIFAR_EPS], eval_pgd_steps=10,
        eval_pgd_restarts=1), {
            'fgsm': dict(attack='fgsm'),
            'rfgsm': dict(attack='rfgsm', step_size=CIFAR_EPS / 2),
            'pgd2': dict(attack='pgd', num_steps=2, step_size=CIFAR_EPS / 2),
            'uta1_mc5': dict(attack='uta', num_steps=1, step_size=CIFAR_EPS,
                             uncertainty='mc_dropout', num_samples=5),
            'uta2_mc5': dict(attack='uta', num_steps=2,
                             step_size=CIFAR_EPS / 2,
                             uncertainty='mc_dropout', num_samples=5),
        }),
}
QUICK = {'fmnist_lenet': dict(epochs=15, max_eval_examples=500,
                              eval_every_steps=100)}
PAPER = {'fmnist_lenet': dict(epochs=30, max_eval_examples=1000,
                              eval_every_steps=100),
         'cifar10_resnet18': dict(epochs=30, max_eval_examples=1000,
                                  eval_every_steps=200)}

flags.DEFINE_list('settings', None, f'subset of {",".join(SETTINGS)}; '
                  'default: the preset\'s (quick has no CIFAR-10 offline)')
flags.DEFINE_integer('eval_every_steps', None, 'override: iterations between '
                     'evaluations')
FLAGS = flags.FLAGS


def run_setting(name: str, preset: dict, out: str) -> list:
  dataset, shared, methods = SETTINGS[name]
  rows = []
  for method in sweep.methods(methods, methods):
    method_overrides = methods[method]
    values = dict(preset, **shared, **method_overrides)
    if FLAGS.eval_every_steps:
      values['eval_every_steps'] = FLAGS.eval_every_steps
    config = configs.get_config(dataset, **sweep.overrides(values))
    workdir = os.path.join(out, 'runs', name, method)
    results = sweep.train(config, workdir)
    curve = [r for r in reporting.read_metrics(
        os.path.join(workdir, reporting.METRICS)) if r.get('kind') == 'eval']
    steps = [r['step'] for r in curve]
    pgd = [r['pgd_accuracy'] for r in curve]
    best = max(range(len(pgd)), key=pgd.__getitem__)
    rows.append({
        'setting': name, 'method': method, 'eps': config.eval.eps[0],
        'steps': steps,
        'clean': [r['clean_accuracy'] for r in curve],
        'fgsm': [r['fgsm_accuracy'] for r in curve],
        'pgd': pgd,
        'best_pgd': pgd[best], 'best_pgd_step': steps[best],
        'final': {'clean': results['clean_accuracy'],
                  'fgsm': curve[-1]['fgsm_accuracy'],
                  'pgd': curve[-1]['pgd_accuracy']},
        'collapse_step': evaluation.collapse_step(steps, pgd),
        'eval_examples': results['evaluation']['num_examples'],
        'train_seconds': results['timings'].get('wall_seconds'),
        'workdir': workdir,
    })
  return rows


def markdown(rows: list) -> str:
  header = ['setting', 'method', 'eps', 'final clean', 'final FGSM',
            'final PGD', 'best PGD (step)', 'PGD collapse at step']
  table = [[r['setting'], r['method'], f"{r['eps']:.4g}", r['final']['clean'],
            r['final']['fgsm'], r['final']['pgd'],
            f"{r['best_pgd']:.1f} ({r['best_pgd_step']})",
            r['collapse_step'] if r['collapse_step'] is not None else 'none']
           for r in rows]
  return (f"Accuracies in % on {rows[0]['eval_examples']} test points; PGD "
          'with 1 restart during training.\n\n' +
          reporting.markdown_table(header, table))


def figure(rows: list):
  plt = sweep.pyplot()
  fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.5),
                           squeeze=False, sharey=True)
  for ax, r in zip(axes[0], rows):
    ax.plot(r['steps'], r['clean'], label='clean')
    ax.plot(r['steps'], r['fgsm'], label='FGSM')
    ax.plot(r['steps'], r['pgd'], label='PGD')
    if r['collapse_step'] is not None:
      ax.axvline(r['collapse_step'], color='k', ls=':', label='PGD collapse')
    ax.set(title=f"{r['setting']}: {r['method']}", xlabel='iteration',
           ylabel='test accuracy (%)')
    ax.legend()
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  out = sweep.start('catastrophic_overfitting')
  preset = QUICK if FLAGS.preset == 'quick' else PAPER
  names = FLAGS.settings or list(preset)
  t0 = time.time()
  rows = []
  try:
    for name in names:
      if name not in SETTINGS:
        cli.fail(f'unknown setting {name!r}; choose from {list(SETTINGS)}')
      rows += run_setting(name, preset.get(name, PAPER[name]), out)
  except sweep.USER_ERRORS as e:
    cli.fail(str(e))
  sweep.write_outputs(out, 'catastrophic_overfitting', markdown=markdown(rows),
                      payload={'preset': FLAGS.preset, 'rows': rows,
                               'wall_seconds_this_invocation':
                                   time.time() - t0},
                      figure=figure(rows))


if __name__ == '__main__':
  app.run(main)
