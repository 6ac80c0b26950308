"""Tests of uta_jax.steps and uta_jax.parallel on 4 fake CPU devices."""

import dataclasses
import zlib

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import models
from uta_jax import parallel
from uta_jax import steps
from uta_jax import uncertainty

from testutil import synthetic_images  # pylint: disable=g-bad-import-order

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator


def _setup(overrides, tx=None):
  config = configs.get_config('fashion_mnist', overrides)
  model = classifier.create_model(config)
  tx = tx or steps.make_optimizer(config, 10)
  state = steps.create_train_state(config, model, tx, (28, 28, 1))
  x, y = synthetic_images(16, seed=3)
  return config, model, tx, state, {'image': x, 'label': y}


class PmapTest(chex.TestCase):

  def test_every_device_together_equals_one_device_on_the_full_batch(self):
    if jax.local_device_count() < 2:
      self.skipTest('one local device: nothing to compare (the CPU suite '
                    'fakes 4)')
    # Plain SGD with lr 1: the parameter change is minus the gradient.
    config, model, tx, state, batch = _setup(
        {'attack.name': 'pgd', 'attack.eps_train': 0.1, 'attack.num_steps': 3},
        tx=optax.sgd(1.0))
    single = jax.jit(steps.make_train_step(config, model, tx, axis_name=None))
    s1, m1 = single(state, batch)
    p_step = parallel.pmap_train_step(
        steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
    s4, m4 = p_step(parallel.replicate(state), parallel.shard(batch))
    s4 = parallel.unreplicate(s4)
    grads_1 = jax.tree_util.tree_map(jnp.subtract, state.params, s1.params)
    grads_4 = jax.tree_util.tree_map(jnp.subtract, state.params, s4.params)
    chex.assert_trees_all_close(grads_4, grads_1, rtol=1e-4, atol=1e-6)
    self.assertGreater(max(float(jnp.abs(g).max()) for g in
                           jax.tree_util.tree_leaves(grads_1)), 1e-4)
    np.testing.assert_allclose(m4['loss'][0], m1['loss'], rtol=1e-5)
    self.assertEqual(int(s4.step), 1)

  def test_first_replica_is_a_copy_that_later_donating_steps_leave_alone(
      self):
    # The checkpoint writer reads the copy while the next steps run; the
    # step donates the replicated state's buffers.
    config, model, tx, state, batch = _setup({'attack.name': 'none'})
    p_step = parallel.pmap_train_step(
        steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
    p_state = parallel.replicate(state)
    copy = parallel.first_replica(p_state)
    sent = parallel.device_batch(batch)
    self.assertEqual(sent['image'].shape, (4, 4, 28, 28, 1))
    for _ in range(2):
      p_state, _ = p_step(p_state, sent)
    chex.assert_trees_all_equal(jax.device_get(copy), jax.device_get(state))
    self.assertEqual(int(parallel.unreplicate(p_state).step), 2)

  @pytest.mark.slow  # a ResNet compiled for 1 and 4 devices
  def test_batchnorm_statistics_are_global_so_devices_do_not_matter(self):
    # A small ResNet in training mode: with per-device statistics, 4 devices
    # of 2 examples would normalise differently from 1 device of 8.
    config = configs.get_config('cifar10', {
        'attack.name': 'pgd', 'attack.eps_train': 8 / 255,
        'attack.num_steps': 2, 'attack.step_size': 4 / 255,
        'model.dropout_rate': 0.0})
    model = models.ResNet18(dropout_rate=0.0, stage_sizes=(1, 1), base_width=4)
    tx = optax.sgd(0.5)
    state = steps.create_train_state(config, model, tx, (32, 32, 3))
    x, y = synthetic_images(8, seed=5, shape=(32, 32, 3))
    batch = {'image': x, 'label': y}
    single = jax.jit(steps.make_train_step(config, model, tx, axis_name=None))
    p_step = parallel.pmap_train_step(
        steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
    s1, p4 = state, parallel.replicate(state)
    for _ in range(2):
      s1, m1 = single(s1, batch)
      p4, m4 = p_step(p4, parallel.shard(batch))
    s4 = parallel.unreplicate(p4)
    chex.assert_trees_all_close(s4.params, s1.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(s4.batch_stats, s1.batch_stats, rtol=1e-4,
                                atol=1e-5)
    np.testing.assert_allclose(m4['loss'][0], m1['loss'], rtol=1e-4)

  def _one_vs_four_devices(self, config, model, shape, num_steps=3):
    # SGD: the update is linear in the gradient, so float noise stays small
    # (Adam divides near-zero gradients by their near-zero scale).
    tx = optax.sgd(0.1)
    state = steps.create_train_state(config, model, tx, shape)
    x, y = synthetic_images(8, seed=6, shape=shape)
    batch = {'image': x, 'label': y, 'id': np.arange(100, 108, dtype=np.int32)}
    single = jax.jit(steps.make_train_step(config, model, tx, axis_name=None))
    p_step = parallel.pmap_train_step(
        steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
    s1, p4 = state, parallel.replicate(state)
    for _ in range(num_steps):
      s1, _ = single(s1, batch)
      p4, _ = p_step(p4, parallel.shard(batch))
    s4 = parallel.unreplicate(p4)
    self.assertFalse(np.allclose(
        jax.tree_util.tree_leaves(s1.params)[0],
        jax.tree_util.tree_leaves(state.params)[0]))
    chex.assert_trees_all_close(s4.params, s1.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(s4.batch_stats, s1.batch_stats, rtol=1e-4,
                                atol=1e-5)

  @pytest.mark.slow  # MC-dropout steps compiled for 1 and 4 devices
  def test_uta_mc_dropout_training_does_not_depend_on_the_devices(self):
    # Dropout masks, MC-dropout samples and the attack are keyed by example
    # id: 4 devices of 2 examples draw what 1 device of 8 draws.
    config = configs.get_config('fashion_mnist', {
        'attack.name': 'uta', 'attack.eps_train': 0.1, 'attack.num_steps': 2,
        'attack.uncertainty': 'mc_dropout', 'attack.num_samples': 3,
        'model.dropout_rate': 0.3})
    self._one_vs_four_devices(config, classifier.create_model(config),
                              (28, 28, 1))

  @pytest.mark.slow  # a ResNet compiled for 1 and 4 devices
  def test_small_resnet_with_mc_dropout_does_not_depend_on_the_devices(self):
    config = configs.get_config('cifar10', {
        'attack.num_samples': 2, 'model.dropout_rate': 0.2})
    model = models.ResNet18(dropout_rate=0.2, stage_sizes=(1, 1), base_width=4)
    self._one_vs_four_devices(config, model, (32, 32, 3), num_steps=2)

  @pytest.mark.slow  # several compiled training programs
  def test_rfgsm_starts_do_not_depend_on_the_devices(self):
    config = configs.get_config('fashion_mnist', {
        'attack.name': 'rfgsm', 'attack.eps_train': 0.1,
        'attack.step_size': 0.05, 'model.dropout_rate': 0.3})
    self._one_vs_four_devices(config, classifier.create_model(config),
                              (28, 28, 1), num_steps=2)

  @pytest.mark.slow  # several compiled training programs
  def test_adam_parameters_match_too(self):
    config, model, tx, state, batch = _setup(
        {'attack.name': 'uta', 'attack.eps_train': 0.1, 'attack.num_steps': 3})
    single = jax.jit(steps.make_train_step(config, model, tx, axis_name=None))
    p_step = parallel.pmap_train_step(
        steps.make_train_step(config, model, tx, axis_name=parallel.AXIS))
    s1, p4 = state, parallel.replicate(state)
    for _ in range(3):
      s1, _ = single(s1, batch)
      p4, _ = p_step(p4, parallel.shard(batch))
    chex.assert_trees_all_close(parallel.unreplicate(p4).params, s1.params,
                                rtol=1e-4, atol=1e-5)

  @pytest.mark.slow  # a dropout model's step compiled for 1 and 4 devices
  def test_each_device_draws_its_own_dropout_mask(self):
    config, model, tx, state, batch = _setup(
        {'attack.name': 'none', 'model.dropout_rate': 0.5}, tx=optax.sgd(1.0))
    shard = jax.tree_util.tree_map(lambda v: v[:4], batch)
    same_on_all = jax.tree_util.tree_map(
        lambda v: np.stack([np.asarray(v)] * 4), shard)
    step = steps.make_train_step(config, model, tx, axis_name=parallel.AXIS)
    four = jax.pmap(step, axis_name=parallel.AXIS)(parallel.replicate(state),
                                                   same_on_all)
    one = jax.pmap(step, axis_name=parallel.AXIS,
                   devices=jax.local_devices()[:1])(
                       jax.tree_util.tree_map(lambda v: v[None], state),
                       jax.tree_util.tree_map(lambda v: v[:1], same_on_all))
    # Identical data everywhere: only different masks make the mean differ.
    p4 = jax.tree_util.tree_leaves(four[0].params)
    p1 = jax.tree_util.tree_leaves(one[0].params)
    self.assertFalse(all(np.allclose(a[0], b[0]) for a, b in zip(p4, p1)))

  def test_batch_must_divide_over_devices(self):
    with self.assertRaisesRegex(parallel.ParallelError, 'multiple of 4'):
      parallel.check_global_batch(6)
    with self.assertRaisesRegex(parallel.ParallelError, 'does not divide'):
      parallel.shard({'image': np.zeros((6, 2))})
    parallel.check_global_batch(8)

  def test_the_step_compiles_once_on_a_replicated_state(self):
    # A replicated state sharded unlike the step's output made JAX compile
    # the step again at its second call (on the first call's output).
    def count(state, batch):
      return {'n': state['n'] + 1,
              'key': jax.random.fold_in(state['key'], 1)}, batch.sum()

    step = parallel.pmap_train_step(count)
    state = parallel.replicate({'n': jnp.zeros((3,)),
                                'key': jax.random.key(0)})
    batch = np.ones((jax.local_device_count(), 2), np.float32)
    state, _ = step(state, batch)
    with jax.log_compiles(), self.assertNoLogs('jax', 'WARNING'):
      for _ in range(2):
        state, _ = step(state, batch)
    np.testing.assert_array_equal(parallel.unreplicate(state)['n'], 3)

  def test_shapes_compile_the_step_that_runs_on_the_real_inputs(self):
    # Program sizing compiles from shapes (nothing on a device); the
    # compiled step must accept the replicated state and the run-axis batch.
    def step(state, batch):
      return {'n': state['n'] + batch.sum(),
              'key': jax.vmap(jax.random.fold_in, (0, None))(state['key'], 1)
             }, batch.mean()

    state = {'n': np.zeros((2, 3), np.float32),  # [R, 3]
             'key': jax.random.split(jax.random.key(0), 2)}
    batch = np.ones((2, 8, 5), np.float32)  # [R, B, 5]
    p_state = parallel.replicate(state)
    p_batch = parallel.device_batch(batch, axis=1)  # [4, R, 2, 5]
    shapes = (parallel.replicated_shapes(state),
              parallel.device_batch_shapes(batch, axis=1))
    for real, shape in zip(jax.tree_util.tree_leaves((p_state, p_batch)),
                           jax.tree_util.tree_leaves(shapes)):
      self.assertEqual((real.shape, real.dtype), (shape.shape, shape.dtype))
      self.assertTrue(real.sharding.is_equivalent_to(shape.sharding,
                                                     real.ndim))
    compiled = parallel.pmap_train_step(step).lower(*shapes).compile()
    out, mean = compiled(p_state, p_batch)
    # each device's shard: [R, 2, 5] ones
    np.testing.assert_array_equal(parallel.unreplicate(out)['n'], 20.0)
    np.testing.assert_array_equal(mean, 1.0)
    with self.assertRaisesRegex(parallel.ParallelError, 'does not divide'):
      parallel.device_batch_shapes(np.ones((2, 6, 5)), axis=1)


class StepTest(chex.TestCase):

  def test_uta_perturbation_ignores_labels(self):
    config, model, _, state, batch = _setup(
        {'attack.name': 'uta', 'attack.eps_train': 0.2})
    variables = steps.variables_of(state)
    key = jax.random.PRNGKey(0)
    kwargs = dict(ensemble=False, bounds=(0.0, 1.0))
    a = steps.perturb(config.attack, model, variables, batch['image'],
                      batch['label'], key, **kwargs)
    b = steps.perturb(config.attack, model, variables, batch['image'],
                      (batch['label'] + 3) % 10, key, **kwargs)
    chex.assert_trees_all_equal(a, b)
    pgd = dataclasses.replace(config.attack, name='pgd')
    c = steps.perturb(pgd, model, variables, batch['image'], batch['label'],
                      key, **kwargs)
    d = steps.perturb(pgd, model, variables, batch['image'],
                      (batch['label'] + 3) % 10, key, **kwargs)
    self.assertFalse(np.allclose(c, d))  # PGD does use them

  def test_latent_space_step_perturbs_z_and_trains_the_encoder(self):
    config, model, tx, state, batch = _setup(
        {'attack.name': 'uta', 'attack.eps_train': 0.3,
         'attack.space': 'latent', 'attack.step_schedule': 'triangular'},
        tx=optax.sgd(1.0))
    variables = steps.variables_of(state)
    z = model.apply(variables, batch['image'], method=model.encode)
    z_adv = steps.perturb(config.attack, model, variables, batch['image'],
                          batch['label'], jax.random.PRNGKey(0),
                          ensemble=False, bounds=(0.0, 1.0))
    chex.assert_equal_shape([z, z_adv])
    self.assertLessEqual(float(jnp.max(jnp.abs(z_adv - z))), 0.3 + 1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(z_adv - z))), 0.0)
    new, metrics = jax.jit(steps.make_train_step(
        config, model, tx, axis_name=None))(state, batch)
    self.assertTrue(np.isfinite(metrics['loss']))
    conv = lambda s: s.params['conv1']['Conv_0']['kernel']
    self.assertFalse(np.allclose(conv(new), conv(state)))

  @pytest.mark.slow  # a 5-member ensemble's step compiled
  def test_ensemble_step_trains_every_member(self):
    config, model, tx, state, batch = _setup(
        {'attack.name': 'uta', 'attack.eps_train': 0.1,
         'attack.num_steps': 2, 'model.ensemble_size': 3})
    kernel = state.params['fc3']['Dense_0']['kernel']
    self.assertEqual(kernel.shape[0], 3)
    self.assertFalse(np.allclose(kernel[0], kernel[1]))  # own inits
    new, metrics = jax.jit(steps.make_train_step(
        config, model, tx, axis_name=None))(state, batch)
    self.assertTrue(np.isfinite(metrics['loss']))
    moved = jnp.abs(new.params['fc3']['Dense_0']['kernel'] - kernel).max(
        axis=(1, 2))
    self.assertTrue(np.all(moved > 0))

  @pytest.mark.slow  # an ensemble of LeNets compiled with its latent attack
  def test_latent_ensemble_moves_each_members_own_code(self):
    config, model, tx, state, batch = _setup(
        {'attack.name': 'uta', 'attack.eps_train': 0.3,
         'attack.space': 'latent', 'model.ensemble_size': 3,
         'attack.step_schedule': 'triangular'}, tx=optax.sgd(1.0))
    variables = steps.variables_of(state)
    # A fresh model is maximally uncertain; sharpen its last layer so the
    # entropy has room to grow.
    variables = {'params': dict(variables['params'], fc3=jax.tree_util.tree_map(
        lambda a: 30 * a, variables['params']['fc3']))}
    member = lambda m: jax.tree_util.tree_map(lambda a: a[m], variables)
    z = jnp.stack([model.apply(member(m), batch['image'], method=model.encode)
                   for m in range(3)])  # [M, B, l], looped reference
    z_adv = steps.perturb(config.attack, model, variables, batch['image'],
                          batch['label'], jax.random.PRNGKey(0),
                          ensemble=True, bounds=(0.0, 1.0))
    chex.assert_equal_shape([z, z_adv])
    for m in range(3):
      self.assertLessEqual(float(jnp.max(jnp.abs(z_adv[m] - z[m]))),
                           0.3 + 1e-5)
    looped = lambda codes: jnp.stack([
        model.apply(member(m), codes[m], method=model.classify)
        for m in range(3)])
    chex.assert_trees_all_close(
        classifier.member_logits(model, variables, z_adv, ensemble=True,
                            per_member_inputs=True, method=model.classify),
        looped(z_adv), atol=1e-5)
    entropy = lambda codes: float(jnp.mean(uncertainty.predictive_entropy(
        looped(codes))))
    self.assertGreater(entropy(z_adv), entropy(z) + 1e-3)
    new, metrics = jax.jit(steps.make_train_step(
        config, model, tx, axis_name=None))(state, batch)
    self.assertTrue(np.isfinite(metrics['loss']))
    conv = lambda s: s.params['conv1']['Conv_0']['kernel']
    moved = jnp.abs(conv(new) - conv(state)).max(axis=(1, 2, 3, 4))
    self.assertTrue(np.all(moved > 0))  # every member's encoder trains

  def test_fit_calls_back_after_every_update_with_the_new_params(self):
    config = configs.get_config('toy2d', {'attack.name': 'pgd',
                                          'batch_size': 64})
    ds = data.load_dataset('toy2d')
    seen = []
    _, final = steps.fit(config, ds.train, num_steps=3,
                         callback=lambda s, m, v: seen.append((s, v)))
    self.assertEqual([s for s, _ in seen], [1, 2, 3])
    chex.assert_trees_all_equal(seen[-1][1], final)
    self.assertFalse(np.allclose(
        seen[0][1]['params']['fc1']['Dense_0']['kernel'],
        seen[1][1]['params']['fc1']['Dense_0']['kernel']))

  def test_fit_shares_one_compiled_step_across_seeds(self):
    config = configs.get_config('toy2d', {'attack.name': 'pgd',
                                          'batch_size': 64, 'seed': 5})
    ds = data.load_dataset('toy2d')
    _, first = steps.fit(config, ds.train, num_steps=2)
    misses = steps._fit_program.cache_info().misses
    steps.fit(dataclasses.replace(config, seed=6), ds.train, num_steps=2)
    _, again = steps.fit(config, ds.train, num_steps=2)
    self.assertEqual(steps._fit_program.cache_info().misses, misses)
    chex.assert_trees_all_equal(first, again)  # the seed still decides
    # The step built by hand, run on the same batches, gives the same.
    model = classifier.create_model(config)
    tx = steps.make_optimizer(config, data.steps_per_epoch(len(ds.train), 64))
    state = steps.create_train_state(config, model, tx, (2,))
    step_fn = jax.jit(steps.make_train_step(config, model, tx,
                                            axis_name=None))
    for step in range(2):
      state, _ = step_fn(state, data.get_batch(ds.train, data.host_batch_indices(
          seed=5, step=step, num_examples=len(ds.train), global_batch=64)))
    chex.assert_trees_all_close(steps.variables_of(state), first)

  @pytest.mark.slow  # several compiled training programs
  def test_mc_dropout_masks_come_from_the_key_and_repeat_with_it(self):
    config, model, tx, state, batch = _setup(
        {'attack.name': 'uta', 'attack.eps_train': 0.1, 'attack.num_steps': 3,
         'attack.uncertainty': 'mc_dropout', 'attack.num_samples': 5})
    variables = steps.variables_of(state)
    perturb = lambda attack, key: steps.perturb(
        attack, model, variables, batch['image'], batch['label'], key,
        ensemble=False, bounds=(0.0, 1.0))
    key = jax.random.PRNGKey(0)
    a = perturb(config.attack, key)
    # The same key in a separate computation: the same masks, the same point.
    chex.assert_trees_all_equal(a, jax.jit(perturb, static_argnums=0)(
        config.attack, jax.random.PRNGKey(0)))
    # Another key draws other masks; one sample is another objective.
    self.assertFalse(np.allclose(a, perturb(config.attack,
                                            jax.random.PRNGKey(1))))
    one = dataclasses.replace(config.attack, num_samples=1)
    self.assertFalse(np.allclose(a, perturb(one, key)))
    new, metrics = jax.jit(steps.make_train_step(
        config, model, tx, axis_name=None))(state, batch)
    self.assertTrue(np.isfinite(metrics['loss']))


class LearningRateTest(absltest.TestCase):

  def test_cyclic_is_one_triangle_over_the_run(self):
    config = configs.get_config('cifar10', {
        'optimizer.lr_schedule': 'cyclic', 'optimizer.learning_rate': 0.2,
        'epochs': 90})
    schedule = steps.learning_rate(config, steps_per_epoch=10)
    t = np.arange(0, 901, 7)
    # Independent computation: the fast-AT form, np.interp over the steps.
    expected = np.interp(t, [0, 450, 900], [0, 0.2, 0])
    np.testing.assert_allclose([float(schedule(s)) for s in t], expected,
                               atol=1e-6)
    early = configs.replace(config, {'optimizer.lr_peak_fraction': 0.4})
    self.assertAlmostEqual(float(steps.learning_rate(early, 10)(360)), 0.2,
                           places=6)

  def test_piecewise_decays_at_the_boundary_epochs(self):
    config = configs.get_config('cifar10')  # 0.1, /15 at 60, 120, 160
    schedule = steps.learning_rate(config, steps_per_epoch=10)
    for step, lr in ((0, 0.1), (599, 0.1), (600, 0.1 / 15),
                     (1200, 0.1 / 15**2), (1999, 0.1 / 15**3)):
      self.assertAlmostEqual(float(schedule(step)), lr, places=7)


class KeyTest(absltest.TestCase):

  def test_the_state_keeps_key_data_and_hands_out_typed_keys(self):
    _, _, _, state, _ = _setup({'seed': 3})
    self.assertEqual((state.key.shape, state.key.dtype), ((2,), jnp.uint32))
    key = steps.run_key(state)
    self.assertTrue(jnp.issubdtype(key.dtype, jax.dtypes.prng_key))
    _, _, _, other, _ = _setup({'seed': 4})
    self.assertFalse(np.array_equal(state.key, other.key))

  def test_streams_depend_on_their_name_the_step_and_the_seed_only(self):
    _, _, _, state, _ = _setup({'seed': 3})
    data_of = lambda k: np.asarray(jax.random.key_data(k))
    a = data_of(steps.stream_key(state, 'evaluation', 10))
    np.testing.assert_array_equal(
        a, data_of(steps.stream_key(state, 'evaluation', 10)))
    # Training does not move the stream: the run key is the same after it.
    trained = state.replace(step=state.step + 5)
    np.testing.assert_array_equal(
        a, data_of(steps.stream_key(trained, 'evaluation', 10)))
    _, _, _, seed4, _ = _setup({'seed': 4})
    for other in (steps.stream_key(state, 'evaluation', 11),
                  steps.stream_key(state, 'autoattack', 10),
                  steps.stream_key(seed4, 'evaluation', 10)):
      self.assertFalse(np.array_equal(a, data_of(other)))
    # Independent computation of the rule.
    expected = jax.random.fold_in(jax.random.fold_in(
        jax.random.wrap_key_data(state.key), zlib.crc32(b'evaluation')), 10)
    np.testing.assert_array_equal(a, data_of(expected))


if __name__ == '__main__':
  absltest.main()
