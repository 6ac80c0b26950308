r"""Table 2 and Fig. 13: latent-space PGD-AT vs latent-space UTA-AT.

  python experiments/latent_space.py                  # quick: embedded MNIST
  python experiments/latent_space.py --preset=paper   # full MNIST
  python experiments/latent_space.py --seeds=0,1,2 --methods=ls_pgd

LeNet split into encoder (convolutions + first fc layer, latent 120) and
classifier (last two fc layers), §5.2. LS-PGD-AT perturbs the code of one
model; LS-UTA-AT maximises the predictive entropy of a 5-model ensemble, each
member moving its own code (``steps.perturb``). Both use the triangular step
size (10 steps) at eps_train 0.1-0.4 and train encoder and classifier
together. Evaluation is in input space: the standard AutoAttack at eps_test
0.05-0.3 (cell = mean of clean and robust accuracy, paper in parentheses)
and JAX PGD-20 with restarts (Fig. 13, right). One run per seed;
``verdicts`` tests Table 2's claims over the seeds. Writes latent_space.md /
.json / .png.
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

EPS_TRAIN = (0.1, 0.2, 0.3, 0.4)
METHODS = {
    'ls_pgd': dict(attack='pgd'),
    'ls_uta': dict(attack='uta', ensemble_size=5),
}
SHARED = dict(model='lenet', space='latent', step_schedule='triangular',
              num_steps=10)
# Quick: the 5-member ensemble makes evaluation 5x dearer, so fewer points.
PRESETS = {
    'quick': dict(seeds=(0, 1, 2), dataset='mnist_embedded', aa_examples=100,
                  config=dict(epochs=15, max_eval_examples=200,
                              eval_pgd_restarts=1)),
    'paper': dict(seeds=(0, 1, 2), dataset='mnist', aa_examples=1000,
                  config=dict(epochs=20)),
}
COLLAPSED_CLEAN = 20.0  # clean accuracy (%) of a collapsed run; chance 10%
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

# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def clean(rows: list) -> list:
  return [r['clean_accuracy'] for r in rows]


def score(rows: list, i: int) -> list:
  return [r['score'][i] for r in rows]


def verdicts(rows: list) -> list:
  """Table 2 / Fig. 13's claims over the per-seed rows (``uta_jax.stats``:
  paired seeds, intervals over seeds and test points)."""
  pgd = sweep_tables.method_cells(rows, 'ls_pgd')
  uta = sweep_tables.method_cells(rows, 'ls_uta')
  shared = sorted(set(pgd) & set(uta))
  if not shared:
    return []
  n_eval = min(r['eval_examples'] for r in rows)
  n_aa = min(r['aa_examples'] for r in rows)
  large = [e for e in shared if e >= 0.2]
  out = []
  if large:
    out.append(claims.every(
        'latent space: LS-PGD-AT collapses at eps_train >= 0.2 (Table 2: '
        '11.3 everywhere)',
        f'clean(LS-PGD-AT) < {COLLAPSED_CLEAN:g}% at every eps_train >= 0.2',
        [(f'eps_train {e:g}', 'clean(LS-PGD-AT), %',
          stats.accuracy(clean(pgd[e]), n=n_eval), '<',
          COLLAPSED_CLEAN) for e in large], signed=False))
  pairs = {e: claims.paired_rows(uta[e], pgd[e]) for e in shared}
  out.append(claims.every(
      'latent space: LS-UTA-AT keeps a higher clean accuracy than '
      'LS-PGD-AT (Fig. 13 left)',
      'clean(LS-UTA-AT) - clean(LS-PGD-AT) > 0 at every eps_train',
      [(f'eps_train {e:g}', 'clean(LS-UTA-AT) - clean(LS-PGD-AT)',
        stats.paired_difference(clean(u), clean(p), n=n_eval),
        '>', 0) for e, (u, p) in pairs.items()]))
  out.append(claims.every(
      'latent space: LS-UTA-AT scores higher than LS-PGD-AT (Table 2)',
      'score(LS-UTA-AT) - score(LS-PGD-AT) > 0 in every (eps_train / '
      'eps_test) cell',
      [(f'{e:g}/{t:g}', 'score(LS-UTA-AT) - score(LS-PGD-AT)',
        stats.paired_difference(score(u, i), score(p, i),
                                n=n_aa), '>', 0)
       for e, (u, p) in pairs.items()
       for i, t in enumerate(rows[0]['eps_test'])]))
  return out


def payload_verdicts(payload: dict) -> list:
  """The verdicts of a stored payload."""
  return verdicts(payload['rows'])


def markdown(payload: dict) -> str:
  rows = payload['rows']
  return (f"### {payload['dataset']}, LeNet, latent dimension 120: (clean "
          '+ input-space AutoAttack robust) / 2, %, mean ± std over seeds '
          f"{payload['seeds']}; paper (MNIST) in parentheses; AutoAttack "
          f"({rows[0]['aa_version']}, {rows[0]['aa_backend']}) on "
          f"{rows[0]['aa_examples']} test points\n\n" +
          sweep_tables.score_table(rows))


def figure(payload: dict):
  """Fig. 13: clean accuracy against eps_train (mean ± std over seeds);
  JAX PGD against eps_test (seed means)."""
  rows = payload['rows']
  plt = sweep.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  for method, color in (('ls_pgd', 'tab:blue'), ('ls_uta', 'tab:orange')):
    cells = sweep_tables.method_cells(rows, method)
    if not cells:
      continue
    name = reporting.method_name(method)
    spread = [reporting.mean_std(r['clean_accuracy'] for r in rs)
              for rs in cells.values()]
    left.errorbar(list(cells), [s['mean'] for s in spread],
                  yerr=[s['std'] for s in spread], marker='o', color=color,
                  capsize=3, label=name)
    for i, (eps, rs) in enumerate(cells.items()):
      eps_test = list(rs[0]['jax_pgd_accuracy'])
      right.plot([float(e) for e in eps_test],
                 [reporting.mean_std(r['jax_pgd_accuracy'][e] for r in rs)[
                     'mean'] for e in eps_test], marker='.', color=color,
                 alpha=0.4 + 0.15 * i,
                 label=(f'{name}, eps_train {min(cells):g}-{max(cells):g} '
                        '(one line each, overlapping)') if i == 0 else None)
  left.set(xlabel='eps_train (latent space)', ylabel='clean accuracy (%)',
           title='clean accuracy, mean ± std over seeds')
  right.set(xlabel='eps_test (input space)',
            ylabel='PGD-20 accuracy (%), seed mean',
            title='input-space robustness')
  left.legend()
  right.legend(fontsize=7)
  fig.suptitle(f"Table 2 / Fig. 13 at quick scale ({payload['dataset']}, "
               f"seeds {payload['seeds']})", fontsize=10)
  fig.tight_layout()
  return fig


def run(out: str):
  """Every (seed, method, eps_train) of the preset; the payload."""
  preset = sweep.preset(PRESETS)
  cells, keys = [], []
  for seed in sweep.seeds(preset['seeds']):
    for method in sweep.methods(METHODS, METHODS):
      for eps in sweep.eps_grid(EPS_TRAIN):
        config = sweep.config(preset['dataset'], dict(
            preset['config'], eps_train=eps, **SHARED, **METHODS[method]),
                              seed)
        cells.append((config, sweep.seed_dir(
            os.path.join(out, 'runs', f'{method}_eps{eps:g}'), seed)))
        keys.append((method, eps))
  rows = []
  for (method, eps), row in zip(keys, sweep.train_and_attack(
      cells, aa_examples=sweep.aa_examples(preset['aa_examples']))):
    paper = PAPER_TABLE2.get((method, eps))
    rows.append(dict(row, method=method,
                     paper_score=list(paper) if paper else None))
  payload = {'dataset': preset['dataset'],
             'seeds': sorted({r['seed'] for r in rows}), 'rows': rows,
             'compute_seconds': sweep_tables.compute_seconds(rows)}
  payload['verdicts'] = payload_verdicts(payload)
  return payload, {'latent_space': figure(payload)}


main = sweep.main('latent_space', run, markdown=markdown)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
