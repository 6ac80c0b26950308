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
predicted class, confidence and perturbation size of each image.
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
from uta_jax import loop
from uta_jax import reporting
from uta_jax import steps

QUICK = dict(dataset='fashion_mnist', config=dict(
    attack='none', epochs=2, max_eval_examples=500, eval_pgd_restarts=1))
PAPER = dict(dataset='cifar10', config=dict(attack='none', epochs=30))
UNBOUNDED = 1.0  # eps = 1 on [0, 1] images: the box is the only bound

flags.DEFINE_string('workdir', None, 'a trained run to attack; default: '
                    'train a clean model in <output_dir>/runs/clean')
flags.DEFINE_integer('attack_steps', 1000, 'sign steps of both attacks')
flags.DEFINE_float('attack_step_size', 0.001, 'step size of both attacks')
FLAGS = flags.FLAGS


def one_per_class(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
  """Index of the first test example of each class."""
  return np.array([int(np.argmax(labels == c)) for c in range(num_classes)
                   if np.any(labels == c)])


def main(argv):
  del argv
  out = sweep.start('visual_appearance')
  preset = QUICK if FLAGS.preset == 'quick' else PAPER
  t0 = time.time()
  try:
    workdir = FLAGS.workdir
    if workdir is None:
      workdir = os.path.join(out, 'runs', 'clean')
      sweep.train(configs.get_config(
          preset['dataset'], **sweep.overrides(preset['config'])), workdir)
    config, model, variables, _ = loop.load_run(workdir)
    ds = data.load_dataset(config.dataset, data_dir=config.data_dir,
                           max_eval_examples=1000, seed=config.seed)
  except sweep.USER_ERRORS as e:
    cli.fail(str(e))
  if config.dataset == 'toy2d':
    cli.fail('--workdir holds a toy2d run; Fig. 8 needs an image model')
  idx = one_per_class(ds.test.labels)
  x = jnp.asarray(data.to_float(ds.test.images[idx]))
  y = jnp.asarray(ds.test.labels[idx])
  ensemble = steps.is_ensemble(config)
  logits_fn = functools.partial(steps.predict_logits, model, variables,
                                ensemble=ensemble)
  sample_fn = functools.partial(steps.member_logits, model, variables,
                                ensemble=ensemble)
  common = dict(eps=UNBOUNDED, num_steps=FLAGS.attack_steps,
                step_size=FLAGS.attack_step_size)
  images = {'clean': x,
            'uta': attacks.uta(sample_fn, x, **common),
            'pgd': attacks.pgd(logits_fn, x, y, **common)}
  rows, payload = [], {'dataset': config.dataset, 'workdir': workdir,
                       'labels': np.asarray(y).tolist(), 'attack': {
                           'steps': FLAGS.attack_steps,
                           'step_size': FLAGS.attack_step_size,
                           'eps': 'unbounded ([0, 1] box only)'}}
  for name, imgs in images.items():
    probs = jax.nn.softmax(logits_fn(imgs))
    pred = np.asarray(jnp.argmax(probs, -1))
    delta = np.asarray(imgs - x).reshape(len(idx), -1)
    stats = {
        'accuracy': 100 * float(np.mean(pred == np.asarray(y))),
        'predictions': pred.tolist(),
        'mean_confidence': 100 * float(jnp.mean(jnp.max(probs, -1))),
        'mean_linf': float(np.abs(delta).max(1).mean()),
        'mean_l2': float(np.linalg.norm(delta, axis=1).mean()),
    }
    payload[name] = stats
    rows.append([name, stats['accuracy'], stats['mean_confidence'],
                 f"{stats['mean_linf']:.3f}", f"{stats['mean_l2']:.2f}",
                 ' '.join(map(str, stats['predictions']))])
  payload['wall_seconds'] = time.time() - t0
  markdown = (f'{config.dataset}, model {config.model} from {workdir}; '
              f'{FLAGS.attack_steps} steps of {FLAGS.attack_step_size:g}, no '
              f'eps bound; one test image per class (labels '
              f"{' '.join(map(str, np.asarray(y).tolist()))})\n\n" +
              reporting.markdown_table(
                  ['row', 'accuracy (%)', 'mean confidence (%)',
                   'mean L-inf', 'mean L2', 'predicted classes'], rows))
  sweep.write_outputs(out, 'visual_appearance', markdown=markdown,
                      payload=payload, figure=figure(images, payload))


def figure(images: dict, payload: dict):
  plt = sweep.pyplot()
  n = images['clean'].shape[0]
  fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6))
  for row, name in enumerate(('clean', 'uta', 'pgd')):
    for col in range(n):
      ax = axes[row, col]
      img = np.asarray(images[name][col])
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray',
                vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f"pred {payload[name]['predictions'][col]}", fontsize=8)
      if col == 0:
        ax.set_ylabel(name.upper())
  fig.tight_layout()
  return fig


if __name__ == '__main__':
  app.run(main)
