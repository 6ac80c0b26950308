"""One statistical rule for every verdict on the paper's claims.

A claim is a statistic measured once per seed (a paired difference such as
clean(UTA-AT) - clean(PGD-AT), both runs of a seed sharing data order and
initialisation; or a single quantity such as clean(PGD-AT) at eps 0.4) and a
side of a threshold it should lie on. ``interval`` gives the seed mean of
the statistic and a 95% interval; ``outcome`` says

* **holds** when the whole interval lies on the claimed side,
* **fails** when the whole interval lies on the other side,
* **inconclusive** otherwise (a tie, or too few seeds or test points to tell).

Why this interval: two independent sources of error move a seed mean.
(1) Training randomness: the seeds differ, estimated by the sample variance
s^2 of the per-seed values (s^2 / S for their mean, with S - 1 degrees of
freedom). (2) The test sample: every seed is evaluated on the *same* n test
points, so their sampling error is shared by all seeds and the seed spread
cannot see it; an accuracy p measured on n points carries the binomial
variance p (1 - p) / n. For a paired difference the two methods' binomial
variances are added, which ignores their (positive) correlation on the same
points and so errs wide. The interval is mean +- t_df * sqrt(s^2 / S + v_test)
with the Welch-Satterthwaite degrees of freedom
df = (s^2 / S + v_test)^2 / ((s^2 / S)^2 / (S - 1)): Student's t over the
seeds when the test set is large, the normal interval when the seeds agree.
A paired bootstrap was rejected: over 3 seeds it resamples 10 distinct
sets and its intervals cover far less than their nominal 95%.
Quantities that are not accuracies on a test sample (oscillation counts on a
grid, perturbation norms) pass ``test_variance=0``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence, Tuple


LEVEL = 0.95
OUTCOMES = ('holds', 'fails', 'inconclusive')
SIDES = ('>', '<')


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A seed mean with its interval (``lo``/``hi`` None: unbounded, e.g.
  one seed), over ``seeds`` seeds."""
  effect: float
  lo: Optional[float]
  hi: Optional[float]
  seeds: int

  def text(self, digits: int = 1, signed: bool = True) -> str:
    """'+4.2 [+1.0, +7.4]' (``signed`` for differences; '9.7 [7.9, 11.5]'
    for a quantity such as an accuracy)."""
    sign = '+' if signed else ''
    f = lambda v: '?' if v is None else f'{v:{sign}.{digits}f}'
    return f'{f(self.effect)} [{f(self.lo)}, {f(self.hi)}]'



def _t_quantile(q: float, df: float) -> float:
  """Student's t quantile (the normal one for infinite ``df``): what
  ``scipy.stats.t.ppf`` computes, from ``scipy.special``, imported here
  (scipy.stats costs every script 1.3 s of start-up)."""
  from scipy import special  # pylint: disable=g-import-not-at-top
  return float(special.ndtri(q) if math.isinf(df) else special.stdtrit(df, q))

def binomial_variance(accuracy: float, n: Optional[int]) -> float:
  """Variance, in points^2, of an accuracy (%) measured on ``n`` test points
  (0 when ``n`` is None: not a sample of test points)."""
  if n is None:
    return 0.0
  if n < 1:
    raise ValueError(f'test points must be positive, got {n}')
  p = min(max(accuracy / 100, 0.0), 1.0)
  return 1e4 * p * (1 - p) / n


def interval(values: Iterable[float], test_variance: float = 0.0, *,
             level: float = LEVEL) -> Estimate:
  """The seed mean of per-seed ``values`` and its ``level`` interval, widened
  by ``test_variance`` (the variance of the shared test sample's error; see
  the module docstring)."""
  values = [float(v) for v in values]
  s = len(values)
  if not s:
    raise ValueError('an interval needs at least one seed')
  mean = sum(values) / s
  if s == 1:
    return Estimate(mean, None, None, 1)
  seed_var = sum((v - mean) ** 2 for v in values) / (s - 1) / s
  total = seed_var + test_variance
  if total == 0:
    return Estimate(mean, mean, mean, s)
  df = (total ** 2 / (seed_var ** 2 / (s - 1)) if seed_var > 0
        else math.inf)
  half = _t_quantile(0.5 + level / 2, df) * math.sqrt(total)
  return Estimate(mean, mean - half, mean + half, s)


def paired_difference(a: Sequence[float], b: Sequence[float], *,
                      n: Optional[int] = None,
                      level: float = LEVEL) -> Estimate:
  """a - b per seed (lists in the same seed order) and its interval; ``n``:
  test points of both accuracies (None: not accuracies on a sample)."""
  if len(a) != len(b):
    raise ValueError(f'paired seeds differ: {len(a)} vs {len(b)} values')
  if not a:
    raise ValueError('a paired difference needs at least one seed')
  test = (binomial_variance(sum(a) / len(a), n) +
          binomial_variance(sum(b) / len(b), n))
  return interval([x - y for x, y in zip(a, b)], test, level=level)


def unpaired_difference(a: Sequence[float], b: Sequence[float], *,
                        level: float = LEVEL) -> Estimate:
  """mean(a) - mean(b) of two independent samples (e.g. one attack's
  accuracy over the random seeds of two implementations on the same points
  and model: no pairing, no test-sample variance) and Welch's ``level``
  t-interval; ``seeds`` is the smaller sample's size."""
  a, b = [float(v) for v in a], [float(v) for v in b]
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f'an unpaired difference needs 2 or more values per '
                     f'side, got {len(a)} and {len(b)}')
  mean = lambda v: sum(v) / len(v)
  var = lambda v: sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1) / len(v)
  va, vb = var(a), var(b)
  effect = mean(a) - mean(b)
  if va + vb == 0:
    return Estimate(effect, effect, effect, min(len(a), len(b)))
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = _t_quantile(0.5 + level / 2, df) * math.sqrt(va + vb)
  return Estimate(effect, effect - half, effect + half, min(len(a), len(b)))


def accuracy(values: Sequence[float], *, n: Optional[int] = None,
             level: float = LEVEL) -> Estimate:
  """The seed mean of one accuracy (%) on ``n`` test points, with interval."""
  values = list(values)
  return interval(values, binomial_variance(sum(values) / len(values), n),
                  level=level)


def outcome(estimate: Estimate, side: str = '>',
            threshold: float = 0.0) -> str:
  """'holds' / 'fails' / 'inconclusive' for the claim "effect ``side``
  ``threshold``" given the interval."""
  if side not in SIDES:
    raise ValueError(f'side must be one of {SIDES}, got {side!r}')
  lo, hi = estimate.lo, estimate.hi
  if lo is None or hi is None:
    return 'inconclusive'
  above, below = lo > threshold, hi < threshold
  if side == '<':
    above, below = below, above
  return 'holds' if above else 'fails' if below else 'inconclusive'


def all_hold(outcomes: Iterable[str]) -> str:
  """A conjunction of claims: holds if every part holds, fails if any part
  fails, inconclusive otherwise."""
  outcomes = list(outcomes)
  unknown = set(outcomes) - set(OUTCOMES)
  if unknown or not outcomes:
    raise ValueError(f'outcomes must be some of {OUTCOMES}, got {outcomes}')
  if 'fails' in outcomes:
    return 'fails'
  return 'holds' if set(outcomes) == {'holds'} else 'inconclusive'


def margin(estimate: Estimate, side: str = '>',
           threshold: float = 0.0) -> float:
  """How far the interval's near end lies past ``threshold`` on the claimed
  side (negative: not past it; -inf: unbounded)."""
  if estimate.lo is None or estimate.hi is None:
    return -math.inf
  return (estimate.lo - threshold if side == '>' else
          threshold - estimate.hi)


def conjunction(parts: Sequence[Tuple[Estimate, str, float]]
                ) -> Tuple[str, int]:
  """(outcome, index of the weakest part) of a claim that every part
  "estimate side threshold" holds (e.g. "at every eps_train"); the weakest
  part, the one with the smallest ``margin``, is the one a table shows."""
  if not parts:
    raise ValueError('a conjunction needs at least one part')
  result = all_hold(outcome(*p) for p in parts)
  return result, min(range(len(parts)), key=lambda i: margin(*parts[i]))
