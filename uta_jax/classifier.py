"""Applying the configured classifier: one model or a stacked ensemble.

Everything that runs a model in eval mode goes through here: the attacks of
the training step, evaluation, AutoAttack, the scripts and the notebooks.
The configuration says what the classifier is (``config.model``: its
architecture, dropout and ``ensemble_size``); these functions take the flax
module, its variables and ``ensemble`` (``is_ensemble(config)``):

  model = classifier.create_model(config)
  variables = classifier.init_variables(config, model, key, (28, 28, 1))
  logits = classifier.predict_logits(model, variables, x,
                                     ensemble=classifier.is_ensemble(config))

An ensemble keeps its M members' variables stacked on a leading axis
``[M, ...]`` and predicts the log of the mean softmax; every per-member loop
is ``uncertainty.map_members``. In latent space (``method=model.classify``)
an ensemble's members may each see their own code (``per_member_inputs``).
MC-dropout samples are ``uncertainty.mc_dropout_sampler``'s.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax

from uta_jax import attacks
from uta_jax import configs
from uta_jax import data
from uta_jax import models
from uta_jax import uncertainty


def create_model(config: configs.Config) -> nn.Module:
  """The configured module, one output per class of its dataset; for an
  ensemble, the module of one member."""
  kwargs = {'num_classes': data.NUM_CLASSES[config.dataset]}
  if config.model.name != 'resnet18' or config.model.dropout_rate:
    kwargs['dropout_rate'] = config.model.dropout_rate
  return models.create_model(config.model.name, **kwargs)


def is_ensemble(config: configs.Config) -> bool:
  return config.model.ensemble_size > 1


def init_variables(config: configs.Config, model: nn.Module, key: jax.Array,
                   input_shape: Tuple[int, ...]) -> dict:
  """Fresh variables; an ensemble's M members each from their own key,
  stacked on a leading axis."""
  init = functools.partial(models.init_variables, model,
                           input_shape=input_shape)
  if is_ensemble(config):
    return jax.vmap(init)(jax.random.split(key, config.model.ensemble_size))
  return init(key)


def input_bounds(config: configs.Config) -> Optional[Tuple[float, float]]:
  """Pixel box for images; none for the toy 2D points."""
  return None if config.dataset == 'toy2d' else attacks.PIXEL_BOUNDS


def member_logits(model: nn.Module, variables: dict, x: jax.Array, *,
                  ensemble: bool, per_member_inputs: bool = False,
                  **kwargs) -> jax.Array:
  """Eval-mode logits per member: [M, B, C] (M = 1 for a single model).

  With ``per_member_inputs`` member m sees ``x[m]`` (x: [M, B, ...], e.g.
  the members' own latent codes); otherwise every member sees ``x``.
  ``kwargs`` go to ``model.apply`` (``method=model.classify``).
  """
  apply = functools.partial(model.apply, **kwargs)
  if ensemble and per_member_inputs:
    return uncertainty.map_members(apply, variables, x)
  if ensemble:
    return uncertainty.ensemble_sampler(apply, variables)(x)
  return apply(variables, x)[None]


def predict_logits(model: nn.Module, variables: dict, x: jax.Array, *,
                   ensemble: bool, per_member_inputs: bool = False,
                   **kwargs) -> jax.Array:
  """Eval-mode logits [B, C]; for an ensemble, log of the mean softmax."""
  if ensemble:
    return uncertainty.predictive_log_probs(member_logits(
        model, variables, x, ensemble=True,
        per_member_inputs=per_member_inputs, **kwargs))
  return model.apply(variables, x, **kwargs)


def latent_codes(model: nn.Module, variables: dict, x: jax.Array, *,
                 ensemble: bool) -> jax.Array:
  """Eval-mode codes: [B, l], or [M, B, l] for an ensemble (one per member)."""
  encode = functools.partial(model.apply, method=model.encode)
  if ensemble:
    return uncertainty.map_members(lambda v: encode(v, x), variables)
  return encode(variables, x)
