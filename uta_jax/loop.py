"""``train_and_evaluate(config, workdir)``: the main job.

Loads the data, restores the newest valid checkpoint in ``workdir`` (or
starts fresh), trains with the pmapped step over every local device
(``_train``: logs progress, checkpoints every ``checkpoint_every`` steps, at
the end and when ``stop_requested()`` turns true), then evaluates and
reports (``_report``: ``results.json`` through ``runs.update_results``,
``metrics.jsonl``, ``training_curves.png``, TensorBoard events). What the
workdir holds and how it is read back is ``runs``.

Step s always sees global batch s of the (seed, epoch) order, and every
random draw is ``fold_in(key, s)``: a killed and resumed run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
from typing import Any, Callable, Dict

import jax
import numpy as np

from uta_jax import checkpointing
from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import runs
from uta_jax import steps
from uta_jax import workdir_lock

log = logging.getLogger('uta_jax')

class TrainingError(runs.RunError):
  """Training cannot go on (a non-finite loss or parameters)."""


def _global_batch(split: data.Split, step: int, config: configs.Config):
  idx = data.host_batch_indices(
      seed=config.seed, step=step, num_examples=len(split),
      global_batch=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  return data.get_batch(split, idx, augment_seed=(
      (config.seed, step) if config.augment else None))


def train_and_evaluate(config: configs.Config, workdir: str, *,
                       stop_requested: Callable[[], bool] = lambda: False
                      ) -> Dict[str, Any]:
  """Trains, checkpoints and evaluates; returns the results dict.

  If ``stop_requested()`` becomes true the state is checkpointed and
  ``{'status': 'preempted', 'step': s}`` is returned; rerun to resume.
  """
  configs.validate(config)
  parallel.check_global_batch(config.batch_size)
  runs.make_workdir(workdir)
  with workdir_lock.hold(workdir, what='training',
                         enabled=jax.process_index() == 0):
    try:
      start = time.time()
      trained = _train(config, workdir, stop_requested)
      if trained['status'] != 'finished':
        return trained
      try:
        return _report(config, workdir, stop_requested, trained, start=start)
      finally:
        trained['metrics_log'].close()
    except OSError as e:
      raise workdir_lock.write_error(e, workdir) from e


def _train(config: configs.Config, workdir: str,
           stop_requested: Callable[[], bool]) -> Dict[str, Any]:
  """The training loop: {'status': 'finished', 'state', 'dataset', 'model',
  'timings'} or {'status': 'preempted', 'step'}.

  The device is kept busy: the next batch is sent while a step runs, a
  step's metrics are read once the next step is queued (``_Progress``),
  and checkpoints are written by a writer thread (``BackgroundSaver``).
  """
  runs.prepare_workdir(config, workdir)
  dataset = data.load_dataset(
      config.dataset, data_dir=config.data_dir,
      max_train_examples=config.max_train_examples,
      max_eval_examples=config.max_eval_examples, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(dataset.train),
                                         config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  log.info('%s (%s): %d train / %d test, input %s, %d devices, %d steps',
           dataset.name, dataset.source, len(dataset.train),
           len(dataset.test), dataset.input_shape, jax.device_count(),
           total_steps)

  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, steps_per_epoch)
  state = jax.device_get(steps.create_train_state(config, model, tx,
                                                  dataset.input_shape))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir,
                                                         runs.CHECKPOINTS))
  restored, restored_step = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    log.info('resumed from step %d of %d', restored_step, total_steps)
  step = int(state.step)
  metrics_log = reporting.MetricsLog(
      os.path.join(workdir, reporting.METRICS),
      os.path.join(workdir, reporting.TENSORBOARD), resumed_step=step,
      enabled=jax.process_index() == 0)
  saver = checkpointing.BackgroundSaver(
      checkpointer, validate=_refuse_non_finite,
      background=jax.process_count() == 1)
  p_step = parallel.pmap_train_step(
      steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
  p_state = parallel.replicate(state)
  progress = _Progress(config, total_steps, steps_per_epoch, metrics_log,
                       saver, start_step=step)

  def save(at):
    saver.submit(at, parallel.first_replica(p_state))

  def evaluating(at):
    return at < total_steps and (
        (config.eval_every and
         at % (config.eval_every * steps_per_epoch) == 0) or
        (config.eval_every_steps and at % config.eval_every_steps == 0))

  t0 = time.time()
  batches = _Prefetcher(lambda at: parallel.device_batch(
      _global_batch(dataset.train, at, config)), start=step, stop=total_steps)
  try:
    while step < total_steps:
      p_state, metrics = p_step(p_state, batches.get(step))
      step += 1
      progress.queued(step, metrics)  # reads the step before this one
      stopping = stop_requested() or parallel.preemption_reached(step)
      if step % config.checkpoint_every == 0 or stopping:
        save(step)  # a device copy, before the next step donates the state
      if stopping:
        progress.finish()
        saver.wait()
        metrics_log.close()
        log.info('stop requested: checkpointed step %d, exiting', step)
        return {'status': 'preempted', 'step': step}
      if evaluating(step):
        progress.finish()
        try:
          _eval_during_training(config, model, p_state, dataset, step,
                                metrics_log, stop_requested)
        except parallel.Stopped:
          if saver.submitted_step != step:
            save(step)
          saver.wait()
          metrics_log.close()
          log.info('stop requested during evaluation: checkpointed step %d',
                   step)
          return {'status': 'preempted', 'step': step}
      saver.check()
    progress.finish()
    if step not in checkpointer.steps() and saver.submitted_step != step:
      save(step)
    saver.wait()
  except BaseException:
    metrics_log.close()
    raise
  finally:
    batches.close()
    saver.close()
  return {'status': 'finished', 'state': parallel.unreplicate(p_state),
          'dataset': dataset, 'model': model, 'metrics_log': metrics_log,
          'timings': {'train_seconds_this_run': time.time() - t0,
                      'steps_this_run': step - progress.start_step,
                      'first_step_seconds': progress.first_step_seconds}}


class _Prefetcher:
  """``make(step)`` for the steps ``start`` .. ``stop - 1`` in order, each
  made on a helper thread while the step before it runs (XLA releases the
  GIL while it computes), so the host's batch work overlaps the device's."""

  def __init__(self, make: Callable[[int], Any], *, start: int, stop: int):
    self._make, self._stop = make, stop
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='batch-prefetch')
    self._next = self._submit(start)

  def _submit(self, step: int):
    return (step, self._pool.submit(self._make, step)) if step < self._stop \
        else None

  def get(self, step: int) -> Any:
    """The batch of ``step`` (the next one in order); starts the one after."""
    made, future = self._next
    assert made == step, (made, step)
    self._next = self._submit(step + 1)
    return future.result()

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


def _refuse_non_finite(step: int, host_state: Any) -> None:
  """The writer thread's check: non-finite parameters are never saved."""
  if not all(np.all(np.isfinite(leaf)) for leaf in
             jax.tree_util.tree_leaves(host_state.params)):
    raise TrainingError(
        f'non-finite parameters at step {step}; stopped without saving them, '
        'last good checkpoint kept. Lower optimizer.learning_rate or '
        'attack.eps_train', 'optimizer.learning_rate', 'attack.eps_train')


class _Progress:
  """Reads each step's metrics one step late, when the next step is already
  queued (the device never waits for the host), checks the loss, and logs
  every ``log_every`` steps (``metrics.jsonl``, TensorBoard, a line)."""

  def __init__(self, config, total_steps, steps_per_epoch, metrics_log,
               saver, *, start_step):
    self.config, self.total_steps = config, total_steps
    self.steps_per_epoch, self.metrics_log = steps_per_epoch, metrics_log
    self.saver, self.start_step = saver, start_step
    self._pending = None  # (step, device metrics) not yet read
    self._started = time.time()
    self.first_step_seconds = None
    self._window_start, self._window_step = time.time(), start_step

  def queued(self, step: int, metrics: Dict[str, Any]) -> None:
    """Step ``step`` is queued: completes the one before it."""
    self.finish()
    self._pending = (step, metrics)

  def finish(self) -> None:
    """Waits for the pending step and handles its metrics."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    loss = float(np.asarray(metrics['loss'])[0])  # waits for the step
    now = time.time()
    if self.first_step_seconds is None:
      self.first_step_seconds = now - self._started
    if not (step % self.config.log_every == 0 or step == self.total_steps or
            not math.isfinite(loss)):
      return
    metrics = jax.tree_util.tree_map(lambda m: float(m[0]),
                                     jax.device_get(metrics))
    if not math.isfinite(metrics['loss']):
      # A non-finite loss poisons every later step: stop before it is saved
      # (the writer refuses non-finite parameters too).
      try:
        self.saver.wait()
      except TrainingError:
        pass
      done = self.saver.checkpointer.steps()
      raise TrainingError(
          f'non-finite loss by step {step}; stopped, last good checkpoint '
          f'kept (step {done[-1] if done else "none"}). Lower '
          'optimizer.learning_rate or attack.eps_train',
          'optimizer.learning_rate', 'attack.eps_train')
    images = (step - self._window_step) * self.config.batch_size
    rate = images / max(now - self._window_start, 1e-9)
    eta = (self.total_steps - step) * self.config.batch_size / max(rate, 1e-9)
    record = dict(kind='train', step=step, epoch=step / self.steps_per_epoch,
                  images_per_sec=rate, **metrics)
    self.metrics_log.append(record)
    log.info('epoch %.2f step %d/%d loss %.4f train acc %.2f%% '
             '%.0f img/s ETA %.0fs', record['epoch'], step, self.total_steps,
             metrics['loss'], 100 * metrics['accuracy'], rate, eta)
    self._window_start, self._window_step = now, step


def _report(config: configs.Config, workdir: str,
            stop_requested: Callable[[], bool], trained: Dict[str, Any], *,
            start: float) -> Dict[str, Any]:
  """The final evaluation of ``_train``'s finished state; writes and returns
  the results (``runs.update_results``), the last metrics, the curves."""
  state, dataset, model = trained['state'], trained['dataset'], trained['model']
  step = int(state.step)
  t1 = time.time()
  try:
    results_eval = evaluation.evaluate(
        model, steps.variables_of(state), dataset.test, config=config,
        key=steps.stream_key(state, evaluation.KEY_STREAM, step),
        stop_requested=stop_requested)
  except parallel.Stopped:
    log.info('stop requested during the final evaluation (training finished '
             'and checkpointed at step %d)', step)
    return {'status': 'preempted', 'step': step}
  metrics_path = os.path.join(workdir, reporting.METRICS)
  metrics_log = trained['metrics_log']
  metrics_log.append({'kind': 'eval', 'step': step,
                      'clean_accuracy': results_eval['clean_accuracy'],
                      **_first_eps_accuracies(results_eval)})
  if jax.process_index() == 0:
    reporting.plot_training_curves(metrics_path,
                                   os.path.join(workdir, reporting.CURVES))
  return runs.update_results(
      workdir, replace=True,
      status='finished',
      config=configs.to_dict(config),
      dataset_source=dataset.source,
      steps=step,
      evaluation=results_eval,
      clean_accuracy=results_eval['clean_accuracy'],
      robust_accuracy=results_eval['robust_accuracy'],
      tradeoff={a: evaluation.tradeoff(results_eval, a)
                for a in ('pgd', 'uta')},
      timings=dict(trained['timings'], eval_seconds=time.time() - t1,
                   wall_seconds=time.time() - start,
                   devices=jax.device_count()))


def _eval_during_training(config, model, p_state, dataset, step,
                          metrics_log, stop_requested) -> None:
  state = parallel.unreplicate(p_state)
  ev = evaluation.evaluate(model, steps.variables_of(state), dataset.test,
                           config=config,
                           key=steps.stream_key(state, evaluation.KEY_STREAM, step),
                           stop_requested=stop_requested)
  first = _first_eps_accuracies(ev)
  log.info('eval at step %d: clean %.2f%%, FGSM %.2f%%, PGD %.2f%% '
           '(eps=%s)', step, ev['clean_accuracy'], first['fgsm_accuracy'],
           first['pgd_accuracy'], config.eval.eps[0])
  metrics_log.append({'kind': 'eval', 'step': step,
                      'clean_accuracy': ev['clean_accuracy'], **first})


def _first_eps_accuracies(ev: Dict[str, Any]) -> Dict[str, float]:
  """{'pgd_accuracy': %, 'uta_accuracy': %, ...} at the first eval eps."""
  return {f'{a}_accuracy': list(accs.values())[0]
          for a, accs in ev['robust_accuracy'].items()}


