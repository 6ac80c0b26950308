r"""Fig. 1 (§4.1, App. A): PGD vs UTA on the non-isotropic 2D toy set.

  python experiments/toy2d.py                  # quick (~2 min on 2 cores)
  python experiments/toy2d.py --preset=paper   # finer grid

The classes lie 0.3 apart on the left and 3.0 apart on the right
(``uta_jax.toy``); eps = 0.5 breaks AT-Asm on the left only.
(a, b) A fixed, cleanly trained MLP is attacked with PGD (its cross-entropy)
and UTA (the predictive entropy of a 10-model ensemble; also of the single
model) for 1 and 20 steps of 0.05: how many perturbed points cross the
decision boundary? (c) PGD-AT and UTA-AT with eps = 0.5, k = 15, alpha = 0.05
(``steps.fit``, the library's train step): decision boundaries and clean
accuracy. (d) The boundary-oscillation map: for each grid point, how many
times the prediction changed over the training updates (``toy``).
Writes toy2d.md / .json / .png.
"""

import functools
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
from uta_jax import attacks
from uta_jax import configs
from uta_jax import data
from uta_jax import reporting
from uta_jax import steps
from uta_jax import toy
from uta_jax import uncertainty

GRID_LO, GRID_HI = (-3.5, -2.5), (3.5, 2.5)
QUICK = dict(resolution=100, ensemble_size=10, attack_points=256, seeds=3)
PAPER = dict(resolution=250, ensemble_size=10, attack_points=512, seeds=5)

flags.DEFINE_float('eps', 0.5, 'attack and training radius (violates AT-Asm '
                   'on the left, where the classes are 0.3 apart)')
flags.DEFINE_float('alpha', 0.05, 'attack step size')
flags.DEFINE_integer('train_steps', 15, 'attack steps k during training')
FLAGS = flags.FLAGS


def toy_config(seed: int, **overrides) -> configs.Config:
  values = sweep.overrides(dict(eps_train=FLAGS.eps, step_size=FLAGS.alpha,
                                num_steps=FLAGS.train_steps))
  values.update(overrides, seed=seed)
  return configs.get_config('toy2d', **values)


def num_updates(config: configs.Config, split: data.Split) -> int:
  return config.epochs * data.steps_per_epoch(len(split), config.batch_size)


def attack_panels(ds, setting: dict, seed: int) -> dict:
  """(a, b): attacks on a fixed model; crossing fractions and point sets."""
  clean = toy_config(seed, attack='none')
  model, fixed = steps.fit(clean, ds.train,
                           num_steps=num_updates(clean, ds.train))
  members = toy_config(seed, attack='none', uncertainty='ensemble',
                       num_samples=setting['ensemble_size'])
  _, ensemble = steps.fit(members, ds.train,
                          num_steps=num_updates(members, ds.train))
  x = jnp.asarray(ds.test.images[:setting['attack_points']])
  y = jnp.asarray(ds.test.labels[:setting['attack_points']])
  single_logits = functools.partial(steps.predict_logits, model, fixed,
                                    ensemble=False)
  single_samples = functools.partial(steps.member_logits, model, fixed,
                                     ensemble=False)
  ens_logits = functools.partial(steps.predict_logits, model, ensemble,
                                 ensemble=True)
  ens_samples = functools.partial(steps.member_logits, model, ensemble,
                                  ensemble=True)
  predict = lambda fn, inputs: np.asarray(jnp.argmax(fn(inputs), -1))
  common = dict(eps=FLAGS.eps, step_size=FLAGS.alpha, bounds=None)
  out = {'points': np.asarray(x).tolist(), 'labels': np.asarray(y).tolist(),
         'clean_accuracy_fixed': 100 * float(np.mean(predict(
             single_logits, x) == np.asarray(y))),
         'clean_accuracy_ensemble': 100 * float(np.mean(predict(
             ens_logits, x) == np.asarray(y))),
         'crossing': {}, 'perturbed': {}}
  for k in (1, 20):
    runs = {
        'pgd': (attacks.pgd(single_logits, x, y, num_steps=k, **common),
                single_logits),
        'uta_ensemble': (attacks.uta(ens_samples, x, num_steps=k, **common),
                         ens_logits),
        'uta_single': (attacks.uta(single_samples, x, num_steps=k, **common),
                       single_logits),
    }
    for name, (x_adv, logits_fn) in runs.items():
      out['crossing'][f'{name}_{k}'] = toy.crossing_fraction(
          predict(logits_fn, x), predict(logits_fn, x_adv))
      out['perturbed'][f'{name}_{k}'] = np.asarray(x_adv).tolist()
  g = jnp.asarray(toy.grid(GRID_LO, GRID_HI, setting['resolution']))
  out['fixed_prob'] = np.asarray(jax.nn.softmax(single_logits(g))[:, 1])
  out['ensemble_entropy'] = np.asarray(uncertainty.predictive_entropy(
      ens_samples(g)))
  return out


def train_panels(ds, setting: dict, seed: int) -> dict:
  """(c, d): PGD-AT and UTA-AT with the large eps; boundaries, oscillation."""
  g = jnp.asarray(toy.grid(GRID_LO, GRID_HI, setting['resolution']))
  out = {}
  for method in ('pgd', 'uta'):
    config = toy_config(seed, attack=method)
    model = steps.create_model(config)
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
        'updates': len(predictions),
        'mean_oscillations': float(counts.mean()),
        'max_oscillations': int(counts.max()),
        'oscillations': counts,
        'prob': np.asarray(jax.nn.softmax(model.apply(variables, g))[:, 1]),
    }
  return out


def mean_std(values) -> str:
  return f'{np.mean(values):.1f} ± {np.std(values):.1f}'


def markdown(per_seed: list) -> str:
  seeds = len(per_seed)
  cross = lambda key: mean_std([100 * s['crossing'][key] for s in per_seed])
  rows = [[name.replace('_', ' '), cross(f'{name}_1'), cross(f'{name}_20')]
          for name in ('pgd', 'uta_single', 'uta_ensemble')]
  part1 = ('(a, b) Perturbed test points whose predicted class flipped, % '
           f"(eps {FLAGS.eps:g}, step {FLAGS.alpha:g}; "
           f"{per_seed[0]['attack_points']} points; mean ± std over {seeds} "
           'seeds; fixed models\' clean accuracy '
           f"{mean_std([s['clean_accuracy_fixed'] for s in per_seed])}%)\n\n"
           + reporting.markdown_table(['attack', '1 step', '20 steps'], rows))
  train = lambda m, k: [s['training'][m][k] for s in per_seed]
  rows = [[m.upper() + '-AT', mean_std(train(m, 'clean_accuracy')),
           mean_std(train(m, 'mean_oscillations')),
           max(train(m, 'max_oscillations')), train(m, 'updates')[0]]
          for m in ('pgd', 'uta')]
  part2 = (f'\n(c, d) Training with eps {FLAGS.eps:g}, k = '
           f'{FLAGS.train_steps}, alpha = {FLAGS.alpha:g}; mean ± std over '
           f'{seeds} seeds\n\n' +
           reporting.markdown_table(
               ['training', 'clean test accuracy (%)',
                'mean prediction changes per grid point', 'max', 'updates'],
               rows))
  return part1 + part2


def figure(ds, a: dict, c: dict, resolution: int):
  plt = sweep.pyplot()
  extent = (GRID_LO[0], GRID_HI[0], GRID_LO[1], GRID_HI[1])
  img = lambda v: np.asarray(v).reshape(resolution, resolution)
  fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
  points, labels = np.asarray(a['points']), np.asarray(a['labels'])
  colors = np.where(labels == 1, 'tab:red', 'tab:blue')
  for row, (attack, background, cmap) in enumerate((
      ('pgd', a['fixed_prob'], 'RdBu_r'),
      ('uta_ensemble', a['ensemble_entropy'], 'Greens'))):
    for col, k in enumerate((1, 20)):
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
    ax.set_title(f"{method.upper()}-AT eps={FLAGS.eps:g}: clean "
                 f"{c[method]['clean_accuracy']:.1f}%")
    ax = axes[row, 3]
    shown = ax.imshow(img(c[method]['oscillations']), origin='lower',
                      extent=extent, cmap='magma', aspect='auto')
    fig.colorbar(shown, ax=ax)
    ax.set_title(f"{method.upper()}-AT prediction changes (mean "
                 f"{c[method]['mean_oscillations']:.2f})")
  fig.tight_layout()
  return fig


def main(argv):
  del argv
  out = sweep.start('toy2d')
  setting = QUICK if FLAGS.preset == 'quick' else PAPER
  t0 = time.time()
  per_seed, shown = [], None
  try:
    for seed in range(FLAGS.seed, FLAGS.seed + setting['seeds']):
      ds = data.load_dataset('toy2d', seed=seed)
      a = attack_panels(ds, setting, seed)
      c = train_panels(ds, setting, seed)
      per_seed.append({
          'seed': seed, 'attack_points': len(a['labels']),
          'crossing': a['crossing'],
          'clean_accuracy_fixed': a['clean_accuracy_fixed'],
          'clean_accuracy_ensemble': a['clean_accuracy_ensemble'],
          'training': {m: {k: v for k, v in r.items()
                           if k not in ('oscillations', 'prob')}
                       for m, r in c.items()}})
      shown = shown or (ds, a, c)  # the figure shows the first seed
  except sweep.USER_ERRORS as e:
    cli.fail(str(e))
  payload = {'preset': FLAGS.preset, 'eps': FLAGS.eps, 'alpha': FLAGS.alpha,
             'train_steps': FLAGS.train_steps, 'per_seed': per_seed,
             'wall_seconds': time.time() - t0}
  sweep.write_outputs(out, 'toy2d', markdown=markdown(per_seed),
                      payload=payload,
                      figure=figure(*shown, setting['resolution']))


if __name__ == '__main__':
  app.run(main)
