"""APGD's random-start diagnostic of ``autoattack_agreement.py``.

For a row outside the bounds after APGD-CE or APGD-T (it changes no
verdict): the two sides draw their random starts from different
generators, so (1) APGD-CE then APGD-T with seeds 0-9 on each side, and the
difference of the seed means with Welch's 95% interval ("explained" when
every interval lies within the accuracy bound); (2) APGD-CE once more with
the reference's own seed-0 starts recorded and replayed in JAX: the same
points fooled when the two differ only by their generators.
"""

from typing import Callable, Optional

import jax
import numpy as np

from uta_jax import apgd
from uta_jax import auto_attack
from uta_jax import classifier
from uta_jax import data
from uta_jax import evaluation
from uta_jax import reporting
from uta_jax import runs
from uta_jax import stats

APGD_ATTACKS = auto_attack.JAX_ATTACKS['apgd']
APGD_SEEDS = tuple(range(10))  # the random-start diagnostic's seeds
REPLAY_BATCH = 250  # JAX's batch when replaying the reference's starts


def spread_summary(accuracy: dict, bound: float) -> dict:
  """The random-start diagnostic from ``accuracy[side][attack]`` (per-seed
  accuracies, side 'jax' or 'reference'): per attack the difference of the
  seed means, JAX - reference, with Welch's 95% interval (the sides draw
  independent starts: nothing is paired), and whether every interval lies
  within +-``bound`` points."""
  bound += 1e-9
  difference = {}
  for attack in accuracy['jax']:
    est = stats.unpaired_difference(accuracy['jax'][attack],
                                    accuracy['reference'][attack])
    difference[attack] = {'effect': est.effect, 'lo': est.lo, 'hi': est.hi}
  return {'difference': difference,
          'explained': all(-bound <= d['lo'] and d['hi'] <= bound
                           for d in difference.values())}


def apgd_seed_spread(run: runs.Run, split: data.Split, eps: float,
                     bound: float,
                     stop_requested: Optional[Callable[[], bool]] = None
                     ) -> dict:
  """APGD-CE then APGD-T (AutoAttack's 'apgd' version) on both sides with
  each of ``APGD_SEEDS`` on the row's points: the accuracy (%) after each
  attack per seed, and ``spread_summary`` of them."""
  accuracy = {side: {a: [] for a in APGD_ATTACKS}
              for side in ('jax', 'reference')}
  for seed in APGD_SEEDS:
    for side, backend in (('jax', 'jax'), ('reference', 'torch')):
      report = auto_attack.evaluate(
          run.model, run.variables, split, eps=eps, version='apgd',
          backend=backend, ensemble=classifier.is_ensemble(run.config),
          seed=seed, stop_requested=stop_requested)
      for a in APGD_ATTACKS:  # the reference stops logging at 0 points
        accuracy[side][a].append(report['per_attack'].get(
            a, report['robust_accuracy']))
    print(f'  APGD seed {seed}: JAX {accuracy["jax"]["apgd-ce"][-1]:.1f}, '
          f'reference {accuracy["reference"]["apgd-ce"][-1]:.1f} after '
          'APGD-CE', flush=True)
  return dict(spread_summary(accuracy, bound), seeds=list(APGD_SEEDS),
              accuracy=accuracy)


def apgd_replayed(run: runs.Run, split: data.Split, eps: float,
                  reference) -> dict:
  """APGD-CE with the reference's own random starts (seed 0, AutoAttack's
  batches), recorded by ``auto_attack.reference_apgd_ce`` on ``reference``
  (module, x, y, device: the run's model through the bridge and the
  split's tensors) and replayed by JAX's ``apgd.apgd_ce``: the accuracy
  (%) after it on each side and the share of points with the same verdict.
  Equal when the two differ only by their generators."""
  module, x, y, device = reference
  ref_robust, noise = auto_attack.reference_apgd_ce(module, x, y, eps=eps,
                                                    device=device)
  images = data.to_float(split.images)  # [N, H, W, C]
  logits_fn, _ = evaluation.logits_fns(run.model, run.variables,
                                       classifier.is_ensemble(run.config))
  attack = jax.jit(lambda x, y, t: apgd.apgd_ce(
      logits_fn, x, y, eps=eps, key=jax.random.key(0), noise=t)[0])
  attacked = np.abs(noise).reshape(len(noise), -1).max(1) > 0
  robust = np.zeros(len(split), bool)
  noise = noise.transpose(0, 2, 3, 1)  # NHWC
  for start in range(0, len(split), REPLAY_BATCH):
    idx = np.arange(start, min(start + REPLAY_BATCH, len(split)))
    robust[idx] = np.asarray(attack(images[idx], split.labels[idx],
                                    noise[idx]))
  robust &= attacked  # points wrong when clean are not attacked
  return {'jax': 100.0 * float(robust.mean()),
          'reference': 100.0 * float(ref_robust.mean()),
          'same_verdict': float(np.mean(robust == ref_robust)),
          'attacked': int(attacked.sum())}


def spread_markdown(rows, bound: float) -> str:
  """The random-start diagnostic of the rows that have one ('' if none)."""
  def seeds(values):
    return (f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} '
            f'[{min(values):.1f}, {max(values):.1f}]')
  table = []
  for r in rows:
    spread = r.get('apgd_seed_spread')
    for a in APGD_ATTACKS if spread else ():
      d = spread['difference'][a]
      table.append([r['model'], f"{r['eps']:g}", a.upper(),
                    seeds(spread['accuracy']['jax'][a]),
                    seeds(spread['accuracy']['reference'][a]),
                    f"{d['effect']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]",
                    'yes' if spread['explained'] else 'no'])
  replayed = [[r['model'], f"{r['eps']:g}", r['apgd_replayed']['attacked'],
               f"{r['apgd_replayed']['jax']:.1f}",
               f"{r['apgd_replayed']['reference']:.1f}",
               f"{100 * r['apgd_replayed']['same_verdict']:.1f}%"]
              for r in rows if 'apgd_replayed' in r]
  if not table:
    return ''
  return (
      "\nAPGD's random start, for the rows outside the bounds after APGD-CE "
      'or APGD-T (a diagnostic: it changes no verdict above): the accuracy '
      f'(%) after each attack over seeds {APGD_SEEDS[0]}-{APGD_SEEDS[-1]} '
      'on each side, mean ± sd [min, max], and the difference of the means, '
      "JAX - reference, with Welch's 95% interval; explained when every "
      f'interval lies within ±{bound} points.\n\n' +
      reporting.markdown_table(
          ['model', 'eps', 'attack', 'JAX seeds', 'reference seeds',
           'difference [95%]', 'explained'], table) +
      ('' if not replayed else
       "\nAPGD-CE with the reference's own random starts (seed 0, recorded "
       'and replayed in JAX): the accuracy (%) after it on each side and '
       'the points with the same verdict.\n\n' + reporting.markdown_table(
           ['model', 'eps', 'attacked', 'JAX (replayed)', 'reference',
            'same verdict'], replayed)))
