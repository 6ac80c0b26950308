"""The paper's non-isotropic 2D two-class data set (§4.1, Fig. 1).

Two regions with very different distances between the classes: on the left
the classes lie ``near_gap`` apart, on the right ``far_gap`` apart. An eps
between the two gaps breaks AT-Asm only in the left region, which is the
setting where PGD-AT and UTA-AT differ. Points are float32 [N, 2] (no pixel
box: attacks on them use ``bounds=None``).

Shapes: ``strips`` (the paper's: x uniform along each region, the classes
``gap`` apart in y with a little noise) and ``blobs`` (one isotropic
Gaussian per class and region, centred where the strip is, with a standard
deviation of a quarter of the region's gap, so the classes stay separable).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

NEAR_GAP = 0.3
FAR_GAP = 3.0
SHAPES = ('strips', 'blobs')
REGION_X = {'left': (-3.0, -0.5), 'right': (0.5, 3.0)}  # x-range of strips


def grid(lo: Tuple[float, float], hi: Tuple[float, float],
         resolution: int) -> np.ndarray:
  """Points [resolution**2, 2] of a regular grid, row-major from ``lo``."""
  xs = np.linspace(lo[0], hi[0], resolution, dtype=np.float32)
  ys = np.linspace(lo[1], hi[1], resolution, dtype=np.float32)
  gx, gy = np.meshgrid(xs, ys)
  return np.stack([gx.ravel(), gy.ravel()], axis=1)


def oscillation_counts(predictions: np.ndarray) -> np.ndarray:
  """How often each point's prediction changed over training (Fig. 1d).

  ``predictions`` [T, G]: the predicted class of G grid points after each
  of T updates. Returns [G] counts of t with predictions[t] != [t - 1].
  """
  predictions = np.asarray(predictions)
  return np.sum(predictions[1:] != predictions[:-1], axis=0)


def crossing_fraction(clean_pred: np.ndarray, adv_pred: np.ndarray) -> float:
  """Fraction of perturbed points whose predicted class flipped (§4.3)."""
  return float(np.mean(np.asarray(clean_pred) != np.asarray(adv_pred)))


def make_toy2d(num: int, *, seed: int, near_gap: float = NEAR_GAP,
               far_gap: float = FAR_GAP, noise: float = 0.05,
               shape: str = 'strips') -> Tuple[np.ndarray, np.ndarray]:
  """``num`` points [num, 2] and labels [num] (0 above, 1 below the x-axis);
  the left region's classes are ``near_gap`` apart, the right's ``far_gap``."""
  if shape not in SHAPES:
    raise ValueError(f'unknown toy shape {shape!r}; choose one of {SHAPES}')
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=num).astype(np.int32)
  left = rng.random(num) < 0.5
  half_gap = np.where(left, near_gap / 2, far_gap / 2)
  sign = np.where(labels == 0, 1.0, -1.0)
  if shape == 'strips':
    x = np.where(left, rng.uniform(*REGION_X['left'], num),
                 rng.uniform(*REGION_X['right'], num))
    y = sign * half_gap + rng.normal(0, noise, num)
  else:
    centre = np.where(left, np.mean(REGION_X['left']),
                      np.mean(REGION_X['right']))
    std = half_gap / 2  # a quarter of the gap: 2 std from centre to y = 0
    x = centre + rng.normal(0, 1, num) * std
    y = sign * half_gap + rng.normal(0, 1, num) * std
  return np.stack([x, y], axis=1).astype(np.float32), labels


def region_accuracy(points: np.ndarray, labels: np.ndarray,
                    predictions: np.ndarray) -> dict:
  """Accuracy in % on the left (near) and right (far) region (x < 0, x > 0)."""
  left = np.asarray(points)[:, 0] < 0
  correct = np.asarray(predictions) == np.asarray(labels)
  return {'near': 100 * float(np.mean(correct[left])),
          'far': 100 * float(np.mean(correct[~left]))}
