"""A run's config.json: the JSON round-trip of a ``configs.Config``, the
upgrade of layouts written before the model section existed, and which
settings a resumption may change."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping

from uta_jax import configs


# Settings that may change between a run and its resumption.
RESUMABLE_CHANGES = ('data_dir', 'epochs', 'checkpoint_every', 'eval_every',
                     'eval_every_steps',
                     'log_every', 'eval', 'max_eval_examples')


def incompatibilities(saved: configs.Config,
                      current: configs.Config) -> list:
  """Paths of the settings that differ and would make resuming ``saved``
  wrong."""
  return [s.path for s in configs.settings()
          if s.path.split('.')[0] not in RESUMABLE_CHANGES and
          configs.get(saved, s.path) != configs.get(current, s.path)]


def to_dict(config: configs.Config) -> Dict[str, Any]:
  """The config as JSON-ready nested dicts (tuples as lists)."""
  return json.loads(to_json(config))


def to_json(config: configs.Config) -> str:
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def _build(cls, values: dict):
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    value = values[f.name]
    if dataclasses.is_dataclass(f.default):
      value = _build(type(f.default), value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  return cls(**kwargs)


def _upgrade(values: dict) -> dict:
  """A config.json written before the model section (model, dropout_rate at
  the top, attack.eps, an ensemble's members in attack.num_samples), in the
  current schema; newer ones unchanged."""
  if not isinstance(values.get('model'), str):
    return values
  values = dict(values)
  attack = dict(values.get('attack', {}))
  if 'eps' in attack:
    attack['eps_train'] = attack.pop('eps')
  members = 1
  if attack.get('uncertainty') == 'ensemble':
    members, attack['num_samples'] = attack.get('num_samples', 1), 1
  values['attack'] = attack
  values['model'] = {'name': values['model'],
                     'dropout_rate': values.pop('dropout_rate', 0.0),
                     'ensemble_size': members}
  return values


def from_dict(values: Mapping[str, Any]) -> configs.Config:
  """Inverse of ``to_dict`` (older layouts upgraded); raises
  ``configs.ConfigError`` on malformed input."""
  try:
    return _build(configs.Config, _upgrade(dict(values)))
  except (ValueError, TypeError, AttributeError) as e:
    raise configs.ConfigError(f'malformed config: {e}') from e


def from_json(text: str) -> configs.Config:
  """Inverse of ``to_json``; raises ``configs.ConfigError`` on malformed
  input."""
  try:
    values = json.loads(text)
  except ValueError as e:
    raise configs.ConfigError(f'malformed config JSON: {e}') from e
  if not isinstance(values, dict):
    raise configs.ConfigError('malformed config JSON: not an object')
  return from_dict(values)
