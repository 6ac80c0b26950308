"""Shared test set-up: the platform the suite runs on (before JAX starts)
and fixtures.

By default the CPU, split into 4 fake devices (the sharded code runs as on
several accelerators). An explicit ``JAX_PLATFORMS`` runs the suite there:
``JAX_PLATFORMS=cuda python -m pytest -m accelerator`` runs the tests that
mean something on a GPU (numerics, attacks, steps, APGD, a short train and
resume) on it; on a machine without that platform the suite stops with one
line instead of running on the CPU.
"""

import os

# Must run before jax is imported anywhere: pmap tests need several devices
# (the flag only splits the CPU; an accelerator keeps its own count).
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=4').strip()
PLATFORM = os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Two xdist workers share the cores with XLA's threads and the subprocesses'
# own: PyTorch's OpenMP threads spin-wait while another process holds a core,
# which made a 30 s train.py + AutoAttack run exceed 300 s. One torch thread
# per process (inherited by the scripts the tests start).
os.environ.setdefault('OMP_NUM_THREADS', '1')

import jax  # pylint: disable=g-import-not-at-top

try:  # before anything else starts JAX's backends
  jax.devices()
  PLATFORM_ERROR = None
except (RuntimeError, AssertionError) as e:  # JAX 0.10 asserts when the
  # platform has no plugin installed
  PLATFORM_ERROR = (str(e).strip().splitlines() or
                    ['JAX started no backend for it'])[0]

from absl import flags  # pylint: disable=g-import-not-at-top
import optax
import pytest

from uta_jax import models

from testutil import synthetic_images  # pylint: disable=g-bad-import-order

# absltest helpers (create_tempdir) read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  """Stops at once, in one line, when ``JAX_PLATFORMS`` names a platform
  this machine lacks (JAX would raise in the first test of every worker)."""
  del config
  if PLATFORM_ERROR is not None:
    pytest.exit(f'JAX_PLATFORMS={PLATFORM}: this machine has no such JAX '
                f'platform ({PLATFORM_ERROR[:160]}); unset JAX_PLATFORMS to '
                'run on the CPU', returncode=4)


def pytest_collection_modifyitems(config, items):
  """The files holding slow tests (end-to-end runs, minutes) first, in
  their collected order (a class's set-up runs once per worker): the
  workers then end on short tests instead of one waiting on the other's
  last long run."""
  del config
  slow = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow)


def pytest_report_header(config):
  del config
  if PLATFORM_ERROR is not None:
    return None
  return (f'JAX {jax.__version__} on {jax.default_backend()}: '
          f'{jax.device_count()} x {jax.devices()[0].device_kind}')


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
