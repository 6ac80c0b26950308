r"""JAX vs PyTorch eager, side by side in one process.

  python experiments/benchmark.py                       # attacks + AT step
  python experiments/benchmark.py --sections=autoattack # JAX vs reference
  python experiments/benchmark.py --sections=attacks --models=lenet --reps=9
  python experiments/benchmark.py --sections=convs      # per conv layer

Section ``attacks``: for the MLP, LeNet and SVHN LeNet, PGD-10, UTA-10
(M = 1), UTA-10 with 5 MC-dropout samples (batch --batch_size) and one full
UTA-10 adversarial-training step (attack + Adam, batch --train_batch_size),
each as uta_jax runs it (data-parallel over the local devices: on a CPU one
per core, ``cli.use_cpu_cores_as_devices``; also on one device, the
"before") and as a typical PyTorch research codebase writes it (a Python
loop with ``torch.autograd.grad``), with the same weights.

Section ``convs``: each 5x5 convolution of LeNet and SVHN LeNet at the
attack batch, forward and input gradient (the transposed convolution the
attack runs every step), as plain ``lax``, as ``uta_jax.fast_ops`` runs it,
and as PyTorch (``conv2d`` and ``convolution_backward``): where the time of
the attacks goes, layer by layer.

Section ``autoattack``: AutoAttack's APGD-CE + APGD-T (version ``apgd``) on
1,000 embedded-MNIST test points of a PGD-trained MLP and LeNet: natively in
JAX (``uta_jax.apgd``, every local device, and one device), and the
reference ``pyautoattack`` through ``uta_jax.torch_bridge`` and on the native
PyTorch network. XLA_FLAGS chooses the CPU device count (one device:
``XLA_FLAGS=--xla_force_host_platform_device_count=1``).

Repetitions are interleaved (JAX, torch, JAX, torch, ...) after one warm-up
call each; the table gives medians, the spread (min-max) and the ratio of
medians (JAX throughput / torch throughput, or torch time / bridge time).
GFLOP/s use XLA's cost analysis of the JAX program for both frameworks and
are compared with a float32 1024x1024 matmul measured in the same run.
"""

import functools
import json
import logging
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uta_jax import attacks  # pylint: disable=g-import-not-at-top
from uta_jax import configs
from uta_jax import data
from uta_jax import evaluation
from uta_jax import fast_ops
from uta_jax import models
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import steps
from uta_jax import torch_bridge
from uta_jax import uncertainty

FLAGS = flags.FLAGS
flags.DEFINE_list('sections', ['attacks'], 'attacks, convs and/or autoattack')
flags.DEFINE_list('models', ['mlp', 'lenet', 'svhn_lenet'], 'models to run')
flags.DEFINE_integer('batch_size', 256, 'attack batch size')
flags.DEFINE_integer('train_batch_size', 128, 'AT-step batch size')
flags.DEFINE_integer('reps', 5, 'timed repetitions per implementation')
flags.DEFINE_integer('aa_examples', 1000, 'AutoAttack test points')
flags.DEFINE_float('aa_eps', 0.1, 'AutoAttack eps')
flags.DEFINE_integer('aa_batch_size', 500, 'AutoAttack batch size')
flags.DEFINE_integer('aa_reps', 1, 'timed AutoAttack runs per implementation')
flags.DEFINE_integer('aa_train_steps', 300, 'PGD-AT steps of the attacked '
                     'models')
flags.DEFINE_string('output', 'benchmark_results.json', 'JSON output path')
flags.DEFINE_bool('plain_ops', False, 'run the models with plain lax '
                  'convolutions and nn.max_pool instead of uta_jax.fast_ops '
                  '(the "before" of the fast_ops A/B)')

K, EPS, ALPHA, M = 10, 0.1, 0.01, 5


def interleaved(fns: dict, reps: int, *, warm_up: bool = True) -> dict:
  """Seconds per call for each fn: one warm-up each, then interleaved reps."""
  for fn in fns.values() if warm_up else ():
    fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def matmul_peak_gflops() -> float:
  """Best of JAX and torch float32 1024x1024 matmul throughput, GFLOP/s."""
  torch = torch_bridge.require_torch()
  a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
  mm = jax.jit(lambda a: a @ a)
  ta = torch.randn(1024, 1024)
  times = interleaved({'jax': lambda: mm(a).block_until_ready(),
                       'torch': lambda: ta @ ta}, 5)
  return 2 * 1024**3 / min(min(t) for t in times.values()) / 1e9


# --------------------------------------------------------- torch eager side


def torch_attack(torch, net, x, y, *, objective):
  """K projected sign steps in a Python loop, as PyTorch codebases write it."""
  F = torch.nn.functional
  x_adv = x.clone()
  for _ in range(K):
    x_adv.requires_grad_(True)
    if objective == 'pgd':
      value = F.cross_entropy(net(x_adv), y, reduction='sum')
    else:
      samples = M if objective == 'uta_mc5' else 1
      probs = torch.stack([F.softmax(net(x_adv), -1)
                           for _ in range(samples)]).mean(0)
      value = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    grad, = torch.autograd.grad(value, x_adv)
    x_adv = x_adv.detach() + ALPHA * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
  return x_adv


def torch_workloads(torch, name, params, x_np, y_np, x_train, y_train):
  F = torch.nn.functional
  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(
      a.transpose(0, 3, 1, 2)))
  x, y = to_nchw(x_np), torch.from_numpy(y_np.astype(np.int64))
  xt, yt = to_nchw(x_train), torch.from_numpy(y_train.astype(np.int64))
  net = torch_bridge.native_torch_model(name, params)
  mc_net = torch_bridge.native_torch_model(name, params, dropout_rate=0.2)
  mc_net.train()  # dropout on: MC samples
  train_net = torch_bridge.native_torch_model(name, params)
  opt = torch.optim.Adam(train_net.parameters(), lr=1e-3)

  def at_step():
    train_net.eval()
    x_adv = torch_attack(torch, train_net, xt, yt, objective='uta')
    train_net.train()
    opt.zero_grad()
    F.cross_entropy(train_net(x_adv), yt).backward()
    opt.step()

  return {
      'pgd10': lambda: torch_attack(torch, net, x, y, objective='pgd'),
      'uta10': lambda: torch_attack(torch, net, x, y, objective='uta'),
      'uta10_mc5': lambda: torch_attack(torch, mc_net, x, y,
                                        objective='uta_mc5'),
      'at_step': at_step,
  }


# ----------------------------------------------------------------- JAX side


def jax_workloads(name, variables, x, y, x_train, y_train, devices, *,
                  count_flops=True):
  """uta_jax programs data-parallel over ``devices`` (as train.py and
  evaluation run them: the batch split over the devices, the weights
  replicated) and, with ``count_flops``, their FLOP counts (each costs a
  compilation; the device count does not change them).

  XLA's cost analysis counts a while loop's body once, so an attack's FLOPs
  are K times those of one gradient step of its objective.
  """
  n = len(devices)
  split = lambda a: np.asarray(a).reshape((n, -1) + a.shape[1:])
  ctor = models.MODELS[name][0]
  model = ctor()
  mc_model = ctor(dropout_rate=0.2)
  keys = jax.random.split(jax.random.PRNGKey(1), M)
  samplers = {
      'pgd10': None,
      'uta10': lambda v: uncertainty.single_model_sampler(model.apply, v),
      'uta10_mc5': lambda v: uncertainty.mc_dropout_sampler(mc_model.apply,
                                                            v, keys),
  }

  def objective(label, v, labels):
    if label == 'pgd10':
      return attacks.cross_entropy_objective(
          functools.partial(model.apply, v), labels)
    return attacks.uncertainty_objective(samplers[label](v))

  def attack(label, v, x_, y_):
    return attacks.projected_sign_ascent(objective(label, v, y_), x_,
                                         eps=EPS, num_steps=K,
                                         step_size=ALPHA)

  def step_flops(label, v, x_, labels):
    grad = jax.jit(jax.grad(lambda x__: jnp.sum(
        objective(label, v, labels)(x__))))
    return _flops(grad, x_)

  fns, flops = {}, {}
  xs, ys = split(x), split(y)
  for label in samplers:
    mapped = jax.pmap(functools.partial(attack, label), in_axes=(None, 0, 0),
                      devices=devices)
    fns[label] = functools.partial(
        lambda m: m(variables, xs, ys).block_until_ready(), mapped)
    if count_flops:
      flops[label] = K * step_flops(label, variables, x, y)

  config = configs.get_config('mnist', {'model.name': name,
                                        'attack.name': 'uta',
                                        'attack.eps_train': EPS,
                                        'attack.num_steps': K})
  tx = optax.adam(1e-3)
  train_step = jax.pmap(
      steps.make_train_step(config, model, tx, axis_name=parallel.AXIS),
      axis_name=parallel.AXIS, donate_argnums=(0,), devices=devices)
  state = {'s': parallel.replicate(steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats={}, opt_state=tx.init(variables['params']),
      key=jax.random.PRNGKey(2)), devices)}
  batch = {'image': split(x_train), 'label': split(y_train)}

  def at_step():
    state['s'], metrics = train_step(state['s'], batch)
    metrics['loss'].block_until_ready()

  fns['at_step'] = at_step
  if not count_flops:
    return fns, flops
  update = jax.jit(jax.grad(lambda p: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(
          model.apply({'params': p}, x_train), y_train))))
  flops['at_step'] = (K * step_flops('uta10', variables, x_train, y_train) +
                      _flops(update, variables['params']))
  return fns, flops


def _flops(jitted, *args) -> float:
  """FLOPs of one call of a jitted function, from XLA's cost analysis."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def run_attacks(torch, peak: float) -> list:
  rows = []
  rng = np.random.default_rng(0)
  for name in FLAGS.models:
    ctor, shape = models.MODELS[name]
    variables = models.init_variables(ctor(), jax.random.PRNGKey(0), shape)
    x = rng.uniform(size=(FLAGS.batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, 10, FLAGS.batch_size).astype(np.int32)
    xt = x[:FLAGS.train_batch_size]
    yt = y[:FLAGS.train_batch_size]
    devices = jax.local_devices()
    jfns, flops = jax_workloads(name, variables, x, y, xt, yt, devices)
    one = (jax_workloads(name, variables, x, y, xt, yt, devices[:1],
                         count_flops=False)[0]
           if len(devices) > 1 else {})
    tfns = torch_workloads(torch, name, variables['params'], x, y, xt, yt)
    for workload in jfns:
      fns = {'jax': jfns[workload], 'torch': tfns[workload]}
      if one:
        fns['jax_1_device'] = one[workload]
      times = interleaved(fns, FLAGS.reps)
      images = FLAGS.train_batch_size if workload == 'at_step' else (
          FLAGS.batch_size * K)
      row = {'model': name, 'workload': workload,
             'unit': 'images/s' if workload == 'at_step' else
                     'images x steps / s'}
      for impl, t in times.items():
        med = statistics.median(t)
        row[impl] = {'median_s': med, 'min_s': min(t), 'max_s': max(t),
                     'throughput': images / med,
                     'gflops': flops[workload] / med / 1e9,
                     'fraction_of_peak': flops[workload] / med / 1e9 / peak}
      row['jax_devices'] = len(devices)
      row['ratio_jax_over_torch'] = (row['jax']['throughput'] /
                                     row['torch']['throughput'])
      if one:
        row['ratio_1_device_over_torch'] = (
            row['jax_1_device']['throughput'] / row['torch']['throughput'])
      rows.append(row)
      print(f"{name:10s} {workload:9s} JAX {row['jax']['throughput']:9.0f} "
            f"torch {row['torch']['throughput']:9.0f} {row['unit']:18s} "
            f"ratio {row['ratio_jax_over_torch']:.2f} ({len(devices)} "
            f"devices; 1 device "
            f"{row.get('ratio_1_device_over_torch', float('nan')):.2f})  "
            f"(JAX {row['jax']['gflops']:.1f} GFLOP/s, torch "
            f"{row['torch']['gflops']:.1f}; peak {peak:.0f})", flush=True)
  return rows


# ---------------------------------------------------------------- convs

# (layer, input side, input channels, output channels, padding) at 5x5.
CONV_LAYERS = (('lenet conv1', 28, 1, 6, 2), ('lenet conv2', 14, 6, 16, 0),
               ('svhn_lenet conv1', 32, 3, 32, 2),
               ('svhn_lenet conv2', 16, 32, 64, 0))


def run_convs(torch) -> list:
  """Milliseconds per forward and input gradient of each layer: plain lax,
  fast_ops and PyTorch, interleaved."""
  fn = torch.nn.functional
  dn = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1),
                                      ('NHWC', 'HWIO', 'NHWC'))
  rng = np.random.default_rng(0)
  rows = []
  for layer, side, cin, cout, pad in CONV_LAYERS:
    x = rng.standard_normal((FLAGS.batch_size, side, side, cin), np.float32)
    k = rng.standard_normal((5, 5, cin, cout), np.float32)
    padding = [(pad, pad)] * 2
    conv = lambda impl: jax.jit(lambda x_, k_: impl(
        x_, k_, (1, 1), padding, dimension_numbers=dn))
    plain, fast = conv(jax.lax.conv_general_dilated), conv(
        fast_ops.conv_general_dilated)
    g = rng.standard_normal(plain(x, k).shape, np.float32)
    input_grad = lambda f: jax.jit(lambda x_, k_, g_: jax.vjp(
        lambda a: f(a, k_), x_)[1](g_)[0])
    plain_grad, fast_grad = input_grad(plain), input_grad(fast)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    kt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
    gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
    torch_grad = lambda: torch.ops.aten.convolution_backward(
        gt, xt, kt, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
        [True, False, False])
    for op, fns in (
        ('forward', {'lax': lambda: plain(x, k).block_until_ready(),
                     'fast_ops': lambda: fast(x, k).block_until_ready(),
                     'torch': lambda: fn.conv2d(xt, kt, padding=pad)}),
        ('input gradient',
         {'lax': lambda: plain_grad(x, k, g).block_until_ready(),
          'fast_ops': lambda: fast_grad(x, k, g).block_until_ready(),
          'torch': torch_grad})):
      times = interleaved(fns, FLAGS.reps)
      row = {'layer': layer, 'op': op, 'batch': FLAGS.batch_size,
             **{f'{impl}_ms': 1e3 * statistics.median(t)
                for impl, t in times.items()}}
      rows.append(row)
      print(f"{layer:17s} {op:14s} lax {row['lax_ms']:7.2f} ms  fast_ops "
            f"{row['fast_ops_ms']:7.2f} ms  torch {row['torch_ms']:7.2f} ms",
            flush=True)
  return rows


# --------------------------------------------------------------- AutoAttack


def run_autoattack(torch) -> list:
  """AutoAttack (APGD-CE + APGD-T) in JAX vs the reference, per model.

  The reference runs through the bridge and on the native PyTorch network
  with the same weights. JAX runs on one device and, where there are more,
  on every local device. The JAX program is compiled by a warm-up call
  (its compile time is reported apart); the timed calls are interleaved.
  """
  ds = data.load_dataset('mnist_embedded',
                         max_eval_examples=FLAGS.aa_examples)
  x = torch.from_numpy(np.ascontiguousarray(
      data.to_float(ds.test.images).transpose(0, 3, 1, 2)))
  y = torch.from_numpy(ds.test.labels.astype(np.int64))
  devices = jax.local_devices()
  default_threads = torch.get_num_threads()
  rows = []
  for name in [m for m in FLAGS.models if m in ('mlp', 'lenet')]:
    # PGD-AT (eps 0.1): a model with robust points left for APGD-T.
    model, variables = steps.fit(
        configs.get_config('mnist_embedded', {'model.name': name,
                                              'attack.name': 'pgd',
                                              'attack.eps_train': 0.1,
                                              'attack.num_steps': 5,
                                              'attack.step_size': 0.03}),
        ds.train, num_steps=FLAGS.aa_train_steps)
    modules = {
        'bridge': torch_bridge.bridge_module(model.apply, variables),
        'native': torch_bridge.native_torch_model(name, variables['params']),
    }
    robust = {}

    def run_jax(label, devs):
      report = evaluation.autoattack(
          model, variables, ds.test, eps=FLAGS.aa_eps, version='apgd',
          backend='jax', devices=devs, batch_size=FLAGS.aa_batch_size)
      robust[label] = report['robust_accuracy']

    def run_torch(label, impl, threads):
      torch.set_num_threads(threads)
      try:
        x_adv, _ = evaluation.reference_autoattack(
            modules[impl], x, y, eps=FLAGS.aa_eps, version='apgd',
            batch_size=FLAGS.aa_batch_size)
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
    times = interleaved(fns, FLAGS.aa_reps, warm_up=False)
    med = {k: statistics.median(t) for k, t in times.items()}
    row = {'model': name, 'num_examples': len(y), 'eps': FLAGS.aa_eps,
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
      row['evaluate'] = time_evaluate(model, variables, ds.test, devices)
    rows.append(row)
    print(f"{name:6s} AutoAttack apgd, {len(y)} points, eps {FLAGS.aa_eps}: "
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


def time_evaluate(model, variables, split, devices) -> dict:
  """``evaluation.evaluate`` (PGD-20 x 10 restarts, UTA-20, FGSM at the
  AutoAttack eps) on one device and on all, interleaved after a warm-up."""
  config = configs.get_config('mnist_embedded', {'eval.eps': [FLAGS.aa_eps]})
  run = lambda devs: evaluation.evaluate(
      model, variables, split, config=config, key=jax.random.PRNGKey(0),
      devices=devs)
  times = interleaved({'one_device': lambda: run(devices[:1]),
                       'all_devices': lambda: run(devices)}, FLAGS.aa_reps)
  med = {k: statistics.median(t) for k, t in times.items()}
  return {'one_device_seconds': med['one_device'],
          'all_devices_seconds': med['all_devices'],
          'speedup': med['one_device'] / med['all_devices']}


WORKLOAD_NAMES = {'pgd10': 'PGD-10 (img x steps/s)', 'uta10': 'UTA-10',
                  'uta10_mc5': 'UTA-10, 5 MC-dropout samples',
                  'at_step': 'UTA-10 AT step (img/s)'}


def attacks_markdown(rows) -> str:
  """The README's speed table of the ``attacks`` section."""
  devices = rows[0].get('jax_devices', 1) if rows else 1
  lines = [f'| model | workload | JAX ({devices} CPU devices) | PyTorch | '
           'ratio | ratio, JAX on 1 device | JAX / PyTorch GFLOP/s |',
           '| --- | --- | ---: | ---: | ---: | ---: | --- |']
  for r in rows:
    one = r.get('ratio_1_device_over_torch')
    lines.append(
        f"| {reporting.ARCHITECTURES.get(r['model'], r['model'])} | "
        f"{WORKLOAD_NAMES[r['workload']]} | {r['jax']['throughput']:,.0f} | "
        f"{r['torch']['throughput']:,.0f} | "
        f"{r['ratio_jax_over_torch']:.2f} | "
        f"{'-' if one is None else f'{one:.2f}'} | {r['jax']['gflops']:.0f} / "
        f"{r['torch']['gflops']:.0f} |")
  return '\n'.join(lines)


def convs_markdown(rows) -> str:
  """The README's per-layer table of the ``convs`` section."""
  lines = ['| layer | op | lax (ms) | fast_ops (ms) | PyTorch (ms) |',
           '| --- | --- | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f"| {r['layer']} | {r['op']} | {r['lax_ms']:.2f} | "
                 f"{r['fast_ops_ms']:.2f} | {r['torch_ms']:.2f} |")
  return '\n'.join(lines)


def autoattack_markdown(rows) -> str:
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


def use_plain_ops() -> None:
  """Routes the models' convolution and pooling back to plain lax / flax."""
  fast_ops.conv_general_dilated = jax.lax.conv_general_dilated
  fast_ops.max_pool_2x2 = lambda x: flax.linen.max_pool(x, (2, 2),
                                                        strides=(2, 2))


def main(argv):
  del argv
  cli.use_cpu_cores_as_devices()  # as the scripts run: one device per core
  torch = torch_bridge.require_torch()
  if FLAGS.plain_ops:
    use_plain_ops()
  unknown = set(FLAGS.sections) - {'attacks', 'convs', 'autoattack'}
  if unknown:
    print(f'error: unknown sections {sorted(unknown)}; choose attacks, '
          'convs, autoattack', file=sys.stderr)
    sys.exit(2)
  peak = matmul_peak_gflops()
  result = {
      'machine': {'processor': platform.processor() or platform.machine(),
                  'cpus': os.cpu_count(), 'jax': jax.__version__,
                  'torch': torch.__version__,
                  'jax_devices': [str(d) for d in jax.devices()],
                  'torch_threads': torch.get_num_threads(),
                  'matmul_peak_gflops': peak},
      'settings': {'batch_size': FLAGS.batch_size,
                   'train_batch_size': FLAGS.train_batch_size,
                   'reps': FLAGS.reps, 'steps': K, 'eps': EPS,
                   'step_size': ALPHA, 'mc_samples': M,
                   'plain_ops': FLAGS.plain_ops},
  }
  print(f'float32 matmul peak: {peak:.1f} GFLOP/s; JAX {jax.__version__} on '
        f'{jax.devices()[0].platform}, torch {torch.__version__}', flush=True)
  if 'attacks' in FLAGS.sections:
    result['attacks'] = run_attacks(torch, peak)
    print(attacks_markdown(result['attacks']))
  if 'convs' in FLAGS.sections:
    result['convs'] = run_convs(torch)
    print(convs_markdown(result['convs']))
  if 'autoattack' in FLAGS.sections:
    # AutoAttack's own progress lines would drown the summary.
    logging.getLogger(evaluation.AUTOATTACK_LOGGER).propagate = False
    result['autoattack'] = run_autoattack(torch)
    print(autoattack_markdown(result['autoattack']))
  with open(FLAGS.output, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'results: {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
