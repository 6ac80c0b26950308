r"""Table 1 and Fig. 2: PGD-AT vs UTA-AT for each eps_train, AutoAttack.

  python experiments/table1.py                       # quick: F-MNIST, MNIST
  python experiments/table1.py --preset=paper        # + full MNIST, SVHN
  python experiments/table1.py --datasets=mnist_embedded --methods=pgd,uta \
      --seeds=0,1,2

For each dataset, method and eps_train (§5.1: MNIST / Fashion-MNIST
K = eps/0.01 steps of 0.01; SVHN triangular steps) one run is trained with
``loop.train_and_evaluate_runs`` per seed (all runs of a dataset as few
programs of runs as they allow), then AutoAttack attacks each at each
eps_test (quick: APGD-CE + APGD-T in JAX; paper: the standard version). A
cell is the mean of clean and robust accuracy, as in the paper, averaged
over seeds (± std); the paper's number is shown beside it. Methods: ``pgd``,
``uta`` (single model) and ``uta_ensemble`` (5 models, App. C). ``verdicts``
tests the paper's claims as rules over the per-seed rows. Writes table1.md /
.json / .png (Fig. 2: clean accuracy against eps_train, mean ± std).
Rerunning reuses finished runs and AutoAttack reports.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
import sweep_tables  # pylint: disable=g-import-not-at-top
from uta_jax import claims
from uta_jax import reporting
from uta_jax import stats

METHODS = ('pgd', 'uta', 'uta_ensemble')
EPS_TRAIN = {
    'fashion_mnist': (0.1, 0.2, 0.3, 0.4),
    'mnist': (0.1, 0.2, 0.3, 0.4),
    'mnist_embedded': (0.1, 0.2, 0.3, 0.4),
    'svhn': (0.01, 0.04, 0.08, 0.12, 0.16),
}
# Seeds, and per dataset: config flags, AutoAttack points and methods.
PRESETS = {
    'quick': dict(seeds=(0, 1, 2), datasets={
        # Clean and PGD accuracy on all 10,000 test images, AutoAttack on
        # 1,000: enough points that the test set is not the noise.
        'fashion_mnist': dict(config=dict(max_train_examples=20000, epochs=2,
                                          eval_pgd_restarts=2),
                              aa_examples=1000, methods=('pgd', 'uta')),
        'mnist_embedded': dict(config=dict(max_eval_examples=500,
                                           eval_pgd_restarts=2),
                               aa_examples=500, methods=METHODS),
    }),
    'paper': dict(seeds=(0, 1, 2), datasets={
        'fashion_mnist': dict(config={}, aa_examples=1000, methods=METHODS),
        'mnist': dict(config={}, aa_examples=1000, methods=('pgd', 'uta')),
        'svhn': dict(config={}, aa_examples=1000, methods=('pgd', 'uta')),
    }),
}
# Clean accuracy under which a run counts as collapsed (chance is 10%).
COLLAPSED_CLEAN = 20.0
# "At least as well": the ensemble's score is not below UTA-AT's by more
# than this many points (a non-inferiority margin; 0 would demand a win).
ENSEMBLE_MARGIN = 1.0
# Fewer test points than this leave intervals too wide to decide most
# claims; such rows say so.
UNDERPOWERED = 1000
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
# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def method_overrides(method: str) -> dict:
  if method == 'pgd':
    return {'attack': 'pgd'}
  if method == 'uta':
    return {'attack': 'uta'}
  return {'attack': 'uta', 'ensemble_size': 5}


def dataset_cells(dataset: str, setting: dict, out: str, seeds) -> tuple:
  """(cells, keys): the (config, workdir) and (method, eps_train) of every
  (seed, method, eps_train) of ``dataset``."""
  cells, keys = [], []
  for seed in seeds:
    for method in sweep.methods(setting['methods'], METHODS):
      for eps in sweep.eps_grid(EPS_TRAIN[dataset]):
        config = sweep.config(dataset, dict(setting['config'], eps_train=eps,
                                            **method_overrides(method)), seed)
        cells.append((config, sweep.seed_dir(
            os.path.join(out, 'runs', dataset, f'{method}_eps{eps:g}'),
            seed)))
        keys.append((method, eps))
  return cells, keys


def run_dataset(dataset: str, setting: dict, cells: list, keys: list) -> list:
  """Trains ``dataset_cells`` together (as few programs of runs as they
  allow) and AutoAttacks each; row dicts."""
  rows = sweep.train_and_attack(
      cells, aa_examples=sweep.aa_examples(setting['aa_examples']))
  out_rows = []
  for (method, eps), row in zip(keys, rows):
    paper = PAPER_TABLE1.get(
        (PAPER_DATASET.get(dataset, dataset), method, eps))
    out_rows.append(dict(row, dataset=dataset, method=method,
                         paper_score=list(paper) if paper else None))
  return out_rows


def _means(rows: list, key: str, index=None) -> float:
  values = [r[key] if index is None else r[key][index] for r in rows]
  return reporting.mean_std(values)['mean']


def clean(rows: list) -> list:
  """The per-seed clean accuracies of a cell's rows."""
  return [r['clean_accuracy'] for r in rows]


def score(rows: list, i: int) -> list:
  """The per-seed scores at the ``i``-th eps_test of a cell's rows."""
  return [r['score'][i] for r in rows]


def verdicts(rows: list) -> list:
  """The paper's Table 1 / Fig. 2 claims over one dataset's per-seed rows
  (``uta_jax.stats``: paired seeds, intervals over seeds and test points;
  clean accuracy on each row's ``eval_examples``, scores on its
  ``aa_examples``: the score averages two accuracies of the same points, so
  its binomial variance is at most that of one accuracy)."""
  dataset = rows[0]['dataset']
  pgd, uta, ens = (sweep_tables.method_cells(rows, m) for m in METHODS)
  n_eval = min(r['eval_examples'] for r in rows)
  n_aa = min(r['aa_examples'] for r in rows)
  eps_test = rows[0]['eps_test']
  out = []
  shared = sorted(set(pgd) & set(uta))
  if shared:
    pairs = {eps: claims.paired_rows(uta[eps], pgd[eps]) for eps in shared}
    gaps = {eps: stats.paired_difference(clean(u), clean(p), n=n_eval)
            for eps, (u, p) in pairs.items()}
    out.append(claims.every(
        f'{dataset}: UTA-AT keeps a higher clean accuracy than PGD-AT '
        '(Fig. 2)',
        'clean(UTA-AT) - clean(PGD-AT) > 0 at every eps_train',
        [(f'eps_train {eps:g}', 'clean(UTA-AT) - clean(PGD-AT)', g, '>', 0)
         for eps, g in gaps.items()]))
    if len(shared) > 1:
      lo_eps, hi_eps = shared[0], shared[-1]
      (u_hi, p_hi), (u_lo, p_lo) = pairs[hi_eps], pairs[lo_eps]
      common = sorted({r['seed'] for r in u_hi} & {r['seed'] for r in u_lo})
      at = lambda rs: [r['clean_accuracy'] for s in common for r in rs
                       if r['seed'] == s]
      widening = [(a - b) - (c - d) for a, b, c, d in
                  zip(at(u_hi), at(p_hi), at(u_lo), at(p_lo))]
      test_var = sum(stats.binomial_variance(_means(rs, 'clean_accuracy'),
                                             n_eval)
                     for rs in (u_hi, p_hi, u_lo, p_lo))
      est = stats.interval(widening, test_var)
      out.append(claims.verdict(
          f'{dataset}: the clean-accuracy gap UTA-AT minus PGD-AT widens '
          'with eps_train (Fig. 2)',
          f'gap at eps_train {hi_eps:g} - gap at {lo_eps:g} > 0 (per seed)',
          'change of the gap, points', est, stats.outcome(est, '>', 0),
          ', '.join(f'gap at {eps:g}: {g.text()}' for eps, g in gaps.items())))
    top = shared[-1]
    u_top, p_top = pairs[top]
    parts = [(f'PGD-AT at {top:g}', 'clean(PGD-AT)',
              stats.accuracy(clean(p_top), n=n_eval), '<', COLLAPSED_CLEAN),
             (f'UTA-AT at {top:g}', 'clean(UTA-AT)',
              stats.accuracy(clean(u_top), n=n_eval), '>', COLLAPSED_CLEAN)]
    out.append(claims.every(
        f'{dataset}: at the largest eps_train PGD-AT collapses and UTA-AT '
        'does not (§5.1)',
        f'at eps_train {top:g}: clean(PGD-AT) < {COLLAPSED_CLEAN:g}% and '
        f'clean(UTA-AT) > {COLLAPSED_CLEAN:g}%', parts, signed=False))
    best = lambda cells, i: max(cells, key=lambda e: _means(cells[e], 'score',
                                                            i))
    parts = []
    for i, e in enumerate(eps_test):
      bu, bp = best({k: uta[k] for k in shared}, i), best(
          {k: pgd[k] for k in shared}, i)
      u, p = claims.paired_rows(uta[bu], pgd[bp])
      parts.append((f'eps_test {e:g} (UTA {bu:g} vs PGD {bp:g})',
                    'score(best UTA-AT) - score(best PGD-AT)',
                    stats.paired_difference(score(u, i), score(p, i),
                                            n=n_aa), '>', 0))
    out.append(claims.every(
        f'{dataset}: the best UTA-AT model beats the best PGD-AT model at '
        'every eps_test (Table 1)',
        'per eps_test, the eps_train of each method with the best seed-mean '
        'score; their paired score difference > 0 at every eps_test',
        parts))
  if ens and uta:
    parts = []
    for eps in sorted(set(ens) & set(uta)):
      e_rows, u_rows = claims.paired_rows(ens[eps], uta[eps])
      for i, e in enumerate(eps_test):
        parts.append((f'{eps:g}/{e:g}', 'score(ensemble) - score(UTA-AT)',
                      stats.paired_difference(score(e_rows, i),
                                              score(u_rows, i), n=n_aa),
                      '>', -ENSEMBLE_MARGIN))
    out.append(claims.every(
        f'{dataset}: a 5-model UTA ensemble scores at least as well as '
        'single-model UTA-AT (App. C)',
        f'score(ensemble) - score(UTA-AT) > -{ENSEMBLE_MARGIN:g} points in '
        'every (eps_train / eps_test) cell', parts))
  return out


def payload_verdicts(payload: dict) -> list:
  """The verdicts of every dataset of a stored payload."""
  rows = payload['rows']
  return [v for d in dict.fromkeys(r['dataset'] for r in rows)
          for v in verdicts([r for r in rows if r['dataset'] == d])]


def markdown(payload: dict) -> str:
  rows = payload['rows']
  parts = []
  for dataset in dict.fromkeys(r['dataset'] for r in rows):
    rs = [r for r in rows if r['dataset'] == dataset]
    train = rs[0]['train_examples'] or 'all'
    n_eval = min(r['eval_examples'] for r in rs)
    power = (f' (underpowered: {n_eval} test points give a 95% binomial '
             'interval of about ±4 points at 50%)' if n_eval < UNDERPOWERED
             else '')
    parts.append(
        f'### {dataset}: (clean + AutoAttack robust) / 2, %, mean ± std '
        f'over seeds {sorted({r["seed"] for r in rs})}; paper in '
        f"parentheses; {train} training images, {rs[0]['epochs']} epochs; "
        f"AutoAttack ({rs[0]['aa_version']}, {rs[0]['aa_backend']}) on "
        f"{rs[0]['aa_examples']} test points; clean and PGD accuracy on "
        f'{n_eval}{power}\n\n' + sweep_tables.score_table(rs))
  return '\n'.join(parts)


COLORS = {'pgd': 'tab:blue', 'uta': 'tab:orange', 'uta_ensemble': 'tab:green'}


def figure(payload: dict):
  """Fig. 2 and Table 1 beside the paper: per dataset, clean accuracy and
  each eps_test's score against eps_train, seed mean ± std (every seed a
  faint dot), the paper's Table 1 score dashed."""
  rows = payload['rows']
  plt = sweep.pyplot()
  datasets = list(dict.fromkeys(r['dataset'] for r in rows))
  eps_test = rows[0]['eps_test']
  fig, axes = plt.subplots(len(datasets), 1 + len(eps_test),
                           figsize=(3.6 * (1 + len(eps_test)),
                                    3.3 * len(datasets)), squeeze=False)
  for ax_row, dataset in zip(axes, datasets):
    rs_d = [r for r in rows if r['dataset'] == dataset]
    panels = [('clean accuracy (%)', lambda r: r['clean_accuracy'], None)]
    panels += [(f'score at eps_test {e:g} (%)', lambda r, i=i: r['score'][i],
                i) for i, e in enumerate(eps_test)]
    for ax, (label, value, index) in zip(ax_row, panels):
      for method in METHODS:
        cells = sweep_tables.method_cells(rs_d, method)
        if not cells:
          continue
        spread = [reporting.mean_std(value(r) for r in rs)
                  for rs in cells.values()]
        ax.errorbar(list(cells), [s['mean'] for s in spread],
                    yerr=[s['std'] for s in spread], marker='o', capsize=3,
                    color=COLORS[method], label=reporting.method_name(method))
        for eps, rs in cells.items():
          ax.scatter([eps] * len(rs), [value(r) for r in rs], s=8,
                     alpha=0.4, color=COLORS[method])
        paper = [(eps, rs[0]['paper_score'][index]) for eps, rs in
                 cells.items() if index is not None and rs[0]['paper_score']]
        if paper:
          ax.plot(*zip(*paper), ls='--', marker='x', color=COLORS[method],
                  alpha=0.7, label=f'{reporting.method_name(method)}, paper')
      ax.set(xlabel='eps_train', ylabel=label)
    r0 = rs_d[0]
    ax_row[0].set_title(
        f"{dataset}: {r0['train_examples'] or 'all'} training images, "
        f"{r0['epochs']} epochs\n(quick scale; seeds "
        f"{sorted({r['seed'] for r in rs_d})}, mean ± std)", fontsize=9)
    for ax in ax_row[1:]:
      ax.set_title(f"AutoAttack ({r0['aa_version']}) on {r0['aa_examples']}"
                   ' points', fontsize=9)
    ax_row[-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1))
  fig.tight_layout()
  return fig


def run(out: str):
  """Every dataset of --datasets (default: the preset's); the payload."""
  preset = sweep.preset(PRESETS)
  datasets = FLAGS.datasets or list(preset['datasets'])
  seeds = sweep.seeds(preset['seeds'])
  rows = []
  planned = []
  for dataset in datasets:
    if dataset not in EPS_TRAIN:
      cli.fail(f'unknown dataset {dataset!r} for Table 1; choose from '
               f'{sorted(EPS_TRAIN)}')
    # A dataset of the other preset runs with that preset's setting.
    setting = preset['datasets'].get(dataset) or next(
        p['datasets'][dataset] for p in PRESETS.values()
        if dataset in p['datasets'])
    planned.append((dataset, setting,
                    *dataset_cells(dataset, setting, out, seeds)))
  # Every dataset's data (and PyTorch, if AutoAttack needs it) before the
  # first one trains for hours.
  sweep.preflight([c for p in planned for c, _ in p[2]], autoattack=True)
  for dataset, setting, cells, keys in planned:
    rows += run_dataset(dataset, setting, cells, keys)
  payload = {
      'seeds': sorted({r['seed'] for r in rows}), 'rows': rows,
      'compute_seconds': sweep_tables.compute_seconds(rows)}
  payload['verdicts'] = payload_verdicts(payload)
  return payload, {'table1': figure(payload)}


main = sweep.main('table1', run, markdown=markdown)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
