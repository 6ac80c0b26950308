"""Section ``runs``: R runs as one program vs R plain steps one after another.

The step: R runs of the Fashion-MNIST LeNet UTA-AT step (eps_train 0.1,
K = 10, batch 128 each) as one pmapped program (``training.program_step``,
each of ``programs.RUN_MAPS``) against the plain step of one run
(``steps.make_train_step``: every attack setting a Python constant) called
R times in a row, every run on its own device-resident batch; images/s of
all R runs, the next call always queued (at most two in flight, as in the
loop). A mixed row: 8 runs at K = 10 of PGD and UTA, eps_train 0.05-0.2.

End to end: ``train.py --seeds=0,..,R-1`` against R ``train.py`` calls, as a
user types them (start-up, data loading, compilation, evaluation included;
each side with a fresh persistent compilation cache of its own, so the R
calls compile once and then hit the cache as a user's would).
"""

import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import jax
import numpy as np

from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import parallel
from uta_jax import programs
from uta_jax import steps
from uta_jax import training

STEP_SETTING = {'attack.name': 'uta', 'attack.eps_train': 0.1,
                'attack.num_steps': 10, 'max_train_examples': 4096}
MIXED = [dict(STEP_SETTING, **{'attack.eps_train': eps, 'attack.name': name})
         for eps in (0.05, 0.1, 0.15, 0.2) for name in ('pgd', 'uta')]
# The end-to-end runs: the main job's preset, shortened.
E2E_ARGS = ('--epochs=3', '--max_eval_examples=200', '--eval_pgd_restarts=1',
            '--eval_eps=0.1')
TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'train.py')


def _program(run_configs: Sequence[configs.Config], run_map: str):
  """A call that runs one step of ``run_configs`` as one program
  (``run_map`` 'plain': the plain step of the one run)."""
  config = run_configs[0]
  dataset = data.load_dataset(config.dataset,
                              max_train_examples=config.max_train_examples,
                              max_eval_examples=1)
  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, 100)
  states = [jax.device_get(steps.create_train_state(
      c, model, tx, dataset.input_shape)) for c in run_configs]
  batches = [data.get_batch(dataset.train,
                            np.arange(config.batch_size) + 128 * r)
             for r in range(len(run_configs))]
  if run_map == 'plain':
    (state,), (batch,) = states, batches
    p_states = [parallel.replicate(state)]
    batch = parallel.device_batch(batch)
    p_step = parallel.pmap_train_step(steps.make_train_step(
        config, model, tx, axis_name=parallel.AXIS))
    args = (batch,)
  else:
    p_states = [parallel.replicate(programs.stack(states))]
    batch = parallel.device_batch(programs.stack(batches), axis=1)
    p_step = training.program_step(config, model, tx, run_map=run_map)
    args = (batch, parallel.replicate(programs.run_attacks(run_configs)))
  pending = []

  def call():
    p_states[0], metrics = p_step(p_states[0], *args)
    pending.append(metrics)
    if len(pending) > 1:
      jax.block_until_ready(pending.pop(0))

  def finish():
    while pending:
      jax.block_until_ready(pending.pop(0))
  return call, finish


def _rate(calls: int, images: int, seconds: float) -> float:
  return calls * images / seconds


def step_rows(reps: int, sizes=(1, 3, 8), mixed: bool = True) -> List[Dict]:
  """images/s of R runs as one program (each ``programs.RUN_MAPS``) vs R
  plain steps in a row, interleaved; medians over ``reps`` timings of 5
  calls each; with ``mixed``, the PGD-and-UTA row too."""
  rows = []
  cases = [(f'{r} run{"s" if r > 1 else ""}, K = 10', [STEP_SETTING] * r)
           for r in sizes]
  if mixed:
    cases.append(('8 runs, K = 10, PGD and UTA, eps 0.05-0.2', MIXED))
  for name, overrides in cases:
    run_configs = [configs.get_config('fashion_mnist', dict(o, seed=s))
                   for s, o in enumerate(overrides)]
    num, batch = len(run_configs), run_configs[0].batch_size
    fns = {}
    for run_map in programs.RUN_MAPS:
      fns[run_map] = _program(run_configs, run_map)
    singles = [_program([c], 'plain') for c in run_configs]
    fns['plain'] = (lambda: [call() for call, _ in singles],
                     lambda: [finish() for _, finish in singles])
    times = {name_: [] for name_ in fns}
    for call, finish in fns.values():  # compile and warm up
      call()
      finish()
    for _ in range(reps):
      for key, (call, finish) in fns.items():
        start = time.perf_counter()
        for _ in range(5):
          call()
        finish()
        times[key].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    row = {'case': name, 'runs': num, 'batch_size': batch,
           'backend': jax.default_backend(), 'devices': jax.device_count(),
           'images_per_sec': {k: _rate(5, num * batch, v)
                              for k, v in med.items()},
           'seconds_runs': times}
    row['ratio'] = {k: med['plain'] / med[k] for k in programs.RUN_MAPS}
    rows.append(row)
    print(f'{name}: ' + ', '.join(
        f"{k} {row['images_per_sec'][k]:,.0f} img/s (ratio "
        f"{row['ratio'][k]:.2f})" for k in programs.RUN_MAPS) +
          f", {num} plain steps {row['images_per_sec']['plain']:,.0f}",
          flush=True)
  return rows


def _train(args: Sequence[str], cache: str) -> float:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, TRAIN, *args,
                         f'--compilation_cache_dir={cache}'],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'train.py {" ".join(args)} failed:\n'
                       f'{proc.stderr[-2000:]}')
  return time.perf_counter() - start


def end_to_end(num_runs: int = 3, repeats: int = 2) -> Dict:
  """Seconds of ``train.py --seeds`` vs ``num_runs`` ``train.py`` calls,
  alternated ``repeats`` times; medians."""
  seeds = list(range(num_runs))
  together, apart = [], []
  for _ in range(repeats):
    with tempfile.TemporaryDirectory() as tmp:
      together.append(_train([*E2E_ARGS, f'--workdir={tmp}/together',
                              f'--seeds={",".join(map(str, seeds))}'],
                             f'{tmp}/cache_together'))
      apart.append(sum(_train([*E2E_ARGS, f'--workdir={tmp}/seed{s}',
                               f'--seed={s}'], f'{tmp}/cache_apart')
                       for s in seeds))
  row = {'runs': num_runs, 'args': list(E2E_ARGS),
         'backend': jax.default_backend(), 'devices': jax.device_count(),
         'seeds_seconds': float(np.median(together)),
         'separate_seconds': float(np.median(apart)),
         'seeds_seconds_runs': together, 'separate_seconds_runs': apart}
  row['ratio'] = row['separate_seconds'] / row['seeds_seconds']
  print(f"end to end, {num_runs} runs: train.py --seeds "
        f"{row['seeds_seconds']:.1f} s, {num_runs} train.py calls "
        f"{row['separate_seconds']:.1f} s -> ratio {row['ratio']:.2f}",
        flush=True)
  return row


def markdown(result: Dict) -> str:
  """The README's run-axis tables."""
  maps = programs.RUN_MAPS
  lines = ['| runs (F-MNIST LeNet UTA-AT step) | device | ' + ' | '.join(
      f'one program, {m} (img/s)' for m in maps) + ' | R plain steps '
           '(img/s) | ' + ' | '.join(f'ratio {m}' for m in maps) + ' |',
           '| --- | --- |' + ' ---: |' * (2 * len(maps) + 1)]
  for r in result['steps']:
    ips = r['images_per_sec']
    lines.append(f"| {r['case']} | {r['devices']} {r['backend'].upper()} "
                 'devices | ' + ' | '.join(f'{ips[m]:,.0f}' for m in maps) +
                 f" | {ips['plain']:,.0f} | " +
                 ' | '.join(f"{r['ratio'][m]:.2f}" for m in maps) + ' |')
  e = result.get('end_to_end')
  if e:
    lines += ['', '| end to end | device | `train.py --seeds` (s) | '
              'separate `train.py` calls (s) | ratio |',
              '| --- | --- | ---: | ---: | ---: |',
              f"| {e['runs']} runs, main job, {' '.join(e['args'])} | "
              f"{e['devices']} {e['backend'].upper()} devices | "
              f"{e['seeds_seconds']:.1f} | {e['separate_seconds']:.1f} | "
              f"{e['ratio']:.2f} |"]
  return '\n'.join(lines)
