"""Tests of uta_jax.torch_bridge against jax.grad and native PyTorch."""

import importlib.util
import logging
import os
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import auto_attack
from uta_jax import configs
from uta_jax import data
from uta_jax import models
from uta_jax import steps
from uta_jax import torch_bridge

from testutil import require  # pylint: disable=g-bad-import-order

torch = require('torch')


def _model(name, seed=0, **kwargs):
  ctor, shape = models.MODELS[name]
  model = ctor(**kwargs)
  return model, models.init_variables(model, jax.random.PRNGKey(seed), shape), shape


def _nchw(shape, n, seed=0):
  g = torch.Generator().manual_seed(seed)
  return torch.rand(n, shape[2], shape[0], shape[1], generator=g)


class BridgeTest(parameterized.TestCase):

  @parameterized.parameters('mlp', 'lenet', 'svhn_lenet')
  def test_logits_and_input_gradients_match_jax(self, name):
    model, variables, shape = _model(name)
    module = torch_bridge.bridge_module(model.apply, variables)
    x = _nchw(shape, 5).requires_grad_(True)  # 4-D NCHW also for the MLP
    logits = module(x)
    x_nhwc = jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))
    expected = model.apply(variables, x_nhwc)
    np.testing.assert_allclose(logits.detach().numpy(), expected, atol=1e-6)
    weights = torch.linspace(-1, 2, 10)
    grad, = torch.autograd.grad((logits * weights).sum(), x)
    expected_grad = jax.grad(lambda v: jnp.sum(
        model.apply(variables, v) * jnp.linspace(-1, 2, 10)))(x_nhwc)
    np.testing.assert_allclose(grad.numpy().transpose(0, 2, 3, 1),
                               expected_grad, atol=1e-6)

  @parameterized.parameters('mlp', 'lenet')
  def test_same_numbers_as_the_native_pytorch_network(self, name):
    model, variables, shape = _model(name)
    module = torch_bridge.bridge_module(model.apply, variables)
    native = torch_bridge.native_torch_model(name, variables['params'])
    x = _nchw(shape, 6, seed=1).requires_grad_(True)
    a, b = module(x), native(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga, = torch.autograd.grad(a.sum(), x)
    gb, = torch.autograd.grad(b.sum(), x)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)

  def test_dtype_round_trip_and_no_grad_path(self):
    model, variables, shape = _model('lenet')
    module = torch_bridge.bridge_module(model.apply, variables)
    x = _nchw(shape, 3)
    with torch.no_grad():
      fast = module(x)
    self.assertEqual(fast.dtype, torch.float32)
    self.assertFalse(fast.requires_grad)
    double = module(x.double())
    self.assertEqual(double.dtype, torch.float64)
    torch.testing.assert_close(double.float(), fast)
    slow = module(x.clone().requires_grad_(True))
    self.assertTrue(slow.requires_grad)
    torch.testing.assert_close(slow.detach(), fast)

  def test_batch_buckets_bound_the_compilations(self):
    model, variables, shape = _model('mlp')
    traces = []

    def apply(v, x):
      traces.append(x.shape[0])
      return model.apply(v, x)

    module = torch_bridge.bridge_module(apply, variables)
    with torch.no_grad():
      for n in (3, 4, 2, 7, 5, 8, 1, 6):
        self.assertEqual(module(_nchw(shape, n)).shape, (n, 10))
    self.assertEqual(sorted(set(traces)), [1, 2, 4, 8])
    self.assertLen(traces, 4)  # one trace per bucket, never per batch size
    self.assertEqual([torch_bridge.bucket_size(n) for n in (1, 2, 3, 9)],
                     [1, 2, 4, 16])

  def test_autoattack_checks_see_a_static_deterministic_model(self):
    checks = require('pyautoattack.checks')
    model, variables, shape = _model('lenet', dropout_rate=0.3)
    module = torch_bridge.bridge_module(model.apply, variables)
    x, y = _nchw(shape, 8), torch.zeros(8, dtype=torch.long)
    logger = logging.getLogger('bridge-test')
    for name in checks.funcs:
      checks.funcs[name] = 0
    with self.assertNoLogs(logger, level='WARNING'):
      checks.check_randomized(module, x, y, logger=logger)
      checks.check_dynamic(module, x, logger=logger)
      checks.check_range_output(module, x, logger=logger)
    # MC dropout with a fresh key per call is a randomized model: AutoAttack
    # must notice it (and is then run with version='rand').
    stochastic = torch_bridge.bridge_module(
        lambda v, x_, key: model.apply(v, x_, mc_dropout=True,
                                       rngs={'dropout': key}),
        variables, stochastic=True)
    with self.assertLogs(logger, level='WARNING') as logs:
      checks.check_randomized(stochastic, x, y, logger=logger)
    self.assertIn('randomized', logs.output[0])

  def test_missing_torch_names_the_extra(self):
    with mock.patch.dict(sys.modules, {'torch': None}):
      with self.assertRaisesRegex(ImportError, r"uta-jax\[torch\]"):
        torch_bridge.require_torch()

  def test_native_model_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, 'mlp, lenet'):
      torch_bridge.native_torch_model('resnet18', {})


def _train_mlp_on_embedded_mnist(num_steps=300):
  """A quickly trained MLP on real MNIST digits: (model, variables, dataset)."""
  ds = data.load_dataset('mnist_embedded')
  model, variables = steps.fit(
      configs.get_config('mnist_embedded', {'attack.name': 'none'}), ds.train,
      num_steps=num_steps)
  return model, variables, ds


class AutoAttackDeviceTest(absltest.TestCase):

  def test_torch_device_follows_the_jax_backend(self):
    self.assertEqual(torch_bridge.torch_device(), 'cpu')  # this machine
    with mock.patch.object(jax, 'default_backend', return_value='gpu'), \
        mock.patch.object(torch.cuda, 'is_available', return_value=True):
      self.assertEqual(torch_bridge.torch_device(), 'cuda')
    with mock.patch.object(jax, 'default_backend', return_value='gpu'), \
        mock.patch.object(torch.cuda, 'is_available', return_value=False):
      self.assertEqual(torch_bridge.torch_device(), 'cpu')

  def test_autoattack_gets_the_models_device(self):
    aa = require('pyautoattack')
    model, variables, ds = _train_mlp_on_embedded_mnist(num_steps=5)
    device = torch.device('cpu')  # a distinct object: passed, not a default
    with mock.patch.object(aa, 'AutoAttack', wraps=aa.AutoAttack) as spy, \
        mock.patch.object(torch_bridge, 'torch_device', return_value=device):
      auto_attack.evaluate(model, variables, data.Split(
          ds.test.images[:4], ds.test.labels[:4]), eps=0.1, version='apgd',
                            backend='torch')
    self.assertIs(spy.call_args.kwargs['device'], device)


def _reference_resnet18():
  """pyautoattack's example CIFAR-10 ResNet-18 and its trained weights."""
  aa = require('pyautoattack')
  folder = os.path.join(os.path.dirname(aa.__file__), 'examples')
  spec = importlib.util.spec_from_file_location(
      'pyautoattack_example_resnet', os.path.join(folder, 'resnet.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  net = module.ResNet18()
  state_dict = torch.load(os.path.join(folder, 'model_test.pt'),
                          map_location='cpu')
  net.load_state_dict(state_dict)
  return net.eval(), state_dict


class PretrainedResNetTest(absltest.TestCase):
  """Real trained weights, offline: the ResNet-18 shipped with pyautoattack
  ported into models.ResNet18 computes the same function."""

  @pytest.mark.slow  # a full ResNet-18 in both frameworks
  def test_logits_and_input_gradients_match_pytorch(self):
    net, state_dict = _reference_resnet18()
    variables = torch_bridge.resnet18_variables(state_dict)
    model = models.ResNet18(mean=None, std=None)
    x = np.random.default_rng(0).uniform(size=(4, 3, 32, 32)).astype(
        np.float32)
    y = np.array([0, 3, 5, 9])
    xt = torch.from_numpy(x).requires_grad_(True)
    logits_t = net(xt)
    torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(y),
                                      reduction='sum').backward()

    def loss(x_nhwc):
      logits = model.apply(variables, x_nhwc)
      return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    grad, logits = jax.grad(loss, has_aux=True)(
        jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), atol=2e-5,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2),
                               xt.grad.numpy(), atol=1e-5, rtol=1e-3)
    # Trained weights: confident, not the near-uniform output of an init.
    self.assertGreater(float(jnp.max(jax.nn.softmax(logits))), 0.5)


class AutoAttackEquivalenceTest(absltest.TestCase):

  @pytest.mark.slow
  def test_bridge_and_native_pytorch_give_the_same_robust_accuracy(self):
    AutoAttack = require('pyautoattack').AutoAttack  # pylint: disable=invalid-name
    model, variables, ds = _train_mlp_on_embedded_mnist()
    n = 60
    x = torch.from_numpy(data.to_float(ds.test.images[:n]).transpose(0, 3, 1, 2))
    y = torch.from_numpy(ds.test.labels[:n].astype(np.int64))
    accuracies = {}
    for name, module in (
        ('bridge', torch_bridge.bridge_module(model.apply, variables)),
        ('native', torch_bridge.native_torch_model('mlp', variables['params'])),
    ):
      adversary = AutoAttack(module, eps=0.08, seed=0, version='standard')
      x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=n)
      with torch.no_grad():
        clean = (module(x).argmax(1) == y).float().mean().item()
        robust = (module(x_adv).argmax(1) == y).float().mean().item()
      accuracies[name] = (clean, robust)
      self.assertLessEqual(float((x_adv - x).abs().max()), 0.08 + 1e-6)
    (clean_b, robust_b), (clean_n, robust_n) = (accuracies['bridge'],
                                                accuracies['native'])
    self.assertGreater(clean_b, 0.8)  # a real, trained model
    self.assertLess(robust_b, clean_b)  # the attack did something
    self.assertEqual(clean_b, clean_n)
    self.assertLessEqual(abs(robust_b - robust_n) * n, 1.0 + 1e-9)


if __name__ == '__main__':
  absltest.main()
