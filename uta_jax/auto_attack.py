"""AutoAttack natively in JAX, or the reference pyautoattack.

``evaluate`` runs AutoAttack's attacks in sequence, each on the points still
robust, sharded like ``evaluation.evaluate`` (``backend='jax'``,
``uta_jax.auto_attack_jax``): the standard version's APGD-CE, APGD-T
(``uta_jax.apgd``), FAB-T (``uta_jax.fab``) and Square
(``uta_jax.square``), or version ``apgd``'s first two; ``evaluate_runs``
does it for many same-architecture models at once, at every eps.
``backend='torch'`` runs the reference ``pyautoattack`` (PyTorch) on the
JAX model through ``torch_bridge`` (every version, ``rand`` and ``plus``
too); torch is imported only there. Both log AutoAttack's own lines to the
logger ``LOGGER``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import numpy as np

from uta_jax import auto_attack_jax
from uta_jax import classifier
from uta_jax import data
from uta_jax import evaluation
from uta_jax import parallel
from uta_jax import programs

LOGGER = 'auto-attack'
# The attacks of each version the JAX backend runs, in AutoAttack's order.
APGD_ATTACKS = auto_attack_jax.APGD_ATTACKS
JAX_ATTACKS = auto_attack_jax.ATTACKS
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
  ``robust_points`` (a bool array per point, for comparisons; not JSON;
  the JAX backend adds ``robust_points_after`` each attack).
  Raises ``parallel.Stopped`` once ``stop_requested()`` is true.
  """
  backend = backend or default_backend(version)
  _check(backend, version, eps)
  if backend == 'jax':
    report = evaluate_runs(model, programs.stack([variables]), split,
                           eps=[eps], ensemble=ensemble, version=version,
                           batch_size=batch_size, seed=seed, devices=devices,
                           stop_requested=stop_requested)[0][0]
    report.pop('runs_in_program')
    return report
  report = _evaluate_torch(model, variables, split, eps=eps,
                           ensemble=ensemble, version=version,
                           batch_size=batch_size, seed=seed,
                           stop_requested=stop_requested)
  report.update(eps=eps, version=version, backend=backend,
                num_examples=len(split))
  return report


def evaluate_runs(model: nn.Module, variables: Any, split: data.Split, *,
                  eps: Sequence[float], ensemble: bool = False,
                  version: str = 'standard', batch_size: int = 500,
                  seed: int = 0, devices: evaluation.Devices = None,
                  run_map: Optional[str] = None,
                  stop_requested: evaluation.StopFn = None,
                  on_eps: Optional[Callable[[float, List[Dict[str, Any]]],
                                            None]] = None
                 ) -> List[List[Dict[str, Any]]]:
  """``evaluate``'s JAX backend on R models of one architecture at once.

  ``variables``: the models' variables stacked on a leading run axis [R,
  ...] (``programs.stack``). Each attack runs in one program for every run
  (``run_map``: ``programs.EVAL_RUN_MAPS``, default per backend), on each
  run's own still-robust points; FAB-T's distances serve every eps. Every
  run gets what ``evaluate`` gives it alone (same keys, same points).
  Returns, per eps, a report per run (``evaluate``'s fields, ``seconds``
  the run's share, ``runs_in_program``); ``on_eps(eps, reports)`` is called
  as each eps finishes. Raises ``parallel.Stopped`` on a stop request.
  """
  _check('jax', version, *eps)
  reports = auto_attack_jax.evaluate_runs(
      model, variables, split, eps=eps, ensemble=ensemble, version=version,
      batch_size=batch_size, seed=seed, devices=devices, run_map=run_map,
      stop_requested=stop_requested, logger=logging.getLogger(LOGGER),
      on_eps=None if on_eps is None else lambda e, rs: on_eps(
          e, [_stamped(r, e, version, len(split)) for r in rs]))
  return [[_stamped(r, e, version, len(split)) for r in rs]
          for e, rs in zip(eps, reports)]


def _stamped(report, eps, version, num_examples):
  """A JAX backend report with its settings."""
  return dict(report, eps=eps, version=version, backend='jax',
              num_examples=num_examples)


def _check(backend: str, version: str, *eps: float) -> None:
  """Raises ``ValueError`` naming the choices for an unknown backend or
  version, a version the backend does not run, or an eps outside (0, 1]."""
  if backend not in BACKENDS:
    raise ValueError(f'unknown AutoAttack backend {backend!r}; choose one of '
                     f'{BACKENDS}')
  if version not in VERSIONS:
    raise ValueError(f'unknown AutoAttack version {version!r}; choose one of '
                     f'{VERSIONS}')
  if backend == 'jax' and version not in JAX_ATTACKS:
    raise ValueError(f'the JAX backend runs versions {sorted(JAX_ATTACKS)};'
                     f" run version {version!r} with backend 'torch'")
  for e in eps:
    if not 0 < e <= 1:
      raise ValueError(f'eps {e} is outside (0, 1]: images are in [0, 1]')


def _evaluate_torch(model, variables, split, *, eps, ensemble, version,
                    batch_size, seed, stop_requested):
  """The reference ``pyautoattack`` on the model through ``torch_bridge``
  (on JAX's default device)."""
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


def reference_apgd_ce(module, x, y, *, eps: float, seed: int = 0,
                      batch_size: int = 500, device: str = 'cpu'):
  """The reference APGD-CE as the standard AutoAttack runs it first (one
  restart, its points reseeded with ``seed`` per batch of ``batch_size``
  points correct when clean), its random starts recorded: (robust [N]
  bool, noise [N, C, H, W] float32: each attacked point's
  ``t = 2 * torch.rand - 1``, zeros elsewhere). JAX's ``apgd.apgd_ce`` given
  that noise (NHWC) replays the reference's iterates."""
  from uta_jax import torch_bridge  # pylint: disable=g-import-not-at-top
  torch = torch_bridge.require_torch()
  try:
    from pyautoattack.autopgd_base import APGDAttack  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the reference APGD needs pyautoattack: pip install "
                      "'uta-jax[torch]'") from e
  attack = APGDAttack(module, n_restarts=1, n_iter=100, eps=eps,
                      norm='Linf', eot_iter=1, rho=.75, seed=seed,
                      device=device)
  attack.loss = 'ce'
  clean = _torch_correct(module, x, y, batch_size)
  robust = np.zeros(len(y), bool)
  noise = np.zeros(tuple(x.shape), np.float32)
  draws, rand = [], torch.rand

  def recorded_rand(*args, **kwargs):
    out = rand(*args, **kwargs)
    draws.append(out)
    return out

  todo = np.flatnonzero(clean)
  for start in range(0, len(todo), batch_size):
    idx = todo[start:start + batch_size]
    xb, yb = x[idx], y[idx]
    draws.clear()
    torch.rand = recorded_rand
    try:
      x_adv = attack.perturb(xb, yb)
    finally:
      torch.rand = rand
    if len(draws) != 1 or tuple(draws[0].shape) != tuple(xb.shape):
      raise RuntimeError('the reference APGD-CE drew its start other than '
                         'once per point: cannot record it')
    noise[idx] = (2 * draws[0] - 1).cpu().numpy()
    with torch.no_grad():
      robust[idx] = (module(x_adv).argmax(1) == yb).cpu().numpy()
  return robust, noise


def _torch_correct(module, x, y, batch_size: int) -> np.ndarray:
  """Per-point correctness of ``module`` on ``x`` (bool [N])."""
  correct = []
  for start in range(0, len(y), batch_size):
    logits = module(x[start:start + batch_size])
    correct.append(
        (logits.argmax(1) == y[start:start + batch_size]).cpu().numpy())
  return np.concatenate(correct)
