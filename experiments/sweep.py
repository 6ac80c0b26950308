"""What the paper-reproduction scripts share: presets, run-or-reuse, outputs.

Each script builds one ``configs.Config`` per run and seed of its sweep
(``--seeds``; a workdir per seed, ``seed_dir``) and calls
``train_all([(config, workdir), ...])``: a workdir whose ``results.json``
already holds a finished run of the same config is reused, the others train
or resume from their checkpoints together, as few programs of runs as
``loop.train_and_evaluate_runs`` can make of them (``--max_runs_per_program``,
``--run_map``).
``autoattack(workdirs, ...)`` evaluates a program's runs together in JAX
(``train_and_attack`` does it per program) and likewise reuses every eps of
a stored report on the same points (quick presets: APGD-CE + APGD-T).
``write_outputs`` writes the script's JSON (per-seed rows, ``seeds``, the
``verdicts`` of its claims, the command), its markdown (rendered from that
JSON alone, so ``report.py`` can rebuild it) and its PNG into
``--output_dir``. The JSON holds nothing that depends on the invocation
but the flags: rerunning reproduces it.

``--preset=quick`` runs on 2 CPU cores in minutes; ``--preset=paper`` is the
paper's full setting (for a GPU). Flags set here override either preset.
"""

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags

import cli
import config_flags
from uta_jax import auto_attack
from uta_jax import claims
from uta_jax import configs
from uta_jax import data
from uta_jax import loop
from uta_jax import parallel
from uta_jax import programs
from uta_jax import reporting
from uta_jax import runs
from uta_jax import stopping
from uta_jax import torch_bridge
from uta_jax import workdir_lock

PRESETS = ('quick', 'paper')

flags.DEFINE_enum('preset', 'quick', list(PRESETS),
                  'quick: minutes on 2 CPU cores; paper: full settings (GPU)')
flags.DEFINE_string('output_dir', None, 'folder of the runs, table, JSON and '
                    'plot; default results/<script>_<preset>')
# Config flags that override a setting of every run of a sweep.
_CONFIG_PATHS = ('data_dir', 'epochs', 'max_train_examples',
                 'max_eval_examples')
config_flags.define(_CONFIG_PATHS)
flags.adopt_module_key_flags(config_flags)
cli.define_program_flags()
flags.DEFINE_integer('aa_examples', None, 'override: test points for '
                     'AutoAttack')
flags.DEFINE_enum('aa_version', None, ['standard', 'apgd', 'plus'],
                  'AutoAttack version; default: apgd (APGD-CE + APGD-T of '
                  'the standard version) for quick, standard for paper')
flags.DEFINE_enum('aa_backend', None, ['jax', 'torch'],
                  'AutoAttack backend; default: jax (native, every device) '
                  'for standard and apgd, torch (the reference, bridged) '
                  'for rand and plus')
flags.DEFINE_list('seeds', None, 'seeds of the runs, e.g. 0,1,2 (one run '
                  'per seed); default: the preset\'s')
flags.DEFINE_list('methods', None, 'subset of the script\'s methods; '
                  'default: the preset\'s')
flags.DEFINE_list('eps_train', None, 'override the script\'s eps_train grid')

FLAGS = flags.FLAGS

# Sweep flags that change what a script runs; a script that does not use
# one refuses it (``start(..., unused=...)``) rather than ignore it.
SELECTION_FLAGS = ('methods', 'eps_train', 'aa_examples', 'aa_version',
                   'aa_backend')
NOT_FOR_GENERATED_DATA = ('data_dir', 'max_train_examples',
                          'max_eval_examples')

# Exceptions the library raises with a message naming the fix.
USER_ERRORS = (configs.ConfigError, data.DataError, runs.RunError,
               workdir_lock.WorkdirError, programs.ProgramTooLarge,
               ImportError)


class _Stop:
  """SIGTERM / Ctrl-C during a sweep (``stopping.StopSignals``, installed by
  ``start``): runs checkpoint and the script exits, to resume on a rerun.
  ``lock`` holds the output folder's workdir lock until the process ends."""
  signals: Optional[stopping.StopSignals] = None
  lock: Optional[contextlib.ExitStack] = None


def stop_requested() -> bool:
  return _Stop.signals is not None and _Stop.signals()


def exit_if_stopped() -> None:
  """Ends the script (exit 0 after SIGTERM, 130 after Ctrl-C) once a stop
  was asked for; finished runs and AutoAttack eps stay stored."""
  if stop_requested():
    print('stopped: finished runs are stored and the run in progress is '
          'checkpointed; rerun the same command to resume', file=sys.stderr)
    sys.exit(_Stop.signals.exit_code())


def start(script: str, *, unused: Sequence[str] = (),
          folder: Optional[str] = None) -> str:
  """Logs to stderr, stops cleanly on SIGTERM / Ctrl-C, refuses the sweep
  flags in ``unused`` (they would be silently ignored); returns the output
  folder (default ``results/<folder or script>_<preset>``), created and
  locked for this process (a second script on the same folder stops at
  once, naming this one)."""
  cli.set_up_backend()
  cli.show_logs(sys.stderr, timestamps=True)
  for name in unused:
    if FLAGS[name].present:
      cli.fail(f'--{name} has no effect on {script}.py; drop it')
  _Stop.signals = cli.stop_signals()
  out = FLAGS.output_dir or os.path.join(
      'results', f'{folder or script}_{FLAGS.preset}')
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    cli.fail(f'cannot create --output_dir {out!r} ({e.strerror})')
  _Stop.lock = contextlib.ExitStack()
  try:
    _Stop.lock.enter_context(workdir_lock.hold(out, what=f'{script}.py'))
  except workdir_lock.WorkdirError as e:
    cli.fail(str(e).replace('--workdir', '--output_dir'))
  return out


def preset(presets: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """The ``--preset`` entry of a script's ``PRESETS``: every script has
  one per name in ``PRESETS`` (sweep.PRESETS), each with its ``seeds``."""
  return presets[FLAGS.preset]


Figures = Dict[str, Any]  # file stem -> matplotlib figure


def main(script: str, run: Callable[[str], Tuple[Dict[str, Any], Figures]],
         *, markdown: Callable[[Dict[str, Any]], str],
         unused: Sequence[str] = (), folder: Optional[str] = None
         ) -> Callable[[List[str]], None]:
  """The ``main`` of a paper script, for ``app.run``.

  ``start``s (output folder locked, signals, ``unused`` flags refused),
  calls ``run(out)`` for the JSON payload and the figures, turns the
  library's errors into one line, and writes ``<script>.json`` (with the
  preset), ``.md`` (``markdown(payload)``) and each figure as
  ``<stem>.png``, into ``start``'s folder (``folder``: share another
  script's).
  """
  def _main(argv):
    del argv
    out = start(script, unused=unused, folder=folder)
    try:
      payload, figures = run(out)
    except USER_ERRORS as e:
      cli.fail(config_flags.message(e))
    write_outputs(out, script, payload=dict(payload, preset=FLAGS.preset),
                  markdown=markdown, figures=figures)
  return _main


def seeds(default: Sequence[int]) -> List[int]:
  """--seeds as distinct non-negative integers, else ``default``."""
  if FLAGS.seeds is None:
    return list(default)
  return cli.parse_seeds(FLAGS.seeds)


def seed_dir(folder: str, seed: int) -> str:
  """The workdir of one seed of a sweep cell."""
  return os.path.join(folder, f'seed{seed}')


def config(dataset: str, preset_flags: Dict[str, Any],
           seed: int) -> configs.Config:
  """The config of one run: ``dataset``'s paper preset, then the script's
  preset (written as the flags a user would type, ``{'attack': 'pgd'}``),
  the seed, and this invocation's config flags."""
  values = config_flags.as_paths(preset_flags)
  values['seed'] = seed
  values.update(config_flags.overrides(_CONFIG_PATHS))
  return configs.get_config(dataset, values)


def aa_examples(default: int) -> int:
  return FLAGS.aa_examples or default


def methods(default, known) -> list:
  """--methods (checked against ``known``), else ``default``."""
  chosen = list(FLAGS.methods or default)
  for method in chosen:
    if method not in known:
      cli.fail(f'unknown method {method!r}; choose from {list(known)}')
  return chosen


def eps_grid(default) -> list:
  """--eps_train as floats, else ``default``."""
  return cli.parse_floats(FLAGS.eps_train, 'eps_train') or list(default)


def aa_version() -> str:
  """--aa_version, else the preset's: quick sweeps run the standard
  version's APGD-CE and APGD-T only (FAB-T and Square cost most of its time
  and, in the quick runs measured so far, changed no robust accuracy)."""
  if FLAGS.aa_version:
    return FLAGS.aa_version
  return 'apgd' if FLAGS.preset == 'quick' else 'standard'


def preflight(configs_: Sequence[configs.Config], *,
              autoattack: bool = False) -> None:
  """Before the first step: every dataset the runs read is there
  (``data.check_available``), one --data_dir is not an IDX folder standing
  in for two datasets (MNIST and Fashion-MNIST share file names), and the
  reference AutoAttack's PyTorch is installed when it will run. Raises the
  library's error naming what is missing and how to get it."""
  datasets = {c.dataset: c.data_dir for c in configs_}
  idx_readers = sorted(d for d in datasets if d in ('mnist', 'fashion_mnist'))
  folders = {datasets[d] for d in idx_readers}
  if len(idx_readers) > 1 and any(data.idx_folder_has(f) for f in folders):
    raise data.DataError(
        f'--data_dir holds one IDX dataset, but this sweep reads '
        f'{" and ".join(idx_readers)} (their IDX files share names): run each '
        'with its own --datasets and --data_dir', 'data_dir')
  for dataset, data_dir in datasets.items():
    data.check_available(dataset, data_dir)
  if autoattack and aa_backend(aa_version()) == 'torch':
    torch_bridge.require_torch()
    try:
      import pyautoattack  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ImportError(f'AutoAttack {aa_version()} runs the reference '
                        "library: pip install 'uta-jax[torch]' (or "
                        '--aa_version=apgd for APGD-CE + APGD-T in JAX)'
                       ) from e


def train_all(runs_: Sequence[Tuple[configs.Config, str]]
             ) -> List[Dict[str, Any]]:
  """Each (config, workdir)'s finished ``results.json``: a finished run of
  the same config is reused; the others train (or resume) together, as few
  programs as ``loop.train_and_evaluate_runs`` can make of them
  (``cli.program_options``). Exits after a stop signal (runs checkpointed);
  a run that failed (non-finite) is an error naming its workdir."""
  preflight([config for config, _ in runs_])
  results: List[Optional[Dict[str, Any]]] = []
  todo = []
  for config, workdir in runs_:
    stored = runs.finished_results(workdir, config)
    if stored is not None:
      loop.log.info('reusing finished run %s', workdir)
    else:
      todo.append(len(results))
    results.append(stored)
  if todo:
    trained = loop.train_and_evaluate_runs(
        [runs_[i][0] for i in todo], [runs_[i][1] for i in todo],
        stop_requested=stop_requested, **cli.program_options())
    exit_if_stopped()
    for i, result in zip(todo, trained):
      workdir = runs_[i][1]
      if result['status'] == 'failed':
        raise runs.RunError(f'run {workdir}: {result["error"]}')
      if result['status'] != 'finished':
        raise runs.RunError(f'run {workdir} stopped at step '
                            f'{result["step"]}; rerun to resume')
      results[i] = result
  return results


def aa_backend(version: str) -> str:
  """--aa_backend, else JAX for the APGD-only version."""
  return FLAGS.aa_backend or auto_attack.default_backend(version)


def autoattack(workdirs: Sequence[str], *, eps, num_examples: int,
               version: str = 'standard') -> List[Dict[str, Any]]:
  """``runs.evaluate_workdirs``' AutoAttack reports of runs of one program
  (evaluated together); it reuses every eps already stored with the same
  settings."""
  backend = aa_backend(version)
  if backend == 'torch':
    torch_bridge.require_torch().set_num_threads(1)
  try:
    return runs.evaluate_workdirs(workdirs, version=version, backend=backend,
                                  eps=tuple(eps), num_examples=num_examples,
                                  jax_pgd=False,
                                  stop_requested=stop_requested)
  except parallel.Stopped:
    exit_if_stopped()
    raise


def aa_cell(report: Dict[str, Any], eps: float) -> Dict[str, float]:
  """Clean, robust and the paper's score (their mean) at ``eps``, in %."""
  for key, r in report['eps'].items():
    if abs(float(key) - eps) < 1e-9:
      return {'clean': r['clean_accuracy'], 'robust': r['robust_accuracy'],
              'score': (r['clean_accuracy'] + r['robust_accuracy']) / 2}
  raise KeyError(f'no AutoAttack result at eps={eps} in the report')


def train_and_attack(cells: Sequence[Tuple[configs.Config, str]], *,
                     aa_examples: int) -> List[Dict[str, Any]]:
  """Trains (or reuses) every (config, workdir) of ``cells`` together
  (``train_all``), then AutoAttacks each at its eval eps, the runs of one
  program together (``programs.group``); a row per cell.

  ``score`` per eps_test is the paper's Table 1 / 2 cell: the mean of clean
  and AutoAttack robust accuracy on the AutoAttack points.
  """
  preflight([config for config, _ in cells], autoattack=True)
  trained = train_all(cells)
  reports: List[Optional[Dict[str, Any]]] = [None] * len(cells)
  for group in programs.group([config for config, _ in cells]):
    eps = cells[group[0]][0].eval.eps
    for i, report in zip(group, autoattack(
        [cells[i][1] for i in group], eps=eps, num_examples=aa_examples,
        version=aa_version())):
      reports[i] = report
  return [_attack_row(config, workdir, results, report)
          for (config, workdir), results, report in zip(cells, trained,
                                                        reports)]


def _attack_row(config, workdir, results, report):
  cells = [aa_cell(report, e) for e in config.eval.eps]
  return {
      'seed': config.seed,
      'epochs': config.epochs,
      'train_examples': results.get('train_examples',
                                    config.max_train_examples),
      'eps_train': config.attack.eps_train,
      'eps_test': list(config.eval.eps),
      'clean_accuracy': results['clean_accuracy'],
      'aa_clean_accuracy': cells[0]['clean'],
      'aa_robust_accuracy': [c['robust'] for c in cells],
      'score': [c['score'] for c in cells],
      'jax_pgd_accuracy': results['robust_accuracy']['pgd'],
      'train_seconds': results['timings'].get('wall_seconds'),
      'runs_in_program': results['timings'].get('runs_in_program', 1),
      'autoattack_seconds': sum(r['seconds'] for r in report['eps'].values()),
      'aa_examples': report['num_examples'],
      'aa_version': report['version'],
      'aa_backend': report['backend'],
      'eval_examples': results['evaluation']['num_examples'],
      'workdir': workdir,
  }


def command() -> str:
  """The command line of this invocation, as a user would type it."""
  script = os.path.relpath(os.path.abspath(sys.argv[0]))
  return ' '.join(['python', script] + sys.argv[1:])


def render(markdown: Callable[[Dict[str, Any]], str],
           payload: Dict[str, Any]) -> str:
  """A script's markdown from its JSON payload: tables, then verdicts."""
  text = markdown(payload)
  if payload.get('verdicts'):
    text += ('\n#### Verdicts (seed mean of each statistic with its 95% '
             'interval over seeds and test points; `uta_jax.stats`)\n\n' +
             claims.verdicts_markdown(payload['verdicts']))
  return text


def write_outputs(out: str, stem: str, *, payload: Dict[str, Any],
                  markdown: Callable[[Dict[str, Any]], str],
                  figures: Optional[Figures] = None) -> None:
  """``<stem>.json`` (``payload`` plus the script and command), ``<stem>.md``
  (``render``ed from it) and a ``<name>.png`` per figure in ``out``."""
  payload = dict(payload, script=stem, command=command())
  old = os.path.join(out, f'{stem}.json')
  if 'verdicts' in payload and os.path.exists(old):
    payload['verdicts'] = claims.carry_previous(
        payload['verdicts'], reporting.read_json(old).get('verdicts'))
  text = render(markdown, payload)
  try:
    reporting.write_json(os.path.join(out, f'{stem}.json'), payload)
    with open(os.path.join(out, f'{stem}.md'), 'w') as f:
      f.write(text)
    for name, figure in (figures or {}).items():
      figure.savefig(os.path.join(out, f'{name}.png'), dpi=110,
                     bbox_inches='tight')
  except OSError as e:
    cli.fail(str(workdir_lock.write_error(e, out)))
  print(text)
  print(f'wrote {os.path.join(out, stem)}.md, .json' + ''.join(
      f', {name}.png' for name in figures or {}))


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def cached(path: str, settings: Dict[str, Any],
           compute: Callable[[], Dict[str, Any]]) -> tuple:
  """(result, seconds): the stored result of ``compute`` when ``path`` holds
  one for the same ``settings``, else computed now and stored. For the
  scripts whose runs are not training workdirs (the 2D toy)."""
  settings = json.loads(json.dumps(settings))  # tuples -> lists
  if os.path.exists(path):
    stored = reporting.read_json(path)
    if stored.get('settings') == settings:
      loop.log.info('reusing %s', path)
      return stored['result'], stored['seconds']
  start_time = time.time()
  result = compute()
  seconds = time.time() - start_time
  exit_if_stopped()  # a result computed after the signal may be cut short
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    reporting.write_json(path, {'settings': settings, 'result': result,
                                'seconds': seconds})
  except OSError as e:
    raise workdir_lock.write_error(e, os.path.dirname(path)) from e
  return result, seconds
