"""The paper's non-isotropic 2D two-class data set (§4.1, Fig. 1) and the
measurements its experiments make.

Two regions with very different distances between the classes: on the left
(the *near* region) the classes lie ``near_gap`` apart, on the right (the
*far* region) ``far_gap`` apart. An eps between the two gaps breaks AT-Asm
only in the near region, which is the setting where PGD-AT and UTA-AT
differ. Points are float32 [N, 2] (no pixel box: attacks use
``bounds=None``); every point records the region it was drawn in.

Shapes (the paper draws the set, Fig. 1, without a generative description):
``strips``, x uniform along each region and the classes ``gap`` apart in y
with a Gaussian ``spread`` across it; ``blobs``, one isotropic Gaussian of
sd ``spread`` per class and region, centred where the strip is.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

NEAR_GAP = 0.3
FAR_GAP = 3.0
SHAPES = ('strips', 'blobs')
SPLITS = ('train', 'test')
REGION_X = {'near': (-3.0, -0.5), 'far': (0.5, 3.0)}  # x-range of strips
NEAR_CENTRE_X = float(np.mean(REGION_X['near']))
STRIP_SPREAD = 0.05  # the strips' default spread across the gap


def default_spread(shape: str, gap: float) -> float:
  """A region's spread when none is given: the strips' 0.05; a quarter of
  the gap for blobs (2 sd from a cluster's centre to the middle line)."""
  return STRIP_SPREAD if shape == 'strips' else gap / 4


def make_toy2d(num: int, *, seed: int, split: str = 'train',
               near_gap: float = NEAR_GAP, far_gap: float = FAR_GAP,
               near_spread: Optional[float] = None,
               far_spread: Optional[float] = None, shape: str = 'strips'
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``num`` points [num, 2], labels [num] (0 above, 1 below the x-axis) and
  whether each was drawn in the near region [num] (bool).

  Each (seed, split) draws from its own random stream, so a seed's test set
  is independent of its training set and of every other seed's sets.
  """
  if shape not in SHAPES:
    raise ValueError(f'unknown toy shape {shape!r}; choose one of {SHAPES}')
  if split not in SPLITS:
    raise ValueError(f'unknown toy split {split!r}; choose one of {SPLITS}')
  spreads = {'near': near_spread, 'far': far_spread}
  gaps = {'near': near_gap, 'far': far_gap}
  for region in spreads:
    if spreads[region] is None:
      spreads[region] = default_spread(shape, gaps[region])
    if spreads[region] < 0 or gaps[region] <= 0:
      raise ValueError(f'the {region} region needs a positive gap and a '
                       f'non-negative spread, got {gaps[region]} and '
                       f'{spreads[region]}')
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  labels = rng.integers(0, 2, size=num).astype(np.int32)
  near = rng.random(num) < 0.5
  half_gap = np.where(near, near_gap / 2, far_gap / 2)
  spread = np.where(near, spreads['near'], spreads['far'])
  sign = np.where(labels == 0, 1.0, -1.0)
  if shape == 'strips':
    x = np.where(near, rng.uniform(*REGION_X['near'], num),
                 rng.uniform(*REGION_X['far'], num))
  else:
    centre = np.where(near, NEAR_CENTRE_X, np.mean(REGION_X['far']))
    x = centre + rng.normal(0, 1, num) * spread
  y = sign * half_gap + rng.normal(0, 1, num) * spread
  return np.stack([x, y], axis=1).astype(np.float32), labels, near


def grid(lo: Tuple[float, float], hi: Tuple[float, float],
         resolution: int) -> np.ndarray:
  """Points [resolution**2, 2] of a regular grid, row-major from ``lo``."""
  xs = np.linspace(lo[0], hi[0], resolution, dtype=np.float32)
  ys = np.linspace(lo[1], hi[1], resolution, dtype=np.float32)
  gx, gy = np.meshgrid(xs, ys)
  return np.stack([gx.ravel(), gy.ravel()], axis=1)


def vertical_line(x: float, lo: float, hi: float, num: int) -> np.ndarray:
  """``num`` points [num, 2] on the line through x from y = lo to y = hi."""
  ys = np.linspace(lo, hi, num, dtype=np.float32)
  return np.stack([np.full_like(ys, x), ys], axis=1)


def oscillation_counts(predictions: np.ndarray) -> np.ndarray:
  """How often each point's prediction changed over training (Fig. 1d).

  ``predictions`` [T, G]: the predicted class of G points after each of T
  updates. Returns [G] counts of t with predictions[t] != [t - 1].
  """
  predictions = np.asarray(predictions)
  return np.sum(predictions[1:] != predictions[:-1], axis=0)


def crossing_fraction(labels: np.ndarray, clean_pred: np.ndarray,
                      *adv_preds: np.ndarray) -> float:
  """Among the points classified correctly when clean, the fraction that
  every one of ``adv_preds`` misclassifies (§4.3's "crossing the decision
  boundary"; pass the predictions after K and K + 1 steps to count only
  points that stay across, not those oscillating on the boundary).
  Measured against the label, so moving a misclassified point back is no
  crossing. 0 when no point is classified correctly."""
  labels, clean_pred = np.asarray(labels), np.asarray(clean_pred)
  if not adv_preds:
    raise ValueError('crossing_fraction needs the perturbed predictions')
  correct = clean_pred == labels
  if not correct.any():
    return 0.0
  crossed = correct.copy()
  for pred in adv_preds:
    crossed &= np.asarray(pred) != labels
  return float(crossed.sum() / correct.sum())


def region_accuracy(near: np.ndarray, labels: np.ndarray,
                    predictions: np.ndarray) -> dict:
  """Accuracy in % in the near and the far region (``near``: each point's
  region as drawn, from ``make_toy2d``)."""
  near = np.asarray(near, bool)
  correct = np.asarray(predictions) == np.asarray(labels)
  return {'near': 100 * float(np.mean(correct[near])),
          'far': 100 * float(np.mean(correct[~near]))}


def boundary_offset(ys: Sequence[float], prob_below: np.ndarray) -> float:
  """Where a vertical line crosses the decision boundary: the y nearest 0
  at which the probability of class 1 (below) falls through 1/2, linearly
  interpolated. Past the line's end when the line lies in one class (its
  last y when all of it is class 1, its first when all is class 0)."""
  ys = np.asarray(ys, np.float64)
  p = np.asarray(prob_below, np.float64) - 0.5  # [L], ys increasing
  sign_change = np.nonzero(np.signbit(p[:-1]) != np.signbit(p[1:]))[0]
  if not len(sign_change):
    return float(ys[-1] if p[0] > 0 else ys[0])
  crossings = [ys[i] + (ys[i + 1] - ys[i]) * p[i] / (p[i] - p[i + 1])
               for i in sign_change]
  return float(min(crossings, key=abs))
