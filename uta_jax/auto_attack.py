"""AutoAttack natively in JAX, or the reference pyautoattack.

``evaluate`` runs AutoAttack's attacks in sequence, each on the points still
robust, sharded like ``evaluation.evaluate`` (``backend='jax'``): the
standard version's APGD-CE, APGD-T (``uta_jax.apgd``), FAB-T
(``uta_jax.fab``) and Square (``uta_jax.square``), or version ``apgd``'s
first two. ``backend='torch'`` runs the reference ``pyautoattack``
(PyTorch) on the JAX model through ``torch_bridge`` (every version, ``rand``
and ``plus`` too); torch is imported only there. Both log AutoAttack's own
lines to the logger ``LOGGER``.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import apgd
from uta_jax import classifier
from uta_jax import data
from uta_jax import evaluation
from uta_jax import fab
from uta_jax import parallel
from uta_jax import square

LOGGER = 'auto-attack'
# The attacks of each version the JAX backend runs, in AutoAttack's order;
# version='apgd' is the standard version without FAB-T and Square.
APGD_ATTACKS = ('apgd-ce', 'apgd-t')
JAX_ATTACKS = {'apgd': APGD_ATTACKS,
               'standard': APGD_ATTACKS + ('fab-t', 'square')}
_AFTER = re.compile(r'robust accuracy after (\S+): ([\d.]+)%')


class _Recorder(logging.Handler):
  """Collects AutoAttack's 'robust accuracy after ATTACK: X%' lines."""

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.per_attack: Dict[str, float] = {}

  def emit(self, record):
    match = _AFTER.search(record.getMessage())
    if match:
      self.per_attack[match.group(1).lower()] = float(match.group(2))


BACKENDS = ('jax', 'torch')
VERSIONS = ('standard', 'apgd', 'rand', 'plus')


def default_backend(version: str) -> str:
  """'jax' for the versions native here (``JAX_ATTACKS``), else the
  reference."""
  return 'jax' if version in JAX_ATTACKS else 'torch'


def evaluate(model: nn.Module, variables: Any, split: data.Split, *,
             eps: float, ensemble: bool = False, version: str = 'standard',
             batch_size: int = 500, seed: int = 0,
             backend: Optional[str] = None,
             devices: evaluation.Devices = None,
             stop_requested: evaluation.StopFn = None) -> Dict[str, Any]:
  """AutoAttack at ``eps`` on ``split``: natively in JAX or the reference.

  ``backend='jax'`` (the default for ``standard`` and ``apgd``) runs the
  version's attacks (``JAX_ATTACKS``: APGD-CE, APGD-T, then for
  ``standard`` FAB-T and Square), each on the points still robust, sharded
  over hosts and ``devices``; FAB-T is deterministic and equals the
  reference, APGD's random starts and Square's draws come from ``seed``
  (not the reference's torch stream). ``backend='torch'`` runs the
  reference ``pyautoattack`` through ``torch_bridge`` (``standard``,
  ``rand``, ``plus`` and ``apgd``).
  Both log AutoAttack's own lines to the logger ``'auto-attack'``. With
  ``version='rand'`` a model with dropout is evaluated as the stochastic
  MC-dropout model (a new key per call, AutoAttack's EoT); otherwise dropout
  is off and the model is deterministic. ``version='apgd'`` is the standard
  version without FAB-T and Square (same APGD settings).

  Returns clean and robust accuracy (%), the accuracy after each attack, the
  number of points, the largest perturbation, the wall time, and
  ``robust_points`` (a bool array per point, for comparisons; not JSON).
  Raises ``parallel.Stopped`` once ``stop_requested()`` is true.
  """
  backend = backend or default_backend(version)
  if backend not in BACKENDS:
    raise ValueError(f'unknown AutoAttack backend {backend!r}; choose one of '
                     f'{BACKENDS}')
  if version not in VERSIONS:
    raise ValueError(f'unknown AutoAttack version {version!r}; choose one of '
                     f'{VERSIONS}')
  if backend == 'jax' and version not in JAX_ATTACKS:
    raise ValueError(f'the JAX backend runs versions {sorted(JAX_ATTACKS)};'
                     f" run version {version!r} with backend 'torch'")
  if not 0 < eps <= 1:
    raise ValueError(f'eps {eps} is outside (0, 1]: images are in [0, 1]')
  run = _evaluate_jax if backend == 'jax' else _evaluate_torch
  report = run(model, variables, split, eps=eps, ensemble=ensemble,
               version=version, batch_size=batch_size, seed=seed,
               devices=devices, stop_requested=stop_requested)
  report.update(eps=eps, version=version, backend=backend,
                num_examples=len(split))
  return report


def _apgd_program(variables, batch, key, eps, *, model, ensemble, attack):
  """Per example: robust after ``attack`` (checked on the returned point, as
  AutoAttack does) and the L-inf size of its perturbation."""
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  x, y = batch['image'], batch['label']
  run = apgd.apgd_ce if attack == 'apgd-ce' else apgd.apgd_t
  robust, x_adv = run(logits_fn, x, y, eps=eps, key=key,
                      example_ids=batch['id'])
  robust &= jnp.argmax(logits_fn(x_adv), -1) == y
  linf = jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1)
  return {'robust': robust, 'linf': linf}


def _fab_program(variables, batch, eps, *, model, ensemble):
  """Per example: robust after FAB-T at ``eps`` and its perturbation's
  L-inf size."""
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  x, y = batch['image'], batch['label']
  robust, x_adv = fab.fab_t_at(logits_fn, x, y, eps)
  robust &= jnp.argmax(logits_fn(x_adv), -1) == y
  linf = jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1)
  return {'robust': robust, 'linf': linf}


def _square_start(variables, batch, key, eps, *, model, ensemble):
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  return square.start_state(logits_fn, batch['image'], batch['label'], key,
                            batch['id'], eps=eps)


def _square_segment(variables, batch, state, key, eps, first, sides, *,
                    model, ensemble):
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  return square.segment_queries(logits_fn, batch['image'], batch['label'],
                                state, key, first, sides, eps=eps)


def _square_runner(programs, replicated, key, eps, stop_requested):
  """Square on one chunk of points (``map_examples``' function): the start,
  then segments of queries until none is left or a stop is asked for."""
  def run(batch):
    state = programs['square-start'](replicated, batch, key, eps)
    height, width = batch['image'].shape[2:4]
    sides = jnp.asarray(square.padded_sides(square.NUM_QUERIES, height,
                                            width))
    for first in range(0, int(sides.shape[0]), square.SEGMENT):
      if not np.any(np.asarray(state.margin_min) > 0.0):
        break
      if stop_requested is not None and stop_requested():
        raise parallel.Stopped(f'stopped during Square after {first} '
                               'queries')
      state = programs['square-segment'](replicated, batch, state, key, eps,
                                         jnp.int32(first), sides)
    x_best = np.asarray(state.x_best)
    linf = np.abs(x_best - batch['image']).reshape(
        x_best.shape[:2] + (-1,)).max(-1)
    return {'robust': np.asarray(state.margin_min) > 0.0, 'linf': linf}
  return run


def _clean_program(variables, batch, *, model, ensemble):
  logits_fn, _ = evaluation.logits_fns(model, variables, ensemble)
  return {'correct': jnp.argmax(logits_fn(batch['image']), -1) ==
                     batch['label']}


@functools.lru_cache(maxsize=16)
def _apgd_programs(devices: Tuple[Any, ...], model: nn.Module,
                   ensemble: bool):
  settings = dict(model=model, ensemble=ensemble)
  programs = {'clean': parallel.local_pmap(
      functools.partial(_clean_program, **settings), devices)}
  for attack in APGD_ATTACKS:
    programs[attack] = parallel.local_pmap(
        functools.partial(_apgd_program, attack=attack, **settings), devices,
        in_axes=(0, 0, None, None))
  programs['fab-t'] = parallel.local_pmap(
      functools.partial(_fab_program, **settings), devices,
      in_axes=(0, 0, None))
  programs['square-start'] = parallel.local_pmap(
      functools.partial(_square_start, **settings), devices,
      in_axes=(0, 0, None, None))
  programs['square-segment'] = parallel.local_pmap(
      functools.partial(_square_segment, **settings), devices,
      in_axes=(0, 0, 0, None, None, None, None))
  return programs


def _evaluate_jax(model, variables, split, *, eps, ensemble, version,
                    batch_size, seed, devices, stop_requested):
  """``version``'s attacks (``JAX_ATTACKS``), each on the points still
  robust, in JAX."""
  attacks = JAX_ATTACKS[version]
  logger = logging.getLogger(LOGGER)
  devices = tuple(devices or jax.local_devices())
  programs = _apgd_programs(devices, model, ensemble)
  replicated = parallel.replicate(variables, devices)
  n = len(split)
  ids = parallel.host_indices(n)
  run = evaluation.example_runner(split, devices, stop_requested)
  logger.info('using %s version including %s (JAX backend, %d devices '
              'x %d hosts)', version, ', '.join(attacks), len(devices),
              jax.process_count())
  start = time.time()
  robust = run(lambda b: programs['clean'](replicated, b), ids,
               batch_size=batch_size)['correct']
  clean = 100.0 * float(parallel.gather_examples(robust, n).mean())
  logger.debug('initial accuracy: %.2f%%', clean)
  linf = np.zeros(len(ids), np.float32)
  key = jax.random.key(seed)
  per_attack = {}
  for a, attack in enumerate(attacks):
    todo = np.flatnonzero(robust)
    # APGD-T and FAB-T run their targets side by side: fewer points a call.
    size = batch_size if attack in ('apgd-ce', 'square') else max(
        1, batch_size // apgd.NUM_TARGETS)
    attack_key = jax.random.fold_in(key, a)
    if attack == 'fab-t':
      program = lambda b: programs['fab-t'](replicated, b, jnp.float32(eps))
    elif attack == 'square':
      program = _square_runner(programs, replicated, attack_key,
                               jnp.float32(eps), stop_requested)
    else:
      program = lambda b, attack=attack, attack_key=attack_key: programs[
          attack](replicated, b, attack_key, jnp.float32(eps))
    if len(todo):
      out = run(program, ids[todo], batch_size=size)
      robust[todo] = out['robust']
      linf[todo] = np.maximum(linf[todo], out['linf'])
    per_attack[attack] = 100.0 * float(
        parallel.gather_examples(robust, n).mean())
    logger.debug('robust accuracy after %s: %.2f%% (total time %.1f s)',
                 attack.upper(), per_attack[attack], time.time() - start)
  if 'square' in per_attack:
    before = per_attack[attacks[attacks.index('square') - 1]]
    if before - per_attack['square'] > 0.2:  # as checks.check_square_sr
      logger.warning('Square lowered the robust accuracy by %.2f points '
                     'after the gradient-based attacks: a sign of gradient '
                     'masking; see flags_doc.md of AutoAttack',
                     before - per_attack['square'])
  robust_points = parallel.gather_examples(robust, n)
  return {
      'model_randomness': 'deterministic (dropout off)',
      'clean_accuracy': clean,
      'robust_accuracy': 100.0 * float(robust_points.mean()),
      'per_attack': per_attack,
      'max_perturbation': float(parallel.gather_examples(linf, n).max()),
      'seconds': time.time() - start,
      'robust_points': robust_points,
  }


def _evaluate_torch(model, variables, split, *, eps, ensemble, version,
                      batch_size, seed, devices, stop_requested):
  """The reference ``pyautoattack`` on the model through ``torch_bridge``."""
  del devices  # the bridge runs on JAX's default device
  from uta_jax import torch_bridge  # pylint: disable=g-import-not-at-top
  torch = torch_bridge.require_torch()
  stochastic = version == 'rand'
  if stochastic:
    def apply(v, x, key):
      return classifier.predict_logits(model, v, x, ensemble=ensemble,
                                  mc_dropout=True, rngs={'dropout': key})
  else:
    def apply(v, x):
      return classifier.predict_logits(model, v, x, ensemble=ensemble)
  module = torch_bridge.bridge_module(apply, variables, stochastic=stochastic,
                                      seed=seed)
  if stop_requested is not None:
    def check_stop(*_):
      if stop_requested():
        raise parallel.Stopped('stopped during AutoAttack')
    module.register_forward_pre_hook(check_stop)
  device = torch_bridge.torch_device()
  x = torch.from_numpy(np.ascontiguousarray(
      data.to_float(split.images).transpose(0, 3, 1, 2))).to(device)
  y = torch.from_numpy(split.labels.astype(np.int64)).to(device)
  start = time.time()
  x_adv, per_attack = reference_autoattack(module, x, y, eps=eps,
                                           version=version, seed=seed,
                                           batch_size=batch_size,
                                           device=device)
  seconds = time.time() - start
  with torch.no_grad():
    clean = _torch_correct(module, x, y, batch_size)
    robust = _torch_correct(module, x_adv, y, batch_size)
  return {
      'model_randomness': ('MC dropout, a new key per call (EoT)' if
                           stochastic else 'deterministic (dropout off)'),
      'clean_accuracy': 100.0 * float(clean.mean()),
      'robust_accuracy': 100.0 * float(robust.mean()),
      'per_attack': per_attack,
      'max_perturbation': float((x_adv - x).abs().max()),
      'seconds': seconds,
      'robust_points': robust,
  }


def reference_autoattack(module, x, y, *, eps: float, version: str,
                         seed: int = 0, batch_size: int = 500,
                         device: str = 'cpu'):
  """``pyautoattack`` on any ``torch.nn.Module`` (NCHW in [0, 1] -> logits),
  its own tensors on ``device`` (the module's: ``torch_bridge.torch_device``).

  ``version='apgd'`` is the standard version's APGD-CE and APGD-T (one
  restart, 9 target classes). Returns the adversarial tensor and the
  accuracy (%) after each attack, parsed from AutoAttack's own log lines.
  """
  try:
    from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("AutoAttack needs pyautoattack: pip install "
                      "'uta-jax[torch]'") from e
  recorder = _Recorder()
  logger = logging.getLogger(LOGGER)
  logger.addHandler(recorder)
  level = logger.level
  if not logger.isEnabledFor(logging.DEBUG):
    logger.setLevel(logging.DEBUG)  # the per-attack lines are DEBUG records
  try:
    if version == 'apgd':
      adversary = AutoAttack(module, eps=eps, seed=seed, version='custom',
                             attacks=list(APGD_ATTACKS), device=device)
      adversary.apgd.n_restarts = 1  # the standard version's settings
      adversary.apgd_targeted.n_target_classes = 9
    else:
      adversary = AutoAttack(module, eps=eps, seed=seed, version=version,
                             device=device)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
  finally:
    logger.removeHandler(recorder)
    logger.setLevel(level)
  return x_adv, recorder.per_attack


def _torch_correct(module, x, y, batch_size: int) -> np.ndarray:
  """Per-point correctness of ``module`` on ``x`` (bool [N])."""
  correct = []
  for start in range(0, len(y), batch_size):
    logits = module(x[start:start + batch_size])
    correct.append(
        (logits.argmax(1) == y[start:start + batch_size]).cpu().numpy())
  return np.concatenate(correct)
