"""Tests of uta_jax.programs: which runs share a program, the run-mapped
step against each run's own step, label-free UTA in a mixed program, and
sizing a program to the device memory."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import programs
from uta_jax import steps

SMALL = {'max_train_examples': 64, 'batch_size': 16}


def _config(dataset='mnist_embedded', **overrides):
  return configs.get_config(dataset, dict(SMALL, **overrides))


def _mixed_configs(model='mlp'):
  """2 seeds x PGD/UTA x 2 eps_train (K 3 and 5): one program."""
  return [_config(seed=seed, **{'model.name': model, 'attack.name': name,
                                'attack.eps_train': eps,
                                'attack.num_steps': k})
          for seed in (0, 1) for name in ('pgd', 'uta')
          for eps, k in ((0.1, 3), (0.2, 5))]


class GroupTest(absltest.TestCase):

  def test_seeds_eps_k_and_pgd_uta_share_a_program(self):
    self.assertEqual(programs.group(_mixed_configs()), [list(range(8))])

  def test_without_mixing_k_each_k_gets_its_own_program(self):
    self.assertEqual(programs.group(_mixed_configs(), mix_num_steps=False),
                     [[0, 2, 4, 6], [1, 3, 5, 7]])

  def test_runs_needing_other_forwards_or_settings_get_their_own(self):
    run_configs = [
        _config(**{'attack.name': 'uta'}),
        _config(**{'attack.name': 'uta', 'model.ensemble_size': 3}),
        _config(seed=1, **{'attack.name': 'uta', 'model.ensemble_size': 3,
                           'attack.eps_train': 0.3}),
        _config(**{'attack.name': 'pgd', 'model.ensemble_size': 3}),
        _config(**{'attack.name': 'uta', 'model.dropout_rate': 0.2,
                   'attack.uncertainty': 'mc_dropout',
                   'attack.num_samples': 2}),
        _config(**{'attack.name': 'fgsm'}),
        _config(**{'attack.name': 'pgd', 'optimizer.learning_rate': 0.01}),
        _config(seed=3, **{'attack.name': 'pgd'}),
    ]
    self.assertEqual(programs.group(run_configs),
                     [[0, 7], [1, 2], [3], [4], [5], [6]])

  def test_toy_runs_of_other_seeds_do_not_share(self):
    toys = [configs.get_config('toy2d', {'seed': s}) for s in (0, 1)]
    self.assertEqual(programs.group(toys), [[0], [1]])


def _host_state(config, model, tx):
  return jax.device_get(steps.create_train_state(config, model, tx,
                                                 (28, 28, 1)))


def _batch(config, step):
  split = data.load_dataset('mnist_embedded', max_train_examples=64,
                            max_eval_examples=1).train
  return data.get_batch(split, data.host_batch_indices(
      seed=config.seed, step=step, num_examples=64, global_batch=16))


class RunMappedStepTest(parameterized.TestCase):

  def test_each_run_equals_its_own_step(self):
    self._check_each_run_equals_its_own_step('unroll')  # the CPU default

  @parameterized.parameters('map', 'vmap')
  @pytest.mark.slow  # two more programs of 8 LeNet runs
  def test_each_run_equals_its_own_step_under_other_maps(self, run_map):
    self._check_each_run_equals_its_own_step(run_map)

  def _check_each_run_equals_its_own_step(self, run_map):
    # Against steps.train_step with each run's static attack (Python eps,
    # alpha and K; pgd or uta by name): an independent program, two steps.
    # map and unroll run each run's kernels alone, but the objective select
    # and the while loop of a traced K fuse differently than the static
    # attack:
    # 1e-5 (seen: 2.5e-6). vmap's batched kernels sum in another
    # order (~1e-7 relative per op); a sign step that flips on a near-zero
    # gradient moves a pixel by alpha, and Adam's first steps move a weight
    # by ~lr whatever its gradient's size, so a weight whose gradient is
    # near zero may differ by up to 2 lr per step: every weight within
    # 2 lr * steps, their mean within 1e-5.
    run_configs = _mixed_configs('lenet')
    model = classifier.create_model(run_configs[0])
    tx = steps.make_optimizer(run_configs[0], 4)
    states = programs.stack([_host_state(c, model, tx) for c in run_configs])
    runs_step = jax.jit(programs.make_train_step(
        run_configs[0], model, tx, axis_name=None, run_map=run_map))
    attack_settings = programs.run_attacks(run_configs)
    for step in range(2):
      batch = programs.stack([_batch(c, step) for c in run_configs])
      states, metrics = runs_step(states, batch, attack_settings)
    chex.assert_shape(metrics['loss'], (len(run_configs),))
    lr = run_configs[0].optimizer.learning_rate
    for r, config in enumerate(run_configs):
      alone = _host_state(config, model, tx)
      step_fn = jax.jit(steps.make_train_step(config, model, tx,
                                              axis_name=None))
      for step in range(2):
        alone, _ = step_fn(alone, _batch(config, step))
      got = programs.unstack(states, r).params
      if run_map != 'vmap':
        chex.assert_trees_all_close(got, alone.params, atol=1e-5, rtol=0)
        continue
      chex.assert_trees_all_close(got, alone.params, atol=2 * lr * 2, rtol=0)
      diffs = np.concatenate([np.abs(np.ravel(a - b)) for a, b in zip(
          jax.tree_util.tree_leaves(got),
          jax.tree_util.tree_leaves(alone.params))])
      self.assertLess(diffs.mean(), 1e-5, f'run {r}')

  def test_uta_runs_are_label_free_and_pgd_runs_are_not(self):
    config = _config(**{'model.name': 'lenet'})
    model = classifier.create_model(config)
    variables = classifier.init_variables(config, model, jax.random.key(0),
                                          (28, 28, 1))
    batch = _batch(config, 0)
    x = jnp.asarray(batch['image'])
    labels = jnp.asarray(batch['label'])
    permuted = jnp.roll(labels, 1)
    keys = jax.random.split(jax.random.key(1), x.shape[0])
    for name, label_free in (('uta', True), ('pgd', False)):
      run = steps.RunAttack.of(dataclasses.replace(config.attack, name=name,
                                                   eps_train=0.2,
                                                   num_steps=4))
      attack = jax.jit(lambda y, run=run: steps.perturb(
          config.attack, model, variables, x, y, keys, ensemble=False,
          bounds=(0.0, 1.0), run=run))
      same = bool(jnp.array_equal(attack(labels), attack(permuted)))
      self.assertEqual(same, label_free, name)

  def test_a_smaller_k_stops_moving_after_its_k_steps_under_vmap(self):
    # A run with K = 2 in a program whose largest K is 6 ends where the
    # K = 2 attack alone ends.
    config = _config(**{'attack.name': 'pgd'})
    model = classifier.create_model(config)
    variables = classifier.init_variables(config, model, jax.random.key(0),
                                          (28, 28, 1))
    x = jnp.asarray(_batch(config, 0)['image'])
    y = jnp.asarray(_batch(config, 0)['label'])
    keys = jax.random.split(jax.random.key(1), x.shape[0])

    def attack(run):
      return steps.perturb(config.attack, model, variables, x, y, keys,
                           ensemble=False, bounds=(0.0, 1.0), run=run)
    runs = programs.stack([jax.device_get(steps.RunAttack.of(
        dataclasses.replace(config.attack, num_steps=k))) for k in (2, 6)])
    both = jax.jit(jax.vmap(attack))(runs)
    alone = jax.jit(lambda: steps.perturb(
        dataclasses.replace(config.attack, num_steps=2), model, variables, x,
        y, keys, ensemble=False, bounds=(0.0, 1.0)))()
    np.testing.assert_allclose(both[0], alone, atol=1e-6)
    self.assertFalse(np.allclose(both[1], alone, atol=1e-3))


class MemoryTest(absltest.TestCase):

  def test_runs_that_fit_halves_until_the_program_fits(self):
    need = lambda r: 100 + 50 * r
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=1000), 8)
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=400), 4)
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=250), 2)
    with self.assertRaisesRegex(programs.ProgramTooLarge,
                                'one run needs .* lower batch_size'):
      programs.runs_that_fit(need, 8, limit_bytes=100)

  def test_the_compiled_program_grows_with_its_runs(self):
    config = _config()
    model = classifier.create_model(config)
    tx = steps.make_optimizer(config, 4)
    step = programs.make_train_step(config, model, tx, axis_name=None,
                                    run_map='vmap')

    def size(r):
      run_configs = [dataclasses.replace(config, seed=s) for s in range(r)]
      states = programs.stack([_host_state(c, model, tx)
                               for c in run_configs])
      batch = programs.stack([_batch(c, 0) for c in run_configs])
      return programs.compiled_bytes(jax.jit(step).lower(
          states, batch, programs.run_attacks(run_configs)).compile())
    one, four = size(1), size(4)
    self.assertGreater(four, 3 * one)


if __name__ == '__main__':
  absltest.main()
