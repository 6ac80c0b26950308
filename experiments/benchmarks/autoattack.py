"""Section ``autoattack``: the standard AutoAttack (APGD-CE, APGD-T, FAB-T,
Square) natively in JAX vs the reference ``pyautoattack`` through
``uta_jax.torch_bridge``, and many models in one program.

- ``standard``: per ``--models`` (``lenet``: the agreement set's
  Fashion-MNIST LeNet PGD-AT, ``--aa_workdir``, written by
  ``autoattack_agreement.py`` and trained here like it if missing; ``mlp``:
  the first MLP below) at ``--aa_eps`` on ``--aa_examples`` test points: JAX
  with its compilation (caches cleared before each timed call), JAX with
  its programs in the persistent compilation cache (filled by one untimed
  call; in-memory caches cleared: what evaluate.py pays from its second
  model of an architecture on) and the bridge, interleaved; and JAX warm.
- ``runs``: ``--aa_runs`` (8) embedded-MNIST MLPs (PGD-AT, seeds 0-7) at
  ``--aa_eps`` on ``--aa_runs_examples`` points: one program over the run
  axis (``auto_attack.evaluate_runs``, the backend's default run map) vs as
  many separate ``auto_attack.evaluate`` calls, both warm, interleaved.

XLA_FLAGS chooses the CPU device count.
"""

import os
import shutil
import statistics
import tempfile
import time

import jax

from benchmarks import common
from uta_jax import auto_attack
from uta_jax import auto_attack_jax
from uta_jax import backend as uta_backend
from uta_jax import configs
from uta_jax import data
from uta_jax import programs
from uta_jax import runs
from uta_jax import steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
AGREEMENT_LENET = os.path.join(ROOT, 'results', 'autoattack_agreement_quick',
                               'runs', 'fmnist_lenet_pgd_at', 'seed0')
# autoattack_agreement.py's PGD-AT LeNet: eps_train 0.2, 3 epochs of 10k.
LENET = {'attack.name': 'pgd', 'attack.eps_train': 0.2,
         'max_train_examples': 10000, 'epochs': 3}
NUM_MODELS = 8  # --aa_runs' default: the issue's "8 models at once"


def lenet(workdir: str):
  """(model, variables, config, where from) of the agreement LeNet."""
  if os.path.exists(os.path.join(workdir, runs.CONFIG)):
    run = runs.load_run(workdir)
    return run.model, run.variables, run.config, workdir
  config = configs.get_config('fashion_mnist', LENET)
  ds = data.load_dataset('fashion_mnist', data_dir=config.data_dir,
                         max_train_examples=config.max_train_examples,
                         max_eval_examples=16)
  num_steps = config.epochs * data.steps_per_epoch(len(ds.train),
                                                   config.batch_size)
  model, variables = steps.fit(config, ds.train, num_steps=num_steps)
  return model, variables, config, f'trained here ({num_steps} steps)'


def mlps(opts):
  """(model, [variables] of ``--aa_runs`` seeds, embedded-MNIST dataset):
  MLPs after ``--aa_train_steps`` of PGD-AT (eps 0.1)."""
  ds = data.load_dataset('mnist_embedded')
  fitted = [steps.fit(configs.get_config('mnist_embedded', {
      'attack.name': 'pgd', 'attack.eps_train': 0.1, 'attack.num_steps': 5,
      'attack.step_size': 0.03, 'seed': seed}), ds.train,
                      num_steps=opts.aa_train_steps)
            for seed in range(opts.aa_runs)]
  return fitted[0][0], [v for _, v in fitted], ds


def standard_row(name, model, variables, split, source, opts) -> dict:
  """The standard version on one model: JAX cold and warm vs the bridge,
  and JAX cold in memory but with its programs in the persistent
  compilation cache (what evaluate.py, whose cache is on by default, pays
  from its second model of an architecture on)."""
  reports = {}
  cache = tempfile.mkdtemp(prefix='aa_compilation_cache_')
  # The process's own cache (benchmark.py turns the user's on, as the
  # scripts do), restored after each call: the cold side must not read it.
  previous = ((jax.config.jax_enable_compilation_cache and
               jax.config.jax_compilation_cache_dir) or 'none')

  def evaluate(label, backend, cold=False, cache_dir='none'):
    if cold:  # nothing compiled in this process is reused
      jax.clear_caches()
      auto_attack_jax._programs.cache_clear()  # pylint: disable=protected-access
    uta_backend.enable_compilation_cache(cache_dir)
    try:
      reports[label] = auto_attack.evaluate(
          model, variables, split, eps=opts.aa_eps, version='standard',
          backend=backend, batch_size=opts.aa_batch_size)
    finally:
      uta_backend.enable_compilation_cache(previous)

  try:
    evaluate('jax_cached', 'jax', cold=True, cache_dir=cache)  # fills it
    times = common.interleaved(
        {'jax_with_compilation': lambda: evaluate('jax', 'jax', cold=True),
         'jax_compilation_cached': lambda: evaluate(
             'jax_cached', 'jax', cold=True, cache_dir=cache),
         'bridge': lambda: evaluate('bridge', 'torch')},
        opts.aa_reps, warm_up=False)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  start = time.perf_counter()
  evaluate('jax_warm', 'jax')
  warm = time.perf_counter() - start
  med = {k: statistics.median(t) for k, t in times.items()}
  row = {'model': name, 'source': source, 'num_examples': len(split),
         'eps': opts.aa_eps, 'version': 'standard',
         'jax_devices': len(jax.local_devices()),
         'jax_seconds': med['jax_with_compilation'], 'jax_warm_seconds': warm,
         'jax_cached_seconds': med['jax_compilation_cached'],
         'bridge_seconds': med['bridge'],
         'speedup_over_bridge': med['bridge'] / med['jax_with_compilation'],
         'speedup_cached_over_bridge': (med['bridge'] /
                                        med['jax_compilation_cached']),
         'robust_accuracy': {k: r['robust_accuracy']
                             for k, r in reports.items()},
         'per_attack': {k: r['per_attack'] for k, r in reports.items()},
         'times': {k: {'median_s': med[k], 'min_s': min(t), 'max_s': max(t)}
                   for k, t in times.items()}}
  print(f"{name} standard AutoAttack, {len(split)} points, eps "
        f"{opts.aa_eps}: JAX {med['jax_with_compilation']:.1f} s with "
        f"compilation ({warm:.1f} s warm, "
        f"{med['jax_compilation_cached']:.1f} s from the compilation "
        f"cache), bridge {med['bridge']:.1f} s -> "
        f"{row['speedup_over_bridge']:.2f}x; robust acc "
        f"{row['robust_accuracy']}", flush=True)
  return row


def runs_row(model, variables, split, opts) -> dict:
  """The MLPs: one program over the run axis vs separate evaluations."""
  stacked = programs.stack(variables)
  accuracies = {}

  def together():
    reports = auto_attack.evaluate_runs(
        model, stacked, split, eps=[opts.aa_eps], version='standard',
        batch_size=opts.aa_batch_size)[0]
    accuracies['one_program'] = [r['robust_accuracy'] for r in reports]

  def separate(models=variables):
    accuracies['separate'] = [auto_attack.evaluate(
        model, v, split, eps=opts.aa_eps, version='standard',
        batch_size=opts.aa_batch_size)['robust_accuracy'] for v in models]

  first_call = {}  # compiles; the 8 separate calls share one program
  for name, fn in (('one_program', together),
                   ('separate', lambda: separate(variables[:1]))):
    start = time.perf_counter()
    fn()
    first_call[name] = time.perf_counter() - start
  times = common.interleaved({'one_program': together,
                              'separate': separate}, opts.aa_runs_reps,
                             warm_up=False)
  med = {k: statistics.median(t) for k, t in times.items()}
  row = {'models': len(variables), 'model': 'mlp',
         'num_examples': len(split), 'eps': opts.aa_eps,
         'version': 'standard',
         'run_map': programs.default_eval_run_map(jax.devices()[0].platform),
         'jax_devices': len(jax.local_devices()),
         'one_program_seconds': med['one_program'],
         'separate_seconds': med['separate'],
         'speedup': med['separate'] / med['one_program'],
         'first_call_seconds': first_call,
         'same_accuracies': accuracies['one_program'] ==
                            accuracies['separate'],
         'robust_accuracy': accuracies,
         'times': {k: {'median_s': med[k], 'min_s': min(t), 'max_s': max(t)}
                   for k, t in times.items()}}
  print(f"{len(variables)} MLPs, standard AutoAttack, {len(split)} points: "
        f"one program {med['one_program']:.1f} s vs {len(variables)} "
        f"separate {med['separate']:.1f} s -> {row['speedup']:.2f}x (same "
        f"accuracies: {row['same_accuracies']})", flush=True)
  return row


def run(torch, opts) -> dict:
  """The standard version on ``--models`` (mlp: the first MLP; lenet: the
  agreement LeNet), then the ``--aa_runs`` MLPs at once; torch runs the
  reference on 1 thread (as evaluate.py runs it, XLA beside it)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    model, variables, ds = mlps(opts)
    rows = []
    for name in [m for m in opts.models if m in ('mlp', 'lenet')]:
      if name == 'mlp':
        rows.append(standard_row(
            'mnist_mlp_pgd_at', model, variables[0],
            ds.test.take(opts.aa_examples),
            f'{opts.aa_train_steps} PGD-AT steps', opts))
      else:
        lenet_model, lenet_variables, config, source = lenet(opts.aa_workdir)
        lenet_split = data.load_dataset(
            config.dataset, data_dir=config.data_dir,
            max_eval_examples=opts.aa_examples).test
        rows.append(standard_row('fmnist_lenet_pgd_at', lenet_model,
                                 lenet_variables, lenet_split, source, opts))
    return {'standard': rows, 'runs': runs_row(
        model, variables, ds.test.take(opts.aa_runs_examples), opts),
            'torch_threads': 1}
  finally:
    torch.set_num_threads(threads)


def markdown(result: dict) -> str:
  """The speed tables of the ``autoattack`` section."""
  lines = ['| model | points | eps | JAX, with compilation | JAX, '
           'compilation cached | JAX, warm | reference via bridge | JAX '
           'speed-up (with compilation / cached) | robust acc. JAX / bridge '
           '(%) |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
  for r in result['standard']:
    lines.append(
        f"| {r['model']} | {r['num_examples']} | {r['eps']:g} | "
        f"{r['jax_seconds']:.1f} s ({r['jax_devices']} devices) | "
        f"{r['jax_cached_seconds']:.1f} s | "
        f"{r['jax_warm_seconds']:.1f} s | {r['bridge_seconds']:.1f} s | "
        f"{r['speedup_over_bridge']:.2f}x / "
        f"{r['speedup_cached_over_bridge']:.2f}x | "
        f"{r['robust_accuracy']['jax']:.1f} / "
        f"{r['robust_accuracy']['bridge']:.1f} |")
  r = result['runs']
  lines += ['', f"| {r['models']} models ({r['model']}, {r['num_examples']} "
            f"points, eps {r['eps']:g}) | one program (run map "
            f"`{r['run_map']}`) | {r['models']} separate evaluations | "
            'speed-up | same accuracies |',
            '| --- | ---: | ---: | ---: | --- |',
            f"| warm, median | {r['one_program_seconds']:.1f} s | "
            f"{r['separate_seconds']:.1f} s | {r['speedup']:.2f}x | "
            f"{'yes' if r['same_accuracies'] else 'no'} |"]
  return '\n'.join(lines) + '\n'
