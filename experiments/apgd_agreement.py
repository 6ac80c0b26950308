r"""JAX APGD vs the reference AutoAttack on the same models and points.

  python experiments/apgd_agreement.py                 # 3 models x 2 eps
  python experiments/apgd_agreement.py --num_examples=200 --eps_test=0.1

Trains (or reuses) three models: a Fashion-MNIST LeNet with PGD-AT and one
with UTA-AT (eps_train 0.2, the first 10k training images, 3 epochs: table1.py's
earlier quick preset) and the MNIST MLP of the main job (UTA-AT on the
embedded MNIST, 30 epochs). On the first --num_examples test points it runs
AutoAttack's APGD-CE + APGD-T (version ``apgd``) twice per eps: natively in
JAX (``uta_jax.apgd``) and the reference ``pyautoattack`` through the bridge.
Writes apgd_agreement.md / .json: robust accuracy of each, the difference,
the share of points with the same robust / non-robust verdict, and times.
Finished models are reused; the attacks run again.
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import config_flags  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
import numpy as np

from uta_jax import auto_attack
from uta_jax import data
from uta_jax import reporting
from uta_jax import runs
from uta_jax import torch_bridge

flags.DEFINE_integer('num_examples', 1000, 'first N test points')
flags.DEFINE_list('eps_test', ['0.1', '0.2'], 'AutoAttack radii')

# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS

FMNIST = dict(max_train_examples=10000, epochs=3, max_eval_examples=500,
              eval_pgd_restarts=2, eps_train=0.2)
MODELS = {
    'fmnist_lenet_pgd_at': ('fashion_mnist', dict(FMNIST, attack='pgd')),
    'fmnist_lenet_uta_at': ('fashion_mnist', dict(FMNIST, attack='uta')),
    'mnist_mlp_uta_at': ('mnist_embedded', dict(max_eval_examples=500,
                                                eval_pgd_restarts=2)),
}


def compare(name, workdir, eps_values):
  """Both backends on one trained model; a row per eps."""
  config, model, variables = runs.load_run(workdir)[:3]
  ds = data.load_dataset(config.dataset, data_dir=config.data_dir,
                         max_eval_examples=FLAGS.num_examples)
  rows = []
  for eps in eps_values:
    reports = {}
    for backend in ('jax', 'torch'):
      start = time.time()
      reports[backend] = auto_attack.evaluate(
          model, variables, ds.test, eps=eps, version='apgd', backend=backend,
          ensemble=False)
      reports[backend]['wall_seconds'] = time.time() - start
    jax_r, ref = reports['jax'], reports['torch']
    same = float(np.mean(jax_r['robust_points'] == ref['robust_points']))
    rows.append({
        'model': name, 'dataset': config.dataset, 'model_arch': config.model.name,
        'attack_train': config.attack.name, 'eps_train': config.attack.eps_train,
        'eps': eps, 'num_examples': len(ds.test),
        'clean_accuracy': ref['clean_accuracy'],
        'jax_robust_accuracy': jax_r['robust_accuracy'],
        'reference_robust_accuracy': ref['robust_accuracy'],
        'difference': jax_r['robust_accuracy'] - ref['robust_accuracy'],
        'jax_per_attack': jax_r['per_attack'],
        'reference_per_attack': ref['per_attack'],
        'same_verdict': same,
        'only_jax_robust': int(np.sum(jax_r['robust_points'] &
                                      ~ref['robust_points'])),
        'only_reference_robust': int(np.sum(~jax_r['robust_points'] &
                                            ref['robust_points'])),
        'jax_seconds': jax_r['wall_seconds'],
        'reference_seconds': ref['wall_seconds'],
    })
    r = rows[-1]
    print(f"{name} eps={eps:g}: JAX {r['jax_robust_accuracy']:.2f}% vs "
          f"reference {r['reference_robust_accuracy']:.2f}% (same verdict on "
          f"{100 * same:.1f}% of {len(ds.test)} points; {r['jax_seconds']:.0f}"
          f" s vs {r['reference_seconds']:.0f} s)", flush=True)
  return rows


def markdown(payload: dict) -> str:
  rows = payload['rows']
  header = ['model', 'eps', 'clean', 'JAX apgd', 'reference apgd',
            'difference', 'same verdict', 'JAX s', 'reference s']
  table = [[r['model'], f"{r['eps']:g}", r['clean_accuracy'],
            f"{r['jax_robust_accuracy']:.2f}",
            f"{r['reference_robust_accuracy']:.2f}",
            f"{r['difference']:+.2f}", f"{100 * r['same_verdict']:.1f}%",
            f"{r['jax_seconds']:.0f}", f"{r['reference_seconds']:.0f}"]
           for r in rows]
  n = rows[0]['num_examples']
  return (f'AutoAttack APGD-CE + APGD-T: robust accuracy (%) on the first {n}'
          ' test points, JAX (uta_jax.apgd) vs the reference pyautoattack '
          'through the bridge; times are wall seconds on this run\'s machine, '
          'JAX\'s including its compilation at the first eps\n\n' +
          reporting.markdown_table(header, table))


def main(argv):
  del argv
  out = sweep.start('apgd_agreement', unused=sweep.SELECTION_FLAGS)
  eps_values = cli.parse_floats(FLAGS.eps_test, 'eps_test')
  for e in eps_values:
    if not 0 < e <= 1:
      cli.fail(f'--eps_test {e} is outside (0, 1]')
  try:
    torch_bridge.require_torch().set_num_threads(1)
    rows = []
    seeds = sweep.seeds((0,))
    cells = [(seed, name, sweep.config(dataset, overrides, seed),
              sweep.seed_dir(os.path.join(out, 'runs', name), seed))
             for seed in seeds
             for name, (dataset, overrides) in MODELS.items()]
    sweep.train_all([(config, workdir) for _, _, config, workdir in cells])
    for seed, name, _, workdir in cells:
      rows += [dict(r, seed=seed)
               for r in compare(name, workdir, eps_values)]
  except sweep.USER_ERRORS as e:
    cli.fail(config_flags.message(e))
  sweep.write_outputs(out, 'apgd_agreement', markdown=markdown,
                      payload={'rows': rows, 'num_examples': FLAGS.num_examples,
                               'eps': eps_values, 'seeds': seeds})


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
