"""Section ``attacks``: the attacks and the training step, JAX vs PyTorch.

For the MLP, LeNet and SVHN LeNet: PGD-10, UTA-10 (M = 1), UTA-10 with 5
MC-dropout samples (batch ``--batch_size``) and one full UTA-10
adversarial-training step (attack + Adam, batch ``--train_batch_size``).
For ResNet-18: the CIFAR-10 preset's training step (UTA-1 with 5 MC-dropout
samples, SGD-Nesterov), the PyTorch side being the reference CIFAR ResNet-18
that ships with ``pyautoattack`` (the architecture
``torch_bridge.resnet18_variables`` reads) with dropout where uta-jax puts
it, and the same weights. Each as uta_jax runs it (data-parallel over the
local devices: on a CPU one per core; also on one device, the "before") and
as a typical PyTorch research codebase writes it (a Python loop with
``torch.autograd.grad``), PyTorch on the device JAX computes on.
"""

import functools
import importlib.util
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from uta_jax import attacks
from uta_jax import classifier
from uta_jax import configs
from uta_jax import models
from uta_jax import parallel
from uta_jax import reporting
from uta_jax import steps
from uta_jax import torch_bridge
from uta_jax import uncertainty

K, EPS, ALPHA, M = 10, 0.1, 0.01, 5
ATTACK_WORKLOADS = ('pgd10', 'uta10', 'uta10_mc5')
CIFAR10_STEPS_PER_EPOCH = 50_000 // 128  # the preset's learning-rate schedule

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


def torch_workloads(torch, device, name, params, x_np, y_np, x_train,
                    y_train):
  """The PyTorch workloads on ``device``; each returns once its work is
  done (CUDA synchronised)."""
  F = torch.nn.functional
  x = common.to_nchw(torch, x_np, device)
  y = torch.from_numpy(y_np.astype(np.int64)).to(device)
  xt = common.to_nchw(torch, x_train, device)
  yt = torch.from_numpy(y_train.astype(np.int64)).to(device)
  net = torch_bridge.native_torch_model(name, params).to(device)
  mc_net = torch_bridge.native_torch_model(name, params,
                                           dropout_rate=0.2).to(device)
  mc_net.train()  # dropout on: MC samples
  train_net = torch_bridge.native_torch_model(name, params).to(device)
  opt = torch.optim.Adam(train_net.parameters(), lr=1e-3)
  synced = lambda fn: lambda: (fn(), common.torch_sync(torch, device))

  def at_step():
    train_net.eval()
    x_adv = torch_attack(torch, train_net, xt, yt, objective='uta')
    train_net.train()
    opt.zero_grad()
    F.cross_entropy(train_net(x_adv), yt).backward()
    opt.step()

  return {
      'pgd10': synced(lambda: torch_attack(torch, net, x, y, objective='pgd')),
      'uta10': synced(lambda: torch_attack(torch, net, x, y, objective='uta')),
      'uta10_mc5': synced(lambda: torch_attack(torch, mc_net, x, y,
                                               objective='uta_mc5')),
      'at_step': synced(at_step),
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
    return common.flops(grad, x_)

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
                      common.flops(update, variables['params']))
  return fns, flops


def run(torch, device: str, peak: float, opts) -> list:
  """One row per model and workload: JAX and PyTorch throughput, their
  ratio, GFLOP/s. ``opts``: models, batch_size, train_batch_size, reps."""
  rows = []
  rng = np.random.default_rng(0)
  for name in opts.models:
    if name == 'resnet18':
      rows.append(_resnet_row(torch, device, peak, opts))
      continue
    ctor, shape = models.MODELS[name]
    variables = models.init_variables(ctor(), jax.random.PRNGKey(0), shape)
    x = rng.uniform(size=(opts.batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, 10, opts.batch_size).astype(np.int32)
    xt = x[:opts.train_batch_size]
    yt = y[:opts.train_batch_size]
    devices = jax.local_devices()
    jfns, flops = jax_workloads(name, variables, x, y, xt, yt, devices)
    one = (jax_workloads(name, variables, x, y, xt, yt, devices[:1],
                         count_flops=False)[0]
           if len(devices) > 1 else {})
    tfns = torch_workloads(torch, device, name, variables['params'], x, y,
                           xt, yt)
    for workload in jfns:
      fns = {'jax': jfns[workload], 'torch': tfns[workload]}
      if one:
        fns['jax_1_device'] = one[workload]
      images = opts.train_batch_size if workload == 'at_step' else (
          opts.batch_size * K)
      rows.append(_row(name, workload, fns, images, flops[workload],
                       len(devices), peak, opts.reps))
  return rows


def _row(name, workload, fns, images, flops, devices, peak, reps) -> dict:
  """Times ``fns`` (jax, torch[, jax_1_device]) interleaved; the row."""
  times = common.interleaved(fns, reps)
  row = {'model': name, 'workload': workload,
         'unit': 'images x steps / s' if workload in ATTACK_WORKLOADS else
                 'images/s'}
  for impl, t in times.items():
    med = statistics.median(t)
    row[impl] = {'median_s': med, 'min_s': min(t), 'max_s': max(t),
                 'throughput': images / med,
                 'gflops': flops / med / 1e9,
                 'fraction_of_peak': flops / med / 1e9 / peak}
  row['jax_devices'] = devices
  row['ratio_jax_over_torch'] = (row['jax']['throughput'] /
                                 row['torch']['throughput'])
  if 'jax_1_device' in row:
    row['ratio_1_device_over_torch'] = (
        row['jax_1_device']['throughput'] / row['torch']['throughput'])
  print(f"{name:10s} {workload:10s} JAX {row['jax']['throughput']:9.0f} "
        f"torch {row['torch']['throughput']:9.0f} {row['unit']:18s} "
        f"ratio {row['ratio_jax_over_torch']:.2f} ({devices} devices; "
        f"1 device {row.get('ratio_1_device_over_torch', float('nan')):.2f})"
        f"  (JAX {row['jax']['gflops']:.1f} GFLOP/s, torch "
        f"{row['torch']['gflops']:.1f}; peak {peak:.0f})", flush=True)
  return row


# ------------------------------------------------------------- ResNet-18


def reference_resnet18(torch):
  """pyautoattack's CIFAR ResNet-18 (its ``examples/resnet.py``), freshly
  initialised: the architecture ``torch_bridge.resnet18_variables`` reads."""
  import pyautoattack  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(pyautoattack.__file__), 'examples',
                      'resnet.py')
  spec = importlib.util.spec_from_file_location('pyautoattack_resnet', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  torch.manual_seed(0)
  return module.ResNet18()


def _with_mc_dropout(torch, net, rate: float) -> dict:
  """Dropout where ``models.ResNet18`` has it (after the stem's and each
  block's first ReLU, and after each block), as forward hooks (dropout
  commutes with the ReLU after a BatchNorm). Returns the switch:
  ``switch['on']`` turns it on whatever the BatchNorm mode."""
  switch = {'on': False}
  drop = lambda module, inputs, out: torch.nn.functional.dropout(
      out, rate, training=switch['on'])
  net.bn1.register_forward_hook(drop)
  for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
    for block in layer:
      block.bn1.register_forward_hook(drop)
      block.register_forward_hook(drop)
  return switch


def _resnet_row(torch, device, peak, opts) -> dict:
  """The CIFAR-10 preset's training step (UTA-1 with 5 MC-dropout samples,
  SGD-Nesterov with weight decay), JAX vs the reference ResNet-18 in
  PyTorch, same weights, batch ``--train_batch_size``."""
  F = torch.nn.functional
  config = configs.get_config('cifar10')
  attack, o = config.attack, config.optimizer
  net = reference_resnet18(torch)
  variables = torch_bridge.resnet18_variables(net.state_dict())
  net = net.to(device)
  switch = _with_mc_dropout(torch, net, config.model.dropout_rate)
  opt = torch.optim.SGD(net.parameters(), lr=o.learning_rate,
                        momentum=o.momentum, nesterov=True,
                        weight_decay=o.weight_decay)
  rng = np.random.default_rng(0)
  n = opts.train_batch_size
  x = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  xt = common.to_nchw(torch, x, device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)

  def torch_step():
    net.eval()  # the attack: BatchNorm frozen, MC dropout on
    switch['on'] = True
    x_adv = xt.clone().requires_grad_(True)
    probs = torch.stack([F.softmax(net(x_adv), -1)
                         for _ in range(attack.num_samples)]).mean(0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    grad, = torch.autograd.grad(entropy, x_adv)
    x_adv = (xt + attack.step_size * grad.sign()).clamp(0, 1).detach()
    net.train()
    opt.zero_grad()
    F.cross_entropy(net(x_adv), yt).backward()
    opt.step()
    common.torch_sync(torch, device)

  fns = {'torch': torch_step}
  devices = jax.local_devices()
  for label, devs in (('jax', devices), ('jax_1_device', devices[:1])):
    if label == 'jax_1_device' and len(devices) == 1:
      continue
    fns[label] = _jax_train_step(config, variables, x, y, devs)
  model = classifier.create_model(config).clone(mean=None, std=None)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(model.apply(
          dict(variables, params=p), x), y))))
  # The attack's M forwards and one backward, and the training step's
  # forward and backward: about (M + 1) / 2 + 1 training gradients.
  flops = common.flops(grad, variables['params']) * (
      (attack.num_samples + 1) / 2 + 1)
  return _row('resnet18', 'train_step', fns, n, flops, len(devices), peak,
              opts.reps)


def _jax_train_step(config, variables, x, y, devices):
  """``steps.train_step`` of ``config`` pmapped over ``devices`` from
  ``variables`` (normalisation off, as the reference network)."""
  model = classifier.create_model(config).clone(mean=None, std=None)
  tx = steps.make_optimizer(config, CIFAR10_STEPS_PER_EPOCH)
  state = steps.create_train_state(config, model, tx, (32, 32, 3))
  state = state.replace(params=variables['params'],
                        batch_stats=variables['batch_stats'],
                        opt_state=tx.init(variables['params']))
  p_step = jax.pmap(
      steps.make_train_step(config, model, tx, axis_name=parallel.AXIS),
      axis_name=parallel.AXIS, donate_argnums=(0,), devices=devices)
  held = {'state': parallel.replicate(jax.device_get(state), devices)}
  split = lambda a: np.asarray(a).reshape((len(devices), -1) + a.shape[1:])
  batch = {'image': split(x), 'label': split(y),
           'id': split(np.arange(len(y), dtype=np.int32))}

  def step():
    held['state'], metrics = p_step(held['state'], batch)
    metrics['loss'].block_until_ready()

  return step


WORKLOAD_NAMES = {'pgd10': 'PGD-10 (img x steps/s)', 'uta10': 'UTA-10',
                  'uta10_mc5': 'UTA-10, 5 MC-dropout samples',
                  'at_step': 'UTA-10 AT step (img/s)',
                  'train_step': 'CIFAR-10 preset train step (img/s)'}


def markdown(rows, platform: str = 'CPU') -> str:
  """The README's speed table of the ``attacks`` section."""
  devices = rows[0].get('jax_devices', 1) if rows else 1
  lines = [f'| model | workload | JAX ({devices} {platform} devices) | '
           'PyTorch | '
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
