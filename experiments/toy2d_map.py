r"""The 2D toy settled by a map (beyond the paper, which shows one geometry):
where does adversarial training keep the near region, as eps grows past the
near gap and the near clusters widen?

  python experiments/toy2d_map.py                   # strips and blobs, 5 seeds
  python experiments/toy2d_map.py --shapes=strips --seeds=0,1

At fixed data (near gap 0.3, far gap 3.0 with far clusters of spread 0.1,
so no eps of the map reaches the far boundary), per cell of
x = eps / gap in RATIOS (label-keeping up to 0.5, violating beyond) and
y = near spread / gap in SPREADS, and per seed (paired: one data draw and
initialisation per seed): standard training, PGD-AT and UTA-AT with
K = max(15, ceil(1.25 eps / alpha)) steps of alpha = 0.05
(``toy_runs.attack_steps``: every eps is reached). Measured per training
(``toy_runs.track_training``): near and far test accuracy averaged over the
last quarter of training, the near boundary's offset on the line through
the near region's centre, prediction changes per region over the last
half; on the standard model, the persistent crossing of PGD and UTA at the
cell's eps.

Rules, written before the runs (``verdicts``); "keeps" = near accuracy
within KEPT points of standard training, "performs poorly" = POOR points
below it, each decided by the ``uta_jax.stats`` interval over the seeds:
1. comparative: UTA-AT's keep-frontier lies further out than PGD-AT's in
   every spread row;
2. strong: a large eps never hurts UTA-AT (it keeps at every cell);
3. PGD-AT performs poorly wherever eps is at least the gap;
4. an analysis predicts the frontiers: UTA-AT keeps up to
   eps / gap = 1 - 2 spread / gap, PGD-AT up to 1/2 - 2 spread / gap.
Writes toy2d_map.md / .json / .png into the toy's folder (results/toy2d_*).
"""

import functools
import math
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import sweep  # pylint: disable=g-import-not-at-top
from uta_jax import claims
from uta_jax import config_json
from uta_jax import reporting
from uta_jax import stats
from uta_jax import toy
from uta_jax import toy_runs

RATIOS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # eps / near gap
SPREADS = (1 / 16, 1 / 8, 1 / 6, 1 / 4)  # near spread / near gap
GAP = toy.NEAR_GAP
FAR_SPREAD = 0.1
ALPHA = 0.05
KEPT = 3.0  # points: "keeps the clean accuracy of standard training"
POOR = 20.0  # points: "performs poorly"
METHODS = ('pgd', 'uta')
NAMES = {'standard': 'standard training', 'pgd': 'PGD-AT', 'uta': 'UTA-AT'}
PRESETS = {
    'quick': dict(seeds=(0, 1, 2, 3, 4), shapes=toy.SHAPES),
    'paper': dict(seeds=(0, 1, 2, 3, 4), shapes=toy.SHAPES),
}

flags.DEFINE_list('shapes', None, f'subset of {",".join(toy.SHAPES)}; '
                  'default: the preset\'s')
flags.DEFINE_list('ratios', None, 'eps / near gap of the map; default '
                  + ','.join(f'{r:g}' for r in RATIOS))
flags.DEFINE_list('spreads', None, 'near spread / near gap of the map; '
                  'default 1/16,1/8,1/6,1/4')
# --help lists the shared sweep flags (--preset, --seeds, ...) too.
flags.adopt_module_key_flags(sweep)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def _summary(measured: dict) -> dict:
  keep = ('last_quarter', 'offset_last_quarter', 'changes', 'clean_accuracy',
          'region_accuracy', 'updates')
  return {k: measured[k] for k in keep}


def group(shape: str, spread: float, seed: int, ratios) -> list:
  """One (shape, spread, seed): standard training, then PGD-AT and UTA-AT
  at every ratio, and the attacks' crossing on the standard model; rows."""
  geometry = dict(shape=shape, near_gap=GAP, near_spread=spread * GAP,
                  far_spread=FAR_SPREAD)
  ds, near = toy_runs.dataset(seed, **geometry)
  config = lambda **f: sweep.config('toy2d', f, seed)
  model, variables, standard = toy_runs.track_training(
      config(attack='none'), ds, near)
  logits_fn, sample_fn = toy_runs.model_fns(model, variables)
  rows = []
  for ratio in ratios:
    eps = ratio * GAP
    k = toy_runs.attack_steps(eps, ALPHA)
    row = {'shape': shape, 'spread': spread, 'ratio': ratio, 'eps': eps,
           'steps': k, 'seed': seed, 'standard': _summary(standard)}
    for method in METHODS:
      row[method] = _summary(toy_runs.track_training(
          config(attack=method, eps_train=eps, num_steps=k, step_size=ALPHA),
          ds, near)[2])
    crossed = toy_runs.crossings(logits_fn, sample_fn, ds.test.images,
                                 ds.test.labels, eps=eps, alpha=ALPHA,
                                 num_steps=k)
    row['crossing'] = {m: {s: 100 * crossed[m][s] for s in
                           ('one_step', 'k_steps')} for m in METHODS}
    row['near_points'] = int(near.sum())
    rows.append(row)
  return rows


# ---------------------------------------------------------------- analysis


def _near(rows: list, method: str) -> list:
  return [r[method]['last_quarter']['near'] for r in rows]


def keep_estimate(rows: list, method: str) -> stats.Estimate:
  """Near accuracy of ``method`` minus standard training's, paired seeds."""
  return stats.paired_difference(_near(rows, method), _near(rows, 'standard'),
                                 n=min(r['near_points'] for r in rows))


def frontier(cells: dict, method: str) -> tuple:
  """(kept, possible, lost) ratios of one spread row (``cells``: ratio ->
  rows): the largest ratio up to which "keeps" holds at every ratio (0 if
  none), the largest before any cell where it fails (the last if none), and
  the first where it fails (inf if none)."""
  kept, possible, lost, holding = 0.0, 0.0, math.inf, True
  for ratio in sorted(cells):
    outcome = stats.outcome(keep_estimate(cells[ratio], method), '>', -KEPT)
    holding &= outcome == 'holds'
    if holding:
      kept = ratio
    if outcome == 'fails':
      lost = min(lost, ratio)
    if lost == math.inf:
      possible = ratio
  return kept, possible, lost


def predicted(method: str, spread: float) -> float:
  """The analysis's frontier: where an eps-ball around the near cluster's
  inner edge (2 spreads in) reaches the middle (PGD-AT) or the other
  cluster's inner edge (UTA-AT)."""
  return (1.0 if method == 'uta' else 0.5) - 2 * spread


def rows_by(rows: list) -> dict:
  """(shape, spread) -> ratio -> per-seed rows."""
  out = {}
  for row in rows:
    out.setdefault((row['shape'], row['spread']), {}).setdefault(
        row['ratio'], []).append(row)
  return out


def verdicts(rows: list) -> list:
  """The map's four rules (module docstring), per shape."""
  out = []
  by = rows_by(rows)
  for shape in dict.fromkeys(r['shape'] for r in rows):
    spreads = sorted(s for sh, s in by if sh == shape)
    name = f'toy map ({shape})'
    # 1. comparative: frontier(UTA) beyond frontier(PGD) in every row.
    parts, evidence = [], []
    for s in spreads:
      (u_kept, u_possible, u_lost), (p_kept, p_possible, p_lost) = (
          frontier(by[shape, s], m) for m in ('uta', 'pgd'))
      parts.append((s, stats.Estimate(u_kept - p_kept, u_kept - p_possible,
                                      u_possible - p_kept, 0)))
      evidence.append(f'spread {s:.3g}: UTA-AT kept to {u_kept:g} (lost at '
                      f'{u_lost:g}), PGD-AT to {p_kept:g} (lost at '
                      f'{p_lost:g})')
    outcome = ('fails' if any(e.hi <= 0 for _, e in parts) else 'holds'
               if all(e.lo > 0 for _, e in parts) else 'inconclusive')
    s, weakest = min(parts, key=lambda p: p[1].lo)
    out.append(claims.verdict(
        f'{name}: UTA-AT tolerates a larger eps than PGD-AT: its keep-frontier'
        ' lies further out in every spread row (Fig. 1c, §4.3)',
        f'keeps = near accuracy minus standard > -{KEPT:g} (interval); '
        'frontier = last eps / gap kept at every smaller one; holds when '
        'UTA-AT\'s surely-kept frontier lies beyond PGD-AT\'s possibly-kept '
        'one in every row', f'frontier UTA-AT - PGD-AT, eps / gap (spread '
        f'{s:.3g}, the weakest; interval from the undecided cells)', weakest,
        outcome, '; '.join(evidence), digits=2))
    # 2. strong: UTA-AT keeps everywhere.
    cells = [(f'{s:.3g}/{r:g}', 'near(UTA-AT) - near(standard)',
              keep_estimate(by[shape, s][r], 'uta'), '>', -KEPT)
             for s in spreads for r in sorted(by[shape, s])]
    out.append(claims.every(
        f'{name}: a large eps never hurts UTA-AT: it keeps the near region\'s'
        ' clean accuracy at every cell (§4.3)',
        f'near(UTA-AT) - near(standard) > -{KEPT:g} points at every (spread '
        '/ eps) cell', cells))
    # 3. PGD-AT performs poorly where eps >= gap.
    cells = [(f'{s:.3g}/{r:g}', 'near(PGD-AT) - near(standard)',
              keep_estimate(by[shape, s][r], 'pgd'), '<', -POOR)
             for s in spreads for r in sorted(by[shape, s]) if r >= 1]
    if cells:
      out.append(claims.every(
          f'{name}: PGD-AT performs poorly where eps violates AT-Asm (eps >= '
          'the near gap) (§4.3)',
          f'near(PGD-AT) - near(standard) < -{POOR:g} points at every cell '
          'with eps / gap >= 1', cells))
    # 4. the analysis's frontiers.
    checks, evidence = [], []
    ratios = sorted({r for s in spreads for r in by[shape, s]})
    after = lambda kept: next((r for r in ratios if r > kept), math.inf)
    for s in spreads:
      for m in ('uta', 'pgd'):
        kept, _, lost = frontier(by[shape, s], m)
        pred = predicted(m, s)
        consistent = kept <= max(pred, 0.0) < lost
        pinned = lost == after(kept)  # kept, then lost at the next ratio
        checks.append((consistent, pinned))
        evidence.append(f'{s:.3g} {NAMES[m]}: predicted {pred:.2f}, kept to '
                        f'{kept:g}, lost at {lost:g}')
    agree = sum(c for c, _ in checks)
    outcome = ('fails' if agree < len(checks) else 'holds'
               if all(p for _, p in checks) else 'inconclusive')
    out.append(claims.verdict(
        f'{name}: the frontiers follow the analysis: UTA-AT keeps up to eps '
        '/ gap = 1 - 2 spread / gap, PGD-AT up to 1/2 - 2 spread / gap',
        'per spread row and method: kept frontier <= prediction < first '
        'lost ratio; holds when all agree and every frontier is pinned (lost '
        'at the ratio after the last kept), fails when any disagrees',
        f'(row, method) pairs that agree, of {len(checks)}',
        stats.Estimate(agree, agree, agree, 0), outcome,
        '; '.join(evidence), digits=0, signed=False))
  return out


def payload_verdicts(payload: dict) -> list:
  """The verdicts of a stored payload."""
  return verdicts(payload['rows'])


# --------------------------------------------------------------- outputs


def markdown(payload: dict) -> str:
  """Per shape, a table over (spread, eps / gap): seed means."""
  ms = reporting.format_mean_std
  parts = []
  by = rows_by(payload['rows'])
  for shape in dict.fromkeys(s for s, _ in by):
    table = []
    for (sh, s), cells in by.items():
      if sh != shape:
        continue
      for r, rs in sorted(cells.items()):
        table.append([
            f'{s:.3g}', f'{r:g}', f"{rs[0]['eps']:.3g}", rs[0]['steps'],
            ms(_near(rs, 'standard')), ms(_near(rs, 'pgd')),
            ms(_near(rs, 'uta')), keep_estimate(rs, 'pgd').text(),
            keep_estimate(rs, 'uta').text(),
            ms([x['pgd']['last_quarter']['far'] for x in rs]),
            ms([x['uta']['last_quarter']['far'] for x in rs]),
            ms([x['crossing']['pgd']['k_steps'] for x in rs]),
            ms([x['crossing']['uta']['k_steps'] for x in rs]),
            ms([x['pgd']['offset_last_quarter'] / GAP for x in rs], 2),
            ms([x['uta']['offset_last_quarter'] / GAP for x in rs], 2),
            ms([x['pgd']['changes']['near'] for x in rs], 1),
            ms([x['uta']['changes']['near'] for x in rs], 1)])
    parts.append(
        f'### Geometry map, {shape}: near gap {GAP:g}, far gap '
        f'{toy.FAR_GAP:g} (far spread {FAR_SPREAD:g}); mean ± std over seeds '
        f"{payload['seeds']}; near accuracy averaged over the last quarter "
        'of training; differences with their 95% interval\n\n' +
        reporting.markdown_table(
            ['spread / gap', 'eps / gap', 'eps', 'K', 'near: standard',
             'PGD-AT', 'UTA-AT', 'PGD-AT - standard', 'UTA-AT - standard',
             'far: PGD-AT', 'UTA-AT', 'crossing PGD-K (%)', 'UTA-K',
             'boundary offset / gap: PGD-AT', 'UTA-AT',
             'near prediction changes (last half): PGD-AT', 'UTA-AT'],
            table))
  return ('Crossing: the share of the standard model\'s correctly classified '
          'test points that K steps of the attack (and K + 1) carry across '
          'the boundary. Offset: where P = 1/2 on the vertical line through '
          'the near region, in gaps (0: the middle).\n\n' +
          '\n'.join(parts))


def figure(payload: dict):
  """Per shape: near-accuracy heat maps (PGD-AT and UTA-AT minus standard,
  UTA-AT minus PGD-AT) over (eps / gap, spread / gap), seed means, with the
  measured keep-frontiers and the analysis's predictions drawn."""
  plt = sweep.pyplot()
  by = rows_by(payload['rows'])
  shapes = list(dict.fromkeys(s for s, _ in by))
  fig, axes = plt.subplots(len(shapes), 3, figsize=(16, 3.6 * len(shapes)),
                           squeeze=False)
  for row_axes, shape in zip(axes, shapes):
    spreads = sorted(s for sh, s in by if sh == shape)
    ratios = sorted({r for s in spreads for r in by[shape, s]})
    mean = lambda rs, m: float(np.mean(_near(rs, m)))
    panels = (
        ('PGD-AT - standard', lambda rs: mean(rs, 'pgd') -
         mean(rs, 'standard'), 'RdBu', (-60, 60)),
        ('UTA-AT - standard', lambda rs: mean(rs, 'uta') -
         mean(rs, 'standard'), 'RdBu', (-60, 60)),
        ('UTA-AT - PGD-AT', lambda rs: mean(rs, 'uta') - mean(rs, 'pgd'),
         'PuOr', (-60, 60)))
    for ax, (title, value, cmap, (lo, hi)) in zip(row_axes, panels):
      grid = np.array([[value(by[shape, s][r]) for r in ratios]
                       for s in spreads])
      shown = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, origin='lower',
                        aspect='auto')
      for i in range(len(spreads)):
        for j in range(len(ratios)):
          ax.text(j, i, f'{grid[i, j]:+.0f}', ha='center', va='center',
                  fontsize=8)
      index = lambda x: np.interp(x, ratios, range(len(ratios)),
                                  left=-0.5, right=len(ratios) - 0.5)
      for m, color in (('pgd', 'tab:red'), ('uta', 'tab:green')):
        kept = [index(frontier(by[shape, s], m)[0]) + 0.5 if frontier(
            by[shape, s], m)[0] else -0.5 for s in spreads]
        ax.step(kept, range(len(spreads)), where='mid', color=color, lw=2,
                label=f'{NAMES[m]} keeps up to here')
        ax.plot([index(predicted(m, s)) for s in spreads],
                range(len(spreads)), ls=':', marker='x', color=color,
                label=f'{NAMES[m]}: analysis')
      ax.axvline(index(0.5), color='k', lw=0.8, ls='--')
      ax.set(xticks=range(len(ratios)),
             xticklabels=[f'{r:g}' for r in ratios],
             yticks=range(len(spreads)),
             yticklabels=[f'{s:.3g}' for s in spreads],
             xlabel='eps / near gap (dashed: 1/2, AT-Asm\'s limit)',
             ylabel='near spread / gap',
             title=f'{shape}: near accuracy, {title} (points)')
      fig.colorbar(shown, ax=ax)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.suptitle(f"Toy geometry map: mean over seeds {payload['seeds']}, "
               f"{payload['rows'][0]['standard']['updates']} updates per "
               'training; lines: where each method keeps the near region '
               '(measured, solid) and the analysis\'s prediction (dotted)')
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.legend(handles, labels, loc='lower center', ncol=4, fontsize=9)
  return fig


def run(out: str):
  setting = sweep.preset(PRESETS)
  seeds = sweep.seeds(setting['seeds'])
  shapes = FLAGS.shapes or list(setting['shapes'])
  for shape in shapes:
    if shape not in toy.SHAPES:
      cli.fail(f'--shapes: unknown shape {shape!r}; choose from '
               f'{",".join(toy.SHAPES)}')
  ratios = cli.parse_floats(FLAGS.ratios, 'ratios') or list(RATIOS)
  spreads = cli.parse_floats(FLAGS.spreads, 'spreads') or list(SPREADS)
  settings = dict(gap=GAP, far_spread=FAR_SPREAD, alpha=ALPHA,
                  ratios=ratios, config=config_json.to_json(
                      sweep.config('toy2d', {}, 0)))
  rows, seconds = [], 0.0
  for shape in shapes:
    for spread in spreads:
      for seed in seeds:
        result, took = sweep.cached(
            os.path.join(out, 'runs', 'map',
                         f'{shape}_spread{spread:.4g}_seed{seed}.json'),
            dict(settings, shape=shape, spread=spread, seed=seed),
            functools.partial(group, shape, spread, seed, ratios))
        rows += result
        seconds += took
  payload = {'seeds': seeds, 'rows': rows, 'compute_seconds': seconds,
             'settings': settings}
  payload['verdicts'] = payload_verdicts(payload)
  return payload, {'toy2d_map': figure(payload)}


main = sweep.main('toy2d_map', run, markdown=markdown, folder='toy2d',
                  unused=sweep.SELECTION_FLAGS + sweep.NOT_FOR_GENERATED_DATA)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
