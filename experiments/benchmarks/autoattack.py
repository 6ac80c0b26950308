"""Section ``autoattack``: AutoAttack's APGD-CE + APGD-T (version ``apgd``)
on 1,000 embedded-MNIST test points of a PGD-trained MLP and LeNet: natively
in JAX (``uta_jax.apgd``, every local device, and one device), and the
reference ``pyautoattack`` through ``uta_jax.torch_bridge`` and on the
native PyTorch network. XLA_FLAGS chooses the CPU device count (one device:
``XLA_FLAGS=--xla_force_host_platform_device_count=1``).
"""

import functools
import statistics
import time

import jax
import numpy as np

from benchmarks import common
from uta_jax import auto_attack
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import steps
from uta_jax import torch_bridge


def run(torch, opts) -> list:
  """AutoAttack (APGD-CE + APGD-T) in JAX vs the reference, per model.

  The reference runs through the bridge and on the native PyTorch network
  with the same weights. JAX runs on one device and, where there are more,
  on every local device. The JAX program is compiled by a warm-up call
  (its compile time is reported apart); the timed calls are interleaved.
  """
  ds = data.load_dataset('mnist_embedded',
                         max_eval_examples=opts.aa_examples)
  device = torch_bridge.torch_device()
  x = common.to_nchw(torch, data.to_float(ds.test.images), device)
  y = torch.from_numpy(ds.test.labels.astype(np.int64)).to(device)
  devices = jax.local_devices()
  default_threads = torch.get_num_threads()
  rows = []
  for name in [m for m in opts.models if m in ('mlp', 'lenet')]:
    # PGD-AT (eps 0.1): a model with robust points left for APGD-T.
    model, variables = steps.fit(
        configs.get_config('mnist_embedded', {'model.name': name,
                                              'attack.name': 'pgd',
                                              'attack.eps_train': 0.1,
                                              'attack.num_steps': 5,
                                              'attack.step_size': 0.03}),
        ds.train, num_steps=opts.aa_train_steps)
    modules = {
        'bridge': torch_bridge.bridge_module(model.apply, variables),
        'native': torch_bridge.native_torch_model(
            name, variables['params']).to(device),
    }
    robust = {}

    def run_jax(label, devs):
      report = auto_attack.evaluate(
          model, variables, ds.test, eps=opts.aa_eps, version='apgd',
          backend='jax', devices=devs, batch_size=opts.aa_batch_size)
      robust[label] = report['robust_accuracy']

    def run_torch(label, impl, threads):
      torch.set_num_threads(threads)
      try:
        x_adv, _ = auto_attack.reference_autoattack(
            modules[impl], x, y, eps=opts.aa_eps, version='apgd',
            batch_size=opts.aa_batch_size)
        with torch.no_grad():
          robust[label] = 100.0 * float(
              (modules[impl](x_adv).argmax(1) == y).float().mean())
      finally:
        torch.set_num_threads(default_threads)

    # The reference as evaluate.py runs it (torch on 1 thread, XLA beside
    # it), and the native network also with torch on every core.
    fns = {'jax': functools.partial(run_jax, 'jax', devices),
           'bridge': functools.partial(run_torch, 'bridge', 'bridge', 1),
           'native': functools.partial(run_torch, 'native', 'native', 1)}
    if default_threads > 1:
      fns['native_all_threads'] = functools.partial(
          run_torch, 'native_all_threads', 'native', default_threads)
    if len(devices) > 1:
      fns['jax_1_device'] = functools.partial(run_jax, 'jax_1_device',
                                              devices[:1])
    compile_s = {}
    for label in [k for k in fns if k.startswith('jax')]:
      start = time.perf_counter()
      fns[label]()  # compiles
      compile_s[label] = time.perf_counter() - start
    times = common.interleaved(fns, opts.aa_reps, warm_up=False)
    med = {k: statistics.median(t) for k, t in times.items()}
    row = {'model': name, 'num_examples': len(y), 'eps': opts.aa_eps,
           'version': 'apgd', 'torch_threads': 1,
           'torch_threads_all': default_threads,
           'jax_devices': len(devices),
           'jax_seconds': med['jax'], 'bridge_seconds': med['bridge'],
           'native_seconds': med['native'],
           'jax_first_call_seconds': compile_s['jax'],
           'speedup_over_native': med['native'] / med['jax'],
           'speedup_over_bridge': med['bridge'] / med['jax'],
           'robust_accuracy': dict(robust),
           'times': {k: {'median_s': med[k], 'min_s': min(t), 'max_s': max(t)}
                     for k, t in times.items()}}
    if 'native_all_threads' in med:
      row['native_all_threads_seconds'] = med['native_all_threads']
      row['speedup_over_native_all_threads'] = (med['native_all_threads'] /
                                                med['jax'])
    if 'jax_1_device' in med:
      row['jax_1_device_seconds'] = med['jax_1_device']
      row['sharding_speedup'] = med['jax_1_device'] / med['jax']
      row['evaluate'] = time_evaluate(model, variables, ds.test, devices,
                                      opts)
    rows.append(row)
    print(f"{name:6s} AutoAttack apgd, {len(y)} points, eps {opts.aa_eps}: "
          f"JAX {med['jax']:.1f}s ({len(devices)} devices; first call "
          f"{compile_s['jax']:.1f}s), bridge {med['bridge']:.1f}s, native "
          f"{med['native']:.1f}s (1 thread), "
          f"{med.get('native_all_threads', float('nan')):.1f}s "
          f"({default_threads} threads) -> {row['speedup_over_native']:.2f}x "
          f"native, {row['speedup_over_bridge']:.2f}x bridge"
          + (f"; 1 device {med['jax_1_device']:.1f}s "
             f"({row['sharding_speedup']:.2f}x)" if 'jax_1_device' in med
             else '') + f'; robust acc {robust}', flush=True)
  return rows


def time_evaluate(model, variables, split, devices, opts) -> dict:
  """``evaluation.evaluate`` (PGD-20 x 10 restarts, UTA-20, FGSM at the
  AutoAttack eps) on one device and on all, interleaved after a warm-up."""
  config = configs.get_config('mnist_embedded', {'eval.eps': [opts.aa_eps]})
  evaluate_on = lambda devs: evaluation.evaluate(
      model, variables, split, config=config, key=jax.random.PRNGKey(0),
      devices=devs)
  times = common.interleaved({'one_device': lambda: evaluate_on(devices[:1]),
                              'all_devices': lambda: evaluate_on(devices)},
                             opts.aa_reps)
  med = {k: statistics.median(t) for k, t in times.items()}
  return {'one_device_seconds': med['one_device'],
          'all_devices_seconds': med['all_devices'],
          'speedup': med['one_device'] / med['all_devices']}



def markdown(rows) -> str:
  """The README's speed table of the ``autoattack`` section."""
  fmt = lambda v: '-' if v is None else f'{v:.1f} s'
  lines = ['| model | points | JAX, all devices | JAX, 1 device | reference '
           'via bridge | reference, native (1 thread) | reference, native '
           '(all threads) | JAX speed-up vs native 1 / all threads, vs bridge '
           '| robust acc. JAX / native (%) |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |']
  for r in rows:
    all_threads = r.get('speedup_over_native_all_threads')
    lines.append(
        f"| {r['model']} | {r['num_examples']} | {r['jax_seconds']:.1f} s "
        f"({r['jax_devices']}) | {fmt(r.get('jax_1_device_seconds'))} | "
        f"{r['bridge_seconds']:.1f} s | {r['native_seconds']:.1f} s | "
        f"{fmt(r.get('native_all_threads_seconds'))} | "
        f"{r['speedup_over_native']:.2f}x / " +
        (f'{all_threads:.2f}x' if all_threads else '-') +
        f", {r['speedup_over_bridge']:.2f}x | "
        f"{r['robust_accuracy']['jax']:.1f} / "
        f"{r['robust_accuracy']['native']:.1f} |")
  return '\n'.join(lines) + '\n'


