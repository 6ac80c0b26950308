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
      return _report(config, workdir, stop_requested, trained, start=start)
    except OSError as e:
      raise workdir_lock.write_error(e, workdir) from e


def _train(config: configs.Config, workdir: str,
           stop_requested: Callable[[], bool]) -> Dict[str, Any]:
  """The training loop: {'status': 'finished', 'state', 'dataset', 'model',
  'timings'} or {'status': 'preempted', 'step'}."""
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
  metrics_path = os.path.join(workdir, reporting.METRICS)
  p_step = parallel.pmap_train_step(
      steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
  p_state = parallel.replicate(state)

  def save(step):
    host_state = parallel.unreplicate(p_state)
    if not all(np.all(np.isfinite(leaf)) for leaf in
               jax.tree_util.tree_leaves(host_state.params)):
      raise TrainingError(
          f'non-finite parameters at step {step}; stopped without saving them, '
          'last good checkpoint kept. Lower optimizer.learning_rate or '
          'attack.eps_train', 'optimizer.learning_rate', 'attack.eps_train')
    checkpointer.save(step, host_state)
    if jax.process_index() == 0:
      reporting.write_tensorboard(
          metrics_path, os.path.join(workdir, reporting.TENSORBOARD))

  step = int(state.step)
  start_step, t0 = step, time.time()
  window_start, window_images = time.time(), 0
  try:
    while step < total_steps:
      batch = parallel.shard(_global_batch(dataset.train, step, config))
      p_state, metrics = p_step(p_state, batch)
      step += 1
      window_images += config.batch_size
      stopping = stop_requested() or parallel.preemption_reached(step)
      saving = step % config.checkpoint_every == 0 or stopping
      logging_now = step % config.log_every == 0 or step == total_steps
      evaluating = step < total_steps and (
          (config.eval_every and
           step % (config.eval_every * steps_per_epoch) == 0) or
          (config.eval_every_steps and step % config.eval_every_steps == 0))
      if not (saving or logging_now or evaluating):
        continue  # no host sync: the device runs ahead
      # A non-finite loss poisons every later step, so checking it here,
      # before any save, keeps the last checkpoint good.
      metrics = jax.tree_util.tree_map(lambda m: float(m[0]),
                                       jax.device_get(metrics))
      if not math.isfinite(metrics['loss']):
        last = checkpointer.steps()[-1] if checkpointer.steps() else 'none'
        raise TrainingError(
            f'non-finite loss by step {step}; stopped, last good checkpoint '
            f'kept (step {last}). Lower optimizer.learning_rate or '
            'attack.eps_train', 'optimizer.learning_rate', 'attack.eps_train')
      if logging_now:
        elapsed = time.time() - window_start
        rate = window_images / max(elapsed, 1e-9)
        eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
        record = dict(kind='train', step=step, epoch=step / steps_per_epoch,
                      images_per_sec=rate, **metrics)
        if jax.process_index() == 0:
          reporting.append_metrics(metrics_path, record)
        log.info('epoch %.2f step %d/%d loss %.4f train acc %.2f%% '
                 '%.0f img/s ETA %.0fs', record['epoch'], step, total_steps,
                 metrics['loss'], 100 * metrics['accuracy'], rate, eta)
        window_start, window_images = time.time(), 0
      if saving:
        save(step)
      if stopping:
        log.info('stop requested: checkpointed step %d, exiting', step)
        return {'status': 'preempted', 'step': step}
      if evaluating:
        try:
          _eval_during_training(config, model, p_state, dataset, step,
                                metrics_path, stop_requested)
        except parallel.Stopped:
          save(step)
          log.info('stop requested during evaluation: checkpointed step %d',
                   step)
          return {'status': 'preempted', 'step': step}
    if step not in checkpointer.steps():
      save(step)
  finally:
    checkpointer.close()
  return {'status': 'finished', 'state': parallel.unreplicate(p_state),
          'dataset': dataset, 'model': model,
          'timings': {'train_seconds_this_run': time.time() - t0,
                      'steps_this_run': step - start_step}}


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
  if jax.process_index() == 0:
    reporting.append_metrics(metrics_path, {
        'kind': 'eval', 'step': step,
        'clean_accuracy': results_eval['clean_accuracy'],
        **_first_eps_accuracies(results_eval)})
    reporting.plot_training_curves(metrics_path,
                                   os.path.join(workdir, reporting.CURVES))
    reporting.write_tensorboard(metrics_path,
                                os.path.join(workdir, reporting.TENSORBOARD))
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
                          metrics_path, stop_requested) -> None:
  state = parallel.unreplicate(p_state)
  ev = evaluation.evaluate(model, steps.variables_of(state), dataset.test,
                           config=config,
                           key=steps.stream_key(state, evaluation.KEY_STREAM, step),
                           stop_requested=stop_requested)
  first = _first_eps_accuracies(ev)
  log.info('eval at step %d: clean %.2f%%, FGSM %.2f%%, PGD %.2f%% '
           '(eps=%s)', step, ev['clean_accuracy'], first['fgsm_accuracy'],
           first['pgd_accuracy'], config.eval.eps[0])
  if jax.process_index() == 0:
    reporting.append_metrics(metrics_path, {
        'kind': 'eval', 'step': step, 'clean_accuracy': ev['clean_accuracy'],
        **first})


def _first_eps_accuracies(ev: Dict[str, Any]) -> Dict[str, float]:
  """{'pgd_accuracy': %, 'uta_accuracy': %, ...} at the first eval eps."""
  return {f'{a}_accuracy': list(accs.values())[0]
          for a, accs in ev['robust_accuracy'].items()}


