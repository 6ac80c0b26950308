"""The step loop of one program of runs (``Program.train``).

Keeps the device busy: the next batch of every run is built on a helper
thread and sent while a step runs (``Prefetcher``), a step's metrics are read
once the next step is queued (``Progress``: every run's loss checked each
step, records every ``log_every``), and each run's checkpoints are device
copies written by its own writer thread (``checkpointing.BackgroundSaver``).
A run whose loss or parameters turn non-finite is stopped alone (``Run.fail``);
the step goes on for the others. ``loop`` groups runs into programs and
reports them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

from uta_jax import checkpointing
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import parallel
from uta_jax import programs
from uta_jax import reporting
from uta_jax import runs
from uta_jax import steps

log = logging.getLogger('uta_jax')


class TrainingError(runs.RunError):
  """Training cannot go on (a non-finite loss or parameters)."""


def global_batch(split: data.Split, step: int, config: configs.Config):
  """This host's slice of the run's global batch ``step`` (its own order
  and augmentation)."""
  idx = data.host_batch_indices(
      seed=config.seed, step=step, num_examples=len(split),
      global_batch=config.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  return data.get_batch(split, idx, augment_seed=(
      (config.seed, step) if config.augment else None))


class Run:
  """One run of a program: its config, workdir, state and outcome."""

  def __init__(self, config: configs.Config, workdir: str):
    self.config, self.workdir = config, workdir
    self.state: Any = None  # host TrainState between programs
    self.checkpointer: Optional[checkpointing.Checkpointer] = None
    self.saver: Optional[checkpointing.BackgroundSaver] = None
    self.metrics_log: Optional[reporting.MetricsLog] = None
    self.error: Optional[TrainingError] = None
    self.start_step = 0
    self.stopped_at: Optional[int] = None  # the step a stop checkpointed
    self.timings: Dict[str, Any] = {}

  @property
  def step(self) -> int:
    return int(self.state.step)

  @property
  def active(self) -> bool:
    return self.error is None

  def fail(self, error: TrainingError) -> None:
    """Stops this run alone: its last good checkpoint stays."""
    log.error('%s: %s', self.workdir, error)
    self.error = error
    self.close()

  def close(self) -> None:
    """Waits for its save in flight and closes its files (once)."""
    if self.saver is not None:
      self.saver.close()
      self.saver = None
    if self.metrics_log is not None:
      self.metrics_log.close()
      self.metrics_log = None


def program_step(config: configs.Config, model, tx, *,
                 run_map: str) -> Callable[..., Any]:
  """The step ``Program`` trains with: ``programs.make_train_step`` pmapped
  over every local device, the states donated."""
  return parallel.pmap_train_step(programs.make_train_step(
      config, model, tx, axis_name=parallel.AXIS, run_map=run_map))


class Program:
  """The pmapped step of a group's runs and the loop that drives it."""

  def __init__(self, config, model, tx, dataset, total_steps,
               steps_per_epoch, *, run_map: str):
    self.config, self.model, self.dataset = config, model, dataset
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.first_step_seconds = None  # compilation + the first step's wait
    self.compile_seconds = 0.0  # the ahead-of-time compilations
    self._p_step = program_step(config, model, tx, run_map=run_map)
    self._compiled: Dict[int, Any] = {}
    # evaluation.compiled_programs, once sizing has compiled them
    self.eval_programs: Optional[Tuple[Any, Any]] = None

  def _inputs(self, chunk: List[Run]):
    p_states = parallel.replicate(programs.stack([r.state for r in chunk]))
    p_runs = parallel.replicate(programs.run_attacks([r.config
                                                      for r in chunk]))
    return p_states, p_runs

  def _batch(self, chunk: List[Run], step: int):
    return parallel.device_batch(programs.stack([
        global_batch(self.dataset.train, step, r.config) for r in chunk]),
                                 axis=1)

  def _input_shapes(self, chunk: List[Run]):
    """The step's (states, batch, runs) for ``chunk`` as shapes: nothing is
    placed on a device, so sizing a program that does not fit cannot run
    the device out of memory."""
    num, first = len(chunk), chunk[0]

    def runs_of(x):  # [R, ...] for R runs like ``first``
      return jax.ShapeDtypeStruct((num,) + np.shape(x), x.dtype)

    states = jax.tree_util.tree_map(runs_of, first.state)
    batch = jax.tree_util.tree_map(runs_of, global_batch(
        self.dataset.train, first.step, first.config))
    runs = jax.tree_util.tree_map(runs_of, jax.device_get(
        steps.RunAttack.of(first.config.attack)))
    return (parallel.replicated_shapes(states),
            parallel.device_batch_shapes(batch, axis=1),
            parallel.replicated_shapes(runs))

  def _step_fn(self, chunk: List[Run]):
    """The step compiled ahead of time for ``len(chunk)`` runs (its memory
    is known). Several hosts: the pmapped step itself (an ahead-of-time
    compiled pmap expects the global shapes there)."""
    if jax.process_count() > 1:
      return self._p_step
    num = len(chunk)
    if num not in self._compiled:
      start = time.time()
      self._compiled[num] = self._p_step.lower(
          *self._input_shapes(chunk)).compile()
      self.compile_seconds += time.time() - start
    return self._compiled[num]

  def _evaluation_bytes(self, run: Run) -> int:
    """The larger of the evaluation's two compiled programs (one run's;
    kept in ``eval_programs``, which the evaluations then run)."""
    if self.eval_programs is None:
      start = time.time()
      self.eval_programs = evaluation.compiled_programs(
          self.model, steps.variables_of(run.state), self.dataset.test,
          config=self.config)
      self.compile_seconds += time.time() - start
    return max(programs.compiled_bytes(c) for c in self.eval_programs)

  def peak_bytes(self, chunk: List[Run]) -> int:
    """``programs.loop_bytes`` of ``chunk`` on one device: the compiled
    step, the prefetched batch, the checkpoint copy, the evaluation."""
    states, batch, _ = self._input_shapes(chunk)
    devices = jax.local_device_count()
    return programs.loop_bytes(
        step_bytes=programs.compiled_bytes(self._step_fn(chunk)),
        state_bytes=programs.tree_bytes(states) // devices,
        batch_bytes=programs.tree_bytes(batch) // devices,
        eval_bytes=self._evaluation_bytes(chunk[0]))

  def runs_that_fit(self, group: List[Run],
                    limit_bytes: Optional[int]) -> int:
    """R from ``peak_bytes`` (halving from all)."""
    if jax.process_count() > 1:
      return len(group)  # no memory analysis of a multi-host pmap here
    limit = limit_bytes or programs.device_memory_bytes(jax.local_devices()[0])
    size = programs.runs_that_fit(lambda num: self.peak_bytes(group[:num]),
                                  len(group), limit_bytes=limit)
    if size < len(group):
      log.info('%d runs do not fit one program in %.1f MiB: programs of %d',
               len(group), limit / 2**20, size)
    return size

  def train(self, chunk: List[Run], stop_requested) -> str:
    """Trains ``chunk`` (all at one step) to the last step: 'finished' or
    'preempted' (every active run checkpointed)."""
    config, total = self.config, self.total_steps
    step = chunk[0].step
    step_fn = self._step_fn(chunk)
    p_states, p_runs = self._inputs(chunk)
    progress = Progress(chunk, config, total, self.steps_per_epoch,
                         start_step=step)

    saved = [None]  # the step of the last save

    def save(at):
      copies = programs.unstack_all(parallel.first_replica(p_states),
                                    len(chunk))
      for run, copy in zip(chunk, copies):
        if run.active:
          try:  # raises the previous save's error, or (not in the
            run.saver.submit(at, copy)  # background) this one's
          except TrainingError as e:
            run.fail(e)
      saved[0] = at

    def check(waiting: bool) -> None:
      for run in chunk:
        if run.active:
          try:
            run.saver.wait() if waiting else run.saver.check()
          except TrainingError as e:
            run.fail(e)

    def evaluating(at):
      return at < total and (
          (config.eval_every and
           at % (config.eval_every * self.steps_per_epoch) == 0) or
          (config.eval_every_steps and at % config.eval_every_steps == 0))

    def stop(at, during=''):
      if saved[0] != at:
        save(at)
      check(waiting=True)
      kept = sum(run.active for run in chunk)
      for run in chunk:
        run.close()
        run.stopped_at = at
      log.info('stop requested%s: checkpointed step %d of %d run%s, exiting',
               during, at, kept, '' if kept == 1 else 's')
      return 'preempted'

    batches = _Prefetcher(lambda at: self._batch(chunk, at), start=step,
                          stop=total)
    try:
      while step < total and any(r.active for r in chunk):
        p_states, metrics = step_fn(p_states, batches.get(step), p_runs)
        step += 1
        progress.queued(step, metrics)  # reads the step before this one
        stopping = stop_requested() or parallel.preemption_reached(step)
        if step % config.checkpoint_every == 0 or stopping or step == total:
          save(step)  # device copies, before the next step donates them
        if stopping:
          progress.finish()
          return stop(step)
        if evaluating(step):
          progress.finish()
          states = parallel.unreplicate(p_states)
          try:
            for i, run in enumerate(chunk):
              if run.active:
                eval_during_training(run, self.model,
                                      programs.unstack(states, i),
                                      self.dataset, step, stop_requested,
                                      compiled=self.eval_programs)
          except parallel.Stopped:
            return stop(step, ' during evaluation')
        check(waiting=False)
      progress.finish()
      check(waiting=True)
    finally:
      batches.close()
    if (self.first_step_seconds is None and
        progress.first_step_seconds is not None):
      self.first_step_seconds = (self.compile_seconds +
                                 progress.first_step_seconds)
    states = parallel.unreplicate(p_states)
    for i, run in enumerate(chunk):
      run.state = programs.unstack(states, i)
    return 'finished'


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


def refuse_non_finite(step: int, host_state: Any) -> None:
  """The writer thread's check: non-finite parameters are never saved."""
  if not all(np.all(np.isfinite(leaf)) for leaf in
             jax.tree_util.tree_leaves(host_state.params)):
    raise TrainingError(
        f'non-finite parameters at step {step}; stopped without saving them, '
        'last good checkpoint kept. Lower optimizer.learning_rate or '
        'attack.eps_train', 'optimizer.learning_rate', 'attack.eps_train')


class Progress:
  """Reads each step's metrics one step late, when the next step is already
  queued (the device never waits for the host), checks every run's loss,
  and logs every ``log_every`` steps (per run: ``metrics.jsonl`` and
  TensorBoard; one line for the program)."""

  def __init__(self, chunk: List[Run], config, total_steps,
               steps_per_epoch, *, start_step):
    self.chunk, self.config, self.total_steps = chunk, config, total_steps
    self.steps_per_epoch, self.start_step = steps_per_epoch, start_step
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
    losses = np.asarray(metrics['loss'])[0]  # [R]; waits for the step
    now = time.time()
    if self.first_step_seconds is None:
      self.first_step_seconds = now - self._started
    for run, loss in zip(self.chunk, losses):
      if run.active and not math.isfinite(loss):
        _fail_non_finite(run, step)
    active = [i for i, run in enumerate(self.chunk) if run.active]
    if not active or not (step % self.config.log_every == 0 or
                          step == self.total_steps):
      return
    fetched = jax.tree_util.tree_map(lambda m: np.asarray(m)[0],
                                     jax.device_get(metrics))  # [R] each
    images = (step - self._window_step) * self.config.batch_size * len(
        self.chunk)
    rate = images / max(now - self._window_start, 1e-9)
    eta = ((self.total_steps - step) * self.config.batch_size *
           len(self.chunk) / max(rate, 1e-9))
    epoch = step / self.steps_per_epoch
    for i in active:
      self.chunk[i].metrics_log.append(dict(
          kind='train', step=step, epoch=epoch, images_per_sec=rate,
          **programs.per_run_metrics(fetched, i)))
    loss, acc = fetched['loss'][active], 100 * fetched['accuracy'][active]
    if len(self.chunk) == 1:
      log.info('epoch %.2f step %d/%d loss %.4f train acc %.2f%% '
               '%.0f img/s ETA %.0fs', epoch, step, self.total_steps,
               loss[0], acc[0], rate, eta)
    else:
      log.info('epoch %.2f step %d/%d, %d runs: loss %.4f-%.4f train acc '
               '%.2f-%.2f%% %.0f img/s ETA %.0fs', epoch, step,
               self.total_steps, len(active), loss.min(), loss.max(),
               acc.min(), acc.max(), rate, eta)
    self._window_start, self._window_step = now, step


def _fail_non_finite(run: Run, step: int) -> None:
  """A non-finite loss poisons every later step of its run: stop the run
  before it is saved (the writer refuses non-finite parameters too)."""
  try:
    run.saver.wait()
  except TrainingError:
    pass
  done = run.checkpointer.steps()
  run.fail(TrainingError(
      f'non-finite loss by step {step}; stopped, last good checkpoint '
      f'kept (step {done[-1] if done else "none"}). Lower '
      'optimizer.learning_rate or attack.eps_train',
      'optimizer.learning_rate', 'attack.eps_train'))


def eval_during_training(run: Run, model, state, dataset, step,
                         stop_requested, *, compiled=None) -> None:
  """Evaluates one run of a program mid-training, with its own keys
  (``compiled``: ``Program.eval_programs``)."""
  config = run.config
  ev = evaluation.evaluate(model, steps.variables_of(state), dataset.test,
                           config=config,
                           key=steps.stream_key(state, evaluation.KEY_STREAM,
                                                step),
                           stop_requested=stop_requested, compiled=compiled)
  first = first_eps_accuracies(ev)
  log.info('eval at step %d: clean %.2f%%, FGSM %.2f%%, PGD %.2f%% '
           '(eps=%s)', step, ev['clean_accuracy'], first['fgsm_accuracy'],
           first['pgd_accuracy'], config.eval.eps[0])
  run.metrics_log.append({'kind': 'eval', 'step': step,
                          'clean_accuracy': ev['clean_accuracy'], **first})


def first_eps_accuracies(ev: Dict[str, Any]) -> Dict[str, float]:
  """{'pgd_accuracy': %, 'uta_accuracy': %, ...} at the first eps."""
  return {f'{a}_accuracy': list(accs.values())[0]
          for a, accs in ev['robust_accuracy'].items()}
