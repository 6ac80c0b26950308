r"""Fig. 1 (§4.1, App. A): PGD vs UTA on the non-isotropic 2D toy set, and a
sweep over the toy's geometry beyond the paper.

  python experiments/toy2d.py                  # quick: 5 seeds (~15 min)
  python experiments/toy2d.py --preset=paper   # finer grid, more points
  python experiments/toy2d.py --seeds=0 --nogeometry

The classes lie 0.3 apart on the left and 3.0 apart on the right
(``uta_jax.toy``); eps = 0.5 breaks AT-Asm on the left only.
(a, b) A fixed, cleanly trained MLP is attacked with PGD (its cross-entropy)
and UTA (the predictive entropy of a 10-model ensemble; also of the single
model) for 1 and 20 steps of 0.05: how many perturbed points cross the
decision boundary? (c) PGD-AT and UTA-AT with eps = 0.5, k = 15, alpha = 0.05
(``steps.fit``, the library's train step): decision boundaries and clean
accuracy per region. (d) The boundary-oscillation map: for each grid point,
how many times the prediction changed over the training updates (``toy``).

Geometry sweep (not in the paper, which fixes one geometry): the near
region's gap as a multiple of eps (``--ratios``) and the cluster shape
(uniform strips as in the paper, Gaussian blobs). Per cell and seed: the
crossing fraction of 20-step PGD and single-model UTA on a clean model, the
clean accuracy per region after PGD-AT and UTA-AT, and their oscillations
(``toy2d_geometry``: its datasets, table and heat maps).

Every seed's (and cell's) result is stored under ``<output_dir>/runs`` and
reused by reruns with the same settings. ``verdicts`` tests the paper's toy
claims over the seeds. Writes toy2d.md / .json / .png (Fig. 1 of the first
seed) and toy2d_geometry.png (heat maps, mean over seeds).
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
import toy2d_geometry  # pylint: disable=g-import-not-at-top
from uta_jax import attacks
from uta_jax import claims
from uta_jax import classifier
from uta_jax import config_json
from uta_jax import configs
from uta_jax import data
from uta_jax import reporting
from uta_jax import stats
from uta_jax import steps
from uta_jax import toy
from uta_jax import uncertainty

GRID_LO, GRID_HI = (-3.5, -2.5), (3.5, 2.5)
PRESETS = {
    'quick': dict(seeds=(0, 1, 2, 3, 4), resolution=100, ensemble_size=10,
                  attack_points=256),
    'paper': dict(seeds=(0, 1, 2, 3, 4), resolution=250, ensemble_size=10,
                  attack_points=512),
}
CROSSING_STEPS = (1, 20)
# Clean accuracy within this many points of standard training counts as kept.
KEPT_POINTS = 3.0
_values = reporting.values_at

flags.DEFINE_float('eps', 0.5, 'attack and training radius (violates AT-Asm '
                   'on the left, where the classes are 0.3 apart)')
flags.DEFINE_float('alpha', 0.05, 'attack step size')
flags.DEFINE_integer('train_steps', 15, 'attack steps k during training')
flags.DEFINE_bool('geometry', True, 'also sweep the toy\'s geometry')
flags.DEFINE_list('ratios', None, 'near gap / eps of the geometry sweep; '
                  f'default {",".join(map(str, toy2d_geometry.RATIOS))}')
FLAGS = flags.FLAGS


def toy_config(seed: int, **preset_flags) -> configs.Config:
  """The toy's run at ``--eps``, ``--alpha``, ``--train_steps``, with
  ``preset_flags`` (flag names) on top."""
  return sweep.config('toy2d', dict(eps_train=FLAGS.eps, step_size=FLAGS.alpha,
                                    num_steps=FLAGS.train_steps,
                                    **preset_flags), seed)


def num_updates(config: configs.Config, split: data.Split) -> int:
  return config.epochs * data.steps_per_epoch(len(split), config.batch_size)


def attack_panels(ds, setting: dict, seed: int, *, ensemble: bool = True,
                  figure_data: bool = True) -> dict:
  """(a, b): attacks on a fixed, cleanly trained model: the fraction of
  perturbed points whose class flipped; with ``figure_data`` also the
  points, their perturbations and the grid maps of the figure."""
  clean = toy_config(seed, attack='none')
  model, fixed = steps.fit(clean, ds.train,
                           num_steps=num_updates(clean, ds.train))
  x = jnp.asarray(ds.test.images[:setting['attack_points']])
  y = jnp.asarray(ds.test.labels[:setting['attack_points']])
  logits = {'single': functools.partial(classifier.predict_logits, model,
                                        fixed, ensemble=False)}
  samples = {'single': functools.partial(classifier.member_logits, model,
                                         fixed, ensemble=False)}
  if ensemble:
    members = toy_config(seed, attack='none',
                         ensemble_size=setting['ensemble_size'])
    _, stacked = steps.fit(members, ds.train,
                           num_steps=num_updates(members, ds.train))
    logits['ensemble'] = functools.partial(classifier.predict_logits, model,
                                           stacked, ensemble=True)
    samples['ensemble'] = functools.partial(classifier.member_logits, model,
                                            stacked, ensemble=True)
  predict = lambda fn, inputs: np.asarray(jnp.argmax(fn(inputs), -1))
  common = dict(eps=FLAGS.eps, step_size=FLAGS.alpha, bounds=None)
  test_pred = predict(logits['single'], jnp.asarray(ds.test.images))
  out = {'clean_accuracy_fixed': 100 * float(np.mean(
             test_pred == ds.test.labels)),
         'region_accuracy_fixed': toy.region_accuracy(
             ds.test.images, ds.test.labels, test_pred),
         'crossing': {}, 'perturbed': {}}
  for k in CROSSING_STEPS:
    runs = {'pgd': (lambda: attacks.pgd(logits['single'], x, y, num_steps=k,
                                        **common), 'single')}
    for name in samples:
      runs[f'uta_{name}'] = (functools.partial(
          attacks.uta, samples[name], x, num_steps=k, **common), name)
    for name, (run, model_name) in runs.items():
      x_adv = run()
      out['crossing'][f'{name}_{k}'] = toy.crossing_fraction(
          predict(logits[model_name], x), predict(logits[model_name], x_adv))
      out['perturbed'][f'{name}_{k}'] = np.asarray(x_adv).tolist()
  if not figure_data:
    del out['perturbed']
    return out
  g = jnp.asarray(toy.grid(GRID_LO, GRID_HI, setting['resolution']))
  out.update(
      points=np.asarray(x).tolist(), labels=np.asarray(y).tolist(),
      clean_accuracy_ensemble=100 * float(np.mean(
          predict(logits['ensemble'], x) == np.asarray(y))),
      fixed_prob=np.asarray(jax.nn.softmax(logits['single'](g))[:, 1]).tolist(),
      ensemble_entropy=np.asarray(uncertainty.predictive_entropy(
          samples['ensemble'](g))).tolist())
  return out


def train_panels(ds, resolution: int, seed: int) -> dict:
  """(c, d): PGD-AT and UTA-AT with the large eps: clean accuracy (all and
  per region), boundary map and oscillation counts on a grid."""
  g = jnp.asarray(toy.grid(GRID_LO, GRID_HI, resolution))
  out = {}
  for method in ('pgd', 'uta'):
    config = toy_config(seed, attack=method)
    model = classifier.create_model(config)
    grid_prediction = jax.jit(lambda v, m=model: jnp.argmax(
        m.apply(v, g), -1).astype(jnp.int8))  # [G] after each update
    predictions = []
    model, variables = steps.fit(
        config, ds.train, num_steps=num_updates(config, ds.train),
        callback=lambda step, m, v: predictions.append(grid_prediction(v)))
    counts = toy.oscillation_counts(np.stack(jax.device_get(predictions)))
    test_pred = np.asarray(jnp.argmax(model.apply(
        variables, jnp.asarray(ds.test.images)), -1))
    out[method] = {
        'clean_accuracy': 100 * float(np.mean(test_pred == ds.test.labels)),
        'region_accuracy': toy.region_accuracy(ds.test.images,
                                               ds.test.labels, test_pred),
        'updates': len(predictions),
        'mean_oscillations': float(counts.mean()),
        'max_oscillations': int(counts.max()),
        'oscillations': counts.tolist(),
        'prob': np.asarray(jax.nn.softmax(model.apply(variables, g))[:, 1]
                          ).tolist(),
    }
  return out


GRIDS = ('oscillations', 'prob', 'fixed_prob', 'ensemble_entropy', 'points',
         'labels', 'perturbed')


def summary(result: dict) -> dict:
  """A stored seed or cell without its figure arrays (for the JSON)."""
  if isinstance(result, dict):
    return {k: summary(v) for k, v in result.items() if k not in GRIDS}
  return result


def paper_seed(setting: dict, seed: int) -> dict:
  ds = data.load_dataset('toy2d', seed=seed)
  return {'seed': seed, 'attack': attack_panels(ds, setting, seed),
          'training': train_panels(ds, setting['resolution'], seed)}


def geometry_cell(setting: dict, shape: str, ratio: float, seed: int) -> dict:
  ds = toy2d_geometry.dataset(shape, ratio, seed, eps=FLAGS.eps)
  return summary({'seed': seed, 'shape': shape, 'ratio': ratio,
                  'near_gap': ratio * FLAGS.eps,
                  'attack': attack_panels(ds, setting, seed, ensemble=False,
                                          figure_data=False),
                  'training': train_panels(ds, toy2d_geometry.RESOLUTION,
                                              seed)})


def verdicts(per_seed: list, attack_points: int) -> list:
  """The paper's toy claims (§4.1, §4.3, Fig. 1) over the seeds
  (``uta_jax.stats``; the seeds are paired: one dataset and initialisation
  per seed)."""
  out = []
  for uta in ('uta_ensemble', 'uta_single'):
    parts = []
    for k in CROSSING_STEPS:
      u = [100 * c for c in _values(per_seed, 'attack', 'crossing',
                                    f'{uta}_{k}')]
      p = [100 * c for c in _values(per_seed, 'attack', 'crossing',
                                    f'pgd_{k}')]
      parts.append((f'{k} step(s)', 'crossing(UTA) - crossing(PGD), points',
                    stats.paired_difference(u, p, n=attack_points), '<', 0))
    who = ('a 10-model ensemble' if uta == 'uta_ensemble' else
           'the single model')
    out.append(claims.every(
        f'toy: UTA-perturbed points (entropy of {who}) cross the decision '
        'boundary less often than PGD-perturbed ones (Fig. 1a-b, §4.3)',
        f'crossing({uta}) - crossing(PGD) < 0 at '
        f'{" and ".join(map(str, CROSSING_STEPS))} steps', parts))
  clean = lambda m: _values(per_seed, 'training', m, 'clean_accuracy')
  standard = _values(per_seed, 'attack', 'clean_accuracy_fixed')
  kept = stats.paired_difference(clean('uta'), standard, n=data.TOY_TEST_SIZE)
  out.append(claims.verdict(
      'toy: UTA-AT with the large eps keeps the clean accuracy of standard '
      'training (Fig. 1c, §4.3)',
      f'clean(UTA-AT) - clean(standard training) > -{KEPT_POINTS:g} points',
      'clean-accuracy difference, points', kept,
      stats.outcome(kept, '>', -KEPT_POINTS),
      'UTA-AT ' + '/'.join(f'{v:.1f}' for v in clean('uta')) +
      ' vs standard ' + '/'.join(f'{v:.1f}' for v in standard)))
  gap = stats.paired_difference(clean('uta'), clean('pgd'),
                                n=data.TOY_TEST_SIZE)
  out.append(claims.verdict(
      'toy: UTA-AT ends with a higher clean accuracy than PGD-AT (Fig. 1c)',
      'clean(UTA-AT) - clean(PGD-AT) > 0', 'clean-accuracy difference, '
      'points', gap, stats.outcome(gap, '>', 0),
      'UTA-AT ' + '/'.join(f'{v:.1f}' for v in clean('uta')) + ' vs PGD-AT '
      + '/'.join(f'{v:.1f}' for v in clean('pgd'))))
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
  cross = lambda key: ms([100 * s['attack']['crossing'][key]
                          for s in per_seed])
  rows = [[name.replace('_', ' '), cross(f'{name}_1'), cross(f'{name}_20')]
          for name in ('pgd', 'uta_single', 'uta_ensemble')]
  part1 = ('(a, b) Perturbed test points whose predicted class flipped, % '
           f"(eps {payload['eps']:g}, step {payload['alpha']:g}; "
           f"{payload['attack_points']} points; mean ± std over seeds "
           f"{seeds}; fixed models\' clean accuracy "
           f"{ms(_values(per_seed, 'attack', 'clean_accuracy_fixed'))}%)\n\n"
           + reporting.markdown_table(['attack', '1 step', '20 steps'], rows))
  train = lambda m, *k: _values(per_seed, 'training', m, *k)
  rows = [[m.upper() + '-AT', ms(train(m, 'clean_accuracy')),
           ms(train(m, 'region_accuracy', 'near')),
           ms(train(m, 'region_accuracy', 'far')),
           ms(train(m, 'mean_oscillations'), 2),
           max(train(m, 'max_oscillations')), train(m, 'updates')[0]]
          for m in ('pgd', 'uta')]
  rows.insert(0, ['standard training', ms(_values(
      per_seed, 'attack', 'clean_accuracy_fixed')), ms(_values(
          per_seed, 'attack', 'region_accuracy_fixed', 'near')), ms(_values(
              per_seed, 'attack', 'region_accuracy_fixed', 'far')), '', '',
                  ''])
  part2 = (f"\n(c, d) Training with eps {payload['eps']:g}, k = "
           f"{payload['train_steps']}, alpha = {payload['alpha']:g}; mean ± "
           f'std over seeds {seeds}\n\n' +
           reporting.markdown_table(
               ['training', 'clean test accuracy (%)', 'near region',
                'far region', 'mean prediction changes per grid point',
                'max', 'updates'], rows))
  return part1 + part2 + toy2d_geometry.markdown(payload, KEPT_POINTS)


def figure(payload: dict, shown: dict):
  """Fig. 1 for the first seed (``shown``: its stored result with arrays)."""
  plt = sweep.pyplot()
  ds = data.load_dataset('toy2d', seed=shown['seed'])
  a, c = shown['attack'], shown['training']
  resolution = payload['resolution']
  extent = (GRID_LO[0], GRID_HI[0], GRID_LO[1], GRID_HI[1])
  img = lambda v: np.asarray(v).reshape(resolution, resolution)
  fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
  points, labels = np.asarray(a['points']), np.asarray(a['labels'])
  colors = np.where(labels == 1, 'tab:red', 'tab:blue')
  for row, (attack, background, cmap) in enumerate((
      ('pgd', a['fixed_prob'], 'RdBu_r'),
      ('uta_ensemble', a['ensemble_entropy'], 'Greens'))):
    for col, k in enumerate(CROSSING_STEPS):
      ax = axes[row, col]
      ax.imshow(img(background), origin='lower', extent=extent, cmap=cmap,
                alpha=0.6, aspect='auto')
      ax.contour(img(a['fixed_prob']), levels=[0.5], origin='lower',
                 extent=extent, colors='k', linewidths=1)
      adv = np.asarray(a['perturbed'][f'{attack}_{k}'])
      ax.scatter(points[:, 0], points[:, 1], s=10, facecolors='none',
                 edgecolors=colors)
      ax.scatter(adv[:, 0], adv[:, 1], s=14, marker='+', c=colors)
      ax.set_title(f"{attack.replace('_', ' ').upper()}, {k} step(s): "
                   f"{100 * a['crossing'][f'{attack}_{k}']:.0f}% cross")
    method = ('pgd', 'uta')[row]
    ax = axes[row, 2]
    ax.imshow(img(c[method]['prob']), origin='lower', extent=extent,
              cmap='RdBu_r', alpha=0.6, aspect='auto')
    ax.contour(img(c[method]['prob']), levels=[0.5], origin='lower',
               extent=extent, colors='k')
    train_colors = np.where(ds.train.labels == 1, 'tab:red', 'tab:blue')
    ax.scatter(ds.train.images[:, 0], ds.train.images[:, 1], s=4,
               c=train_colors)
    ax.set_title(f"{method.upper()}-AT eps={payload['eps']:g}: clean "
                 f"{c[method]['clean_accuracy']:.1f}%")
    ax = axes[row, 3]
    shown_map = ax.imshow(img(c[method]['oscillations']), origin='lower',
                          extent=extent, cmap='magma', aspect='auto')
    fig.colorbar(shown_map, ax=ax)
    ax.set_title(f"{method.upper()}-AT prediction changes (mean "
                 f"{c[method]['mean_oscillations']:.2f})")
  fig.tight_layout()
  return fig


def run(out: str):
  """The paper's setting per seed, then the geometry sweep; the payload."""
  setting = sweep.preset(PRESETS)
  seeds = sweep.seeds(setting['seeds'])
  ratios = cli.parse_floats(FLAGS.ratios, 'ratios') or list(
      toy2d_geometry.RATIOS)
  runs = os.path.join(out, 'runs')
  base = dict(setting, seeds=None, eps=FLAGS.eps, alpha=FLAGS.alpha,
              config=config_json.to_json(toy_config(0)))
  per_seed, geometry, seconds, shown = [], [], 0.0, None
  for seed in seeds:
    result, took = sweep.cached(
        os.path.join(runs, f'paper_seed{seed}.json'), dict(base, seed=seed),
        functools.partial(paper_seed, setting, seed))
    per_seed.append(summary(result))
    seconds += took
    shown = shown or result
  for seed in seeds if FLAGS.geometry else ():
    for shape in toy.SHAPES:
      for ratio in ratios:
        result, took = sweep.cached(
            os.path.join(runs, f'geometry_{shape}_{ratio:g}_seed{seed}.json'),
            dict(base, seed=seed, shape=shape, ratio=ratio),
            functools.partial(geometry_cell, setting, shape, ratio, seed))
        geometry.append(summary(result))
        seconds += took
  payload = {'eps': FLAGS.eps, 'alpha': FLAGS.alpha,
             'train_steps': FLAGS.train_steps, 'seeds': seeds,
             'attack_points': setting['attack_points'],
             'resolution': setting['resolution'], 'per_seed': per_seed,
             'geometry': geometry, 'ratios': ratios,
             'compute_seconds': seconds}
  payload['verdicts'] = payload_verdicts(payload)
  figures = {'toy2d': figure(payload, shown)}
  if geometry:
    figures['toy2d_geometry'] = toy2d_geometry.figure(payload)
  return payload, figures


main = sweep.main('toy2d', run, markdown=markdown,
                  unused=sweep.SELECTION_FLAGS + sweep.NOT_FOR_GENERATED_DATA)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
