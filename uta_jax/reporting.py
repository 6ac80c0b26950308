"""Run outputs: metrics JSONL, results JSON, report lines and plots."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

METRICS = 'metrics.jsonl'
RESULTS = 'results.json'
CURVES = 'training_curves.png'
TENSORBOARD = 'tensorboard'  # event files: tensorboard --logdir <workdir>


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def append_metrics(path: str, record: Dict[str, Any]) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record, sort_keys=True) + '\n')


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """Records of ``metrics.jsonl``; for a step logged twice (a resumed run
  replays steps after its last checkpoint) the later record wins."""
  by_step: Dict[Any, Dict[str, Any]] = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        record = json.loads(line)
        by_step[(record.get('kind'), record.get('step'))] = record
  return sorted(by_step.values(), key=lambda r: r.get('step', 0))


def _summary_writer(folder: str, *, empty_first: bool = True):
  """A tensorboardX ``SummaryWriter`` adding a new event file to ``folder``
  (emptied first unless ``empty_first`` is false), or None without
  tensorboardX (no TensorFlow needed)."""
  SummaryWriter = _tensorboardx_writer_class()  # pylint: disable=invalid-name
  if SummaryWriter is None:
    return None
  if empty_first:
    shutil.rmtree(folder, ignore_errors=True)
  return SummaryWriter(folder, flush_secs=10, filename_suffix=_unique())


def _tensorboardx_writer_class():
  """tensorboardX's ``SummaryWriter`` (None without tensorboardX), imported
  without PyTorch: its writer module imports torch when installed only to
  recognise torch tensors (2.4 s of every run's start on a CPU); the
  scalars written here are floats. A torch imported already is kept; once
  tensorboardX is imported, nothing is blocked."""
  blocked = ('torch' not in sys.modules and
             'tensorboardX' not in sys.modules)
  if blocked:
    sys.modules['torch'] = None  # makes ``import torch`` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  finally:
    if blocked:
      sys.modules.pop('torch', None)
  return SummaryWriter


def _unique() -> str:
  """An event-file name suffix: tensorboardX names files by the second, so
  two writers within a second would write the same file."""
  return f'.{os.getpid()}.{time.time_ns()}'


def _add_scalars(writer, record: Dict[str, Any]) -> None:
  """Every numeric metric of ``record`` as ``<kind>/<name>`` at its step."""
  for key, value in record.items():
    if key not in ('kind', 'step') and isinstance(value, (int, float)):
      writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value,
                        global_step=record['step'])


def write_tensorboard(metrics_path: str, folder: str) -> bool:
  """Rewrites ``folder`` as TensorBoard event files holding every numeric
  metric of ``metrics.jsonl`` (``train/loss``, ``eval/pgd_accuracy``, ...),
  each step once (the later record wins). Returns False without
  ``tensorboardX``."""
  writer = _summary_writer(folder)
  if writer is None:
    return False
  with writer:
    for record in read_metrics(metrics_path):
      _add_scalars(writer, record)
  return True


class MetricsLog:
  """``metrics.jsonl`` and its TensorBoard events, appended record by record.

  Opened when a run (re)starts from ``resumed_step``: a resumed run replays
  the steps after its last checkpoint, so the events are rewritten once
  here from the JSONL records up to ``resumed_step``, and each ``append``
  then adds one record's events. A record for a (kind, step) already shown
  (the final evaluation repeated after an interrupted one) rewrites them
  from the JSONL, where the later record wins: TensorBoard shows each step
  once. ``enabled=False`` (hosts other than the first) writes nothing.
  """

  def __init__(self, metrics_path: str, tensorboard_folder: str, *,
               resumed_step: int, enabled: bool = True):
    self.metrics_path, self.folder = metrics_path, tensorboard_folder
    self.enabled = enabled
    self._shown = set()
    self._writer = None
    if not enabled:
      return
    self._writer = _summary_writer(tensorboard_folder)
    for record in read_metrics(metrics_path):
      if record.get('step', 0) <= resumed_step:
        self._show(record)

  def _show(self, record: Dict[str, Any]) -> None:
    self._shown.add((record.get('kind'), record.get('step')))
    if self._writer is not None:
      _add_scalars(self._writer, record)

  def append(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    append_metrics(self.metrics_path, record)
    if (record.get('kind'), record.get('step')) not in self._shown:
      self._show(record)
      return
    if self._writer is not None:
      self._writer.close()
      write_tensorboard(self.metrics_path, self.folder)
      self._writer = _summary_writer(self.folder, empty_first=False)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _whole_255ths(eps: float) -> Optional[int]:
  in_255ths = eps * 255
  return round(in_255ths) if abs(in_255ths - round(in_255ths)) < 1e-6 else None


def format_eps(eps: float) -> str:
  """eps as a decimal and in 255ths, as users write it: '0.03137 (8/255)',
  '0.1 (25.5/255)'."""
  whole = _whole_255ths(eps)
  if whole is not None:
    return f'{eps:.4g} ({whole}/255)'
  return f'{eps:.4g} ({eps * 255:.1f}/255)'


def eps_text(eps: float) -> str:
  """eps as RobustBench writes it: a short decimal when one is exact ('0.3',
  '0.2', not '51/255'), else whole 255ths ('8/255'), else the decimal."""
  if float(f'{eps:.4g}') == eps:
    return f'{eps:g}'
  whole = _whole_255ths(eps)
  return f'{whole}/255' if whole is not None else f'{eps:g}'


ARCHITECTURES = {'mlp': 'MLP', 'lenet': 'LeNet', 'svhn_lenet': 'SVHN LeNet',
                 'resnet18': 'ResNet-18'}


def robustbench_records(config: Any, report: Dict[str, Any]) -> list:
  """One RobustBench-style record per eps of an AutoAttack ``report``
  (``runs.evaluate_workdir``'s) of a run with ``config``: the fields of a
  RobustBench model card (accuracies as strings with two decimals, eps as
  written there, 'Linf'), the number of points, and how it was trained."""
  model = ARCHITECTURES.get(config.model.name, config.model.name)
  if config.model.ensemble_size > 1:
    model = f'{config.model.ensemble_size} x {model} (ensemble)'
  attack = config.attack
  training = ('standard training' if attack.name == 'none' else
              f'{attack.name.upper()}-AT, eps_train '
              f'{eps_text(attack.eps_train)}, uta-jax')
  return [{
      'dataset': config.dataset,
      'threat_model': 'Linf',
      'eps': eps_text(float(eps)),
      'clean_acc': f"{r['clean_accuracy']:.2f}",
      'autoattack_acc': f"{r['robust_accuracy']:.2f}",
      'n_examples': report['num_examples'],
      'autoattack_version': report['version'],
      'autoattack_backend': report.get('backend', 'torch'),
      'architecture': model,
      'additional_data': False,
      'training': training,
  } for eps, r in report['eps'].items()]


def summary_lines(results: Dict[str, Any]) -> Iterable[str]:
  """Human-readable lines of a results dict, in AutoAttack-like wording."""
  ev = results['evaluation']
  n = ev['num_examples']
  yield f"clean accuracy: {ev['clean_accuracy']:.2f}% on {n} test points"
  for attack in ('pgd', 'uta'):
    for eps, acc in ev['robust_accuracy'][attack].items():
      yield (f'robust accuracy ({attack.upper()}, eps={format_eps(float(eps))}'
             f'): {acc:.2f}%   tradeoff: '
             f"{results['tradeoff'][attack][eps]:.2f}")


def autoattack_lines(report: Dict[str, Any]) -> Iterable[str]:
  """Summary lines of ``runs.evaluate_workdir``'s report."""
  n = report['num_examples']
  backend = report.get('backend', 'torch')
  yield (f"AutoAttack {report['version']} ({backend} backend), model "
         f"{report.get('model_randomness', '')}, {n} test points")
  for eps, r in report['eps'].items():
    yield (f"eps={format_eps(float(eps))}: clean accuracy "
           f"{r['clean_accuracy']:.2f}%, robust accuracy "
           f"{r['robust_accuracy']:.2f}% ({r['seconds']:.1f} s)")
  for record in report.get('robustbench', ()):
    yield 'RobustBench record: ' + json.dumps(record)
  jax_eval = report.get('jax')
  if jax_eval:
    for eps, acc in jax_eval['robust_accuracy']['pgd'].items():
      yield f'eps={format_eps(float(eps))}: JAX PGD robust accuracy {acc:.2f}%'


def plot_training_curves(metrics_path: str, png_path: str) -> None:
  """Loss and train accuracy against step, plus eval accuracies if any."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read_metrics(metrics_path)
  train = [r for r in records if r.get('kind') == 'train']
  evals = [r for r in records if r.get('kind') == 'eval']
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  if train:
    steps = [r['step'] for r in train]
    axes[0].plot(steps, [r['loss'] for r in train])
    axes[1].plot(steps, [100 * r['accuracy'] for r in train],
                 label='train (perturbed)')
  for key, label in (('clean_accuracy', 'test clean'),
                     ('pgd_accuracy', 'test PGD')):
    points = [(r['step'], r[key]) for r in evals if key in r]
    if points:
      axes[1].plot(*zip(*points), marker='o', label=label)
  axes[0].set(xlabel='step', ylabel='training loss')
  axes[1].set(xlabel='step', ylabel='accuracy (%)')
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def markdown_table(header: List[str], rows: Iterable[List[Any]]) -> str:
  """A GitHub markdown table; floats are written with one decimal."""
  def cell(v):
    return f'{v:.1f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(header) + ' |',
           '| ' + ' | '.join('---' for _ in header) + ' |']
  lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


# ------------------------------------------------- seeds and verdicts

# The paper's names for the scripts' method keys (figures and tables).
METHOD_NAMES = {
    'none': 'standard training', 'pgd': 'PGD-AT', 'uta': 'UTA-AT',
    'uta_ensemble': 'UTA-AT (5-model ensemble)', 'ls_pgd': 'LS-PGD-AT',
    'ls_uta': 'LS-UTA-AT', 'fgsm': 'FGSM-AT', 'uta1': 'single-step UTA-AT',
    'uta1_mc1': 'single-step UTA-AT (MC dropout, 1 sample)',
    'uta1_mc5': 'single-step UTA-AT (MC dropout, 5 samples)',
}


def method_name(key: str) -> str:
  """The paper's name of a method key ('pgd' -> 'PGD-AT'), else the key."""
  return METHOD_NAMES.get(key, key)



def values_at(rows: Iterable[Any], *path: Any) -> List[Any]:
  """``row[path[0]][path[1]]...`` of each row (a column of nested rows)."""
  out = []
  for row in rows:
    for key in path:
      row = row[key]
    out.append(row)
  return out


def mean_std(values: Iterable[float]) -> Dict[str, float]:
  """Mean, sample standard deviation (0 for one value) and count."""
  values = [float(v) for v in values]
  n = len(values)
  mean = sum(values) / n
  var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
  return {'mean': mean, 'std': var ** 0.5, 'n': n}


def format_mean_std(values: Iterable[float], digits: int = 1) -> str:
  """'71.4 ± 2.3' over seeds; a lone value is written without the spread."""
  s = mean_std(values)
  if s['n'] == 1:
    return f"{s['mean']:.{digits}f}"
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def group_rows(rows: Iterable[Dict[str, Any]], *keys: str
              ) -> Dict[tuple, List[Dict[str, Any]]]:
  """Per-seed rows grouped by the values of ``keys``, in first-seen order."""
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return groups
