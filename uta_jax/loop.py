"""Runs from configs to reports: ``train_and_evaluate(config, workdir)``,
the main job, and ``train_and_evaluate_runs``, many runs as few programs.

Loads the data, restores the newest valid checkpoint of each run (or starts
fresh), trains the runs that share a program (``programs.group``, split to
fit the device memory) with one pmapped step over every local device and a
leading run axis (``training.Program``: logs progress, checkpoints every run
every ``checkpoint_every`` steps, at the end and when ``stop_requested()``
turns true), then evaluates and reports each run alone (``_report``:
``results.json`` through ``runs.update_results``, ``metrics.jsonl``,
``training_curves.png``, TensorBoard events). Every run keeps a single
run's workdir (``runs``): ``evaluate.py`` and a resume of one run alone read
it. A run whose loss or parameters turn non-finite is stopped and reported
alone; the others go on.

Step s always sees global batch s of the (seed, epoch) order, and every
random draw is ``fold_in(key, s)``: a killed and resumed run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax

from uta_jax import checkpointing
from uta_jax import classifier
from uta_jax import config_json
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import parallel
from uta_jax import programs
from uta_jax import reporting
from uta_jax import runs
from uta_jax import steps
from uta_jax import training
from uta_jax import workdir_lock

log = logging.getLogger('uta_jax')
TrainingError = training.TrainingError


def train_and_evaluate(config: configs.Config, workdir: str, *,
                       stop_requested: Callable[[], bool] = lambda: False,
                       **options: Any) -> Dict[str, Any]:
  """Trains, checkpoints and evaluates one run; returns the results dict.

  If ``stop_requested()`` becomes true the state is checkpointed and
  ``{'status': 'preempted', 'step': s}`` is returned; rerun to resume.
  Raises ``TrainingError`` when the run turns non-finite.
  """
  results = train_and_evaluate_runs([config], [workdir],
                                    stop_requested=stop_requested, **options)
  if results[0]['status'] == 'failed':
    raise results[0]['error']
  return results[0]


def train_and_evaluate_runs(
    run_configs: Sequence[configs.Config], workdirs: Sequence[str], *,
    stop_requested: Callable[[], bool] = lambda: False,
    run_map: Optional[str] = None,
    max_runs_per_program: Optional[int] = None,
    memory_limit_bytes: Optional[int] = None,
    background_saves: Optional[bool] = None) -> List[Dict[str, Any]]:
  """Trains the runs in as few programs as ``programs.group`` and the
  device memory allow, evaluates each; a results dict per run, in order:
  ``status`` 'finished' (the report), 'preempted' (``step``: where it
  stopped, None if it did not start) or 'failed' (``error``, a
  ``TrainingError``; the other runs went on).

  ``run_map``: ``programs.RUN_MAPS`` (default per backend);
  ``max_runs_per_program``: R at most (default: what the compiled program's
  memory analysis says fits ``memory_limit_bytes``, default the device's);
  ``background_saves``: checkpoints written on a writer thread per run
  (default: with one host; several hosts save in the loop, as orbax
  synchronises them).
  """
  if len(set(workdirs)) != len(workdirs) or len(workdirs) != len(run_configs):
    raise runs.RunError('every run needs a workdir of its own')
  if max_runs_per_program is not None and max_runs_per_program < 1:
    raise runs.RunError('max_runs_per_program must be >= 1',
                        'max_runs_per_program')
  for config in run_configs:
    configs.validate(config)
    parallel.check_global_batch(config.batch_size)
  for workdir in workdirs:
    runs.make_workdir(workdir)
  options = dict(run_map=run_map or programs.default_run_map(
      jax.default_backend()), max_runs=max_runs_per_program,
                 memory_limit_bytes=memory_limit_bytes,
                 background_saves=(jax.process_count() == 1
                                   if background_saves is None
                                   else background_saves))
  results: List[Optional[Dict[str, Any]]] = [None] * len(run_configs)
  with contextlib.ExitStack() as locks:
    for workdir in workdirs:
      locks.enter_context(workdir_lock.hold(
          workdir, what='training', enabled=jax.process_index() == 0))
    for n, members in enumerate(programs.group(run_configs)):
      if n and stop_requested():  # the programs not started stay so
        break
      group = [training.Run(run_configs[i], workdirs[i]) for i in members]
      try:
        for i, result in zip(members, _train_group(group, stop_requested,
                                                   **options)):
          results[i] = result
      except OSError as e:
        raise workdir_lock.write_error(e, group[0].workdir) from e
  return [r or {'status': 'preempted', 'step': None} for r in results]


def _train_group(group: List[training.Run], stop_requested, *, run_map: str,
                 max_runs: Optional[int], memory_limit_bytes: Optional[int],
                 background_saves: bool) -> List[Dict[str, Any]]:
  """Trains and reports the runs of one ``programs.group``: the runs
  restored at one step train together (in chunks that fit the device);
  runs restored at different steps (a kill between two runs' saves) train
  as separate programs."""
  start = time.time()
  config = group[0].config
  for run in group:
    runs.prepare_workdir(run.config, run.workdir)
  dataset = data.load_dataset(
      config.dataset, data_dir=config.data_dir,
      max_train_examples=config.max_train_examples,
      max_eval_examples=config.max_eval_examples, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(dataset.train),
                                         config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  log.info('%s (%s): %d train / %d test, input %s, %d devices, %d steps, '
           '%d run%s', dataset.name, dataset.source, len(dataset.train),
           len(dataset.test), dataset.input_shape, jax.device_count(),
           total_steps, len(group), 's' if len(group) > 1 else '')
  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, steps_per_epoch)
  for run in group:
    _restore(run, model, tx, dataset.input_shape, total_steps,
             background=background_saves)
  program = training.Program(config, model, tx, dataset, total_steps,
                             steps_per_epoch, run_map=run_map)
  size = max_runs or program.runs_that_fit(group, memory_limit_bytes)
  chunks = [chunk for at in sorted({r.step for r in group})
            for chunk in programs.split([r for r in group if r.step == at],
                                        size)]
  results = {}
  try:
    # The first chunk's time holds the set-up and the compilation.
    chunk_start = start
    for n, chunk in enumerate(chunks):
      status = ('preempted' if n and stop_requested()  # not started
                else _train_to_end(program, chunk, stop_requested,
                                   since=chunk_start))
      chunk_start = time.time()
      for run in chunk:
        if status == 'preempted':
          results[id(run)] = {'status': 'preempted', 'step': (
              run.stopped_at if run.stopped_at is not None else run.step)}
        elif run.active:
          results[id(run)] = _report(run, model, dataset, stop_requested,
                                     runs_in_program=len(chunk), start=start,
                                     compiled=program.eval_programs)
        else:
          results[id(run)] = {'status': 'failed', 'error': run.error}
  finally:
    for run in group:
      run.close()
  return [results[id(run)] for run in group]


def _restore(run: training.Run, model, tx, input_shape, total_steps: int, *,
             background: bool) -> None:
  """The run's fresh state, or its newest valid checkpoint."""
  state = jax.device_get(steps.create_train_state(run.config, model, tx,
                                                  input_shape))
  run.checkpointer = checkpointing.Checkpointer(os.path.join(
      run.workdir, runs.CHECKPOINTS))
  restored, restored_step = run.checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    log.info('%s: resumed from step %d of %d', run.workdir, restored_step,
             total_steps)
  run.state = state
  run.start_step = int(state.step)
  run.metrics_log = reporting.MetricsLog(
      os.path.join(run.workdir, reporting.METRICS),
      os.path.join(run.workdir, reporting.TENSORBOARD),
      resumed_step=run.start_step, enabled=jax.process_index() == 0)
  run.saver = checkpointing.BackgroundSaver(
      run.checkpointer, validate=training.refuse_non_finite,
      background=background)


def _train_to_end(program: training.Program, chunk: List[training.Run],
                  stop_requested, *, since: float) -> str:
  """Trains ``chunk`` (its runs at one step) to the program's last step,
  never past it (a run restored beyond a lowered ``epochs`` stays where it
  is): 'finished' or 'preempted'. ``since``: when the chunk's time started
  (its timings)."""
  if chunk[0].step < program.total_steps:
    status = program.train(chunk, stop_requested)
    if status == 'preempted':
      return status
  for run in chunk:
    run.timings = {'train_seconds_this_run': time.time() - since,
                   'steps_this_run': run.step - run.start_step,
                   'first_step_seconds': program.first_step_seconds,
                   'compile_seconds': program.compile_seconds}
  return 'finished'


def _report(run: training.Run, model, dataset, stop_requested, *,
            runs_in_program: int, start: float,
            compiled=None) -> Dict[str, Any]:
  """The final evaluation of a trained run, with its own key stream (the
  numbers of the run trained alone); writes and returns the results
  (``runs.update_results``), the last metrics, the curves."""
  config, workdir, state = run.config, run.workdir, run.state
  step = int(state.step)
  t1 = time.time()
  try:
    results_eval = evaluation.evaluate(
        model, steps.variables_of(state), dataset.test, config=config,
        key=steps.stream_key(state, evaluation.KEY_STREAM, step),
        stop_requested=stop_requested, compiled=compiled)
  except parallel.Stopped:
    log.info('stop requested during the final evaluation (training finished '
             'and checkpointed at step %d)', step)
    return {'status': 'preempted', 'step': step}
  metrics_path = os.path.join(workdir, reporting.METRICS)
  run.metrics_log.append({'kind': 'eval', 'step': step,
                          'clean_accuracy': results_eval['clean_accuracy'],
                          **training.first_eps_accuracies(results_eval)})
  if jax.process_index() == 0:
    reporting.plot_training_curves(metrics_path,
                                   os.path.join(workdir, reporting.CURVES))
  eval_seconds = time.time() - t1
  train_share = run.timings['train_seconds_this_run'] / runs_in_program
  return runs.update_results(
      workdir, replace=True,
      status='finished',
      config=config_json.to_dict(config),
      dataset_source=dataset.source,
      steps=step,
      evaluation=results_eval,
      clean_accuracy=results_eval['clean_accuracy'],
      robust_accuracy=results_eval['robust_accuracy'],
      tradeoff={a: evaluation.tradeoff(results_eval, a)
                for a in ('pgd', 'uta')},
      # wall_seconds: this run's share of its program's training, and its
      # own evaluation (program_seconds: the whole program's, start-up in)
      timings=dict(run.timings, eval_seconds=eval_seconds,
                   wall_seconds=train_share + eval_seconds,
                   program_seconds=time.time() - start,
                   runs_in_program=runs_in_program,
                   devices=jax.device_count()))
