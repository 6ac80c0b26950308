"""Tests of uta_jax.models: architectures, encode/classify split, dropout, BN."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uta_jax import models

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator

# App. B: exact counts for the small nets; CIFAR ResNet-18 is ~11.2 M.
EXPECTED_PARAMS = {
    'mlp': 203_530,
    'lenet': 61_706,
    'svhn_lenet': 675_826,
    'resnet18': 11_173_962,
}
LATENT_DIM = {'mlp': 256, 'lenet': 120, 'svhn_lenet': 256, 'resnet18': 512}


def _init(name, **kwargs):
  model = models.create_model(name, **kwargs)
  shape = models.MODELS[name][1]
  return model, models.init_variables(model, jax.random.PRNGKey(0), shape), shape


class ArchitectureTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters('mlp', 'lenet', 'svhn_lenet')
  def test_parameter_count_and_shapes(self, name):
    self.check_count_and_shapes(name)

  @pytest.mark.slow  # ResNet-18 runs op by op here
  def test_resnet18_parameter_count_and_shapes(self):
    self.check_count_and_shapes('resnet18')

  def check_count_and_shapes(self, name):
    model, variables, shape = _init(name)
    self.assertEqual(models.count_params(variables['params']),
                     EXPECTED_PARAMS[name])
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, *shape))
    logits = model.apply(variables, x)
    chex.assert_shape(logits, (3, 10))
    chex.assert_tree_all_finite(logits)
    z = model.apply(variables, x, method=model.encode)
    chex.assert_shape(z, (3, LATENT_DIM[name]))
    # encode then classify is the whole model.
    chex.assert_trees_all_close(
        model.apply(variables, z, method=model.classify), logits, atol=1e-5)

  def test_lenet_layer_shapes_follow_table_3_and_4(self):
    _, lenet, _ = _init('lenet')
    self.assertEqual(lenet['params']['conv1']['Conv_0']['kernel'].shape,
                     (5, 5, 1, 6))
    self.assertEqual(lenet['params']['fc1']['Dense_0']['kernel'].shape,
                     (16 * 5 * 5, 120))
    _, svhn, _ = _init('svhn_lenet')
    self.assertEqual(svhn['params']['conv2']['Conv_0']['kernel'].shape,
                     (5, 5, 32, 64))
    self.assertEqual(svhn['params']['fc1']['Dense_0']['kernel'].shape,
                     (64 * 6 * 6, 256))

  def test_pytorch_default_initialisation(self):
    _, variables, _ = _init('lenet')
    for layer, fan_in in [('conv1', 25), ('conv2', 150), ('fc1', 400),
                          ('fc3', 84)]:
      leaves = variables['params'][layer]
      params = leaves[next(iter(leaves))]
      bound = 1 / math.sqrt(fan_in)
      for p in (params['kernel'], params['bias']):
        self.assertLessEqual(float(jnp.max(jnp.abs(p))), bound)
        # Uniform on the bound: the largest draw is near it.
        self.assertGreater(float(jnp.max(jnp.abs(p))), 0.5 * bound)

  def test_unknown_model_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, 'lenet'):
      models.create_model('vgg')


class DropoutAndBatchNormTest(chex.TestCase):

  def test_mc_dropout_needs_the_flag_and_follows_the_key(self):
    model, variables, shape = _init('lenet', dropout_rate=0.3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
    off = model.apply(variables, x)
    same = [model.apply(variables, x, mc_dropout=True,
                        rngs={'dropout': jax.random.PRNGKey(5)})
            for _ in range(2)]
    other = model.apply(variables, x, mc_dropout=True,
                        rngs={'dropout': jax.random.PRNGKey(6)})
    chex.assert_trees_all_equal(*same)
    self.assertFalse(np.allclose(same[0], other))
    self.assertFalse(np.allclose(same[0], off))

  def test_dropout_does_not_change_the_encoder(self):
    model, variables, shape = _init('mlp', dropout_rate=0.5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
    z = model.apply(variables, x, method=model.encode)
    z_mc = model.apply(variables, x, mc_dropout=True, method=model.encode,
                       rngs={'dropout': jax.random.PRNGKey(2)})
    chex.assert_trees_all_equal(z, z_mc)

  @pytest.mark.slow  # ResNet op by op, even small
  def test_resnet_batchnorm_train_and_eval(self):
    # A small ResNet: the same BatchNorm and dropout code, seconds not tens.
    model, variables, shape = _init('resnet18', stage_sizes=(1, 1),
                                    base_width=4)
    self.assertEqual(model.dropout_rate, 0.2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
    logits, updates = model.apply(variables, x, train=True,
                                  mutable=['batch_stats'],
                                  rngs={'dropout': jax.random.PRNGKey(3)})
    chex.assert_shape(logits, (4, 10))
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
        updates['batch_stats'])
    self.assertTrue(all(jax.tree_util.tree_leaves(changed)))
    # Eval mode: running statistics, no rng, deterministic.
    chex.assert_trees_all_equal(model.apply(variables, x),
                                model.apply(variables, x))
    # MC-dropout at eval: statistics frozen, masks from the key.
    a = model.apply(variables, x, mc_dropout=True,
                    rngs={'dropout': jax.random.PRNGKey(4)})
    b = model.apply(variables, x, mc_dropout=True,
                    rngs={'dropout': jax.random.PRNGKey(9)})
    self.assertFalse(np.allclose(a, b))


if __name__ == '__main__':
  absltest.main()
