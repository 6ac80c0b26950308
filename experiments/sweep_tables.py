"""The paper scripts' per-seed rows as tables: a cell per (method,
eps_train), its seeds averaged, and the compute the rows cost. Pure
functions of the rows (``sweep`` trains and attacks; this only reads)."""

from typing import Any, Dict, List

from uta_jax import reporting


def score_table(rows: List[Dict[str, Any]]) -> str:
  """Markdown: a row per (method, eps_train) with the mean ± std over its
  seeds of each eps_test's score, the paper's score in parentheses where
  ``row['paper_score']`` has it, the clean accuracies and the seeds."""
  header = ['method', 'eps_train'] + [f'eps_test {e:g}'
                                      for e in rows[0]['eps_test']]
  header += ['clean (AA points)', 'clean (eval points)', 'seeds']
  table = []
  for (method, eps), rs in reporting.group_rows(
      rows, 'method', 'eps_train').items():
    paper = rs[0].get('paper_score') or [None] * len(rs[0]['score'])
    table.append([reporting.method_name(method), f'{eps:g}'] + [
        reporting.format_mean_std(r['score'][i] for r in rs) +
        (f' ({p:.1f})' if p is not None else '')
        for i, p in enumerate(paper)] + [
            reporting.format_mean_std(r['aa_clean_accuracy'] for r in rs),
            reporting.format_mean_std(r['clean_accuracy'] for r in rs),
            len(rs)])
  return reporting.markdown_table(header, table)


def method_cells(rows: List[Dict[str, Any]], method: str
                ) -> Dict[float, List[Dict[str, Any]]]:
  """eps_train -> the per-seed rows of ``method``, in first-seen order."""
  return {eps: rs for (m, eps), rs in reporting.group_rows(
      rows, 'method', 'eps_train').items() if m == method}


def compute_seconds(rows: List[Dict[str, Any]]) -> float:
  """Training plus AutoAttack time stored with the runs of ``rows``."""
  return sum((r.get('train_seconds') or 0) + (r.get('autoattack_seconds') or 0)
             for r in rows)
