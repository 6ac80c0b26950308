"""Shared test set-up: 4 fake CPU devices (before JAX starts) and fixtures."""

import os

# Must run before jax is imported anywhere: pmap tests need several devices.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Two xdist workers share the cores with XLA's threads and the subprocesses'
# own: PyTorch's OpenMP threads spin-wait while another process holds a core,
# which made a 30 s train.py + AutoAttack run exceed 300 s. One torch thread
# per process (inherited by the scripts the tests start).
os.environ.setdefault('OMP_NUM_THREADS', '1')

from absl import flags  # pylint: disable=g-import-not-at-top
import jax
import optax
import pytest

from uta_jax import models

from testutil import synthetic_images  # pylint: disable=g-bad-import-order

# absltest helpers (create_tempdir) read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session')
def trained_mlp():
  """An MLP with dropout trained to high accuracy on synthetic images.

  Returns (model, variables, test_images, test_labels).
  """
  model = models.MLP(dropout_rate=0.2)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  x, y = synthetic_images(512, seed=0)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(variables['params'])

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      logits = model.apply({'params': p}, x, train=True,
                           rngs={'dropout': key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  params = variables['params']
  for i in range(60):
    params, opt_state = step(params, opt_state, jax.random.PRNGKey(i))
  x_test, y_test = synthetic_images(64, seed=1)
  return model, {'params': params}, x_test, y_test
