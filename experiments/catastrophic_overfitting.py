r"""Catastrophic overfitting (Fig. 4, Fig. 9): one-step AT, accuracy curves.

  python experiments/catastrophic_overfitting.py              # F-MNIST LeNet
  python experiments/catastrophic_overfitting.py --seeds=0,1,2 --epochs=15
  python experiments/catastrophic_overfitting.py --preset=paper \
      --settings=fmnist_lenet,cifar10_resnet18,cifar10_cyclic

Trains each method with ``loop.train_and_evaluate`` and evaluates every
``eval_every_steps`` iterations on held-out points: clean accuracy, FGSM
accuracy and PGD accuracy (F-MNIST: PGD-20, step 0.01, eps 0.2 as in Fig. 4;
CIFAR-10: PGD-10, step eps/4, eps 8/255 as in Fig. 9). CIFAR-10 follows
App. B: Fig. 9a/b (``cifar10_resnet18``) trains 200 epochs with the
piecewise schedule, FGSM against UTA-1 with one MC-dropout sample; Fig. 9c /
Fig. 3 (``cifar10_cyclic``) trains 90 epochs with a cyclic learning rate
peaking at 0.2 for FGSM, R-FGSM, PGD-2 and at 0.1 for UTA-1-5, UTA-2-5;
both with random crops and flips. The script flags the
iteration where PGD accuracy collapses (``evaluation.collapse_step``: it
falls below a quarter of its best value and never recovers). One run per
method and seed; ``verdicts`` tests Fig. 4's claims over the seeds. Writes
catastrophic_overfitting.md / .json / .png (every seed's curves).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import config_flags  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
import sweep_tables  # pylint: disable=g-import-not-at-top
from uta_jax import claims
from uta_jax import evaluation
from uta_jax import reporting
from uta_jax import stats

CIFAR_EPS = 8 / 255
# setting -> (dataset, shared overrides, {method: overrides}).
SETTINGS = {
    'fmnist_lenet': ('fashion_mnist', dict(
        eps_train=0.2, eval_eps=[0.2], eval_pgd_steps=20,
        eval_pgd_restarts=1), {
            'fgsm': dict(attack='fgsm'),
            'uta1': dict(attack='uta', num_steps=1, step_size=0.2),
        }),
    # Fig. 9a/b: the preset's 200 epochs, SGD-Nesterov 0.1 /15 at 60/120/160.
    'cifar10_resnet18': ('cifar10', dict(
        eps_train=CIFAR_EPS, eval_eps=[CIFAR_EPS], eval_pgd_steps=10,
        eval_pgd_restarts=1), {
            'fgsm': dict(attack='fgsm', step_size=CIFAR_EPS),
            # "one UTA step, and sample only one model with MC-dropout"
            'uta1_mc1': dict(attack='uta', num_steps=1, step_size=CIFAR_EPS,
                             uncertainty='mc_dropout', num_samples=1),
        }),
    # Fig. 9c and Fig. 3: 90 epochs, cyclic learning rate (Smith 2017).
    'cifar10_cyclic': ('cifar10', dict(
        eps_train=CIFAR_EPS, eval_eps=[CIFAR_EPS], eval_pgd_steps=10,
        eval_pgd_restarts=1, epochs=90, lr_schedule='cyclic'), {
            'fgsm': dict(attack='fgsm', step_size=CIFAR_EPS,
                         learning_rate=0.2),
            'rfgsm': dict(attack='rfgsm', step_size=CIFAR_EPS / 2,
                          learning_rate=0.2),
            'pgd2': dict(attack='pgd', num_steps=2, step_size=CIFAR_EPS / 2,
                         learning_rate=0.2),
            'uta1_mc5': dict(attack='uta', num_steps=1, step_size=CIFAR_EPS,
                             uncertainty='mc_dropout', num_samples=5,
                             learning_rate=0.1),
            'uta2_mc5': dict(attack='uta', num_steps=2,
                             step_size=CIFAR_EPS / 2,
                             uncertainty='mc_dropout', num_samples=5,
                             learning_rate=0.1),
        }),
}
# Seeds (the paper averages 3 runs) and config flags per setting.
PRESETS = {
    'quick': dict(seeds=(0, 1, 2), settings={
        'fmnist_lenet': dict(epochs=15, max_eval_examples=500,
                             eval_every_steps=100)}),
    'paper': dict(seeds=(0, 1, 2), settings={
        'fmnist_lenet': dict(epochs=30, max_eval_examples=1000,
                             eval_every_steps=100),
        'cifar10_resnet18': dict(max_eval_examples=1000,
                                 eval_every_steps=200),
        'cifar10_cyclic': dict(max_eval_examples=1000,
                               eval_every_steps=200)}),
}
# PGD accuracy (%) under which a run counts as catastrophically overfitted
# once it has passed its peak (the paper: "approaches 0").
COLLAPSED_PGD = 5.0

flags.DEFINE_list('settings', None, f'subset of {",".join(SETTINGS)}; '
                  'default: the preset\'s (quick has no CIFAR-10 offline)')
config_flags.define(['eval_every_steps'])
# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def setting_runs(name: str, preset: dict, out: str, seed: int) -> list:
  """(setting, method, seed, config, workdir) of each method of a setting."""
  dataset, shared, methods = SETTINGS[name]
  cells = []
  for method in sweep.methods(methods, methods):
    values = dict(preset, **shared, **methods[method])
    if FLAGS.eval_every_steps:
      values['eval_every_steps'] = FLAGS.eval_every_steps
    cells.append((name, method, seed, sweep.config(dataset, values, seed),
                  sweep.seed_dir(os.path.join(out, 'runs', name, method),
                                 seed)))
  return cells


def curve_row(name: str, method: str, seed: int, config, workdir: str,
              results: dict) -> dict:
  """A trained run's evaluation curve (its metrics.jsonl) as a row."""
  curve = [r for r in reporting.read_metrics(
      os.path.join(workdir, reporting.METRICS)) if r.get('kind') == 'eval']
  steps = [r['step'] for r in curve]
  pgd = [r['pgd_accuracy'] for r in curve]
  best = max(range(len(pgd)), key=pgd.__getitem__)
  return {
      'setting': name, 'method': method, 'seed': seed,
      'eps': config.eval.eps[0], 'epochs': config.epochs,
      'steps': steps,
      'clean': [r['clean_accuracy'] for r in curve],
      'fgsm': [r['fgsm_accuracy'] for r in curve],
      'pgd': pgd,
      'best_pgd': pgd[best], 'best_pgd_step': steps[best],
      'lowest_pgd_after_best': min(pgd[best:]),
      'final': {'clean': results['clean_accuracy'],
                'fgsm': curve[-1]['fgsm_accuracy'],
                'pgd': curve[-1]['pgd_accuracy']},
      'collapse_step': evaluation.collapse_step(steps, pgd),
      'eval_examples': results['evaluation']['num_examples'],
      'train_seconds': results['timings'].get('wall_seconds'),
      'workdir': workdir,
  }


def verdicts(rows: list) -> list:
  """Fig. 4 / Fig. 9's claims over one setting's per-seed rows
  (``uta_jax.stats``; accuracies on each row's ``eval_examples``)."""
  setting = rows[0]['setting']
  by = reporting.group_rows(rows, 'method')
  fgsm = by.get(('fgsm',))
  uta = (by.get(('uta1',)) or by.get(('uta1_mc1',)) or
         by.get(('uta1_mc5',)))
  if not fgsm or not uta:
    return []
  n = min(r['eval_examples'] for r in rows)
  lows = lambda rs: [r['lowest_pgd_after_best'] for r in rs]
  seq = lambda vs: '/'.join(f'{v:.1f}' for v in vs)
  f_low = stats.accuracy(lows(fgsm), n=n)
  u_low = stats.accuracy(lows(uta), n=n)
  f_rows, u_rows = claims.paired_rows(fgsm, uta)
  final = lambda rs: [r['final']['clean'] for r in rs]
  gap = stats.paired_difference(final(u_rows), final(f_rows), n=n)
  return [
      claims.verdict(
          f'{setting}: FGSM-AT overfits catastrophically: its PGD accuracy '
          'approaches 0 (Fig. 4 left)',
          f'lowest PGD accuracy after its peak < {COLLAPSED_PGD:g}%',
          'lowest PGD accuracy after the peak (FGSM-AT), %', f_low,
          stats.outcome(f_low, '<', COLLAPSED_PGD),
          f'per seed: {seq(lows(fgsm))}%', signed=False),
      claims.verdict(
          f'{setting}: single-step UTA does not overfit catastrophically '
          '(Fig. 4 right, §5.3)',
          f'lowest PGD accuracy after its peak > {COLLAPSED_PGD:g}%',
          'lowest PGD accuracy after the peak (UTA), %', u_low,
          stats.outcome(u_low, '>', COLLAPSED_PGD),
          f'per seed: {seq(lows(uta))}%', signed=False),
      claims.verdict(
          f'{setting}: single-step UTA ends with a higher clean accuracy '
          'than FGSM-AT (Fig. 4)',
          'final clean(UTA) - final clean(FGSM-AT) > 0',
          'final clean-accuracy difference, points', gap,
          stats.outcome(gap, '>', 0),
          f'UTA {seq(final(u_rows))} vs FGSM-AT {seq(final(f_rows))}'),
  ]


def payload_verdicts(payload: dict) -> list:
  """The verdicts of every setting of a stored payload."""
  rows = payload['rows']
  return [v for name in dict.fromkeys(r['setting'] for r in rows)
          for v in verdicts([r for r in rows if r['setting'] == name])]


def markdown(payload: dict) -> str:
  rows = payload['rows']
  ms = reporting.format_mean_std
  header = ['setting', 'method', 'eps', 'final clean', 'final FGSM',
            'final PGD', 'best PGD', 'lowest PGD after best',
            'PGD collapse at step (per seed)', 'seeds']
  table = []
  for (setting, method), rs in reporting.group_rows(rows, 'setting',
                                                    'method').items():
    table.append([
        setting, method, f"{rs[0]['eps']:.4g}",
        ms(r['final']['clean'] for r in rs), ms(r['final']['fgsm'] for r in rs),
        ms(r['final']['pgd'] for r in rs), ms(r['best_pgd'] for r in rs),
        ms(r['lowest_pgd_after_best'] for r in rs),
        ', '.join(str(r['collapse_step']) if r['collapse_step'] is not None
                  else 'none' for r in rs), len(rs)])
  return (f"Accuracies in % on {rows[0]['eval_examples']} test points, mean "
          f"± std over seeds {payload['seeds']}; {rows[0]['epochs']} epochs;"
          ' PGD with 1 restart during training.\n\n' +
          reporting.markdown_table(header, table))


def figure(payload: dict):
  """Clean, FGSM and PGD accuracy against iteration; a thin line per seed."""
  groups = reporting.group_rows(payload['rows'], 'setting', 'method')
  plt = sweep.pyplot()
  fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2),
                           squeeze=False, sharey=True)
  styles = ('-', '--', ':', '-.')
  for ax, ((setting, method), rs) in zip(axes[0], groups.items()):
    for key, label, color in (('clean', 'clean', 'tab:blue'),
                              ('fgsm', 'FGSM', 'tab:orange'),
                              ('pgd', 'PGD-20', 'tab:green')):
      for i, r in enumerate(rs):
        ax.plot(r['steps'], r[key], color=color, lw=1.2, alpha=0.85,
                ls=styles[i % len(styles)],
                label=f"{label}, seed {r['seed']}")
    for i, r in enumerate(rs):
      if r['collapse_step'] is not None:
        ax.axvline(r['collapse_step'], color='k', ls=styles[i % len(styles)],
                   lw=0.8)
    ax.set(title=f'{setting}: {reporting.method_name(method)}, eps '
                 f"{rs[0]['eps']:g}\n(black: where PGD accuracy collapses)",
           xlabel='training iteration',
           ylabel=f"test accuracy (%), {rs[0]['eval_examples']} points")
    ax.legend(fontsize=6, ncol=len(rs))
  fig.suptitle(f"Fig. 4 at quick scale: seeds {payload['seeds']}, one line "
               'style per seed', fontsize=10)
  fig.tight_layout()
  return fig


def run(out: str):
  """Every (seed, setting, method) of the preset; the payload."""
  preset = sweep.preset(PRESETS)
  names = FLAGS.settings or list(preset['settings'])
  for name in names:
    if name not in SETTINGS:
      cli.fail(f'unknown setting {name!r}; choose from {list(SETTINGS)}')
  seeds = sweep.seeds(preset['seeds'])
  cells = []
  for seed in seeds:
    for name in names:
      setting = (preset['settings'].get(name) or
                 PRESETS['paper']['settings'][name])
      cells += setting_runs(name, setting, out, seed)
  trained = sweep.train_all([(c[3], c[4]) for c in cells])  # together
  rows = [curve_row(*cell, results) for cell, results in zip(cells, trained)]
  payload = {'seeds': seeds, 'rows': rows,
             'compute_seconds': sweep_tables.compute_seconds(rows)}
  payload['verdicts'] = payload_verdicts(payload)
  return payload, {'catastrophic_overfitting': figure(payload)}


main = sweep.main('catastrophic_overfitting', run, markdown=markdown,
                  unused=('eps_train', 'aa_examples', 'aa_version',
                          'aa_backend'))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
