"""Run configuration: frozen dataclasses, the paper's presets, validation.

``get_config(dataset, **overrides)`` returns the paper's setting for a dataset
(App. B and §5) with flag-named overrides applied (``eps_train=0.3``,
``attack='pgd'``, ...), validated. ``to_json`` / ``from_json`` round-trip it.

Presets (K = attack steps):

| dataset | model | optimiser | attack at eps_train |
| --- | --- | --- | --- |
| mnist_embedded | MLP | Adam 1e-3 | UTA, step 0.01, K = eps/0.01 |
| mnist | MLP | Adam 1e-3 | step 0.01, K = eps/0.01 (§5.1) |
| fashion_mnist | LeNet | Adam 1e-3, 100 epochs | step 0.01, K = eps/0.01 (§5.1) |
| svhn | SVHN LeNet | Adam 1e-3 | triangular step size, K = 10 |
| cifar10 | ResNet-18 | SGD-Nesterov 0.1, /15 at 60/120/160 | UTA-1, 5 MC-dropout samples |
| toy2d | MLP | Adam 1e-2 | eps 0.5, K = 15, step 0.05 (Fig. 1c) |
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Tuple

from uta_jax import data
from uta_jax import models

ATTACKS = ('none', 'fgsm', 'rfgsm', 'pgd', 'uta')
SCHEDULES = ('constant', 'triangular')
UNCERTAINTIES = ('single', 'mc_dropout', 'ensemble')
SPACES = ('input', 'latent')
OPTIMIZERS = ('adam', 'sgd_nesterov')
LR_SCHEDULES = ('constant', 'piecewise')
MEASURES = ('entropy', 'mutual_information')


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The training-time perturbation."""
  name: str = 'uta'
  eps: float = 0.2
  num_steps: int = 20
  step_size: float = 0.01
  step_schedule: str = 'constant'
  uncertainty: str = 'single'
  num_samples: int = 1
  measure: str = 'entropy'
  space: str = 'input'


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = 'adam'
  learning_rate: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 0.0
  lr_schedule: str = 'constant'
  lr_boundaries_epochs: Tuple[int, ...] = ()
  lr_decay_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """JAX-native evaluation: PGD-k with restarts and a UTA attack per eps."""
  eps: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
  pgd_steps: int = 20
  pgd_step_size: Optional[float] = 0.01  # None: eps / 4
  pgd_restarts: int = 10
  uta_steps: int = 20
  batch_size: int = 500


@dataclasses.dataclass(frozen=True)
class Config:
  dataset: str = 'mnist_embedded'
  data_dir: Optional[str] = None
  max_train_examples: Optional[int] = None
  max_eval_examples: Optional[int] = None
  model: str = 'mlp'
  dropout_rate: float = 0.0
  attack: AttackConfig = AttackConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  eval: EvalConfig = EvalConfig()
  epochs: int = 10
  batch_size: int = 128
  seed: int = 0
  checkpoint_every: int = 100
  eval_every: int = 0  # epochs; 0: evaluate at the end only
  eval_every_steps: int = 0  # steps; 0: off (curves over iterations)
  log_every: int = 20  # steps


MNIST_EVAL_EPS = (0.05, 0.1, 0.2, 0.3)
SVHN_EVAL_EPS = (0.005, 0.01, 0.02, 0.04)


def _paper_steps(eps: float) -> int:
  """§5.1, MNIST / Fashion-MNIST: K = eps_train / 0.01."""
  return max(1, int(round(eps / 0.01)))


def preset(dataset: str, eps_train: Optional[float] = None) -> Config:
  """The paper's setting for ``dataset`` at ``eps_train`` (its default if None)."""
  if dataset in ('mnist_embedded', 'mnist', 'fashion_mnist'):
    eps = 0.2 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps=eps, num_steps=_paper_steps(eps),
                          step_size=0.01)
    model = 'lenet' if dataset == 'fashion_mnist' else 'mlp'
    epochs = {'mnist_embedded': 30, 'mnist': 20, 'fashion_mnist': 100}[dataset]
    return Config(dataset=dataset, model=model, attack=attack, epochs=epochs,
                  eval=EvalConfig(eps=MNIST_EVAL_EPS))
  if dataset == 'svhn':
    eps = 0.04 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps=eps, num_steps=10,
                          step_size=0.005, step_schedule='triangular')
    return Config(dataset=dataset, model='svhn_lenet', attack=attack,
                  epochs=50, eval=EvalConfig(eps=SVHN_EVAL_EPS,
                                             pgd_step_size=None))
  if dataset == 'cifar10':
    eps = 8 / 255 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps=eps, num_steps=1, step_size=eps,
                          uncertainty='mc_dropout', num_samples=5)
    optimizer = OptimizerConfig(
        name='sgd_nesterov', learning_rate=0.1, momentum=0.9,
        weight_decay=5e-4, lr_schedule='piecewise',
        lr_boundaries_epochs=(60, 120, 160), lr_decay_factor=1 / 15)
    return Config(dataset=dataset, model='resnet18', dropout_rate=0.2,
                  attack=attack, optimizer=optimizer, epochs=200,
                  eval=EvalConfig(eps=(8 / 255,), pgd_step_size=None,
                                  batch_size=256))
  if dataset == 'toy2d':
    eps = 0.5 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps=eps, num_steps=15, step_size=0.05)
    return Config(dataset=dataset, model='mlp', attack=attack, epochs=100,
                  batch_size=64, log_every=100,
                  optimizer=OptimizerConfig(learning_rate=1e-2),
                  eval=EvalConfig(eps=(0.1, 0.5), pgd_step_size=None))
  raise ConfigError(f'unknown dataset {dataset!r}; choose one of '
                    f'{data.DATASETS}')


# flag name -> (section or None, field)
FLAG_FIELDS = {
    'data_dir': (None, 'data_dir'),
    'max_train_examples': (None, 'max_train_examples'),
    'max_eval_examples': (None, 'max_eval_examples'),
    'model': (None, 'model'),
    'dropout_rate': (None, 'dropout_rate'),
    'epochs': (None, 'epochs'),
    'batch_size': (None, 'batch_size'),
    'seed': (None, 'seed'),
    'checkpoint_every': (None, 'checkpoint_every'),
    'eval_every': (None, 'eval_every'),
    'eval_every_steps': (None, 'eval_every_steps'),
    'log_every': (None, 'log_every'),
    'attack': ('attack', 'name'),
    'eps_train': ('attack', 'eps'),
    'num_steps': ('attack', 'num_steps'),
    'step_size': ('attack', 'step_size'),
    'step_schedule': ('attack', 'step_schedule'),
    'uncertainty': ('attack', 'uncertainty'),
    'num_samples': ('attack', 'num_samples'),
    'measure': ('attack', 'measure'),
    'space': ('attack', 'space'),
    'optimizer': ('optimizer', 'name'),
    'learning_rate': ('optimizer', 'learning_rate'),
    'eval_eps': ('eval', 'eps'),
    'eval_pgd_steps': ('eval', 'pgd_steps'),
    'eval_pgd_restarts': ('eval', 'pgd_restarts'),
    'eval_batch_size': ('eval', 'batch_size'),
}


def get_config(dataset: str = 'mnist_embedded', **overrides: Any) -> Config:
  """The preset for ``dataset`` with flag-named ``overrides`` (None = keep)."""
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(overrides) - set(FLAG_FIELDS)
  if unknown:
    raise ConfigError(f'unknown settings {sorted(unknown)}; known: '
                      f'{sorted(FLAG_FIELDS)}')
  if 'eps_train' in overrides:
    _check_eps('eps_train', overrides['eps_train'])
  config = preset(dataset, overrides.get('eps_train'))
  sections = {}
  for flag, value in overrides.items():
    section, field = FLAG_FIELDS[flag]
    if isinstance(value, list):
      value = tuple(value)
    if section is None:
      config = dataclasses.replace(config, **{field: value})
    else:
      sections.setdefault(section, {})[field] = value
  for section, fields in sections.items():
    config = dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section),
                                                **fields)})
  # The uncertainty samplers need dropout in the model.
  if (config.attack.uncertainty == 'mc_dropout' and config.dropout_rate == 0
      and 'dropout_rate' not in overrides):
    config = dataclasses.replace(config, dropout_rate=0.2)
  validate(config)
  return config


def _check_eps(name: str, eps: float) -> None:
  if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
    raise ConfigError(f'{name} must be a positive number, got {eps!r}')


def _choose(name: str, value: Any, choices: Tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f'unknown {name} {value!r}; choose one of {choices}')


def _at_least(name: str, value: Any, low: int) -> None:
  if not isinstance(value, int) or value < low:
    raise ConfigError(f'{name} must be an integer >= {low}, got {value!r}')


def validate(config: Config) -> None:
  """Raises ``ConfigError`` naming the first invalid setting and its fix."""
  _choose('dataset', config.dataset, data.DATASETS)
  _choose('model', config.model, tuple(models.MODELS))
  if config.dataset == 'toy2d' and config.model != 'mlp':
    raise ConfigError(f'the toy2d points are 2-D vectors, not images: use '
                      f'--model=mlp, not {config.model}')
  _at_least('seed', config.seed, 0)
  a = config.attack
  _choose('attack', a.name, ATTACKS)
  _choose('step_schedule', a.step_schedule, SCHEDULES)
  _choose('uncertainty', a.uncertainty, UNCERTAINTIES)
  _choose('measure', a.measure, MEASURES)
  _choose('space', a.space, SPACES)
  if a.name != 'none':
    _check_eps('eps_train', a.eps)
    if config.dataset != 'toy2d' and a.space == 'input' and a.eps > 1:
      raise ConfigError(f'eps_train {a.eps} is above 1: images are in [0, 1],'
                        ' so the ball would cover every image')
    _at_least('num_steps', a.num_steps, 1)
    _check_eps('step_size', a.step_size)
  _at_least('num_samples', a.num_samples, 1)
  if a.uncertainty == 'mc_dropout':
    if a.name != 'uta':
      raise ConfigError('--uncertainty=mc_dropout needs --attack=uta')
    if config.dropout_rate <= 0:
      raise ConfigError('--uncertainty=mc_dropout needs --dropout_rate > 0')
  if a.uncertainty == 'single' and a.num_samples != 1:
    raise ConfigError('--num_samples > 1 needs --uncertainty=mc_dropout or '
                      'ensemble')
  if not 0 <= config.dropout_rate < 1:
    raise ConfigError(f'dropout_rate must be in [0, 1), got '
                      f'{config.dropout_rate}')
  o = config.optimizer
  _choose('optimizer', o.name, OPTIMIZERS)
  _choose('lr_schedule', o.lr_schedule, LR_SCHEDULES)
  _check_eps('learning_rate', o.learning_rate)
  e = config.eval
  if not e.eps:
    raise ConfigError('eval_eps needs at least one value')
  for eps in e.eps:
    _check_eps('eval_eps', eps)
    if config.dataset != 'toy2d' and eps > 1:
      raise ConfigError(f'eval_eps {eps} is outside (0, 1]: images are in '
                        '[0, 1], write 8/255 as 0.0314')
  _at_least('eval_pgd_steps', e.pgd_steps, 1)
  _at_least('eval_pgd_restarts', e.pgd_restarts, 1)
  _at_least('uta_steps', e.uta_steps, 1)
  _at_least('eval_batch_size', e.batch_size, 1)
  _at_least('epochs', config.epochs, 1)
  _at_least('batch_size', config.batch_size, 1)
  _at_least('checkpoint_every', config.checkpoint_every, 1)
  _at_least('eval_every', config.eval_every, 0)
  _at_least('eval_every_steps', config.eval_every_steps, 0)
  _at_least('log_every', config.log_every, 1)
  for name in ('max_train_examples', 'max_eval_examples'):
    if getattr(config, name) is not None:
      _at_least(name, getattr(config, name), 1)


# Settings that may change between a run and its resumption.
RESUMABLE_CHANGES = ('data_dir', 'epochs', 'checkpoint_every', 'eval_every',
                     'eval_every_steps',
                     'log_every', 'eval', 'max_eval_examples')


def incompatibilities(saved: Config, current: Config) -> list:
  """Names of settings that differ and would make resuming ``saved`` wrong."""
  a, b = dataclasses.asdict(saved), dataclasses.asdict(current)
  return sorted(k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k])


def to_json(config: Config) -> str:
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def _build(cls, values: dict):
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue
    value = values[field.name]
    if dataclasses.is_dataclass(field.default):
      value = _build(type(field.default), value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return cls(**kwargs)


def from_json(text: str) -> Config:
  """Inverse of ``to_json``; raises ``ConfigError`` on malformed input."""
  try:
    return _build(Config, json.loads(text))
  except (ValueError, TypeError, AttributeError) as e:
    raise ConfigError(f'malformed config JSON: {e}') from e
