r"""Fig. 1 (§4.1, App. A): PGD vs UTA on the non-isotropic 2D toy set.

  python experiments/toy2d.py                  # quick: 5 seeds (~2 min)
  python experiments/toy2d.py --preset=paper   # finer grid, more points
  python experiments/toy2d.py --seeds=0

The classes lie 0.3 apart in the near region and 3.0 apart in the far one
(``uta_jax.toy``); eps = 0.5 breaks AT-Asm in the near region only. Per
seed (its own training and test draw, ``toy_runs.dataset``):
(a, b) a cleanly trained MLP and a 10-model ensemble are attacked with PGD
(the cross-entropy) and UTA (the predictive entropy), one step of size eps
and 20 steps of 0.05: the share of correctly classified test points carried
across the boundary (``toy.crossing_fraction``; at 20 steps only points
still across after 21). For two classes one sign step of UTA equals one of
PGD on every correctly classified point (the gradient of the entropy is the
cross-entropy's times (z_y - z_other) p_y; ``tests/toy_test.py``), so the
one-step columns agree by construction and are not scored.
(c) PGD-AT and UTA-AT with eps = 0.5, k = 15, alpha = 0.05 (``steps.fit``):
clean accuracy per region, at the last update and over the last quarter.
(d) The boundary-oscillation map: per grid point, how many times the
prediction changed over the training updates (``toy.oscillation_counts``).
Whether the clean-accuracy claims of (c) hold is settled over a map of
geometries, not this one: ``toy2d_map.py``.

Every seed's result is stored under ``<output_dir>/runs`` and reused by
reruns with the same settings. ``verdicts`` tests the crossing and
oscillation claims over the seeds. Writes toy2d.md / .json / .png (Fig. 1
of the seed whose UTA-AT minus PGD-AT clean accuracy is the median).
"""

import functools
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
from uta_jax import claims
from uta_jax import config_json
from uta_jax import configs
from uta_jax import reporting
from uta_jax import stats
from uta_jax import steps
from uta_jax import toy
from uta_jax import toy_runs
from uta_jax import uncertainty

GRID_LO, GRID_HI = (-3.5, -2.5), (3.5, 2.5)
PRESETS = {
    'quick': dict(seeds=(0, 1, 2, 3, 4), resolution=100, ensemble_size=10,
                  attack_points=256),
    'paper': dict(seeds=(0, 1, 2, 3, 4), resolution=250, ensemble_size=10,
                  attack_points=512),
}
CROSSING_STEPS = 20  # K of the multi-step attacks on the fixed models
NAMES = {'pgd': 'PGD', 'uta': 'UTA', 'standard': 'standard training'}
_values = reporting.values_at

flags.DEFINE_float('eps', 0.5, 'attack and training radius (violates AT-Asm '
                   'in the near region, where the classes are 0.3 apart)')
flags.DEFINE_float('alpha', 0.05, 'attack step size')
flags.DEFINE_integer('train_steps', 15, 'attack steps k during training '
                     '(k * alpha must reach eps)')
# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def toy_config(seed: int, **preset_flags) -> configs.Config:
  """The toy's run at ``--eps``, ``--alpha``, ``--train_steps``, with
  ``preset_flags`` (flag names) on top."""
  return sweep.config('toy2d', dict(eps_train=FLAGS.eps, step_size=FLAGS.alpha,
                                    num_steps=FLAGS.train_steps,
                                    **preset_flags), seed)


def attack_panels(ds, model, fixed, setting: dict, seed: int) -> dict:
  """(a, b): PGD and UTA on the fixed, cleanly trained model and on a
  10-model ensemble: crossing fractions, and the single model's perturbed
  points and maps for the figure."""
  members = toy_config(seed, attack='none',
                       ensemble_size=setting['ensemble_size'])
  _, stacked = steps.fit(members, ds.train,
                         num_steps=toy_runs.num_updates(members, ds.train))
  x = ds.test.images[:setting['attack_points']]
  y = ds.test.labels[:setting['attack_points']]
  attack = functools.partial(toy_runs.crossings, x=x, y=y, eps=FLAGS.eps,
                             alpha=FLAGS.alpha, num_steps=CROSSING_STEPS)
  single = attack(*toy_runs.model_fns(model, fixed))
  ensemble = attack(*toy_runs.model_fns(model, stacked, ensemble=True))
  fraction = lambda runs: {m: {k: 100 * runs[m][k] for k in (
      'one_step', 'k_steps')} for m in runs}
  g = jnp.asarray(toy.grid(GRID_LO, GRID_HI, setting['resolution']))
  logits_fn, sample_fn = toy_runs.model_fns(model, fixed)
  return {
      'crossing': {'single': fraction(single), 'ensemble': fraction(ensemble)},
      'points': x.tolist(), 'labels': y.tolist(),
      'perturbed': {m: {k: single[m][f'perturbed_{k}'].tolist() for k in (
          'one_step', 'k_steps')} for m in single},
      'fixed_prob': np.asarray(jax.nn.softmax(logits_fn(g))[:, 1]).tolist(),
      'fixed_entropy': np.asarray(uncertainty.predictive_entropy(
          sample_fn(g))).tolist(),
  }


def paper_seed(setting: dict, seed: int) -> dict:
  """One seed: standard training (the fixed model of (a, b)), its attacks,
  then PGD-AT and UTA-AT tracked on the grid (c, d)."""
  toy_runs.check_reach(FLAGS.eps, FLAGS.alpha, FLAGS.train_steps)
  ds, near = toy_runs.dataset(seed)
  g = toy.grid(GRID_LO, GRID_HI, setting['resolution'])
  model, fixed, standard = toy_runs.track_training(
      toy_config(seed, attack='none'), ds, near)
  training = {'standard': standard}
  for method in ('pgd', 'uta'):
    training[method] = toy_runs.track_training(
        toy_config(seed, attack=method), ds, near, grid=g)[2]
    del training[method]['offset']
  del standard['offset']
  return {'seed': seed, 'attack': attack_panels(ds, model, fixed, setting,
                                                seed),
          'training': training}


GRIDS = ('oscillations', 'prob', 'fixed_prob', 'fixed_entropy', 'points',
         'labels', 'perturbed')


def summary(result: dict) -> dict:
  """A stored seed without its figure arrays (for the JSON)."""
  if isinstance(result, dict):
    return {k: summary(v) for k, v in result.items() if k not in GRIDS}
  return result


def verdicts(per_seed: list, attack_points: int) -> list:
  """The paper's toy claims (§4.3, Fig. 1a-b, d) over the seeds
  (``uta_jax.stats``; paired: one data draw and initialisation per seed).
  The clean-accuracy claims of Fig. 1c are decided by ``toy2d_map``."""
  out = []
  for model, who in (('ensemble', 'a 10-model ensemble'),
                     ('single', 'the single model')):
    crossing = lambda m, model=model: _values(
        per_seed, 'attack', 'crossing', model, m, 'k_steps')
    est = stats.paired_difference(crossing('uta'), crossing('pgd'),
                                  n=attack_points)
    out.append(claims.verdict(
        f'toy: UTA-perturbed points (entropy of {who}) cross the decision '
        'boundary less often than PGD-perturbed ones (Fig. 1a-b, §4.3)',
        f'persistent crossing after {CROSSING_STEPS} steps (still across '
        f'after {CROSSING_STEPS + 1}), UTA - PGD < 0; one step is not '
        'scored (equal for two classes)',
        'crossing difference, points of the correctly classified', est,
        stats.outcome(est, '<', 0),
        'UTA ' + '/'.join(f'{v:.1f}' for v in crossing('uta')) + ' vs PGD '
        + '/'.join(f'{v:.1f}' for v in crossing('pgd'))))
  osc = lambda m: _values(per_seed, 'training', m, 'mean_oscillations')
  fewer = stats.paired_difference(osc('uta'), osc('pgd'))
  out.append(claims.verdict(
      'toy: the decision boundary oscillates less during UTA-AT than during '
      'PGD-AT (Fig. 1d)',
      'mean prediction changes per grid point: UTA-AT - PGD-AT < 0 (a grid, '
      'not a sample: seeds only)', 'difference of mean prediction changes',
      fewer, stats.outcome(fewer, '<', 0),
      'UTA-AT ' + '/'.join(f'{v:.2f}' for v in osc('uta')) + ' vs PGD-AT '
      + '/'.join(f'{v:.2f}' for v in osc('pgd')), digits=2))
  return out


def payload_verdicts(payload: dict) -> list:
  """The verdicts of a stored payload."""
  return verdicts(payload['per_seed'], payload['attack_points'])


def markdown(payload: dict) -> str:
  per_seed = payload['per_seed']
  ms = reporting.format_mean_std
  seeds = payload['seeds']
  cross = lambda model, m, k: ms(_values(per_seed, 'attack', 'crossing',
                                         model, m, k))
  rows = [[f'{NAMES[m]} ({model} model)' if model == 'single' else
           f'{NAMES[m]} (10-model ensemble)', cross(model, m, 'one_step'),
           cross(model, m, 'k_steps')]
          for model in ('single', 'ensemble') for m in ('pgd', 'uta')]
  part1 = ('(a, b) Correctly classified test points carried across the '
           f"boundary, % (eps {payload['eps']:g}; {payload['attack_points']}"
           f' points; mean ± std over seeds {seeds}). One step of UTA equals '
           'one of PGD on such points for two classes, so the first column '
           'agrees by construction.\n\n' + reporting.markdown_table(
               ['attack', f"1 step of {payload['eps']:g}",
                f"{CROSSING_STEPS} steps of {payload['alpha']:g} (still "
                f'across after {CROSSING_STEPS + 1})'], rows))
  train = lambda m, *k: _values(per_seed, 'training', m, *k)
  rows = [[NAMES[m] if m == 'standard' else f'{NAMES[m]}-AT',
           ms(train(m, 'clean_accuracy')),
           ms(train(m, 'region_accuracy', 'near')),
           ms(train(m, 'last_quarter', 'near')),
           ms(train(m, 'region_accuracy', 'far')),
           ms(train(m, 'changes', 'near'), 2),
           ms(train(m, 'mean_oscillations'), 2) if m != 'standard' else '',
           train(m, 'updates')[0]]
          for m in ('standard', 'pgd', 'uta')]
  part2 = (f"\n(c, d) Training with eps {payload['eps']:g}, k = "
           f"{payload['train_steps']}, alpha = {payload['alpha']:g}; mean ± "
           f'std over seeds {seeds}. Whether (c) generalises is settled by '
           'the geometry map (`toy2d_map`).\n\n' +
           reporting.markdown_table(
               ['training', 'clean test accuracy (%)', 'near region',
                'near, last quarter of training', 'far region',
                'near prediction changes per test point (last half)',
                'mean prediction changes per grid point', 'updates'], rows))
  return part1 + part2


def shown_seed(per_seed: list) -> int:
  """The index of the seed whose UTA-AT minus PGD-AT clean accuracy is the
  median over seeds (the figure shows a typical seed, and says which)."""
  gaps = [s['training']['uta']['clean_accuracy'] -
          s['training']['pgd']['clean_accuracy'] for s in per_seed]
  return int(np.argsort(gaps)[(len(gaps) - 1) // 2])


def figure(payload: dict, shown: dict):
  """Fig. 1 for one seed (``shown``: its stored result with arrays): top row
  PGD, bottom row UTA, every column one model (a-b: the fixed clean model;
  c-d: the model adversarially trained with that attack)."""
  plt = sweep.pyplot()
  ds, _ = toy_runs.dataset(shown['seed'])
  a, c = shown['attack'], shown['training']
  resolution = payload['resolution']
  extent = (GRID_LO[0], GRID_HI[0], GRID_LO[1], GRID_HI[1])
  img = lambda v: np.asarray(v).reshape(resolution, resolution)
  fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
  points, labels = np.asarray(a['points']), np.asarray(a['labels'])
  colors = np.where(labels == 1, 'tab:red', 'tab:blue')
  for row, (method, background, cmap, what) in enumerate((
      ('pgd', a['fixed_prob'], 'RdBu_r', 'P(red class)'),
      ('uta', a['fixed_entropy'], 'Greens', 'entropy'))):
    for col, (k, label) in enumerate((
        ('one_step', f"1 step of {payload['eps']:g}"),
        ('k_steps', f"{CROSSING_STEPS} steps of {payload['alpha']:g}"))):
      ax = axes[row, col]
      shown_map = ax.imshow(img(background), origin='lower', extent=extent,
                            cmap=cmap, alpha=0.6, aspect='auto')
      fig.colorbar(shown_map, ax=ax, label=f'fixed model: {what}')
      ax.contour(img(a['fixed_prob']), levels=[0.5], origin='lower',
                 extent=extent, colors='k', linewidths=1)
      adv = np.asarray(a['perturbed'][method][k])
      ax.scatter(points[:, 0], points[:, 1], s=10, facecolors='none',
                 edgecolors=colors, label='clean (o)')
      ax.scatter(adv[:, 0], adv[:, 1], s=14, marker='+', c=colors,
                 label='perturbed (+)')
      ax.set_title(f"({'ab'[col]}) {NAMES[method]}, {label}: "
                   f"{a['crossing']['single'][method][k]:.0f}% cross")
    ax = axes[row, 2]
    ax.imshow(img(c[method]['prob']), origin='lower', extent=extent,
              cmap='RdBu_r', alpha=0.6, aspect='auto')
    ax.contour(img(c[method]['prob']), levels=[0.5], origin='lower',
               extent=extent, colors='k')
    ax.scatter(ds.train.images[:, 0], ds.train.images[:, 1], s=4,
               c=np.where(ds.train.labels == 1, 'tab:red', 'tab:blue'))
    ax.set_title(f"(c) {NAMES[method]}-AT, eps {payload['eps']:g}: clean "
                 f"{c[method]['clean_accuracy']:.1f}% (near "
                 f"{c[method]['region_accuracy']['near']:.0f}%)")
    ax = axes[row, 3]
    shown_map = ax.imshow(img(c[method]['oscillations']), origin='lower',
                          extent=extent, cmap='magma', aspect='auto')
    fig.colorbar(shown_map, ax=ax, label='prediction changes')
    ax.set_title(f"(d) {NAMES[method]}-AT: prediction changes over "
                 f"{c[method]['updates']} updates (mean "
                 f"{c[method]['mean_oscillations']:.2f})")
  for ax in axes.flat:
    ax.set(xlabel='x1 (near region left, far region right)', ylabel='x2')
  axes[0, 0].legend(loc='lower left', fontsize=8)
  fig.suptitle(f"Fig. 1 on seed {shown['seed']} of {payload['seeds']} (the "
               'median seed by UTA-AT minus PGD-AT clean accuracy); blue: '
               'class 0, red: class 1; quick scale')
  fig.tight_layout()
  return fig


def run(out: str):
  """The paper's setting per seed; the payload and Fig. 1."""
  setting = sweep.preset(PRESETS)
  seeds = sweep.seeds(setting['seeds'])
  toy_runs.check_reach(FLAGS.eps, FLAGS.alpha, FLAGS.train_steps)
  base = dict(setting, seeds=None, eps=FLAGS.eps, alpha=FLAGS.alpha,
              train_steps=FLAGS.train_steps,
              config=config_json.to_json(toy_config(0)))
  per_seed, results, seconds = [], [], 0.0
  for seed in seeds:
    result, took = sweep.cached(
        os.path.join(out, 'runs', f'paper_seed{seed}.json'),
        dict(base, seed=seed), functools.partial(paper_seed, setting, seed))
    per_seed.append(summary(result))
    results.append(result)
    seconds += took
  payload = {'eps': FLAGS.eps, 'alpha': FLAGS.alpha,
             'train_steps': FLAGS.train_steps, 'seeds': seeds,
             'attack_points': setting['attack_points'],
             'resolution': setting['resolution'], 'per_seed': per_seed,
             'compute_seconds': seconds}
  payload['verdicts'] = payload_verdicts(payload)
  return payload, {'toy2d': figure(payload, results[shown_seed(per_seed)])}


main = sweep.main('toy2d', run, markdown=markdown,
                  unused=sweep.SELECTION_FLAGS + sweep.NOT_FOR_GENERATED_DATA)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
