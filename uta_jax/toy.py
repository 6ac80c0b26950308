"""The paper's non-isotropic 2D two-class data set (§4.1, Fig. 1).

Two regions with very different distances between the classes: on the left
the classes lie ``near_gap`` apart, on the right ``far_gap`` apart. An eps
between the two gaps breaks AT-Asm only in the left region, which is the
setting where PGD-AT and UTA-AT differ. Points are float32 [N, 2] (no pixel
box: attacks on them use ``bounds=None``).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

NEAR_GAP = 0.3
FAR_GAP = 3.0


def make_toy2d(num: int, *, seed: int, near_gap: float = NEAR_GAP,
               far_gap: float = FAR_GAP, noise: float = 0.05
              ) -> Tuple[np.ndarray, np.ndarray]:
  """``num`` points [num, 2] and labels [num] (0 above, 1 below the x-axis)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=num).astype(np.int32)
  left = rng.random(num) < 0.5
  x = np.where(left, rng.uniform(-3.0, -0.5, num), rng.uniform(0.5, 3.0, num))
  half_gap = np.where(left, near_gap / 2, far_gap / 2)
  y = np.where(labels == 0, half_gap, -half_gap) + rng.normal(0, noise, num)
  return np.stack([x, y], axis=1).astype(np.float32), labels
