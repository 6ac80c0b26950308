"""Command-line flags generated from the config schema (``uta_jax.configs``).

Each leaf of the schema is one flag, named by a fixed rule so that the names
stay the ones users type (``--attack=pgd --eps_train=0.3``):

| schema path | flag |
| --- | --- |
| a top-level field, ``seed`` | ``--seed`` |
| a section's ``name``, ``attack.name`` | ``--attack`` |
| an ``eval`` field, ``eval.pgd_steps`` | ``--eval_pgd_steps`` |
| another section's field, ``attack.eps_train`` | ``--eps_train`` |

Every flag but ``--dataset`` defaults to None, "keep the preset's value".
Help and choices come from the schema, so adding a field to a dataclass adds
its flag; a name clash fails at import. Numbers accept fractions
(``--eps_train=8/255``), read exactly. Errors name the flag, not the path.
"""

from typing import Any, Dict, Iterable, Optional

from absl import flags

import cli
from uta_jax import configs
from uta_jax import errors

FLAGS = flags.FLAGS

# Sections whose fields keep their section's name in the flag.
_PREFIXED_SECTIONS = ('eval',)

_SETTINGS = {s.path: s for s in configs.settings()}


def flag_name(path: str) -> str:
  """The flag of a schema path ('attack.eps_train' -> 'eps_train')."""
  section, _, name = path.rpartition('.')
  if not section:
    return name
  if name == 'name':
    return section
  if section in _PREFIXED_SECTIONS:
    return f'{section}_{name}'
  return name


_PATHS = {flag_name(path): path for path in _SETTINGS}
assert len(_PATHS) == len(_SETTINGS), 'two schema paths map to one flag'


class _NumberParser(flags.ArgumentParser):
  """absl parser of one float written as a decimal or a fraction."""

  def parse(self, argument):
    return argument if isinstance(argument, float) else cli.parse_number(
        str(argument))

  def flag_type(self):
    return 'float'


class _ListParser(flags.ListParser):
  """Comma-separated numbers (decimals or fractions) or integers."""

  def __init__(self, item):
    super().__init__()
    self._item = item

  def parse(self, argument):
    return [self._item(v) for v in super().parse(argument)]


_DEFAULT_PRESET = configs.get_config(configs.Config().dataset)


def _shown(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ','.join(_shown(v) for v in value)
  return 'None' if value is None else f'{value:g}' if isinstance(
      value, float) else str(value)


def _help(setting: configs.Setting) -> str:
  text = setting.help
  if setting.choices:
    text += f'; one of {", ".join(setting.choices)}'
  if setting.path != 'dataset':
    text += (f'; default: the --dataset preset\'s ({_DEFAULT_PRESET.dataset}:'
             f' {_shown(configs.get(_DEFAULT_PRESET, setting.path))}; '
             '--print_config shows any preset)')
  return text


def describe(config: configs.Config, given: Iterable[str] = ()) -> str:
  """Every setting of ``config`` as the flag that sets it, one per line,
  with its schema path; ``given`` paths (set by flags) marked with '*'."""
  given = set(given)
  lines = [f'# {config.dataset} preset; * = set by a flag']
  for path in _SETTINGS:
    flag = f'--{flag_name(path)}={_shown(configs.get(config, path))}'
    lines.append(f"{'*' if path in given else ' '} {flag:<40} # {path}")
  return '\n'.join(lines)


def define(paths: Optional[Iterable[str]] = None,
           flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the flags of ``paths`` (default: every setting)."""
  kw = dict(flag_values=flag_values)
  for path in (_SETTINGS if paths is None else paths):
    setting = _SETTINGS[path]
    name, text = flag_name(path), _help(setting)
    default = setting.default if path == 'dataset' else None
    if setting.kind == 'str':
      flags.DEFINE_string(name, default, text, **kw)
    elif setting.kind == 'int':
      flags.DEFINE_integer(name, default, text, **kw)
    elif setting.kind == 'bool':
      flags.DEFINE_bool(name, default, text, **kw)
    elif setting.kind == 'float':
      flags.DEFINE(_NumberParser(), name, default, text, **kw)
    elif setting.kind in ('floats', 'ints'):
      item = cli.parse_number if setting.kind == 'floats' else int
      flags.DEFINE(_ListParser(item), name, default, text,
                   serializer=flags.CsvListSerializer(','), **kw)
    else:
      raise TypeError(f'no flag type for {path} ({setting.kind})')


def overrides(paths: Optional[Iterable[str]] = None,
              flag_values: flags.FlagValues = FLAGS) -> Dict[str, Any]:
  """``{path: value}`` of the flags among ``paths`` (default: all defined)
  that were given, for ``configs.get_config``; ``--dataset`` excluded."""
  paths = [p for p in (_SETTINGS if paths is None else paths)
           if flag_name(p) in flag_values and p != 'dataset']
  return {p: flag_values[flag_name(p)].value for p in paths
          if flag_values[flag_name(p)].value is not None}


def as_paths(values: Dict[str, Any]) -> Dict[str, Any]:
  """``{flag: value}`` as ``{path: value}`` (presets written as commands)."""
  unknown = sorted(set(values) - set(_PATHS))
  if unknown:
    raise KeyError(f'no config flags {unknown}')
  return {_PATHS[name]: value for name, value in values.items()}


def message(error: Exception) -> str:
  """An error's message with the settings it names written as the flags the
  user typed: those the library's error lists, and every dotted schema path
  ('model.name' -> '--model')."""
  rename = lambda path: f'--{flag_name(path)}'
  if isinstance(error, errors.NamesSettings):
    text = error.renamed(rename)
  else:
    text = str(error)
  for path in sorted((p for p in _SETTINGS if '.' in p), key=len,
                     reverse=True):
    text = text.replace(path, rename(path))
  return text


def config(dataset: str) -> configs.Config:
  """The preset of ``dataset`` with the given flags applied; a one-line
  error naming the flag when invalid."""
  try:
    return configs.get_config(dataset, overrides())
  except configs.ConfigError as e:
    cli.fail(message(e))
