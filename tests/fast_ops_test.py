"""Tests of uta_jax.fast_ops against lax, and a guard on the attack program."""

import contextlib
import dataclasses
import functools
import re
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import export
from jax import lax
import optax
import pytest

from uta_jax import attacks
from uta_jax import classifier
from uta_jax import configs
from uta_jax import fast_ops
from uta_jax import models
from uta_jax import programs
from uta_jax import steps

DN = ('NHWC', 'HWIO', 'NHWC')


class ConvTest(chex.TestCase, parameterized.TestCase):

  # Every form: shifted products (1 or 3 input channels), tap products (one
  # output channel, and the input gradient of a grey layer), batch chunks
  # (batch 4 in chunks of 2) and one convolution (batch 3: no chunks).
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((28, 1, 6), 2, 4), ((14, 6, 16), 0, 4),
                            ((32, 3, 32), 2, 4), ((9, 4, 5), 1, 3),
                            ((12, 32, 8), 4, 4), ((28, 6, 1), 2, 4))
  def test_values_and_both_gradients_match_lax(self, shape, pad, batch):
    side, cin, cout = shape
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, side, side, cin))
    k = jax.random.normal(kk, (5, 5, cin, cout))

    def loss(conv, x, k):
      out = conv(x, k, (1, 1), [(pad, pad)] * 2, dimension_numbers=DN)
      weights = jax.random.normal(kg, out.shape)
      return jnp.sum(out * weights), out

    self.enter_context(mock.patch.object(fast_ops, 'CHUNK_EXAMPLES', 2))
    fast = self.variant(jax.value_and_grad(
        functools.partial(loss, fast_ops.conv_general_dilated),
        argnums=(0, 1), has_aux=True))
    ref = jax.value_and_grad(functools.partial(loss, lax.conv_general_dilated),
                             argnums=(0, 1), has_aux=True)
    (_, out_fast), grads_fast = fast(x, k)
    (_, out_ref), grads_ref = ref(x, k)
    chex.assert_trees_all_close(out_fast, out_ref, rtol=1e-5, atol=1e-4)
    chex.assert_trees_all_close(grads_fast, grads_ref, rtol=1e-4, atol=1e-3)

  @parameterized.parameters((1, 6), (3, 8), (6, 1), (8, 5))
  def test_every_form_handles_uneven_padding(self, cin, cout):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 11, 9, cin))
    k = jax.random.normal(jax.random.PRNGKey(1), (5, 3, cin, cout))
    padding = ((1, 3), (0, 2))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    ref = lax.conv_general_dilated(x, k, (1, 1), padding,
                                   dimension_numbers=dn)
    forms = [fast_ops._forward(x, k, padding, dn, primal=primal)  # pylint: disable=protected-access
             for primal in (True, False)]
    if cout == 1:
      forms.append(fast_ops._tap_products(x, k, padding))  # pylint: disable=protected-access
    if cin <= fast_ops.FEW_CHANNELS:
      forms.append(fast_ops._shifted_products(x, k, padding))  # pylint: disable=protected-access
      forms.append(fast_ops._patch_products(x, k, padding))  # pylint: disable=protected-access
    for out in forms:
      chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-4)

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

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_send_the_gradient_to_the_first_maximum_like_flax(self):
    # Equal values in a window: a blank region, rounded values, and a
    # window whose later elements tie above an earlier one.
    rounded = jnp.round(jax.random.normal(jax.random.PRNGKey(0),
                                          (2, 6, 8, 3)))
    blank = jnp.full((2, 6, 8, 3), 0.25)
    later = jnp.tile(jnp.array([[0., 1.], [1., 1.]]), (3, 4))[None, :, :, None]
    for x in (rounded, blank, later):
      g = jax.random.normal(jax.random.PRNGKey(1),
                            (x.shape[0], x.shape[1] // 2, x.shape[2] // 2,
                             x.shape[3]))
      fast = self.variant(lambda v, g_: jax.vjp(fast_ops.max_pool_2x2, v)[1](
          g_)[0])
      ref = jax.vjp(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)),
                    x)[1](g)[0]
      chex.assert_trees_all_equal(fast(x, g), ref)
    self.assertEqual(float(jnp.sum(ref != 0)), ref.size / 4)

  def test_odd_sizes_fall_back(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
    chex.assert_trees_all_equal(fast_ops.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))


def _pooled_lax_conv(lhs, rhs, *args, **kwargs):
  """The reference of ``conv_max_pool_2x2``: lax's convolution, flax's
  max-pool, autodiff's gradients."""
  return nn.max_pool(lax.conv_general_dilated(lhs, rhs, *args, **kwargs),
                     (2, 2), strides=(2, 2))


class ConvPoolTest(chex.TestCase, parameterized.TestCase):
  """``conv_max_pool_2x2``: the phase form (grey layers) and the
  composition (anything else) equal a convolution followed by a pool."""

  @chex.variants(with_jit=True)
  @parameterized.parameters(((28, 1, 6), 2), ((11, 1, 4), 1),
                            ((32, 3, 8), 2), ((14, 6, 16), 0),
                            ((13, 1, 3), 2))
  def test_values_and_both_gradients_match_conv_then_pool(self, shape, pad):
    side, cin, cout = shape
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    # Integer inputs and kernels: every form sums exactly, so windows tie
    # exactly (half of each image blank, as MNIST's background) and the
    # gradients must go to the same element.
    x = jnp.round(2 * jax.random.normal(kx, (3, side, side, cin)))
    x = x.at[:, :side // 2].set(0.)
    k = jnp.round(2 * jax.random.normal(kk, (5, 5, cin, cout)))

    def loss(conv, x, k):
      out = conv(x, k, (1, 1), [(pad, pad)] * 2, dimension_numbers=DN)
      return jnp.sum(out * jax.random.normal(kg, out.shape)), out

    fast = self.variant(jax.value_and_grad(
        functools.partial(loss, fast_ops.conv_max_pool_2x2), argnums=(0, 1),
        has_aux=True))
    ref = jax.value_and_grad(functools.partial(loss, _pooled_lax_conv),
                             argnums=(0, 1), has_aux=True)
    (_, out_fast), grads_fast = fast(x, k)
    (_, out_ref), grads_ref = ref(x, k)
    chex.assert_trees_all_equal(out_fast, out_ref)
    chex.assert_trees_all_close(grads_fast, grads_ref, rtol=1e-5, atol=1e-4)

  def _lowered_lenet(self, platform):
    model = models.LeNet()
    variables = models.init_variables(model, jax.random.PRNGKey(0),
                                      (28, 28, 1))
    return export.export(jax.jit(model.apply), platforms=[platform])(
        variables, jnp.zeros((8, 28, 28, 1))).mlir_module()

  def test_lenet_pools_its_grey_layer_at_the_phases_on_the_cpu(self):
    # The full-size first layer's pool windows [8, 14, 2, 14, 2, 6] exist
    # only in the composition; the CPU program computes the phases instead.
    windows = 'tensor<8x14x2x14x2x6xf32>'
    self.assertNotIn(windows, self._lowered_lenet('cpu'))
    with mock.patch.object(fast_ops, 'conv_max_pool_2x2', lambda l, r, *a, **
                           kw: fast_ops.max_pool_2x2(
                               fast_ops.conv_general_dilated(l, r, *a, **kw))):
      self.assertIn(windows, self._lowered_lenet('cpu'))
    gpu = self._lowered_lenet('cuda')
    self.assertNotIn(fast_ops.CPU_SCOPE, gpu)
    self.assertIn('reduce_window', gpu)


@contextlib.contextmanager
def _plain_ops():
  """The models with plain ``lax`` convolutions and ``nn.max_pool``
  (autodiff's gradients) inside: the reference for fast_ops."""
  with mock.patch.object(fast_ops, 'conv_general_dilated',
                         lax.conv_general_dilated), mock.patch.object(
                             fast_ops, 'max_pool_2x2',
                             lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
                         ), mock.patch.object(fast_ops, 'conv_max_pool_2x2',
                                              _pooled_lax_conv):
    yield


class ModelsMatchPlainOpsTest(parameterized.TestCase):
  """The models with fast_ops compute what they compute with plain ops."""

  @parameterized.parameters('lenet', 'svhn_lenet')
  def test_logits_gradients_and_attack_match(self, name):
    ctor, shape = models.MODELS[name]
    model = ctor()
    variables = models.init_variables(model, jax.random.PRNGKey(0), shape)
    # Half of each image blank, as in MNIST's background: the first layer
    # then gives equal values across pool windows (ties).
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
    x = x.at[:, :shape[0] // 2].set(0.)
    y = jnp.arange(4) % 10

    def run():
      def loss(params, x_):
        logits = model.apply({'params': params}, x_)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits, y)), logits
      (_, logits), grads = jax.jit(jax.value_and_grad(
          loss, argnums=(0, 1), has_aux=True))(variables['params'], x)
      adv = jax.jit(lambda x_: attacks.pgd(
          functools.partial(model.apply, variables), x_, y, eps=0.1,
          num_steps=3, step_size=0.02))(x)
      return logits, grads, adv

    with mock.patch.object(fast_ops, 'CHUNK_EXAMPLES', 2):
      logits, grads, adv = run()
    with _plain_ops():
      ref_logits, ref_grads, ref_adv = run()
    chex.assert_trees_all_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-3, atol=1e-6)
    # Sign steps: only a gradient within rounding of 0 may flip a pixel.
    self.assertLess(float(jnp.mean(adv != ref_adv)), 1e-3)


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
    batch = 2 * fast_ops.CHUNK_EXAMPLES
    x = jnp.zeros((batch, *shape))
    y = jnp.zeros((batch,), jnp.int32)
    text = jax.jit(lambda v, x_, y_: attacks.pgd(
        functools.partial(model.apply, v), x_, y_, eps=0.1, num_steps=3,
        step_size=0.01)).lower(variables, x, y).as_text()
    self.assertIn('stablehlo.while', text)
    self.assertNotIn('select_and_scatter', text)
    convs = [l for l in text.splitlines() if 'stablehlo.convolution' in l]
    # Few-channel layers (LeNet's conv1 and its 1-channel input gradient,
    # SVHN LeNet's RGB conv1) are shifted, tap or patch products, not
    # convolutions; conv2's forward runs in 2 batch chunks, the other input
    # gradients whole.
    chunk = f'tensor<{fast_ops.CHUNK_EXAMPLES}x'
    whole = f'tensor<{batch}x'
    self.assertEqual(
        sorted(chunk if chunk in l.split(':')[-1].split('->')[0] else whole
               for l in convs),
        {'lenet': [chunk, chunk, whole],
         'svhn_lenet': [chunk, chunk, whole, whole]}[name])
    for line in convs:
      self.assertIn('x[0, 1, i, o]->', line)
      self.assertNotRegex(line, r'reverse = \[true')
    # SVHN LeNet's conv1 forward: one matmul of 5 * 5 * 3 = 75-long patches.
    patch_matmuls = [l for l in text.splitlines()
                     if 'stablehlo.dot_general' in l and 'x75xf32>' in l]
    self.assertLen(patch_matmuls, {'lenet': 0, 'svhn_lenet': 1}[name])


class BackendFormsTest(parameterized.TestCase):
  """The CPU forms only in programs for the CPU: a train step exported for
  a GPU or TPU holds lax's convolutions and max-pool (cuDNN's, the TPU's),
  none of the CPU forms (they made ResNet-18's step 2.1x slower on a GPU)."""

  PRESETS = {'lenet': 'fashion_mnist', 'svhn_lenet': 'svhn',
             'resnet18': 'cifar10'}

  def _train_step_program(self, name, platform):
    # The dataset's preset program step as training runs it on
    # ``platform`` (two runs, that platform's run map; CIFAR-10: UTA-1 with
    # 5 MC-dropout samples), exported without needing its hardware. A batch
    # of two chunks, so that the CPU would chunk its convolutions.
    config = configs.get_config(self.PRESETS[name])
    model = classifier.create_model(config)
    if name == 'resnet18':  # the same layers, fewer of them, to trace fast
      model = model.clone(base_width=8, stage_sizes=(1, 1))
    shape = models.MODELS[name][1]
    tx = steps.make_optimizer(config, 10)
    run_configs = [dataclasses.replace(config, seed=s) for s in (0, 1)]
    states = programs.stack([jax.device_get(steps.create_train_state(
        c, model, tx, shape)) for c in run_configs])
    batch_size = 2 * fast_ops.CHUNK_EXAMPLES
    batch = {'image': jnp.zeros((2, batch_size, *shape)),
             'label': jnp.zeros((2, batch_size), jnp.int32),
             'id': jnp.zeros((2, batch_size), jnp.int32)}
    run_map = programs.default_run_map('cpu' if platform == 'cpu' else 'gpu')
    step = jax.jit(programs.make_train_step(config, model, tx, axis_name=None,
                                            run_map=run_map))
    return export.export(step, platforms=[platform])(
        states, batch, programs.run_attacks(run_configs)).mlir_module()

  def _chunked_convolutions(self, text):
    """Convolutions over a batch chunk: the CPU's forward form."""
    chunk = f'tensor<{fast_ops.CHUNK_EXAMPLES}x'
    return [l for l in text.splitlines() if 'stablehlo.convolution' in l and
            l.split(':')[-1].split('->')[0].strip(' (').startswith(chunk)]

  def _assert_no_cpu_form(self, name, platform):
    text = self._train_step_program(name, platform)
    self.assertFalse(fast_ops.CPU_SCOPE in text, 'a CPU form')
    self.assertTrue('stablehlo.convolution' in text, 'no convolution')
    self.assertEqual(self._chunked_convolutions(text), [])
    # No im2col patch matmul (5 * 5 * 3 = 75 long).
    self.assertIsNone(re.search(r'dot_general.*x75xf32>', text))
    if name != 'resnet18':  # LeNets pool: XLA's max-pool and its gradient
      self.assertTrue('reduce_window' in text, 'no reduce_window')
      self.assertTrue('select_and_scatter' in text, 'no select_and_scatter')

  def _assert_cpu_forms(self, name):
    text = self._train_step_program(name, 'cpu')
    self.assertTrue(fast_ops.CPU_SCOPE in text, 'no CPU form')
    self.assertFalse('select_and_scatter' in text, 'select_and_scatter')
    if name == 'svhn_lenet':  # its conv2 forward runs in batch chunks
      self.assertNotEqual(self._chunked_convolutions(text), [])

  def test_the_gpu_program_holds_no_cpu_form(self):
    self._assert_no_cpu_form('svhn_lenet', 'cuda')  # both CPU conv forms

  @parameterized.parameters('lenet', 'resnet18')
  @pytest.mark.slow  # the same lowering rule, two more traces
  def test_other_gpu_programs_hold_no_cpu_form(self, name):
    self._assert_no_cpu_form(name, 'cuda')

  @parameterized.parameters('lenet', 'svhn_lenet', 'resnet18')
  @pytest.mark.slow  # the same lowering rule as for cuda, three more traces
  def test_tpu_programs_hold_no_cpu_form(self, name):
    self._assert_no_cpu_form(name, 'tpu')

  def test_the_cpu_program_holds_the_cpu_forms(self):
    self._assert_cpu_forms('svhn_lenet')

  @parameterized.parameters('lenet', 'resnet18')
  @pytest.mark.slow  # two more traces
  def test_other_cpu_programs_hold_the_cpu_forms(self, name):
    self._assert_cpu_forms(name)

if __name__ == '__main__':
  absltest.main()
