"""Verdicts on the paper's claims: records, their tables, and the
conjunctions ("at every eps_train") the scripts' rules are made of.

A record (``verdict``) holds the claim, its rule, the statistic's seed mean
with a 95% interval (``uta_jax.stats``) and the outcome, holds / fails /
inconclusive; ``previous`` keeps the yes/no of the rule used before
``uta_jax.stats``, so a reader sees which verdicts the rule changed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from uta_jax import reporting
from uta_jax import stats

# A part of a conjunction: (label, statistic, estimate, side, threshold).
Part = Tuple[str, str, stats.Estimate, str, float]


def verdict(claim: str, rule: str, statistic: str, estimate: Any,
            outcome: str, evidence: str, *, digits: int = 1,
            signed: bool = True) -> Dict[str, Any]:
  """A paper claim; the rule that tests it (``uta_jax.stats``: a statistic
  per seed, its seed mean with a 95% interval, a side of a threshold); the
  ``statistic``'s ``estimate`` (a ``stats.Estimate``), its ``outcome``
  (holds / fails / inconclusive) and the per-seed numbers behind it;
  ``signed``: the statistic is a difference (shown with its sign)."""
  r = lambda v: None if v is None else round(v, digits + 2)
  return {'claim': claim, 'rule': rule, 'statistic': statistic,
          'effect': r(estimate.effect), 'lo': r(estimate.lo),
          'hi': r(estimate.hi), 'seeds': estimate.seeds, 'digits': digits,
          'signed': signed,
          'outcome': outcome, 'evidence': evidence}


def interval_text(v: Dict[str, Any]) -> str:
  """A verdict's '+4.2 [+1.0, +7.4]'."""
  d, sign = v.get('digits', 1), '+' if v.get('signed', True) else ''
  f = lambda x: '?' if x is None else f'{x:{sign}.{d}f}'
  return f"{f(v['effect'])} [{f(v['lo'])}, {f(v['hi'])}]"


def outcome_text(v: Dict[str, Any]) -> str:
  """holds / **fails** / *inconclusive*, as the tables show them."""
  return {'holds': 'holds', 'fails': '**fails**',
          'inconclusive': '*inconclusive*'}[v['outcome']]


def previous_text(v: Dict[str, Any]) -> str:
  """The yes/no of the rule before ``uta_jax.stats`` (the same data), or ''
  for a claim it did not test."""
  return {True: 'yes', False: 'no', None: ''}[v.get('previous')]


def carry_previous(verdicts: List[Dict[str, Any]],
                   old: Optional[List[Dict[str, Any]]]
                   ) -> List[Dict[str, Any]]:
  """``verdicts`` with each claim's old yes/no (``previous``) taken from the
  ``old`` verdicts of the same claim: an old-rule record's ``holds``, or the
  ``previous`` it already carried; claims new since are left without."""
  before = {}
  for v in old or ():
    if 'holds' in v:
      before[v['claim']] = bool(v['holds'])
    elif v.get('previous') is not None:
      before[v['claim']] = v['previous']
  return [dict(v, previous=before[v['claim']]) if v['claim'] in before
          else v for v in verdicts]


def verdicts_markdown(verdicts: List[Dict[str, Any]]) -> str:
  """The verdicts as a markdown table: claim, rule, the statistic's seed
  mean [95% interval], outcome, and the per-seed evidence."""
  return reporting.markdown_table(
      ['claim', 'rule', 'statistic', 'mean [95% interval]', 'outcome',
       'evidence'],
      [[v['claim'], v['rule'], v['statistic'], interval_text(v),
        outcome_text(v), v['evidence']] for v in verdicts])


def paired_rows(a_rows: Sequence[Dict[str, Any]],
                b_rows: Sequence[Dict[str, Any]]) -> Tuple[list, list]:
  """Two cells' per-seed rows restricted to their shared seeds, in seed
  order (the pairs of a paired difference)."""
  seeds = sorted({r['seed'] for r in a_rows} & {r['seed'] for r in b_rows})
  a = {r['seed']: r for r in a_rows}
  b = {r['seed']: r for r in b_rows}
  return [a[s] for s in seeds], [b[s] for s in seeds]


def every(claim: str, rule: str, parts: Sequence[Part], *,
          digits: int = 1, signed: bool = True) -> Dict[str, Any]:
  """The verdict of "every part holds" (``stats.conjunction``): the weakest
  part's statistic and interval shown, every part listed as evidence."""
  outcome, i = stats.conjunction([p[2:] for p in parts])
  label, statistic, estimate = parts[i][:3]
  weakest = f'{statistic} ({label}, the weakest)' if len(parts) > 1 else (
      f'{statistic} ({label})')
  return verdict(claim, rule, weakest, estimate, outcome,
                 '; '.join(f'{p[0]}: {p[2].text(digits, signed)}'
                           for p in parts), digits=digits, signed=signed)
