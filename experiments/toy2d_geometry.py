"""The toy's geometry sweep (beyond the paper, which fixes one geometry):
the near region's gap as a multiple of eps and the cluster shape. Its
datasets, table and heat maps; ``toy2d.py`` runs the cells."""

import functools

import numpy as np

import sweep  # pylint: disable=g-import-not-at-top
from uta_jax import data
from uta_jax import reporting
from uta_jax import toy

# Near-region gap / eps of the geometry sweep: below 2 the near classes are
# closer than 2 eps, so an eps-ball around a point reaches past the middle.
RATIOS = (0.4, 0.6, 1.0, 2.0, 3.0)
RESOLUTION = 60  # grid of the oscillation count in the sweep
_values = reporting.values_at


def dataset(shape: str, ratio: float, seed: int, *,
            eps: float) -> data.Dataset:
  """The toy with the near gap ``ratio * eps`` and clusters of ``shape``."""
  make = functools.partial(toy.make_toy2d, near_gap=ratio * eps,
                           shape=shape)
  return data.Dataset(
      'toy2d', data.Split(*make(data.TOY_TRAIN_SIZE, seed=seed)),
      data.Split(*make(data.TOY_TEST_SIZE, seed=seed + 1)),
      data.NUM_CLASSES['toy2d'], f'toy2d {shape}, near gap {ratio:g} eps')


def markdown(payload: dict, kept_points: float) -> str:
  """The sweep's table and where each training keeps the near region's
  clean accuracy (within ``kept_points`` of standard training)."""
  cells = payload.get('geometry')
  if not cells:
    return ''
  ms = reporting.format_mean_std
  rows, kept = [], []
  for (shape, ratio), rs in reporting.group_rows(cells, 'shape',
                                                 'ratio').items():
    near = lambda m: _values(rs, 'training', m, 'region_accuracy', 'near')
    standard = _values(rs, 'attack', 'region_accuracy_fixed', 'near')
    keeps = {m: reporting.mean_std(near(m))['mean'] >=
                reporting.mean_std(standard)['mean'] - kept_points
             for m in ('pgd', 'uta')}
    kept.append((shape, ratio, keeps))
    rows.append([
        shape, f'{ratio:g}',
        ms([100 * c for c in _values(rs, 'attack', 'crossing', 'pgd_20')]),
        ms([100 * c for c in _values(rs, 'attack', 'crossing',
                                     'uta_single_20')]),
        ms(standard), ms(near('pgd')), ms(near('uta')),
        ms(_values(rs, 'training', 'pgd', 'region_accuracy', 'far')),
        ms(_values(rs, 'training', 'uta', 'region_accuracy', 'far')),
        ms(_values(rs, 'training', 'pgd', 'mean_oscillations'), 2),
        ms(_values(rs, 'training', 'uta', 'mean_oscillations'), 2),
        '/'.join('yes' if keeps[m] else 'no' for m in ('pgd', 'uta')),
        len(rs)])
  table = reporting.markdown_table(
      ['shape', 'near gap / eps', 'crossing PGD-20 (%)', 'crossing UTA-20',
       'near clean: standard', 'near: PGD-AT', 'near: UTA-AT',
       'far: PGD-AT', 'far: UTA-AT', 'oscillations PGD-AT', 'UTA-AT',
       'near kept PGD/UTA', 'seeds'], rows)
  where = lambda m, ok: ', '.join(f'{s} {r:g}' for s, r, k in kept
                                  if k[m] == ok) or 'none'
  return (f"\n### Geometry sweep (beyond the paper): eps {payload['eps']:g}, "
          'near gap = ratio x eps, far gap 3.0; single-model attacks; mean ± '
          'std over seeds\n\n' + table +
          f'\n"Kept" = near-region clean accuracy within {kept_points:g} '
          'points of standard training (seed means).\n\n'
          f"- UTA-AT keeps it at (shape ratio): {where('uta', True)}; "
          f"not at: {where('uta', False)}.\n"
          f"- PGD-AT keeps it at: {where('pgd', True)}; not at: "
          f"{where('pgd', False)}.\n")


def figure(payload: dict):
  """Heat maps over (shape, near gap / eps), seed means: crossing, near
  region clean accuracy and oscillations, PGD beside UTA."""
  plt = sweep.pyplot()
  cells = reporting.group_rows(payload['geometry'], 'shape', 'ratio')
  shapes = list(dict.fromkeys(s for s, _ in cells))
  ratios = list(dict.fromkeys(r for _, r in cells))
  panels = (('crossing, 20 steps (%)', lambda rs, m: 100 * np.mean(_values(
                rs, 'attack', 'crossing', f'{m}_20')), ('pgd', 'uta_single')),
            ('near-region clean accuracy (%)', lambda rs, m: np.mean(_values(
                rs, 'training', m, 'region_accuracy', 'near')),
             ('pgd', 'uta')),
            ('mean prediction changes', lambda rs, m: np.mean(_values(
                rs, 'training', m, 'mean_oscillations')), ('pgd', 'uta')))
  fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.2 * len(panels)),
                           squeeze=False)
  for row, (title, value, methods) in enumerate(panels):
    maps = [np.array([[value(cells[(s, r)], m) if (s, r) in cells else np.nan
                       for r in ratios] for s in shapes]) for m in methods]
    lo, hi = np.nanmin(maps), np.nanmax(maps)
    for col, (m, grid) in enumerate(zip(methods, maps)):
      ax = axes[row, col]
      shown = ax.imshow(grid, cmap='viridis', vmin=lo, vmax=hi,
                        aspect='auto')
      for i in range(len(shapes)):
        for j in range(len(ratios)):
          ax.text(j, i, f'{grid[i, j]:.1f}', ha='center', va='center',
                  color='w', fontsize=8)
      ax.set(xticks=range(len(ratios)), xticklabels=[f'{r:g}' for r in ratios],
             yticks=range(len(shapes)), yticklabels=shapes,
             xlabel='near gap / eps',
             title=f"{m.split('_')[0].upper()}{'-AT' if row else ''}: {title}")
      fig.colorbar(shown, ax=ax)
  fig.tight_layout()
  return fig
