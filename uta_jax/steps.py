"""The adversarial-training step as a pure function (Alg. 1).

``train_step(state, batch, *, ...) -> (state, metrics)`` perturbs the batch
with the configured attack on the model in eval mode (frozen BatchNorm; MC
dropout only through explicit keys), then takes one optimiser step on the
cross-entropy of the perturbed batch. With ``axis_name`` set it averages
gradients, BatchNorm statistics and metrics over that axis with
``lax.pmean`` and draws a different key per device; it never calls pmap
(``parallel`` does).

Randomness: every draw of a run comes from its key, ``jax.random.key(seed)``
split once for the initialisation and the run key (``run_key(state)``). The
key of training step s on device d is ``fold_in(fold_in(run key, s), d)``,
split for the attack, the MC-dropout samples and training dropout, so a
resumed run repeats the same draws. Everything else draws from a named
stream, ``stream_key(state, 'evaluation', step)``: evaluations depend on the
seed and the step, never on what training drew.

An ensemble (``model.ensemble_size`` M > 1) keeps the members' variables stacked
on a leading axis; its logits are the log of the mean softmax and its
training loss the mean of the members' losses. In latent space every member
has its own encoder, so the attacked point is the stack of the members'
codes [M, B, l]: each member's code moves in its own eps-ball, and the
objective (the ensemble's predictive entropy, or its cross-entropy) couples
them. Each member is then trained on its own perturbed code.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from uta_jax import attacks
from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import uncertainty


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # scalar int32: also the position in the data
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any
  key: jax.Array  # uint32[2]: key data of the run key (``run_key``), so
  # checkpoints and pmap replication see a plain array


def learning_rate(config: configs.Config, steps_per_epoch: int):
  """The learning rate per step: a constant, or an optax schedule.

  ``piecewise``: decayed by ``lr_decay_factor`` at each boundary epoch.
  ``cyclic``: one triangle (Smith 2017, the fast-AT form), 0 up to
  ``learning_rate`` at ``lr_peak_fraction`` of the run, then down to 0 at
  its last step.
  """
  o = config.optimizer
  if o.lr_schedule == 'piecewise':
    return optax.piecewise_constant_schedule(o.learning_rate, {
        b * steps_per_epoch: o.lr_decay_factor
        for b in o.lr_boundaries_epochs
    })
  if o.lr_schedule == 'cyclic':
    total = max(2, config.epochs * steps_per_epoch)
    up = min(total - 1, max(1, round(o.lr_peak_fraction * total)))
    return optax.join_schedules([
        optax.linear_schedule(0.0, o.learning_rate, up),
        optax.linear_schedule(o.learning_rate, 0.0, total - up)], [up])
  return o.learning_rate


def make_optimizer(config: configs.Config,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam or SGD-Nesterov with the configured learning-rate schedule."""
  lr = learning_rate(config, steps_per_epoch)
  config = config.optimizer
  if config.name == 'adam':
    tx = optax.adam(lr)
  else:
    tx = optax.sgd(lr, momentum=config.momentum, nesterov=True)
  if config.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  return tx


def create_train_state(config: configs.Config, model: nn.Module,
                       tx: optax.GradientTransformation,
                       input_shape: Tuple[int, ...]) -> TrainState:
  """Fresh state from ``config.seed`` (M stacked members for an ensemble)."""
  init_key, key = jax.random.split(jax.random.key(config.seed))
  variables = classifier.init_variables(config, model, init_key, input_shape)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), key=jax.random.key_data(key))


def run_key(state: TrainState) -> jax.Array:
  """The run's typed key, from the key data the state keeps."""
  return jax.random.wrap_key_data(state.key)


def stream_key(state: TrainState, stream: str, step: int) -> jax.Array:
  """The key of ``stream`` ('evaluation', ...) at ``step``: the run key
  folded with the stream's name (crc32) and the step."""
  named = jax.random.fold_in(run_key(state), zlib.crc32(stream.encode()))
  return jax.random.fold_in(named, step)


def variables_of(state: TrainState) -> dict:
  if state.batch_stats:
    return {'params': state.params, 'batch_stats': state.batch_stats}
  return {'params': state.params}


class RunAttack(flax.struct.PyTreeNode):
  """The attack settings that may differ between the runs of one program
  (``programs``), as traced values: [R] each in the program, scalars in a
  run's step. Values only: K (``attack.num_steps``) decides the attack
  loop's trip count, so it stays a Python int that the program shares."""
  eps: jax.Array  # float32: eps_train
  step_size: jax.Array  # float32: alpha (constant schedule)
  use_uncertainty: jax.Array  # bool: UTA's entropy, else PGD's cross-entropy

  @classmethod
  def of(cls, attack: configs.AttackConfig) -> 'RunAttack':
    return cls(eps=jnp.float32(attack.eps_train),
               step_size=jnp.float32(attack.step_size),
               use_uncertainty=jnp.bool_(attack.name == 'uta'))


def selectable_objective(attack: configs.AttackConfig, ensemble: bool) -> bool:
  """PGD and single-model entropy UTA: one forward serves both objectives,
  so runs of either share a program (``attacks.selected_objective``)."""
  return (attack.name in ('pgd', 'uta') and not ensemble and
          attack.uncertainty == 'single' and attack.measure == 'entropy')


def perturb(attack: configs.AttackConfig, model: nn.Module, variables: dict,
            x: jax.Array, labels: jax.Array, key: jax.Array, *,
            ensemble: bool, bounds: Optional[Tuple[float, float]],
            run: Optional[RunAttack] = None) -> jax.Array:
  """The attack's point: x_adv [B, ...], or z_adv [B, l] in latent space.

  Runs the model in eval mode; only UTA's MC-dropout samples use dropout,
  with M explicit keys. UTA never sees ``labels``. ``key`` is one key, or
  one per example [B] (the train step's): then R-FGSM's start and the
  MC-dropout masks of example i come from its own key alone. ``run`` (a
  program of runs) replaces eps and alpha by its traced values, and for
  ``selectable_objective`` attacks picks PGD's or UTA's objective; K is
  always ``attack.num_steps``, a Python int (a loop of known trip count).
  """
  eps, num_steps, alpha = attack.eps_train, attack.num_steps, attack.step_size
  if run is not None:
    eps, alpha = run.eps, run.step_size
  method = {}
  start = x
  if attack.space == 'latent':
    start = classifier.latent_codes(model, variables, x, ensemble=ensemble)
    method = {'method': model.classify}
    if ensemble:  # each member moves its own code: [M, B, l]
      method['per_member_inputs'] = True
    bounds = None
  if attack.name == 'none':
    return start
  if attacks.is_key_batch(key):
    attack_key, sample_key = jnp.swapaxes(jax.vmap(jax.random.split)(key), 0,
                                          1)
  else:
    attack_key, sample_key = jax.random.split(key)
  logits_fn = functools.partial(classifier.predict_logits, model, variables,
                                ensemble=ensemble, **method)
  if attack.step_schedule == 'triangular':
    step_size = attacks.triangular_schedule(num_steps=num_steps, eps=eps)
  else:
    step_size = alpha
  common = dict(eps=eps, bounds=bounds)
  if run is not None and selectable_objective(attack, ensemble):
    return attacks.projected_sign_ascent(
        attacks.selected_objective(logits_fn, labels,
                                   use_uncertainty=run.use_uncertainty),
        start, num_steps=num_steps, step_size=step_size, **common)
  if attack.name == 'fgsm':
    return attacks.fgsm(logits_fn, start, labels, **common)
  if attack.name == 'rfgsm':
    return attacks.rfgsm(logits_fn, start, labels, key=attack_key,
                         step_size=alpha, **common)
  if attack.name == 'pgd':
    return attacks.pgd(logits_fn, start, labels, num_steps=num_steps,
                       step_size=step_size, **common)
  if attack.uncertainty == 'mc_dropout':
    split = functools.partial(jax.random.split, num=attack.num_samples)
    keys = (jax.vmap(split)(sample_key) if attacks.is_key_batch(sample_key)
            else split(sample_key))  # [B, M] or [M]
    sample_fn = uncertainty.mc_dropout_sampler(
        functools.partial(model.apply, **method), variables, keys)
  else:
    sample_fn = functools.partial(classifier.member_logits, model, variables,
                                  ensemble=ensemble, **method)
  return attacks.uta(sample_fn, start, num_steps=num_steps,
                     step_size=step_size, measure=attack.measure, **common)


EXAMPLES = 'examples'  # the vmapped axis of the per-example train forward


def _has_dropout(model: nn.Module) -> bool:
  return getattr(model, 'dropout_rate', 0.0) > 0


def _train_forward(model, variables, x, keys, delta=None):
  """Training-mode logits [B, C] and new BatchNorm statistics of one model.

  With dropout, example i runs with its own dropout key ``keys[i]``
  (vmapped, a batch of one each), so its masks do not depend on its batch
  or device, and BatchNorm (``bn_axis_name`` holds ``EXAMPLES``, set by
  ``train_step``) still normalises over the whole batch. Without dropout
  nothing is random and the batch runs as one (vmapping it costs ~25% on
  CPU). With ``delta`` (latent space), the logits are
  classify(encode(x) + delta), so gradients reach the encoder too.
  """
  mutable = ['batch_stats'] if 'batch_stats' in variables else False
  per_example = _has_dropout(model)

  def one(xi, key, di):
    encode_key, classify_key = jax.random.split(key)

    def apply(inputs, rng, **kwargs):
      if per_example:
        inputs = inputs[None]
      out = model.apply(variables, inputs, train=True,
                        rngs={'dropout': rng}, mutable=mutable, **kwargs)
      out, updates = out if mutable else (out, {})
      return (out[0] if per_example else out), updates

    if di is None:
      logits, updates = apply(xi, encode_key)
    else:
      z, updates = apply(xi, encode_key, method=model.encode)
      logits, _ = apply(z + di, classify_key, method=model.classify)
    return logits, updates.get('batch_stats', {})

  if not per_example:
    return one(x, keys[0], delta)  # the key is unused: no dropout
  logits, stats = jax.vmap(one, axis_name=EXAMPLES)(x, keys, delta)
  # The statistics were averaged over EXAMPLES: every example holds them.
  return logits, jax.tree_util.tree_map(lambda s: s[0], stats)


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation,
               attack: configs.AttackConfig, ensemble: bool,
               bounds: Optional[Tuple[float, float]],
               axis_name: Optional[str] = None,
               run: Optional[RunAttack] = None) -> Tuple[TrainState, dict]:
  """One step of Alg. 1 on ``batch`` = {'image': [B, ...], 'label': [B],
  'id': [B]} (without 'id', an example's position in the global batch);
  ``run``: this run's attack settings in a program of runs.

  Every random draw of example i (attack start, MC-dropout masks, training
  dropout) is keyed by ``fold_in(fold_in(run key, step), id_i)``: the step
  does not depend on how the batch is split over devices or hosts.
  """
  key = jax.random.fold_in(run_key(state), state.step)
  x, labels = batch['image'], batch['label']
  ids = batch.get('id')
  if ids is None:
    ids = jnp.arange(x.shape[0])
    if axis_name is not None:
      ids = ids + jax.lax.axis_index(axis_name) * x.shape[0]
  attack_key, dropout_key = jax.random.split(key)
  attack_keys = attacks.example_keys(attack_key, ids)  # [B]
  dropout_keys = attacks.example_keys(dropout_key, ids)  # [B]
  variables = variables_of(state)
  point = jax.lax.stop_gradient(perturb(attack, model, variables, x, labels,
                                        attack_keys, ensemble=ensemble,
                                        bounds=bounds, run=run))
  if attack.space == 'latent':
    z = classifier.latent_codes(model, variables, x, ensemble=ensemble)
    inputs, delta = x, point - z  # delta: [B, l] or [M, B, l]
  else:
    inputs, delta = point, None

  # BatchNorm statistics over the global batch: the vmapped examples and,
  # under pmap, every device's shard.
  train_model = model
  bn_axes = (((EXAMPLES,) if _has_dropout(model) else ()) +
             ((axis_name,) if axis_name is not None else ()))
  if hasattr(model, 'bn_axis_name') and bn_axes:
    train_model = model.clone(bn_axis_name=bn_axes)

  def loss_fn(params):
    def one(member_vars, k, member_delta):
      logits, stats = _train_forward(train_model, member_vars, inputs, k,
                                     member_delta)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), (logits, stats)
    v = dict(variables, params=params)
    if ensemble:
      num = jax.tree_util.tree_leaves(params)[0].shape[0]
      member_keys = jax.vmap(lambda m: jax.vmap(jax.random.fold_in, (0, None))(
          dropout_keys, m))(jnp.arange(num))  # [M, B]
      losses, (logits, stats) = uncertainty.map_members(
          one, v, member_keys, delta)
      return losses.mean(), (uncertainty.predictive_log_probs(logits), stats)
    return one(v, dropout_keys, delta)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
  }
  if axis_name is not None:
    grads, batch_stats, metrics = jax.lax.pmean((grads, batch_stats, metrics),
                                                axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def make_train_step(config: configs.Config, model: nn.Module,
                    tx: optax.GradientTransformation, *,
                    axis_name: Optional[str]) -> Callable[..., Any]:
  """``train_step`` with the run's static settings bound."""
  return functools.partial(
      train_step, model=model, tx=tx, attack=config.attack,
      ensemble=classifier.is_ensemble(config),
      bounds=classifier.input_bounds(config),
      axis_name=axis_name)


@functools.lru_cache(maxsize=32)
def _fit_program(config: configs.Config, steps_per_epoch: int):
  """(model, optimiser, jitted step) of ``fit``, built once per config up
  to its seed (the step takes the run key from the state): many quick
  trainings, the toy's hundreds, share one compiled step instead of each
  compiling (and keeping) its own."""
  model = classifier.create_model(config)
  tx = make_optimizer(config, steps_per_epoch)
  return model, tx, jax.jit(make_train_step(config, model, tx,
                                            axis_name=None))


def fit(config: configs.Config, split: data.Split, *, num_steps: int,
        callback: Optional[Callable[[int, nn.Module, dict], None]] = None
       ) -> Tuple[nn.Module, dict]:
  """``num_steps`` of ``train_step`` on one device, in the run's data order.

  No checkpoints, logging or evaluation: a quickly trained model for tests,
  benchmarks and the 2D toy (``loop.train_and_evaluate`` is the real job).
  ``callback(step, model, variables)`` sees the model after every update
  (the toy's boundary-oscillation map). Returns the model and its variables.
  """
  steps_per_epoch = data.steps_per_epoch(len(split), config.batch_size)
  model, tx, step_fn = _fit_program(dataclasses.replace(config, seed=0),
                                    steps_per_epoch)
  state = create_train_state(config, model, tx, tuple(split.images.shape[1:]))
  for step in range(num_steps):
    batch = data.get_batch(split, data.host_batch_indices(
        seed=config.seed, step=step, num_examples=len(split),
        global_batch=config.batch_size), augment_seed=(
            (config.seed, step) if config.augment else None))
    state, _ = step_fn(state, batch)
    if callback is not None:
      callback(step + 1, model, variables_of(state))
  return model, variables_of(state)
