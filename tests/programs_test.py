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
from uta_jax import parallel
from uta_jax import programs
from uta_jax import steps
from uta_jax import training

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator

SMALL = {'max_train_examples': 64, 'batch_size': 16}


def _config(dataset='mnist_embedded', **overrides):
  return configs.get_config(dataset, dict(SMALL, **overrides))


def _mixed_configs(model='mlp', num_steps=(3, 3)):
  """2 seeds x PGD/UTA x 2 (eps_train, step size), K of each given."""
  return [_config(seed=seed, **{'model.name': model, 'attack.name': name,
                                'attack.eps_train': eps,
                                'attack.step_size': eps / 4,
                                'attack.num_steps': k})
          for seed in (0, 1) for name in ('pgd', 'uta')
          for eps, k in zip((0.1, 0.2), num_steps)]


class GroupTest(absltest.TestCase):

  def test_seeds_eps_alpha_and_pgd_uta_share_a_program(self):
    self.assertEqual(programs.group(_mixed_configs()), [list(range(8))])

  def test_each_k_gets_its_own_program(self):
    # K is the attack loop's trip count: static, part of the program.
    self.assertEqual(programs.group(_mixed_configs(num_steps=(3, 5))),
                     [[0, 2, 4, 6], [1, 3, 5, 7]])

  def test_table1_fashion_mnist_runs_are_four_programs_of_six(self):
    run_configs = [configs.get_config('fashion_mnist', {
        'seed': seed, 'attack.name': name, 'attack.eps_train': eps,
        'attack.num_steps': round(eps / 0.01)})
                   for name in ('pgd', 'uta') for eps in (0.1, 0.2, 0.3, 0.4)
                   for seed in (0, 1, 2)]
    self.assertEqual([len(g) for g in programs.group(run_configs)], [6] * 4)

  def test_runs_needing_other_forwards_or_settings_get_their_own(self):
    run_configs = [
        _config(**{'attack.name': 'uta'}),
        _config(**{'attack.name': 'uta', 'model.ensemble_size': 3}),
        _config(seed=1, **{'attack.name': 'uta', 'model.ensemble_size': 3,
                           'attack.eps_train': 0.3, 'attack.num_steps': 20}),
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

  @pytest.mark.slow  # 4 LeNet runs as one program and alone
  def test_each_run_equals_its_own_step(self):
    self._check_each_run_equals_its_own_step('unroll')  # the CPU default

  @pytest.mark.slow  # one more program of 4 LeNet runs
  def test_each_run_equals_its_own_step_under_vmap(self):
    self._check_each_run_equals_its_own_step('vmap')

  def _check_each_run_equals_its_own_step(self, run_map):
    # Against steps.train_step with each run's static attack (Python eps
    # and alpha; pgd or uta by name): an independent program, two steps.
    # unroll runs each run's kernels alone, but the objective select and
    # the traced eps and alpha fuse differently than the static attack:
    # 1e-5 (seen: 2.5e-6). vmap's batched kernels sum in another
    # order (~1e-7 relative per op); a sign step that flips on a near-zero
    # gradient moves a pixel by alpha, and Adam's first steps move a weight
    # by ~lr whatever its gradient's size, so a weight whose gradient is
    # near zero may differ by up to 2 lr per step: every weight within
    # 2 lr * steps, their mean within 1e-5.
    # Four of the 8 mixed runs: each seed, objective and eps_train once.
    run_configs = [_mixed_configs('lenet')[i] for i in (0, 3, 5, 6)]
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


def _primitives(jaxpr):
  """Every primitive name in ``jaxpr`` and the jaxprs nested in its
  equations' parameters (pmap's body, scan's and cond's branches, ...)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          names |= _primitives(sub)
  return names


class MapRunsTest(parameterized.TestCase):

  @parameterized.parameters(*programs.EVAL_RUN_MAPS)
  def test_each_run_equals_the_function_on_its_slice(self, run_map):
    def fn(w, x, scale):  # one run: [3, 2] weights, [5, 3] inputs
      return {'y': jnp.tanh(x @ w) * scale, 'sum': jnp.sum(w)}
    w = jax.random.normal(jax.random.key(0), (4, 3, 2))
    x = jax.random.normal(jax.random.key(1), (4, 5, 3))
    out = jax.jit(programs.map_runs(fn, run_map, num_mapped=2))(w, x, 2.0)
    for r in range(4):
      want = fn(w[r], x[r], 2.0)
      chex.assert_trees_all_close(programs.unstack(out, r), want, rtol=1e-6)
    one = programs.map_runs(fn, run_map, num_mapped=2)(w[:1], x[:1], 2.0)
    chex.assert_trees_all_close(programs.unstack(one, 0),
                                fn(w[0], x[0], 2.0), rtol=1e-6)

  def test_map_runs_is_a_loop_and_refuses_unknown_maps(self):
    fn = programs.map_runs(lambda w: w * 2, 'map', num_mapped=1)
    self.assertIn('scan', str(jax.make_jaxpr(fn)(jnp.ones((3, 2)))))
    with self.assertRaisesRegex(ValueError, 'run_map must be one of'):
      programs.map_runs(lambda w: w, 'pmap', num_mapped=1)
    with self.assertRaisesRegex(ValueError, 'run_map must be one of'):
      programs.make_train_step(configs.get_config('mnist_embedded'), None,
                               None, axis_name=None, run_map='map')


class StaticControlFlowTest(parameterized.TestCase):
  """The step training runs (``training.program_step``) has no loop whose
  trip count is unknown when compiling: a traced K would make XLA:GPU copy
  the loop predicate to the host and wait, on every attack step (a static
  ``fori_loop`` traces as ``scan``, a traced bound as ``while``)."""

  @parameterized.product(num_runs=(1, 3), run_map=programs.RUN_MAPS)
  def test_the_program_step_has_no_while_loop(self, num_runs, run_map):
    run_configs = [_config(seed=s, **{'model.name': 'lenet',
                                      'attack.name': ('pgd', 'uta')[s % 2],
                                      'attack.eps_train': 0.05 * (s + 1),
                                      'attack.num_steps': 3})
                   for s in range(num_runs)]
    self.assertLen(programs.group(run_configs), 1)
    model = classifier.create_model(run_configs[0])
    tx = steps.make_optimizer(run_configs[0], 4)
    states = programs.stack([_host_state(c, model, tx) for c in run_configs])
    batch = programs.stack([_batch(c, 0) for c in run_configs])
    p_step = training.program_step(run_configs[0], model, tx,
                                   run_map=run_map)
    jaxpr = jax.make_jaxpr(p_step)(
        parallel.replicate(states),
        parallel.device_batch(batch, axis=1),
        parallel.replicate(programs.run_attacks(run_configs))).jaxpr
    names = _primitives(jaxpr)
    self.assertIn('scan', names)  # the attack's K steps
    self.assertNotIn('while', names)


class MemoryTest(absltest.TestCase):

  def test_runs_that_fit_halves_until_the_program_fits(self):
    need = lambda r: 100 + 50 * r
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=1000), 8)
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=400), 4)
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=250), 2)
    with self.assertRaisesRegex(programs.ProgramTooLarge,
                                'one run needs .* lower batch_size'):
      programs.runs_that_fit(need, 8, limit_bytes=100)

  def test_a_compile_time_out_of_memory_does_not_fit(self):
    def need(r):  # as XLA's compiler says it for a program too large (its
      if r > 2:   # JaxRuntimeError is a RuntimeError)
        raise RuntimeError(
            'RESOURCE_EXHAUSTED: Out of memory while trying to allocate '
            f'{r} GiB.')
      return 100
    self.assertEqual(programs.runs_that_fit(need, 8, limit_bytes=1000), 2)
    with self.assertRaisesRegex(programs.ProgramTooLarge,
                                'one run does not compile within the device '
                                'memory .*RESOURCE_EXHAUSTED.*lower '
                                'batch_size'):
      programs.runs_that_fit(lambda r: need(r + 2), 8, limit_bytes=1000)

  def test_other_errors_of_sizing_are_raised(self):
    def broken(r):
      raise ValueError('a bug')
    with self.assertRaisesRegex(ValueError, 'a bug'):
      programs.runs_that_fit(broken, 8, limit_bytes=1000)

  def test_loop_bytes_hold_the_checkpoint_copy_batch_and_evaluation(self):
    # The step's peak with the prefetched batch, or the evaluation's with
    # the states alive, whichever is larger; the checkpoint copy and its
    # per-run slices beside either.
    self.assertEqual(programs.loop_bytes(step_bytes=1000, state_bytes=100,
                                         batch_bytes=10, eval_bytes=50),
                     200 + 1010)
    self.assertEqual(programs.loop_bytes(step_bytes=1000, state_bytes=100,
                                         batch_bytes=10, eval_bytes=5000),
                     200 + 5100)

  def test_a_programs_peak_counts_more_than_its_compiled_step(self):
    run_configs = [_config(seed=s) for s in (0, 1)]
    model = classifier.create_model(run_configs[0])
    tx = steps.make_optimizer(run_configs[0], 4)
    dataset = data.load_dataset('mnist_embedded', max_train_examples=64,
                                max_eval_examples=16)
    program = training.Program(run_configs[0], model, tx, dataset, 4, 4,
                               run_map='unroll')
    chunk = []
    for config in run_configs:
      run = training.Run(config, self.create_tempdir().full_path)
      run.state = _host_state(config, model, tx)
      chunk.append(run)
    step = programs.compiled_bytes(program._step_fn(chunk))  # pylint: disable=protected-access
    states = programs.tree_bytes(programs.stack([r.state for r in chunk]))
    batch = programs.tree_bytes(programs.stack(
        [_batch(c, 0) for c in run_configs])) // jax.local_device_count()
    self.assertGreaterEqual(program.peak_bytes(chunk),
                            step + 2 * states + batch)

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
