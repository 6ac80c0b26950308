"""Tests of uta_jax.attacks: invariants, references, compilation, schedules."""

import functools
import inspect

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uta_jax import attacks
from uta_jax import uncertainty

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator

EPS = 0.1


def python_loop_reference(objective, x, *, eps, num_steps, schedule,
                          bounds=(0.0, 1.0), noise=None):
  """Eq. PGD / UTA-PGD written as a plain Python loop, no lax."""
  x = np.asarray(x)
  x_adv = x if noise is None else x + np.asarray(noise)
  lo, hi = x - eps, x + eps
  if bounds is not None:
    lo, hi = np.maximum(lo, bounds[0]), np.minimum(hi, bounds[1])
  x_adv = np.clip(x_adv, lo, hi)
  grad_fn = jax.grad(lambda v: jnp.sum(objective(v)))
  for i in range(num_steps):
    g = np.asarray(grad_fn(jnp.asarray(x_adv)))
    x_adv = np.clip(x_adv + float(schedule(i)) * np.sign(g), lo, hi)
  return x_adv


@pytest.fixture(autouse=True)
def _inject_trained_mlp(request, trained_mlp):
  if request.instance is not None:
    request.instance.trained = trained_mlp


class AttackTest(chex.TestCase, parameterized.TestCase):
  trained = None  # (model, variables, x, y), injected from conftest

  def setUp(self):
    super().setUp()
    self.model, self.variables, self.x, self.y = self.trained
    # Push some pixels onto the box edges so the [0, 1] clip is exercised.
    self.x = self.x.at[:, :3].set(0.0).at[:, -3:].set(1.0)
    self.logits_fn = functools.partial(self.model.apply, self.variables)
    self.sample_fn = uncertainty.single_model_sampler(self.model.apply,
                                                      self.variables)

  def all_attacks(self):
    key = jax.random.PRNGKey(0)
    mc = uncertainty.mc_dropout_sampler(self.model.apply, self.variables,
                                        jax.random.split(key, 5))
    return {
        'fgsm': attacks.fgsm(self.logits_fn, self.x, self.y, eps=EPS),
        'rfgsm': attacks.rfgsm(self.logits_fn, self.x, self.y, key=key,
                               eps=EPS, step_size=0.05),
        'pgd': attacks.pgd(self.logits_fn, self.x, self.y, eps=EPS,
                           num_steps=10, step_size=0.02),
        'pgd_rs': attacks.pgd(self.logits_fn, self.x, self.y, eps=EPS,
                              num_steps=10, step_size=0.02, key=key,
                              random_start=True),
        'uta': attacks.uta(self.sample_fn, self.x, eps=EPS, num_steps=10,
                           step_size=0.02),
        'uta_mc5': attacks.uta(mc, self.x, eps=EPS, num_steps=5,
                               step_size=attacks.triangular_schedule(
                                   num_steps=5, eps=EPS)),
        'uta_mi': attacks.uta(mc, self.x, eps=EPS, num_steps=5,
                              step_size=0.02, measure='mutual_information'),
    }

  def test_every_attack_stays_in_the_ball_and_the_box(self):
    for name, x_adv in self.all_attacks().items():
      with self.subTest(name):
        chex.assert_equal_shape([x_adv, self.x])
        self.assertLessEqual(float(jnp.max(jnp.abs(x_adv - self.x))),
                             EPS + 1e-6)
        self.assertGreaterEqual(float(x_adv.min()), 0.0)
        self.assertLessEqual(float(x_adv.max()), 1.0)
        self.assertGreater(float(jnp.max(jnp.abs(x_adv - self.x))), 0.0)

  def _pgd_and_uta(self, eps=0.2):
    kwargs = dict(eps=eps, num_steps=10, step_size=eps / 4)
    return (attacks.pgd(self.logits_fn, self.x, self.y, **kwargs),
            attacks.uta(self.sample_fn, self.x, **kwargs))

  def _cross_entropy(self, x):
    return float(optax.softmax_cross_entropy_with_integer_labels(
        self.logits_fn(x), self.y).mean())

  def _entropy(self, x):
    return float(uncertainty.predictive_entropy(self.sample_fn(x)).mean())

  def test_pgd_raises_the_cross_entropy_more_than_uta(self):
    x_pgd, x_uta = self._pgd_and_uta()
    self.assertGreater(self._cross_entropy(x_pgd),
                       self._cross_entropy(self.x) + 0.5)
    self.assertGreater(self._cross_entropy(x_pgd), self._cross_entropy(x_uta))

  def test_uta_raises_the_entropy_more_than_pgd(self):
    x_pgd, x_uta = self._pgd_and_uta()
    self.assertGreater(self._entropy(x_uta), self._entropy(self.x) + 1.0)
    self.assertGreater(self._entropy(x_uta), self._entropy(x_pgd))

  def test_uta_is_label_free(self):
    self.assertNotIn('labels', inspect.signature(attacks.uta).parameters)
    self.assertNotIn('labels',
                     inspect.signature(attacks.uncertainty_objective).parameters)

  def test_fgsm_is_the_closed_form(self):
    ce = lambda x: optax.softmax_cross_entropy_with_integer_labels(
        self.logits_fn(x), self.y).sum()
    expected = jnp.clip(self.x + EPS * jnp.sign(jax.grad(ce)(self.x)), 0, 1)
    chex.assert_trees_all_close(self.all_attacks()['fgsm'], expected)

  def test_rfgsm_depends_on_the_key_only_through_the_start(self):
    a = attacks.rfgsm(self.logits_fn, self.x, self.y,
                      key=jax.random.PRNGKey(1), eps=EPS, step_size=0.05)
    b = attacks.rfgsm(self.logits_fn, self.x, self.y,
                      key=jax.random.PRNGKey(1), eps=EPS, step_size=0.05)
    c = attacks.rfgsm(self.logits_fn, self.x, self.y,
                      key=jax.random.PRNGKey(2), eps=EPS, step_size=0.05)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.allclose(a, c))

  @parameterized.named_parameters(('pgd', 'pgd'), ('uta', 'uta'))
  def test_fori_loop_equals_python_loop(self, kind):
    key = jax.random.PRNGKey(7)
    schedule = attacks.triangular_schedule(num_steps=6, eps=0.2)
    if kind == 'pgd':
      objective = attacks.cross_entropy_objective(self.logits_fn, self.y)
    else:
      objective = attacks.uncertainty_objective(self.sample_fn)
    got = attacks.projected_sign_ascent(objective, self.x, eps=0.2,
                                        num_steps=6, step_size=schedule,
                                        key=key, random_start=True)
    noise = jax.random.uniform(key, self.x.shape, self.x.dtype, -0.2, 0.2)
    expected = python_loop_reference(objective, self.x, eps=0.2, num_steps=6,
                                     schedule=schedule, noise=noise)
    np.testing.assert_allclose(got, expected, atol=1e-6)

  @chex.all_variants(with_pmap=False)
  def test_jit_and_eager_agree(self):
    def run(variables, x, y):
      logits_fn = functools.partial(self.model.apply, variables)
      return (attacks.pgd(logits_fn, x, y, eps=EPS, num_steps=5,
                          step_size=0.02),
              attacks.uta(uncertainty.single_model_sampler(
                  self.model.apply, variables), x, eps=EPS, num_steps=5,
                          step_size=0.02))
    got = self.variant(run)(self.variables, self.x, self.y)
    expected = run(self.variables, self.x, self.y)
    chex.assert_trees_all_close(got, expected, atol=1e-6)

  def test_one_compilation_per_shape(self):
    @jax.jit
    @chex.assert_max_traces(n=2)
    def attack(variables, x, y):
      return attacks.pgd(functools.partial(self.model.apply, variables), x, y,
                         eps=EPS, num_steps=3, step_size=0.02)
    for i in range(3):  # same shape, new values: no retrace
      attack(self.variables, self.x + 0.01 * i, self.y)
    attack(self.variables, self.x[:8], self.y[:8])  # new shape: one retrace
    with self.assertRaises(AssertionError):
      attack(self.variables, self.x[:4], self.y[:4])  # a third shape: caught

  def test_eps_and_steps_are_validated(self):
    with self.assertRaisesRegex(ValueError, 'num_steps'):
      attacks.pgd(self.logits_fn, self.x, self.y, eps=EPS, num_steps=0,
                  step_size=0.01)
    with self.assertRaisesRegex(ValueError, 'eps'):
      attacks.pgd(self.logits_fn, self.x, self.y, eps=-0.1, num_steps=1,
                  step_size=0.01)
    with self.assertRaisesRegex(ValueError, 'key'):
      attacks.pgd(self.logits_fn, self.x, self.y, eps=EPS, num_steps=1,
                  step_size=0.01, random_start=True)

  def test_unbounded_attack_leaves_the_ball(self):
    x_adv = attacks.uta(self.sample_fn, self.x, eps=float('inf'),
                        num_steps=20, step_size=0.05)
    self.assertGreater(float(jnp.max(jnp.abs(x_adv - self.x))), 0.5)
    self.assertTrue(0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0)


class LatentSpaceTest(chex.TestCase):
  trained = None

  def setUp(self):
    super().setUp()
    self.model, self.variables, self.x, self.y = self.trained
    self.z = self.model.apply(self.variables, self.x, method=self.model.encode)
    self.head = lambda z: self.model.apply(self.variables, z,
                                           method=self.model.classify)

  def test_latent_attacks_stay_in_the_latent_ball_without_a_box(self):
    eps = 0.5
    for name, z_adv in {
        'pgd': attacks.pgd(self.head, self.z, self.y, eps=eps, num_steps=5,
                           step_size=0.2, bounds=None),
        'uta': attacks.uta(lambda z: self.head(z)[None], self.z, eps=eps,
                           num_steps=5, step_size=0.2, bounds=None),
    }.items():
      with self.subTest(name):
        chex.assert_equal_shape([z_adv, self.z])
        self.assertLessEqual(float(jnp.max(jnp.abs(z_adv - self.z))),
                             eps + 1e-6)
        # ReLU codes are often 0; without a box the attack goes below 0.
        self.assertLess(float(z_adv.min()), -0.1)

  def test_latent_attack_changes_only_z(self):
    x_before = np.asarray(self.x)
    z_adv = attacks.pgd(self.head, self.z, self.y, eps=0.5, num_steps=5,
                        step_size=0.2, bounds=None)
    np.testing.assert_array_equal(self.x, x_before)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(
        self.head(z), self.y).mean()
    self.assertGreater(float(ce(z_adv)), float(ce(self.z)))
    # Gradients of a loss on z_adv do not reach the encoder's input.
    g = jax.grad(lambda x: jnp.sum(attacks.pgd(
        self.head, self.model.apply(self.variables, x,
                                    method=self.model.encode), self.y,
        eps=0.5, num_steps=2, step_size=0.2, bounds=None)))(self.x)
    np.testing.assert_array_equal(g, 0.0)


@pytest.fixture(autouse=True)
def _inject_latent(request, trained_mlp):
  if isinstance(request.instance, LatentSpaceTest):
    request.instance.trained = trained_mlp


class ScheduleTest(parameterized.TestCase):

  @parameterized.parameters((10, 0.1), (16, 0.16), (40, 0.4), (4, 0.01))
  def test_triangular_matches_the_paper_at_0_half_and_end(self, k, eps):
    schedule = attacks.triangular_schedule(num_steps=k, eps=eps)
    peak = max(0.005, eps / 5)
    np.testing.assert_allclose(schedule(0), 0.005, rtol=1e-6)
    np.testing.assert_allclose(schedule(k // 2), peak, rtol=1e-6)
    np.testing.assert_allclose(schedule(k), 0.005, rtol=1e-6)
    np.testing.assert_allclose(schedule(k // 4),
                               0.005 + (peak - 0.005) * (k // 4) / (k / 2),
                               rtol=1e-5)

  def test_constant_and_as_schedule(self):
    np.testing.assert_allclose(attacks.as_schedule(0.03)(7), 0.03)
    sched = attacks.triangular_schedule(num_steps=4, eps=0.2)
    self.assertIs(attacks.as_schedule(sched), sched)

