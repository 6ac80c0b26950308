"""A run's workdir: what it holds, who writes it, and what reads it back.

``<workdir>/config.json`` (written by ``prepare_workdir`` when a run starts,
checked against the flags when it resumes), ``checkpoints/`` (``Checkpointer``)
and ``results.json``, whose one writer is ``update_results`` (the training's
report, then each AutoAttack eps as it finishes). ``load_run`` reads a run
back; ``evaluate_workdir`` AutoAttacks it (``evaluate_workdirs``: a
program's runs at once). Training itself is ``loop``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax

from uta_jax import auto_attack
from uta_jax import checkpointing
from uta_jax import classifier
from uta_jax import config_json
from uta_jax import configs
from uta_jax import data
from uta_jax import errors
from uta_jax import evaluation
from uta_jax import programs
from uta_jax import reporting
from uta_jax import steps
from uta_jax import workdir_lock

log = logging.getLogger('uta_jax')

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'


class RunError(errors.NamesSettings, RuntimeError):
  """A workdir cannot be used (no run, unreadable files, other settings);
  the message names the fix."""


def make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise workdir_lock.write_error(e, workdir) from e


def prepare_workdir(config: configs.Config, workdir: str) -> None:
  """Creates ``workdir`` and saves the config, or checks it matches."""
  path = os.path.join(workdir, CONFIG)
  make_workdir(workdir)
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = config_json.from_json(f.read())
    except (OSError, configs.ConfigError) as e:
      raise RunError(f'{path} is unreadable ({e}); delete it or use a new '
                     '--workdir') from e
    diff = config_json.incompatibilities(saved, config)
    if diff:
      raise RunError(
          f'workdir {workdir!r} holds a run with other settings ({", ".join(diff)}'
          '): rerun with the same flags to resume, or use a new --workdir')
  if jax.process_index() == 0:
    reporting.write_json(path, config_json.to_dict(config))


def stored_config(results: Dict[str, Any]) -> Optional[configs.Config]:
  """The config a ``results.json`` was written for (older layouts
  upgraded), or None when it holds none or an unreadable one."""
  try:
    return config_json.from_dict(results['config'])
  except (KeyError, configs.ConfigError):
    return None


def finished_results(workdir: str,
                     config: configs.Config) -> Optional[Dict[str, Any]]:
  """The ``results.json`` of a finished run of ``config`` in ``workdir``
  (a sweep reuses it instead of training again), else None: no results,
  an unfinished run, or another config's."""
  stored = read_results(workdir)
  if stored.get('status') == 'finished' and stored_config(stored) == config:
    return stored
  return None


class Run(NamedTuple):
  """A trained run read back from its workdir."""
  config: configs.Config
  model: Any  # flax module (one member of an ensemble)
  variables: Any
  step: int
  state: steps.TrainState  # host copy; ``steps.stream_key`` draws from it


def load_run(workdir: str) -> Run:
  """The run of the newest valid checkpoint in ``workdir``.

  Raises ``RunError`` naming the fix when ``workdir`` holds no run.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise RunError(f'no run in {workdir!r} (no {CONFIG}): train first '
                        f'with experiments/train.py --workdir={workdir}')
  try:
    with open(path) as f:
      config = config_json.from_json(f.read())
  except (OSError, configs.ConfigError) as e:
    raise RunError(f'{path} is unreadable ({e})') from e
  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, 1)
  target = jax.device_get(steps.create_train_state(
      config, model, tx, data.INPUT_SHAPES[config.dataset]))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS))
  try:
    state, step = checkpointer.restore_latest(target)
  finally:
    checkpointer.close()
  if state is None:
    raise RunError(f'no valid checkpoint in {workdir!r}: train first '
                        f'with experiments/train.py --workdir={workdir}')
  return Run(config, model, steps.variables_of(state), step, state)


def evaluate_workdir(workdir: str, *, version: str = 'standard',
                     backend: Optional[str] = None,
                     eps: Optional[Sequence[float]] = None,
                     num_examples: int = 1000, batch_size: int = 500,
                     seed: int = 0, jax_pgd: bool = True,
                     stop_requested: Optional[Callable[[], bool]] = None
                    ) -> Dict[str, Any]:
  """AutoAttack (and JAX-native PGD / UTA, keyed like the run's own final
  evaluation: the same points give the same numbers) on a trained workdir.

  Evaluates the first ``num_examples`` test points at each ``eps`` (default:
  the run's eval eps) and stores the report as ``'autoattack'`` in the
  workdir's ``results.json`` after every eps, so a stop loses at most the
  eps in progress: a rerun with the same settings (checkpoint, points,
  seed, version, backend) skips the eps already stored. Raises
  ``parallel.Stopped`` once ``stop_requested()`` is true.
  """
  return evaluate_workdirs([workdir], version=version, backend=backend,
                           eps=eps, num_examples=num_examples,
                           batch_size=batch_size, seed=seed, jax_pgd=jax_pgd,
                           stop_requested=stop_requested)[0]


def evaluate_workdirs(workdirs: Sequence[str], *, version: str = 'standard',
                      backend: Optional[str] = None,
                      eps: Optional[Sequence[float]] = None,
                      num_examples: int = 1000, batch_size: int = 500,
                      seed: int = 0, jax_pgd: bool = True,
                      stop_requested: Optional[Callable[[], bool]] = None
                     ) -> List[Dict[str, Any]]:
  """``evaluate_workdir`` on runs of one model architecture and dataset (a
  program's runs): with the JAX backend their AutoAttack runs in one
  program (``auto_attack.evaluate_runs``), each eps stored in every
  workdir as it finishes. ``eps`` defaults to the first run's eval eps.
  Raises ``RunError`` for runs that cannot share a program."""
  loaded = [load_run(w) for w in workdirs]
  for workdir, run in zip(workdirs, loaded):
    if run.config.dataset == 'toy2d':
      raise RunError(f'{workdir}: AutoAttack evaluates image models; toy2d '
                     'points have no pixel box')
    _check_same_program(workdirs[0], loaded[0], workdir, run)
  config = loaded[0].config
  eps = tuple(config.eval.eps if eps is None else eps)
  backend = backend or auto_attack.default_backend(version)
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir,
                              max_eval_examples=num_examples)
  with contextlib.ExitStack() as held:
    for workdir in workdirs:
      held.enter_context(workdir_lock.hold(
          workdir, what='AutoAttack evaluation',
          enabled=jax.process_index() == 0))
    try:
      reports = [_stored_report(w, r.config, {
          'checkpoint_step': r.step, 'num_examples': len(dataset.test),
          'seed': seed, 'version': version, 'backend': backend})
                 for w, r in zip(workdirs, loaded)]
      for workdir, report in zip(workdirs, reports):
        for e in eps:
          if str(e) in report['eps']:
            log.info('AutoAttack (%s, %s) at eps=%s: stored in %s, skipped',
                     version, backend, reporting.format_eps(e), workdir)
      todo = [i for i, r in enumerate(reports)
              if any(str(e) not in r['eps'] for e in eps)]
      if todo:
        log.info('AutoAttack (%s, %s backend) on %d test points of %d '
                 'run%s', version, backend, len(dataset.test), len(todo),
                 '' if len(todo) == 1 else 's')
        _autoattack([(workdirs[i], loaded[i], reports[i]) for i in todo],
                    dataset.test, eps=eps, version=version, backend=backend,
                    batch_size=batch_size, seed=seed,
                    stop_requested=stop_requested)
      for workdir, run, report in zip(workdirs, loaded, reports):
        if jax_pgd:
          _jax_pgd(workdir, run, report, dataset.test, eps, stop_requested)
        else:
          report.pop('jax', None)
      return reports
    except OSError as e:
      raise workdir_lock.write_error(e, workdirs[0]) from e


def _check_same_program(first: str, first_run: Run, workdir: str,
                        run: Run) -> None:
  """Raises ``RunError`` unless ``run`` has ``first_run``'s model, data and
  variable shapes (so their AutoAttack can be one program)."""
  a, b = first_run.config, run.config
  same = (a.model == b.model and a.dataset == b.dataset and
          a.data_dir == b.data_dir and
          classifier.is_ensemble(a) == classifier.is_ensemble(b) and
          jax.tree_util.tree_structure(first_run.state.params) ==
          jax.tree_util.tree_structure(run.state.params))
  if not same:
    raise RunError(f'{workdir} and {first} have different models or data; '
                   'evaluate them apart')


def _stored_report(workdir: str, config: configs.Config,
                   settings: Dict[str, Any]) -> Dict[str, Any]:
  """The workdir's stored AutoAttack report if it has ``settings`` (its
  eps are reused), else a new one."""
  stored = read_results(workdir).get('autoattack') or {}
  same = all(stored.get(k) == v for k, v in settings.items())
  report = dict(stored if same else {}, **settings)
  report.setdefault('eps', {})
  if report.get('robustbench') != reporting.robustbench_records(config,
                                                                report):
    report['robustbench'] = reporting.robustbench_records(config, report)
    update_results(workdir, autoattack=report)
  return report


def _autoattack(todo, split, *, eps, version, backend, batch_size, seed,
                stop_requested) -> None:
  """AutoAttack on (workdir, run, report) of ``todo`` at the eps each lacks,
  storing each eps as it finishes: the JAX backend's runs at once, the
  reference's one at a time."""
  def store(workdir, run, report, e, result):
    result = dict(result)
    for points in ('robust_points', 'robust_points_after'):
      result.pop(points, None)
    report['model_randomness'] = result.pop('model_randomness')
    report['eps'][str(e)] = result
    report['robustbench'] = reporting.robustbench_records(run.config, report)
    update_results(workdir, autoattack=report)

  ensemble = classifier.is_ensemble(todo[0][1].config)
  model = todo[0][1].model
  if backend == 'jax':
    missing = [e for e in eps if any(str(e) not in r['eps']
                                     for _, _, r in todo)]
    auto_attack.evaluate_runs(
        model, programs.stack([run.variables for _, run, _ in todo]), split,
        eps=missing, ensemble=ensemble, version=version,
        batch_size=batch_size, seed=seed, stop_requested=stop_requested,
        on_eps=lambda e, results: [store(*t, e, result)
                                   for t, result in zip(todo, results)])
    return
  for workdir, run, report in todo:
    for e in eps:
      if str(e) not in report['eps']:
        log.info('AutoAttack at eps=%s of %s', reporting.format_eps(e),
                 workdir)
        store(workdir, run, report, e, auto_attack.evaluate(
            model, run.variables, split, eps=e, ensemble=ensemble,
            version=version, backend=backend, batch_size=batch_size,
            seed=seed, stop_requested=stop_requested))


def _jax_pgd(workdir, run, report, split, eps, stop_requested) -> None:
  """The run's own evaluation (PGD, UTA, FGSM) at ``eps`` on the AutoAttack
  points, keyed like its final evaluation, stored as the report's 'jax'."""
  start = time.time()
  config = run.config
  eval_config = dataclasses.replace(
      config, eval=dataclasses.replace(config.eval, eps=eps))
  report['jax'] = evaluation.evaluate(
      run.model, run.variables, split, config=eval_config,
      key=steps.stream_key(run.state, evaluation.KEY_STREAM, run.step),
      stop_requested=stop_requested)
  report['jax']['seconds'] = time.time() - start
  update_results(workdir, autoattack=report)


def read_results(workdir: str) -> Dict[str, Any]:
  """``results.json`` of ``workdir`` ({} when there is none yet)."""
  path = os.path.join(workdir, reporting.RESULTS)
  try:
    return reporting.read_json(path) if os.path.exists(path) else {}
  except (OSError, ValueError) as e:
    raise RunError(f'{path} is unreadable ({e}); move it away and '
                   'rerun') from e


def update_results(workdir: str, *, replace: bool = False,
                   **fields: Any) -> Dict[str, Any]:
  """The one writer of ``results.json``: sets ``fields`` (process 0); with
  ``replace`` the file holds ``fields`` alone (a new training report drops
  the reports of older checkpoints)."""
  results = dict({} if replace else read_results(workdir), **fields)
  if jax.process_index() == 0:
    reporting.write_json(os.path.join(workdir, reporting.RESULTS), results)
  return results
