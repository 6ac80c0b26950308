"""Tests of uta_jax.fast_ops against lax, and a guard on the attack program."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from uta_jax import attacks
from uta_jax import fast_ops
from uta_jax import models

DN = ('NHWC', 'HWIO', 'NHWC')


class ConvTest(chex.TestCase, parameterized.TestCase):

  @chex.all_variants(with_pmap=False)
  @parameterized.parameters(((28, 1, 6), 2), ((14, 6, 16), 0), ((32, 3, 32), 2),
                            ((9, 4, 5), 1))
  def test_values_and_both_gradients_match_lax(self, shape, pad):
    side, cin, cout = shape
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (3, side, side, cin))
    k = jax.random.normal(kk, (5, 5, cin, cout))

    def loss(conv, x, k):
      out = conv(x, k, (1, 1), [(pad, pad)] * 2, dimension_numbers=DN)
      weights = jax.random.normal(kg, out.shape)
      return jnp.sum(out * weights), out

    fast = self.variant(jax.value_and_grad(
        functools.partial(loss, fast_ops.conv_general_dilated),
        argnums=(0, 1), has_aux=True))
    ref = jax.value_and_grad(functools.partial(loss, lax.conv_general_dilated),
                             argnums=(0, 1), has_aux=True)
    (_, out_fast), grads_fast = fast(x, k)
    (_, out_ref), grads_ref = ref(x, k)
    chex.assert_trees_all_close(out_fast, out_ref, rtol=1e-5, atol=1e-4)
    chex.assert_trees_all_close(grads_fast, grads_ref, rtol=1e-4, atol=1e-3)

  def test_strided_convolution_falls_back_to_lax(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
    for fn in (fast_ops.conv_general_dilated, lax.conv_general_dilated):
      out = fn(x, k, (2, 2), [(1, 1)] * 2, dimension_numbers=DN)
      chex.assert_shape(out, (2, 4, 4, 4))
    g = lambda fn: jax.grad(lambda x_: jnp.sum(fn(
        x_, k, (2, 2), [(1, 1)] * 2, dimension_numbers=DN) ** 2))(x)
    chex.assert_trees_all_close(g(fast_ops.conv_general_dilated),
                                g(lax.conv_general_dilated), rtol=1e-5)


class PoolTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_max_pool_and_its_gradient_match_flax(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 12, 4))
    g = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 6, 4))
    ref_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    fast = self.variant(lambda v: jax.vjp(fast_ops.max_pool_2x2, v))
    out, vjp = fast(x)
    ref_out, ref_vjp = jax.vjp(ref_pool, x)
    chex.assert_trees_all_equal(out, ref_out)
    chex.assert_trees_all_equal(vjp(g), ref_vjp(g))

  def test_odd_sizes_fall_back(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
    chex.assert_trees_all_equal(fast_ops.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))


class AttackProgramGuardTest(parameterized.TestCase):
  """The lowered PGD loop must keep the fast formulations.

  A plain ``nn.Conv`` / ``nn.max_pool`` would bring back autodiff's
  transposed convolution (kernel spec [0, 1, o, i] with reversed spatial
  dims) and ``select_and_scatter``, which XLA's CPU backend runs 2-3x slower
  inside the attack's while loop.
  """

  @parameterized.parameters('lenet', 'svhn_lenet')
  def test_no_select_and_scatter_and_no_autodiff_transposed_conv(self, name):
    ctor, shape = models.MODELS[name]
    model = ctor()
    variables = models.init_variables(model, jax.random.PRNGKey(0), shape)
    x = jnp.zeros((4, *shape))
    y = jnp.zeros((4,), jnp.int32)
    text = jax.jit(lambda v, x_, y_: attacks.pgd(
        functools.partial(model.apply, v), x_, y_, eps=0.1, num_steps=3,
        step_size=0.01)).lower(variables, x, y).as_text()
    self.assertIn('stablehlo.while', text)
    self.assertNotIn('select_and_scatter', text)
    convs = [l for l in text.splitlines() if 'stablehlo.convolution' in l]
    self.assertLen(convs, 4)  # 2 forward + 2 input gradients
    for line in convs:
      self.assertIn('x[0, 1, i, o]->', line)
      self.assertNotRegex(line, r'reverse = \[true')


if __name__ == '__main__':
  absltest.main()
