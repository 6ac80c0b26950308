r"""The standard AutoAttack in JAX vs the reference, on the same models and points.

  python experiments/autoattack_agreement.py            # 4 models x 2 eps
  python experiments/autoattack_agreement.py --num_examples=200 --eps_test=0.1

Trains (or reuses) four models: a Fashion-MNIST LeNet with PGD-AT and one
with UTA-AT (eps_train 0.2, the first 10k training images, 3 epochs), the
MNIST MLP of the main job (UTA-AT on the embedded MNIST), and a collapsed
model: the Fashion-MNIST LeNet of catastrophic_overfitting.py's FGSM-AT
(eps 0.2, 15 epochs, seed 0: its PGD accuracy falls to a few % while FGSM's
stays high, where FAB and Square matter most). On the first --num_examples
test points, at each eps:

- the standard version (APGD-CE, APGD-T, FAB-T, Square) natively in JAX and
  the reference ``pyautoattack`` through the bridge (seed 0): the accuracy
  after each attack and the final one, and the points on which they agree;
- Square alone on the same points (those robust after JAX's FAB-T): JAX
  with its own draws vs the reference with seeds 0-4.

``BOUNDS`` (written before the run) decide each row: every per-attack and
final accuracy within 0.5 points of the reference's; Square's JAX accuracy
within the reference seeds' range widened by 0.3 points, and the points
robust for JAX but broken by every reference seed at most 0.3% of those
attacked. Each (model, eps) row is stored in ``rows/`` as it finishes,
with the checksum of the model it measured: a rerun reuses finished rows
and models, and says when a row was measured on another model than its
run folder now holds (retrained, e.g. on another code version: float
rounding changes a training trajectory), adding no diagnostic to it.

A row outside the bounds after APGD-CE or APGD-T also gets a diagnostic
that changes no verdict: APGD's random start, drawn by different
generators on the two sides, measured as the accuracy after each APGD
attack over seeds 0-9 on each side; the difference of the seed means with
Welch's 95% interval "explains" the failed check when it lies within the
0.5-point bound (the two implementations agree in distribution and seed 0
fell apart by chance); and APGD-CE once more with the reference's own
seed-0 starts recorded and replayed in JAX: the same points fooled when
the two differ only by their generators (``agreement_diagnostics``).
"""

import os
import sys
import time
from typing import Optional

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import config_flags  # pylint: disable=g-import-not-at-top
import agreement_diagnostics  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
import numpy as np

from uta_jax import auto_attack
from uta_jax import checkpointing
from uta_jax import classifier
from uta_jax import data
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import runs
from uta_jax import torch_bridge

flags.DEFINE_integer('num_examples', 1000, 'first N test points')
flags.DEFINE_list('eps_test', ['0.1', '0.2'], 'AutoAttack radii')
flags.DEFINE_list('models', None, 'subset of the models (default: all)')

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
    # catastrophic_overfitting.py's quick FGSM-AT run (seed 0 collapses).
    'fmnist_lenet_fgsm_at_collapsed': ('fashion_mnist', dict(
        attack='fgsm', eps_train=0.2, epochs=15, max_eval_examples=500,
        eval_pgd_restarts=1)),
}
ATTACKS = auto_attack.JAX_ATTACKS['standard']
SQUARE_SEEDS = (0, 1, 2, 3, 4)
# Written before the run: what "agrees with the reference" means.
BOUNDS = {'accuracy_points': 0.5,  # per attack and final, JAX - reference
          'square_range_points': 0.3,  # beyond the reference seeds' range
          'square_jax_only_share': 0.003}  # of the points Square attacks


def reference_square(module, x, y, eps: float, seed: int, device,
                     batch_size: int = 500) -> np.ndarray:
  """Robust (bool [n]) after the reference Square Attack with AutoAttack's
  standard settings and ``seed``, in AutoAttack's batches (it reseeds per
  batch)."""
  from pyautoattack.square import SquareAttack  # pylint: disable=g-import-not-at-top
  torch = torch_bridge.require_torch()
  attack = SquareAttack(module, p_init=.8, n_queries=5000, eps=eps,
                        norm='Linf', n_restarts=1, seed=seed, verbose=False,
                        device=device, resc_schedule=False)
  robust = []
  for start in range(0, len(y), batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    x_adv = attack.perturb(xb, yb)
    with torch.no_grad():
      robust.append((module(x_adv).argmax(1) == yb).cpu().numpy())
  return np.concatenate(robust) if robust else np.zeros(0, bool)


def reference_inputs(run, ensemble: bool, images: np.ndarray,
                     labels: np.ndarray):
  """(module, x, y, device): the run's model through the bridge, and
  ``images`` [N, H, W, C] with ``labels`` [N] as the reference's NCHW
  tensors on its device."""
  module = torch_bridge.bridge_module(
      lambda v, x: classifier.predict_logits(run.model, v, x,
                                             ensemble=ensemble),
      run.variables)
  torch = torch_bridge.require_torch()
  device = torch_bridge.torch_device()
  x = torch.from_numpy(np.ascontiguousarray(
      data.to_float(images).transpose(0, 3, 1, 2))).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  return module, x, y, device


def compare(name: str, workdir: str, eps: float) -> dict:
  """One (model, eps) row: both backends' standard version, then Square
  alone on the points robust after JAX's FAB-T."""
  run = runs.load_run(workdir)
  ds = data.load_dataset(run.config.dataset, data_dir=run.config.data_dir,
                         max_eval_examples=FLAGS.num_examples)
  ensemble = classifier.is_ensemble(run.config)
  reports, seconds = {}, {}
  for backend in ('jax', 'torch'):
    start = time.time()
    reports[backend] = auto_attack.evaluate(
        run.model, run.variables, ds.test, eps=eps, version='standard',
        backend=backend, ensemble=ensemble,
        stop_requested=sweep.stop_requested)
    seconds[backend] = time.time() - start
  jax_r, ref = reports['jax'], reports['torch']
  # The reference stops logging once no point is left: later attacks keep
  # the last accuracy.
  ref['per_attack'] = {a: ref['per_attack'].get(a, ref['robust_accuracy'])
                       for a in ATTACKS}
  n = len(ds.test)
  attacked = np.flatnonzero(jax_r['robust_points_after']['fab-t'])
  jax_square = jax_r['robust_points_after']['square'][attacked]
  module, x, y, device = reference_inputs(
      run, ensemble, ds.test.images[attacked], ds.test.labels[attacked])
  start = time.time()
  ref_square = np.stack([reference_square(module, x, y, eps, s, device)
                         for s in SQUARE_SEEDS])  # [seeds, attacked]
  seconds['square_reference'] = time.time() - start
  row = {
      'model': name, 'model_checksum': checkpointing.tree_checksum(
          run.variables), 'dataset': run.config.dataset,
      'model_arch': run.config.model.name,
      'attack_train': run.config.attack.name,
      'eps_train': run.config.attack.eps_train, 'eps': eps,
      'num_examples': n, 'clean_accuracy': jax_r['clean_accuracy'],
      'reference_clean_accuracy': ref['clean_accuracy'],
      'jax_per_attack': jax_r['per_attack'],
      'reference_per_attack': ref['per_attack'],
      'jax_robust_accuracy': jax_r['robust_accuracy'],
      'reference_robust_accuracy': ref['robust_accuracy'],
      'same_verdict': float(np.mean(jax_r['robust_points'] ==
                                    ref['robust_points'])),
      'square_attacked': int(len(attacked)),
      'square_jax_accuracy': 100.0 * float(jax_square.sum()) / n,
      'square_reference_accuracy': [100.0 * float(r.sum()) / n
                                    for r in ref_square],
      'square_jax_only_robust': int(np.sum(jax_square &
                                           ~ref_square.any(0))),
      'jax_seconds': seconds['jax'], 'reference_seconds': seconds['torch'],
      'square_reference_seconds': seconds['square_reference'],
  }
  row['checks'] = checks(row)
  return row


def checks(row: dict) -> dict:
  """``BOUNDS`` applied to one row: a bool per check."""
  tol = BOUNDS['accuracy_points'] + 1e-9
  out = {f'{a}_within': abs(row['jax_per_attack'][a] -
                            row['reference_per_attack'][a]) <= tol
         for a in ATTACKS}
  out['final_within'] = abs(row['jax_robust_accuracy'] -
                            row['reference_robust_accuracy']) <= tol
  ref = row['square_reference_accuracy']
  widen = BOUNDS['square_range_points'] + 1e-9
  out['square_in_seed_range'] = (min(ref) - widen <= row['square_jax_accuracy']
                                 <= max(ref) + widen)
  out['square_jax_only_few'] = (row['square_jax_only_robust'] <=
                                BOUNDS['square_jax_only_share'] *
                                row['square_attacked'])
  return out


def apgd_failed(row: dict) -> bool:
  """Whether the row is outside the bounds after APGD-CE or APGD-T."""
  return not all(row['checks'][f'{a}_within']
                 for a in agreement_diagnostics.APGD_ATTACKS)


def stored_row(path: str, num_examples: int):
  """A finished row of an earlier run on as many points, else None."""
  if not os.path.exists(path):
    return None
  row = reporting.read_json(path)
  return row if row.get('num_examples') == num_examples else None


def other_model(row: dict, checksum: str) -> Optional[str]:
  """Why a stored row may not describe the model now in its run folder
  (retrained since: float rounding of another code version changes the
  trajectory), or None when its recorded checksum is this model's."""
  recorded = row.get('model_checksum')
  if recorded == checksum:
    return None
  if recorded is None:
    return ('measured before rows recorded their model: it may be another '
            'training of the run')
  return 'measured on another model than the run now holds (retrained?)'


def add_diagnostics(name: str, run: runs.Run, eps: float, row: dict,
                    path: str) -> None:
  """``agreement_diagnostics``' random-start spread and replay, each stored
  in the row (at ``path``) as it finishes."""
  split = data.load_dataset(run.config.dataset, data_dir=run.config.data_dir,
                            max_eval_examples=FLAGS.num_examples).test
  seeds = agreement_diagnostics.APGD_SEEDS
  if 'apgd_seed_spread' not in row:
    print(f'{name} eps={eps:g} is outside the bounds after APGD: its '
          f'random start over seeds {seeds[0]}-{seeds[-1]}', flush=True)
    row['apgd_seed_spread'] = agreement_diagnostics.apgd_seed_spread(
        run, split, eps, BOUNDS['accuracy_points'], sweep.stop_requested)
    reporting.write_json(path, row)
    sweep.exit_if_stopped()
  if 'apgd_replayed' not in row:
    reference = reference_inputs(run, classifier.is_ensemble(run.config),
                                 split.images, split.labels)
    row['apgd_replayed'] = agreement_diagnostics.apgd_replayed(
        run, split, eps, reference)
    reporting.write_json(path, row)


def markdown(payload: dict) -> str:
  rows = payload['rows']
  acc = lambda r, a: (f"{r['jax_per_attack'][a]:.1f} / "
                      f"{r['reference_per_attack'][a]:.1f}")
  table = [[r['model'], f"{r['eps']:g}", f"{r['clean_accuracy']:.1f}"] +
           [acc(r, a) for a in ATTACKS] +
           [f"{r['jax_robust_accuracy'] - r['reference_robust_accuracy']:+.1f}",
            f"{100 * r['same_verdict']:.1f}%",
            f"{r['jax_seconds']:.0f} / {r['reference_seconds']:.0f}",
            'yes' if all(r['checks'].values()) else
            'no: ' + ', '.join(k for k, v in r['checks'].items() if not v)]
           for r in rows]
  square = [[r['model'], f"{r['eps']:g}", r['square_attacked'],
             f"{r['square_jax_accuracy']:.1f}",
             f"{min(r['square_reference_accuracy']):.1f} - "
             f"{max(r['square_reference_accuracy']):.1f}",
             r['square_jax_only_robust'],
             'yes' if (r['checks']['square_in_seed_range'] and
                       r['checks']['square_jax_only_few']) else 'no']
            for r in rows]
  n = rows[0]['num_examples']
  held = sum(all(r['checks'].values()) for r in rows)
  return (
      f'The standard AutoAttack on the first {n} test points: robust '
      'accuracy (%) after each attack, JAX (`uta_jax`) / the reference '
      '`pyautoattack` through the bridge (seed 0); times are wall seconds on '
      "this run's machine, JAX's including compilation. Within bounds: "
      f"every accuracy within {BOUNDS['accuracy_points']} points of the "
      f'reference and Square as below ({held} of {len(rows)} rows).\n\n' +
      reporting.markdown_table(
          ['model', 'eps', 'clean', 'APGD-CE', 'APGD-T', 'FAB-T', 'Square',
           'final JAX - ref.', 'same verdict', 'JAX / ref. s',
           'within bounds'], table) +
      '\nSquare alone on the same points (those robust after JAX\'s FAB-T): '
      'robust accuracy (% of all points) with JAX\'s own draws vs the '
      f'reference with seeds {SQUARE_SEEDS[0]}-{SQUARE_SEEDS[-1]}; '
      '"JAX only" counts points robust for JAX but broken by every '
      f"reference seed (bound: {100 * BOUNDS['square_jax_only_share']:.1f}% "
      'of those attacked); the JAX accuracy must lie within the seeds\' '
      f"range +- {BOUNDS['square_range_points']} points.\n\n" +
      reporting.markdown_table(
          ['model', 'eps', 'attacked', 'JAX', 'reference seeds',
           'JAX only', 'within bounds'], square) +
      agreement_diagnostics.spread_markdown(rows, BOUNDS['accuracy_points']))


def main(argv):
  del argv
  out = sweep.start('autoattack_agreement', unused=sweep.SELECTION_FLAGS)
  eps_values = cli.parse_floats(FLAGS.eps_test, 'eps_test')
  for e in eps_values:
    if not 0 < e <= 1:
      cli.fail(f'--eps_test {e} is outside (0, 1]')
  names = FLAGS.models or list(MODELS)
  for name in names:
    if name not in MODELS:
      cli.fail(f'unknown model {name!r}; choose from {list(MODELS)}')
  try:
    torch_bridge.require_torch().set_num_threads(1)
    rows = []
    seeds = sweep.seeds((0,))
    cells = [(seed, name, sweep.config(*MODELS[name], seed),
              sweep.seed_dir(os.path.join(out, 'runs', name), seed))
             for seed in seeds for name in names]
    sweep.train_all([(config, workdir) for _, _, config, workdir in cells])
    os.makedirs(os.path.join(out, 'rows'), exist_ok=True)
    for seed, name, _, workdir in cells:
      run = runs.load_run(workdir)
      checksum = checkpointing.tree_checksum(run.variables)
      for e in eps_values:
        path = os.path.join(out, 'rows', f'{name}_seed{seed}_eps{e:g}.json')
        row = stored_row(path, FLAGS.num_examples)
        if row is None:
          row = dict(compare(name, workdir, e), seed=seed)
          reporting.write_json(path, row)
        sweep.exit_if_stopped()
        why = other_model(row, checksum)
        if why is not None:
          # Diagnostics added now would describe another model than the
          # row's numbers; delete the row's file to measure this model.
          print(f'{name} eps={e:g}: the stored row was {why}; reused as '
                f'measured, no diagnostic added ({path})', flush=True)
        elif apgd_failed(row):
          add_diagnostics(name, run, e, row, path)
        print(f"{name} eps={e:g}: final JAX {row['jax_robust_accuracy']:.1f}"
              f"% vs reference {row['reference_robust_accuracy']:.1f}%; "
              f"within bounds: {all(row['checks'].values())}", flush=True)
        rows.append(row)
  except parallel.Stopped:
    sweep.exit_if_stopped()
    raise
  except sweep.USER_ERRORS as e:
    cli.fail(config_flags.message(e))
  sweep.write_outputs(out, 'autoattack_agreement', markdown=markdown,
                      payload={'rows': rows, 'num_examples': FLAGS.num_examples,
                               'eps': eps_values, 'seeds': seeds,
                               'bounds': BOUNDS})


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
