"""``train_and_evaluate(config, workdir)``: the main job.

Loads the data, restores the newest valid checkpoint in ``workdir`` (or
starts fresh), trains with the pmapped step over every local device, logs
progress, checkpoints every ``checkpoint_every`` steps, at the end and when
``stop_requested()`` turns true (preemption), then evaluates and writes
``results.json``, ``metrics.jsonl`` and ``training_curves.png``.

Step s always sees global batch s of the (seed, epoch) order, and every
random draw is ``fold_in(key, s)``: a killed and resumed run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zlib
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from uta_jax import checkpointing
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import steps
from uta_jax import workdir_lock

log = logging.getLogger('uta_jax')

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'


# Named stream of the evaluation's random draws (PGD random starts), folded
# into the run's key: evaluations depend on --seed, never on training draws.
EVAL_STREAM = zlib.crc32(b'evaluation')


def eval_key(run_key: jax.Array, step: int) -> jax.Array:
  """The key of the evaluation at ``step``: the run key's eval stream."""
  return jax.random.fold_in(jax.random.fold_in(run_key, EVAL_STREAM), step)


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, incompatible workdir)."""


def _make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise workdir_lock.write_error(e, workdir) from e


def prepare_workdir(config: configs.Config, workdir: str) -> None:
  """Creates ``workdir`` and saves the config, or checks it matches."""
  path = os.path.join(workdir, CONFIG)
  _make_workdir(workdir)
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = configs.from_json(f.read())
    except (OSError, configs.ConfigError) as e:
      raise TrainingError(f'{path} is unreadable ({e}); delete it or use a new '
                          '--workdir') from e
    diff = configs.incompatibilities(saved, config)
    if diff:
      raise TrainingError(
          f'workdir {workdir!r} holds a run with other settings ({", ".join(diff)}'
          '): rerun with the same flags to resume, or use a new --workdir')
  if jax.process_index() == 0:
    reporting.write_json(path, json_config(config))


def json_config(config: configs.Config) -> Any:
  """The config as ``config.json`` and ``results.json`` store it."""
  return json.loads(configs.to_json(config))


def _global_batch(split: data.Split, step: int, config: configs.Config):
  idx = data.host_batch_indices(
      seed=config.seed, step=step, num_examples=len(split),
      global_batch=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  return data.get_batch(split, idx)


def train_and_evaluate(config: configs.Config, workdir: str, *,
                       stop_requested: Callable[[], bool] = lambda: False
                      ) -> Dict[str, Any]:
  """Trains, checkpoints and evaluates; returns the results dict.

  If ``stop_requested()`` becomes true the state is checkpointed and
  ``{'status': 'preempted', 'step': s}`` is returned; rerun to resume.
  """
  configs.validate(config)
  parallel.check_global_batch(config.batch_size)
  _make_workdir(workdir)
  with workdir_lock.hold(workdir, what='training',
                         enabled=jax.process_index() == 0):
    try:
      return _train_and_evaluate(config, workdir, stop_requested)
    except OSError as e:
      raise workdir_lock.write_error(e, workdir) from e


def _train_and_evaluate(config: configs.Config, workdir: str,
                        stop_requested: Callable[[], bool]) -> Dict[str, Any]:
  prepare_workdir(config, workdir)
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

  model = steps.create_model(config)
  tx = steps.make_optimizer(config.optimizer, steps_per_epoch)
  state = jax.device_get(steps.create_train_state(config, model, tx,
                                                  dataset.input_shape))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS))
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
          f'last good checkpoint kept. Lower --learning_rate or --eps_train')
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
      stopping = stop_requested()
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
            f'kept (step {last}). Lower --learning_rate or --eps_train')
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
  train_seconds = time.time() - t0

  t1 = time.time()
  final_state = parallel.unreplicate(p_state)
  try:
    results_eval = evaluation.evaluate(
        model, steps.variables_of(final_state), dataset.test, config=config,
        key=eval_key(final_state.key, step), stop_requested=stop_requested)
  except parallel.Stopped:
    log.info('stop requested during the final evaluation (training finished '
             'and checkpointed at step %d)', step)
    return {'status': 'preempted', 'step': step}
  results = {
      'status': 'finished',
      'config': json_config(config),
      'dataset_source': dataset.source,
      'steps': step,
      'evaluation': results_eval,
      'clean_accuracy': results_eval['clean_accuracy'],
      'robust_accuracy': results_eval['robust_accuracy'],
      'tradeoff': {a: evaluation.tradeoff(results_eval, a)
                   for a in ('pgd', 'uta')},
      'timings': {
          'train_seconds_this_run': train_seconds,
          'steps_this_run': step - start_step,
          'eval_seconds': time.time() - t1,
          'devices': jax.device_count(),
      },
  }
  if jax.process_index() == 0:
    reporting.append_metrics(metrics_path, {
        'kind': 'eval', 'step': step,
        'clean_accuracy': results_eval['clean_accuracy'],
        **_first_eps_accuracies(results_eval)})
    reporting.write_json(os.path.join(workdir, reporting.RESULTS), results)
    reporting.plot_training_curves(metrics_path,
                                   os.path.join(workdir, reporting.CURVES))
    reporting.write_tensorboard(metrics_path,
                                os.path.join(workdir, reporting.TENSORBOARD))
  return results


def _eval_during_training(config, model, p_state, dataset, step,
                          metrics_path, stop_requested) -> None:
  state = parallel.unreplicate(p_state)
  ev = evaluation.evaluate(model, steps.variables_of(state), dataset.test,
                           config=config, key=eval_key(state.key, step),
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


def load_run(workdir: str) -> Tuple[configs.Config, Any, Any, int]:
  """(config, model, variables, step) of the newest valid checkpoint.

  Raises ``TrainingError`` naming the fix when ``workdir`` holds no run.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise TrainingError(f'no run in {workdir!r} (no {CONFIG}): train first '
                        f'with experiments/train.py --workdir={workdir}')
  try:
    with open(path) as f:
      config = configs.from_json(f.read())
  except (OSError, configs.ConfigError) as e:
    raise TrainingError(f'{path} is unreadable ({e})') from e
  model = steps.create_model(config)
  tx = steps.make_optimizer(config.optimizer, 1)
  target = jax.device_get(steps.create_train_state(
      config, model, tx, data.INPUT_SHAPES[config.dataset]))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS))
  try:
    state, step = checkpointer.restore_latest(target)
  finally:
    checkpointer.close()
  if state is None:
    raise TrainingError(f'no valid checkpoint in {workdir!r}: train first '
                        f'with experiments/train.py --workdir={workdir}')
  return config, model, steps.variables_of(state), step


def evaluate_workdir(workdir: str, *, version: str = 'standard',
                     backend: Optional[str] = None,
                     eps: Optional[Sequence[float]] = None,
                     num_examples: int = 1000, batch_size: int = 500,
                     seed: int = 0, jax_pgd: bool = True,
                     stop_requested: Optional[Callable[[], bool]] = None
                    ) -> Dict[str, Any]:
  """AutoAttack (and JAX-native PGD / UTA) on a trained workdir.

  Evaluates the first ``num_examples`` test points at each ``eps`` (default:
  the run's eval eps) and stores the report as ``'autoattack'`` in the
  workdir's ``results.json`` after every eps, so a stop loses at most the
  eps in progress: a rerun with the same settings (checkpoint, points,
  seed, version, backend) skips the eps already stored. Raises
  ``parallel.Stopped`` once ``stop_requested()`` is true.
  """
  config, model, variables, step = load_run(workdir)
  if config.dataset == 'toy2d':
    raise TrainingError('AutoAttack evaluates image models; toy2d points have '
                        'no pixel box')
  with workdir_lock.hold(workdir, what='AutoAttack evaluation',
                         enabled=jax.process_index() == 0):
    try:
      return _evaluate_workdir(
          workdir, config, model, variables, step, version=version,
          backend=backend, eps=eps, num_examples=num_examples,
          batch_size=batch_size, seed=seed, jax_pgd=jax_pgd,
          stop_requested=stop_requested)
    except OSError as e:
      raise workdir_lock.write_error(e, workdir) from e


def _evaluate_workdir(workdir, config, model, variables, step, *, version,
                      backend, eps, num_examples, batch_size, seed, jax_pgd,
                      stop_requested) -> Dict[str, Any]:
  eps = tuple(config.eval.eps if eps is None else eps)
  backend = backend or evaluation.default_backend(version)
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir,
                              max_eval_examples=num_examples,
                              seed=config.seed)
  path = os.path.join(workdir, reporting.RESULTS)
  settings = {'checkpoint_step': step, 'num_examples': len(dataset.test),
              'seed': seed, 'version': version, 'backend': backend}
  stored = _read_results(path).get('autoattack') or {}
  same = all(stored.get(k) == v for k, v in settings.items())
  report = dict(stored if same else {}, **settings)
  report.setdefault('eps', {})
  report.pop('jax', None)
  for e in eps:
    if str(e) in report['eps']:
      log.info('AutoAttack (%s, %s) at eps=%s: stored in %s, skipped',
               version, backend, reporting.format_eps(e), path)
      continue
    log.info('AutoAttack (%s, %s backend) at eps=%s on %d test points',
             version, backend, reporting.format_eps(e), len(dataset.test))
    result = evaluation.autoattack(
        model, variables, dataset.test, eps=e, ensemble=steps.is_ensemble(
            config), version=version, backend=backend, batch_size=batch_size,
        seed=seed, stop_requested=stop_requested)
    result.pop('robust_points')
    report['model_randomness'] = result.pop('model_randomness')
    report['eps'][str(e)] = result
    _store_autoattack(path, report)
  if jax_pgd:
    start = time.time()
    eval_config = dataclasses.replace(
        config, eval=dataclasses.replace(config.eval, eps=eps))
    report['jax'] = evaluation.evaluate(
        model, variables, dataset.test, config=eval_config,
        key=jax.random.PRNGKey(seed), stop_requested=stop_requested)
    report['jax']['seconds'] = time.time() - start
    _store_autoattack(path, report)
  return report


def _read_results(path: str) -> Dict[str, Any]:
  try:
    return reporting.read_json(path) if os.path.exists(path) else {}
  except (OSError, ValueError) as e:
    raise TrainingError(f'{path} is unreadable ({e}); move it away and '
                        'rerun') from e


def _store_autoattack(path: str, report: Dict[str, Any]) -> None:
  """Puts ``report`` into ``results.json`` as 'autoattack' (process 0)."""
  if jax.process_index() != 0:
    return
  results = _read_results(path)
  results['autoattack'] = report
  reporting.write_json(path, results)
