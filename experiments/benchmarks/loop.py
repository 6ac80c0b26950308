"""Section ``loop``: how busy ``train.py``'s loop keeps the device.

The loop efficiency of a run is the steady-state images/s of the training
loop as ``train.py`` runs it (``loop.train_and_evaluate`` with the preset's
checkpoints, logging and metrics on), divided by the images/s of the bare
pmapped train step on a device-resident batch. The loop's rate comes from
its own progress records (``metrics.jsonl``: images/s per ``log_every``
window); the first window, which holds the compilation, is left out; the rest holds at least
three checkpoint saves (the preset's 100 steps apart).
"""

import os
import tempfile
import time
from typing import Optional

import jax
import numpy as np

from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import loop
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import steps

# name -> (dataset, overrides): the main job as its README command runs it
# (30 epochs of 4,000 images, ~940 steps), Fashion-MNIST LeNet UTA-AT with
# K = 10 (eps_train 0.1) for 420 steps of its 60,000 images, and with K = 40
# (eps_train 0.4, the paper's largest) for 140 steps.
RUNS = {
    'main job (MNIST MLP, UTA-20)': ('mnist_embedded', {}),
    'Fashion-MNIST LeNet UTA-AT (K = 10)': (
        'fashion_mnist', {'attack.eps_train': 0.1, 'epochs': 1,
                          'max_train_examples': 420 * 128}),
    'Fashion-MNIST LeNet UTA-AT (K = 40)': (
        'fashion_mnist', {'attack.eps_train': 0.4, 'epochs': 1,
                          'max_train_examples': 140 * 128}),
}
# Only the final evaluation changes: it is not part of the measured loop.
CHEAP_EVAL = {'max_eval_examples': 100, 'eval.pgd_restarts': 1,
              'eval.eps': (0.1,)}


def _loop_rate(config: configs.Config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``; the steady-state images/s of the
  loop from its progress records, and the windows it spans."""
  loop.train_and_evaluate(config, workdir)
  records = [r for r in reporting.read_metrics(
      os.path.join(workdir, reporting.METRICS)) if r['kind'] == 'train']
  first, rest = records[0], records[1:]
  steps_done = [r['step'] for r in rest]
  windows = np.diff([first['step']] + steps_done)
  images = windows * config.batch_size
  seconds = images / np.array([r['images_per_sec'] for r in rest])
  saves = sum(1 for s in range(first['step'] + 1, steps_done[-1] + 1)
              if s % config.checkpoint_every == 0)
  return {'images_per_sec': float(images.sum() / seconds.sum()),
          'steps': [int(first['step']), int(steps_done[-1])],
          'saves_in_window': saves}


def _bare_rate(config: configs.Config, seconds: float) -> float:
  """images/s of the pmapped train step alone, on one device-resident
  batch of the run's data (compiled by a warm-up step), the next step
  always queued, for at least ``seconds``."""
  dataset = data.load_dataset(config.dataset,
                              max_train_examples=config.max_train_examples,
                              max_eval_examples=1, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(dataset.train),
                                         config.batch_size)
  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, steps_per_epoch)
  state = parallel.replicate(jax.device_get(steps.create_train_state(
      config, model, tx, dataset.input_shape)))
  p_step = parallel.pmap_train_step(
      steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
  batch = parallel.device_batch(data.get_batch(dataset.train,
                                               np.arange(config.batch_size)))
  state, metrics = p_step(state, batch)
  jax.block_until_ready(metrics)
  start, done = time.perf_counter(), 0
  while done < 10 or time.perf_counter() - start < seconds:
    # At most two steps in flight, as in the loop: the device never idles,
    # and XLA:CPU's collectives can deadlock with many steps queued.
    state, next_metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    metrics, done = next_metrics, done + 1
  jax.block_until_ready((state, metrics))
  return done * config.batch_size / (time.perf_counter() - start)


def run(*, bare_seconds: float, runs: Optional[dict] = None,
        repeats: int = 3) -> list:
  """One row per run of ``runs`` (default ``RUNS``): loop and bare-step
  images/s and their ratio. A CPU's speed drifts by 10-20% within minutes,
  so the bare step is timed before and after each of ``repeats`` loop runs
  (bare, loop, bare, loop, bare) and each loop is divided by the mean of
  its two neighbours; the row gives the median of those ratios (the bare
  step runs ``bare_seconds`` each time)."""
  rows = []
  for name, (dataset, overrides) in (runs or RUNS).items():
    config = configs.get_config(dataset, dict(overrides, **CHEAP_EVAL))
    bare = [_bare_rate(config, bare_seconds)]
    looped = []
    for _ in range(repeats):
      with tempfile.TemporaryDirectory() as workdir:
        looped.append(_loop_rate(config, workdir))
      bare.append(_bare_rate(config, bare_seconds))
    ratios = [l['images_per_sec'] / ((bare[i] + bare[i + 1]) / 2)
              for i, l in enumerate(looped)]
    median = int(np.argsort(ratios)[len(ratios) // 2])
    row = {'run': name, 'dataset': dataset, 'batch_size': config.batch_size,
           'checkpoint_every': config.checkpoint_every,
           'log_every': config.log_every,
           'backend': jax.default_backend(), 'devices': jax.device_count(),
           'loop_images_per_sec': looped[median]['images_per_sec'],
           'bare_step_images_per_sec': (bare[median] + bare[median + 1]) / 2,
           'loop_images_per_sec_runs': [l['images_per_sec'] for l in looped],
           'bare_step_images_per_sec_runs': bare,
           'efficiency_runs': ratios,
           'window_steps': looped[median]['steps'],
           'saves_in_window': looped[median]['saves_in_window'],
           'efficiency': ratios[median]}
    rows.append(row)
    print(f"{name}: loop {row['loop_images_per_sec']:,.0f} img/s, bare step "
          f"{row['bare_step_images_per_sec']:,.0f} img/s -> efficiency "
          f"{row['efficiency']:.2f} (runs: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; steps "
          f"{row['window_steps'][0]}-{row['window_steps'][1]}, "
          f"{row['saves_in_window']} saves)", flush=True)
  return rows


def markdown(rows) -> str:
  """The README's loop-efficiency table."""
  lines = ['| run | device | loop (img/s) | bare step (img/s) | efficiency | '
           'window (steps, saves) | efficiency of each run |',
           '| --- | --- | ---: | ---: | ---: | --- | --- |']
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['devices']} {r['backend'].upper()} devices | "
        f"{r['loop_images_per_sec']:,.0f} | "
        f"{r['bare_step_images_per_sec']:,.0f} | {r['efficiency']:.2f} | "
        f"{r['window_steps'][0]}-{r['window_steps'][1]}, "
        f"{r['saves_in_window']} | " +
        ' / '.join(f'{e:.2f}' for e in r['efficiency_runs']) + ' |')
  return '\n'.join(lines)
