"""Run configuration: one schema of frozen dataclasses, the paper's presets.

The schema is defined here once: every field has its default, help text and,
where it has a fixed set of values, its choices (``field(...)``); the
command-line flags are generated from it (``experiments/config_flags.py``).
Settings are named by their path in the schema, ``'attack.eps_train'`` or
``'seed'``; the library knows no flag names.

``get_config(dataset, overrides)`` returns the paper's setting for a dataset
(App. B and §5) with ``{path: value}`` overrides applied, validated.
``config_json`` writes and reads it (a run's config.json).

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
import math
import typing
from typing import Any, Iterator, Mapping, Optional, Tuple

from uta_jax import data
from uta_jax import errors
from uta_jax import models

ATTACKS = ('none', 'fgsm', 'rfgsm', 'pgd', 'uta')
SCHEDULES = ('constant', 'triangular')
UNCERTAINTIES = ('single', 'mc_dropout', 'ensemble')
SPACES = ('input', 'latent')
OPTIMIZERS = ('adam', 'sgd_nesterov')
LR_SCHEDULES = ('constant', 'piecewise', 'cyclic')
MEASURES = ('entropy', 'mutual_information')

# App. C: the ensemble of the paper has M = 5 members.
PAPER_ENSEMBLE_SIZE = 5


class ConfigError(errors.NamesSettings, ValueError):
  """A configuration value is invalid; the message names the fix and the
  settings by their schema path (``paths``)."""


def field(default: Any, help: str, choices: Tuple[str, ...] = ()):  # pylint: disable=redefined-builtin
  """A schema field: its default, a one-line help, its allowed values."""
  return dataclasses.field(default=default,
                           metadata={'help': help, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The classifier: one model, or M members trained together (App. C)."""
  name: str = field('mlp', 'architecture', tuple(models.MODELS))
  dropout_rate: float = field(0.0, 'dropout probability of the model')
  ensemble_size: int = field(1, 'members M of a jointly trained ensemble '
                             '(1: a single model)')


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The training-time perturbation."""
  name: str = field('uta', 'training attack', ATTACKS)
  eps_train: float = field(0.2, 'training L-inf radius, in [0, 1] units')
  num_steps: int = field(20, 'attack steps K')
  step_size: float = field(0.01, 'attack step size alpha')
  step_schedule: str = field('constant', 'step size over the K steps',
                             SCHEDULES)
  uncertainty: str = field('single', 'predictive distribution UTA maximises '
                           'the uncertainty of', UNCERTAINTIES)
  num_samples: int = field(1, 'MC-dropout samples of UTA')
  measure: str = field('entropy', 'uncertainty measure of UTA', MEASURES)
  space: str = field('input', 'perturb the input or the latent code', SPACES)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = field('adam', 'optimiser', OPTIMIZERS)
  learning_rate: float = field(1e-3, 'base learning rate')
  momentum: float = field(0.9, 'SGD momentum')
  weight_decay: float = field(0.0, 'decoupled weight decay')
  lr_schedule: str = field('constant', 'learning-rate schedule', LR_SCHEDULES)
  lr_boundaries_epochs: Tuple[int, ...] = field(
      (), 'epochs at which the piecewise schedule decays')
  lr_decay_factor: float = field(1.0, 'factor of each piecewise decay')
  lr_peak_fraction: float = field(0.5, 'cyclic schedule: where in the run '
                                  'the learning rate peaks')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """JAX-native evaluation: PGD-k with restarts and a UTA attack per eps."""
  eps: Tuple[float, ...] = field((0.05, 0.1, 0.2, 0.3),
                                 'eps values of the evaluation')
  pgd_steps: int = field(20, 'PGD steps in evaluation')
  pgd_step_size: Optional[float] = field(0.01, 'step size of the PGD and '
                                         'UTA evaluation attacks (None: eps '
                                         '/ 4), at least 2.5 eps / steps')
  pgd_restarts: int = field(10, 'PGD restarts in evaluation')
  uta_steps: int = field(20, 'UTA steps in evaluation')
  batch_size: int = field(500, 'evaluation batch size')


@dataclasses.dataclass(frozen=True)
class Config:
  dataset: str = field('mnist_embedded', 'dataset; picks the paper\'s '
                       'preset', data.DATASETS)
  data_dir: Optional[str] = field(None, 'IDX or TFDS data folder (else '
                                  'TFDS_DATA_DIR)')
  max_train_examples: Optional[int] = field(None, 'use the first N train '
                                            'examples')
  max_eval_examples: Optional[int] = field(None, 'use the first N test '
                                           'examples')
  model: ModelConfig = field(ModelConfig(), 'the classifier')
  attack: AttackConfig = field(AttackConfig(), 'the training attack')
  optimizer: OptimizerConfig = field(OptimizerConfig(), 'the optimiser')
  eval: EvalConfig = field(EvalConfig(), 'the evaluation')
  augment: bool = field(False, 'random crops (4-pixel zero padding) and '
                        'horizontal flips of training images (on in the '
                        'CIFAR-10 preset)')
  epochs: int = field(10, 'training epochs')
  batch_size: int = field(128, 'global batch size (all devices)')
  seed: int = field(0, 'seed of init, data order and attacks')
  checkpoint_every: int = field(100, 'steps between checkpoints')
  eval_every: int = field(0, 'epochs between evaluations (0: at the end)')
  eval_every_steps: int = field(0, 'steps between evaluations (0: off)')
  log_every: int = field(20, 'steps between progress lines')


SECTIONS = ('model', 'attack', 'optimizer', 'eval')


@dataclasses.dataclass(frozen=True)
class Setting:
  """One leaf of the schema: ``path`` ('attack.eps_train'), its value type
  ('str', 'int', 'float', 'floats', 'ints'), whether None is allowed,
  default, help and choices."""
  path: str
  kind: str
  optional: bool
  default: Any
  help: str
  choices: Tuple[str, ...]


_KINDS = {str: 'str', int: 'int', float: 'float', bool: 'bool'}


def _kind(annotation) -> Tuple[str, bool]:
  """('float', True) for Optional[float], ('floats', False) for
  Tuple[float, ...]."""
  args = typing.get_args(annotation)
  if typing.get_origin(annotation) is typing.Union:
    inner = [a for a in args if a is not type(None)]
    return _kind(inner[0])[0], True
  if typing.get_origin(annotation) is tuple:
    return _KINDS[args[0]] + 's', False
  return _KINDS[annotation], False


def settings(cls=Config, prefix: str = '') -> Iterator[Setting]:
  """Every leaf of the schema, depth first, in definition order."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(f.default):
      yield from settings(type(f.default), f'{prefix}{f.name}.')
      continue
    kind, optional = _kind(hints[f.name])
    yield Setting(f'{prefix}{f.name}', kind, optional, f.default,
                  f.metadata['help'], f.metadata['choices'])


def get(config: Config, path: str) -> Any:
  """The value at ``path`` ('attack.eps_train')."""
  value = config
  for name in path.split('.'):
    value = getattr(value, name)
  return value


def replace(config: Config, overrides: Mapping[str, Any]) -> Config:
  """``config`` with ``{path: value}`` set (lists become tuples); unknown
  paths raise ``ConfigError``."""
  known = {s.path for s in settings()}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ConfigError(f'unknown settings {unknown}; known: {sorted(known)}')
  top, sections = {}, {}
  for path, value in overrides.items():
    value = tuple(value) if isinstance(value, list) else value
    section, _, name = path.rpartition('.')
    if section:
      sections.setdefault(section, {})[name] = value
    else:
      top[name] = value
  for section, values in sections.items():
    top[section] = dataclasses.replace(getattr(config, section), **values)
  return dataclasses.replace(config, **top)


MNIST_EVAL_EPS = (0.05, 0.1, 0.2, 0.3)
SVHN_EVAL_EPS = (0.005, 0.01, 0.02, 0.04)


def _paper_steps(eps: float) -> int:
  """§5.1, MNIST / Fashion-MNIST: K = eps_train / 0.01."""
  return max(1, int(round(eps / 0.01)))


def preset(dataset: str, eps_train: Optional[float] = None) -> Config:
  """The paper's setting for ``dataset`` at ``eps_train`` (its default if None)."""
  if dataset in ('mnist_embedded', 'mnist', 'fashion_mnist'):
    eps = 0.2 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps_train=eps,
                          num_steps=_paper_steps(eps), step_size=0.01)
    model = 'lenet' if dataset == 'fashion_mnist' else 'mlp'
    epochs = {'mnist_embedded': 30, 'mnist': 20, 'fashion_mnist': 100}[dataset]
    return Config(dataset=dataset, model=ModelConfig(name=model),
                  attack=attack, epochs=epochs,
                  eval=EvalConfig(eps=MNIST_EVAL_EPS))
  if dataset == 'svhn':
    eps = 0.04 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps_train=eps, num_steps=10,
                          step_size=0.005, step_schedule='triangular')
    return Config(dataset=dataset, model=ModelConfig(name='svhn_lenet'),
                  attack=attack, epochs=50,
                  eval=EvalConfig(eps=SVHN_EVAL_EPS, pgd_step_size=None))
  if dataset == 'cifar10':
    eps = 8 / 255 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps_train=eps, num_steps=1,
                          step_size=eps, uncertainty='mc_dropout',
                          num_samples=5)
    optimizer = OptimizerConfig(
        name='sgd_nesterov', learning_rate=0.1, momentum=0.9,
        weight_decay=5e-4, lr_schedule='piecewise',
        lr_boundaries_epochs=(60, 120, 160), lr_decay_factor=1 / 15)
    return Config(dataset=dataset,
                  model=ModelConfig(name='resnet18', dropout_rate=0.2),
                  attack=attack, optimizer=optimizer, epochs=200, augment=True,
                  eval=EvalConfig(eps=(8 / 255,), pgd_step_size=None,
                                  batch_size=256))
  if dataset == 'toy2d':
    eps = 0.5 if eps_train is None else eps_train
    attack = AttackConfig(name='uta', eps_train=eps, num_steps=15,
                          step_size=0.05)
    return Config(dataset=dataset, model=ModelConfig(name='mlp'),
                  attack=attack, epochs=100, batch_size=64, log_every=100,
                  optimizer=OptimizerConfig(learning_rate=1e-2),
                  eval=EvalConfig(eps=(0.1, 0.5), pgd_step_size=None))
  raise ConfigError(f'unknown dataset {dataset!r}; choose one of '
                    f'{data.DATASETS}', 'dataset')


def get_config(dataset: str = 'mnist_embedded',
               overrides: Optional[Mapping[str, Any]] = None) -> Config:
  """The preset for ``dataset`` with ``{path: value}`` overrides (a None
  value keeps the preset's), validated.

  The preset's K follows an overridden ``attack.eps_train`` unless
  ``attack.num_steps`` is set too. MC-dropout turns dropout on (0.2) and an
  ensemble attack makes the model the paper's 5 members, unless those are
  set; ``model.ensemble_size > 1`` alone means ``uncertainty='ensemble'``;
  another attack than UTA drops a preset's MC-dropout sampling.
  """
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  if 'dataset' in overrides:
    raise ConfigError('dataset picks the preset: pass it as get_config\'s '
                      'first argument', 'dataset')
  eps = overrides.get('attack.eps_train')
  if eps is not None:
    _check_eps('attack.eps_train', eps)
  config = replace(preset(dataset, eps), overrides)
  implied = {}
  if (config.attack.uncertainty == 'mc_dropout' and
      config.attack.name != 'uta' and 'attack.uncertainty' not in overrides):
    # The preset's MC-dropout samples belong to its UTA attack (CIFAR-10).
    implied['attack.uncertainty'] = 'single'
    if 'attack.num_samples' not in overrides:
      implied['attack.num_samples'] = 1
  if (config.attack.uncertainty == 'mc_dropout' and
      config.model.dropout_rate == 0 and 'model.dropout_rate' not in overrides):
    implied['model.dropout_rate'] = 0.2
  if (config.attack.uncertainty == 'ensemble' and
      'model.ensemble_size' not in overrides):
    implied['model.ensemble_size'] = PAPER_ENSEMBLE_SIZE
  if (config.model.ensemble_size > 1 and
      'attack.uncertainty' not in overrides):
    implied['attack.uncertainty'] = 'ensemble'
    if 'attack.num_samples' not in overrides:  # a preset's MC-dropout count
      implied['attack.num_samples'] = 1
  config = replace(config, implied)
  validate(config)
  return config


def _check_eps(path: str, eps: float) -> None:
  if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
    raise ConfigError(f'{path} must be a positive number, got {eps!r}', path)


def _at_least(path: str, value: Any, low: int) -> None:
  if not isinstance(value, int) or value < low:
    raise ConfigError(f'{path} must be an integer >= {low}, got {value!r}',
                      path)


def validate(config: Config) -> None:
  """Raises ``ConfigError`` naming the first invalid setting and its fix."""
  for s in settings():
    value = get(config, s.path)
    if s.choices and value not in s.choices:
      raise ConfigError(f'unknown {s.path} {value!r}; choose one of '
                        f'{s.choices}', s.path)
    if s.kind == 'int' and not (s.optional and value is None):
      _at_least(s.path, value, 1 if s.optional else 0)
  if config.dataset == 'toy2d' and config.augment:
    raise ConfigError('augment crops and flips images; the toy2d points are '
                      '2-D vectors', 'augment')
  if config.dataset == 'toy2d' and config.model.name != 'mlp':
    raise ConfigError(f'the toy2d points are 2-D vectors, not images: use '
                      f'model.name=mlp, not {config.model.name}',
                      'model.name')
  a, m = config.attack, config.model
  if a.name != 'none':
    _check_eps('attack.eps_train', a.eps_train)
    if (config.dataset != 'toy2d' and a.space == 'input' and
        a.eps_train > 1):
      raise ConfigError(f'attack.eps_train {a.eps_train} is above 1: images '
                        'are in [0, 1], so the ball would cover every image',
                        'attack.eps_train')
    _at_least('attack.num_steps', a.num_steps, 1)
    _check_eps('attack.step_size', a.step_size)
  _at_least('attack.num_samples', a.num_samples, 1)
  if a.uncertainty == 'mc_dropout':
    if a.name != 'uta':
      raise ConfigError('attack.uncertainty=mc_dropout needs attack.name=uta',
                        'attack.uncertainty', 'attack.name')
    if m.dropout_rate <= 0:
      raise ConfigError('attack.uncertainty=mc_dropout needs '
                        'model.dropout_rate > 0', 'attack.uncertainty',
                        'model.dropout_rate')
  elif a.num_samples != 1:
    raise ConfigError('attack.num_samples > 1 needs '
                      'attack.uncertainty=mc_dropout (an ensemble\'s members '
                      'are model.ensemble_size)', 'attack.num_samples',
                      'attack.uncertainty', 'model.ensemble_size')
  _at_least('model.ensemble_size', m.ensemble_size, 1)
  if (a.uncertainty == 'ensemble') != (m.ensemble_size > 1):
    raise ConfigError('attack.uncertainty=ensemble goes with '
                      'model.ensemble_size >= 2, and only with it (got '
                      f'{a.uncertainty} and {m.ensemble_size})',
                      'attack.uncertainty', 'model.ensemble_size')
  if not 0 <= m.dropout_rate < 1:
    raise ConfigError(f'model.dropout_rate must be in [0, 1), got '
                      f'{m.dropout_rate}', 'model.dropout_rate')
  _check_eps('optimizer.learning_rate', config.optimizer.learning_rate)
  if not 0 < config.optimizer.lr_peak_fraction < 1:
    raise ConfigError('optimizer.lr_peak_fraction must be in (0, 1), got '
                      f'{config.optimizer.lr_peak_fraction}',
                      'optimizer.lr_peak_fraction')
  e = config.eval
  if not e.eps:
    raise ConfigError('eval.eps needs at least one value', 'eval.eps')
  for eps in e.eps:
    _check_eps('eval.eps', eps)
    if config.dataset != 'toy2d' and eps > 1:
      raise ConfigError(f'eval.eps {eps} is outside (0, 1]: images are in '
                        '[0, 1]; write 8/255 as the fraction 8/255',
                        'eval.eps')
  for path in ('eval.pgd_steps', 'eval.pgd_restarts', 'eval.uta_steps',
               'eval.batch_size', 'epochs', 'batch_size', 'checkpoint_every',
               'log_every'):
    _at_least(path, get(config, path), 1)
