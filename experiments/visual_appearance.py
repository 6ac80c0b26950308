r"""Fig. 8 (App. C.2): what UTA and PGD perturbations look like.

  python experiments/visual_appearance.py                 # quick: F-MNIST
  python experiments/visual_appearance.py --workdir=DIR   # any trained run
  python experiments/visual_appearance.py --preset=paper  # CIFAR-10 ResNet-18

One test image per class, attacked with a large budget as in the paper:
1000 sign steps of 0.001 and no eps bound (eps = 1 in the [0, 1] box).
Rows: clean, UTA-perturbed (maximises the model's entropy, label-free),
PGD-perturbed (maximises the cross-entropy). The model is a cleanly trained
run (``--workdir``, or one trained here through ``loop.train_and_evaluate``
and reused on reruns). Writes visual_appearance.md / .json / .png with the
predicted class, confidence and perturbation size of each image (mean ± std
over one clean model per seed; the figure shows the first).
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
from uta_jax import attacks
from uta_jax import claims
from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import reporting
from uta_jax import runs
from uta_jax import stats

PRESETS = {
    'quick': dict(seeds=(0, 1, 2), dataset='fashion_mnist', config=dict(
        attack='none', epochs=2, max_eval_examples=500, eval_pgd_restarts=1)),
    'paper': dict(seeds=(0, 1, 2), dataset='cifar10',
                  config=dict(attack='none', epochs=30)),
}
UNBOUNDED = 1.0  # eps = 1 on [0, 1] images: the box is the only bound

flags.DEFINE_string('workdir', None, 'a trained run to attack; default: '
                    'train a clean model in <output_dir>/runs/clean')
flags.DEFINE_integer('attack_steps', 1000, 'sign steps of both attacks')
flags.DEFINE_float('attack_step_size', 0.001, 'step size of both attacks')
# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def one_per_class(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
  """Index of the first test example of each class."""
  return np.array([int(np.argmax(labels == c)) for c in range(num_classes)
                   if np.any(labels == c)])


def attack_seed(workdir: str) -> tuple:
  """(images, row): clean, UTA- and PGD-perturbed test images of the run in
  ``workdir`` (one per class) and their statistics."""
  config, model, variables = runs.load_run(workdir)[:3]
  if config.dataset == 'toy2d':
    raise configs.ConfigError(f'{workdir} holds a toy2d run; Fig. 8 needs an '
                              'image model')
  ds = data.load_dataset(config.dataset, data_dir=config.data_dir,
                         max_eval_examples=1000, seed=config.seed)
  idx = one_per_class(ds.test.labels, ds.num_classes)
  x = jnp.asarray(data.to_float(ds.test.images[idx]))
  y = jnp.asarray(ds.test.labels[idx])
  ensemble = classifier.is_ensemble(config)
  logits_fn = functools.partial(classifier.predict_logits, model, variables,
                                ensemble=ensemble)
  sample_fn = functools.partial(classifier.member_logits, model, variables,
                                ensemble=ensemble)
  common = dict(eps=UNBOUNDED, num_steps=FLAGS.attack_steps,
                step_size=FLAGS.attack_step_size)
  images = {'clean': x,
            'uta': attacks.uta(sample_fn, x, **common),
            'pgd': attacks.pgd(logits_fn, x, y, **common)}
  row = {'seed': config.seed, 'dataset': config.dataset,
         'model': config.model.name, 'workdir': workdir,
         'labels': np.asarray(y).tolist()}
  for name, imgs in images.items():
    probs = jax.nn.softmax(logits_fn(imgs))
    pred = np.asarray(jnp.argmax(probs, -1))
    delta = np.asarray(imgs - x).reshape(len(idx), -1)
    row[name] = {
        'accuracy': 100 * float(np.mean(pred == np.asarray(y))),
        'predictions': pred.tolist(),
        'mean_confidence': 100 * float(jnp.mean(jnp.max(probs, -1))),
        'mean_linf': float(np.abs(delta).max(1).mean()),
        'mean_l2': float(np.linalg.norm(delta, axis=1).mean()),
    }
  return images, row


def verdicts(rows: list) -> list:
  """Fig. 8's claim, through a measurable proxy: the size of the change.
  The interval covers the seeds only: every seed perturbs the same images,
  whose sampling error is not a binomial one (``uta_jax.stats``)."""
  l2 = lambda name: [r[name]['mean_l2'] for r in rows]
  est = stats.paired_difference(l2('uta'), l2('pgd'))
  return [claims.verdict(
      f"{rows[0]['dataset']}: with an unbounded budget UTA changes the "
      'image less than PGD, so its class stays perceptible (Fig. 8; proxy: '
      'perturbation size)',
      'mean L2 of the perturbation: UTA - PGD < 0',
      'mean L2 difference UTA - PGD', est, stats.outcome(est, '<', 0),
      'UTA ' + '/'.join(f'{v:.2f}' for v in l2('uta')) + ' vs PGD ' +
      '/'.join(f'{v:.2f}' for v in l2('pgd')), digits=2)]


def payload_verdicts(payload: dict) -> list:
  """The verdicts of a stored payload."""
  return verdicts(payload['rows'])


def markdown(payload: dict) -> str:
  rows = payload['rows']
  ms = reporting.format_mean_std
  table = [[name, ms(r[name]['accuracy'] for r in rows),
            ms(r[name]['mean_confidence'] for r in rows),
            ms((r[name]['mean_linf'] for r in rows), 3),
            ms((r[name]['mean_l2'] for r in rows), 2),
            ' '.join(map(str, rows[0][name]['predictions']))]
           for name in ('clean', 'uta', 'pgd')]
  attack = payload['attack']
  return (f"{rows[0]['dataset']}, model {rows[0]['model']}, seeds "
          f"{payload['seeds']}; {attack['steps']} steps of "
          f"{attack['step_size']:g}, no eps bound; one test image per class "
          f"(labels {' '.join(map(str, rows[0]['labels']))}); mean ± std "
          'over seeds, predicted classes of the first seed\n\n' +
          reporting.markdown_table(
              ['row', 'accuracy (%)', 'mean confidence (%)', 'mean L-inf',
               'mean L2', 'predicted classes'], table))


def run(out: str):
  """The preset's clean runs (or --workdir) attacked; the payload."""
  preset = sweep.preset(PRESETS)
  rows, shown = [], None
  if FLAGS.workdir:
    if FLAGS.seeds:
      cli.fail('--workdir names one trained run; drop --seeds')
    workdirs = [FLAGS.workdir]
  else:
    seeds = sweep.seeds(preset['seeds'])
    workdirs = [sweep.seed_dir(os.path.join(out, 'runs', 'clean'), seed)
                for seed in seeds]
    sweep.train_all([(sweep.config(preset['dataset'], preset['config'], seed),
                      workdir) for seed, workdir in zip(seeds, workdirs)])
  for workdir in workdirs:
    images, row = attack_seed(workdir)
    rows.append(row)
    shown = shown or (images, row)
  payload = {'seeds': [r['seed'] for r in rows],
             'rows': rows, 'attack': {'steps': FLAGS.attack_steps,
                                      'step_size': FLAGS.attack_step_size,
                                      'eps': 'unbounded ([0, 1] box only)'}}
  payload['verdicts'] = payload_verdicts(payload)
  return payload, {'visual_appearance': figure(*shown)}


FASHION_MNIST_CLASSES = ('T-shirt', 'trouser', 'pullover', 'dress', 'coat',
                         'sandal', 'shirt', 'sneaker', 'bag', 'boot')


def figure(images: dict, row: dict):
  """Clean, UTA and PGD rows of one seed's images (the seed named), with
  the model's prediction over each."""
  plt = sweep.pyplot()
  n = images['clean'].shape[0]
  names = (FASHION_MNIST_CLASSES if row['dataset'] == 'fashion_mnist' else
           [str(c) for c in range(10)])
  labels = {'clean': 'clean', 'uta': 'UTA', 'pgd': 'PGD'}
  fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.9))
  for i, name in enumerate(('clean', 'uta', 'pgd')):
    for col in range(n):
      ax = axes[i, col]
      img = np.asarray(images[name][col])
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray',
                vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(names[row[name]['predictions'][col]], fontsize=8)
      if col == 0:
        ax.set_ylabel(labels[name])
  fig.suptitle(f"Fig. 8 at quick scale: seed {row['seed']}'s clean-trained "
               f"{row['model']}; titles: its prediction; UTA and PGD with an "
               f'unbounded budget ({FLAGS.attack_steps} steps of '
               f'{FLAGS.attack_step_size:g})', fontsize=9)
  fig.tight_layout()
  return fig


main = sweep.main('visual_appearance', run, markdown=markdown,
                  unused=sweep.SELECTION_FLAGS)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
