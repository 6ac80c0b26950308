"""Tests of uta_jax.uncertainty against float64 NumPy and finite differences."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uta_jax import models
from uta_jax import uncertainty

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator


def np_predictive_entropy(logits: np.ndarray) -> np.ndarray:
  """float64 reference of Eq. E for logits [M, B, C]."""
  logits = logits.astype(np.float64)
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  y_hat = p.mean(0)
  return -(y_hat * np.log(y_hat)).sum(-1)


def np_mutual_information(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  member_entropy = -(p * np.log(p)).sum(-1).mean(0)
  return np_predictive_entropy(logits) - member_entropy


def random_logits(seed, shape, scale=3.0):
  return np.random.default_rng(seed).normal(scale=scale, size=shape).astype(
      np.float32)


class MeasuresTest(chex.TestCase, parameterized.TestCase):

  @chex.all_variants(with_pmap=False)
  @parameterized.parameters(1, 2, 5)
  def test_entropy_matches_float64_numpy(self, num_samples):
    logits = random_logits(0, (num_samples, 16, 10))
    got = self.variant(uncertainty.predictive_entropy)(logits)
    chex.assert_shape(got, (16,))
    np.testing.assert_allclose(got, np_predictive_entropy(logits), rtol=1e-5,
                               atol=1e-6)

  @chex.all_variants(with_pmap=False)
  def test_mutual_information_matches_float64_numpy(self):
    logits = random_logits(1, (5, 16, 10))
    got = self.variant(uncertainty.mutual_information)(logits)
    np.testing.assert_allclose(got, np_mutual_information(logits), rtol=1e-4,
                               atol=1e-5)
    self.assertTrue(np.all(np.asarray(got) >= -1e-6))

  def test_mutual_information_is_zero_for_identical_samples(self):
    one = random_logits(2, (1, 8, 10))
    logits = np.repeat(one, 4, axis=0)
    np.testing.assert_allclose(uncertainty.mutual_information(logits), 0.0,
                               atol=1e-6)

  def test_single_sample_is_exactly_the_softmax_entropy(self):
    logits = random_logits(3, (1, 32, 10))
    log_p = jax.nn.log_softmax(logits[0])
    direct = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    np.testing.assert_array_equal(uncertainty.predictive_entropy(logits),
                                  direct)

  def test_entropy_bounds(self):
    uniform = jnp.zeros((1, 4, 10))
    np.testing.assert_allclose(uncertainty.predictive_entropy(uniform),
                               np.log(10), rtol=1e-6)
    confident = jnp.zeros((1, 4, 10)).at[..., 3].set(200.0)
    np.testing.assert_allclose(uncertainty.predictive_entropy(confident), 0.0,
                               atol=1e-6)

  def test_predictive_distribution_is_mean_of_softmaxes(self):
    logits = random_logits(4, (5, 8, 10))
    np.testing.assert_allclose(
        uncertainty.predictive_distribution(logits),
        jax.nn.softmax(logits, -1).mean(0), rtol=1e-5, atol=1e-7)

  @parameterized.parameters(1, 5)
  def test_entropy_gradient_matches_finite_differences(self, num_samples):
    with jax.enable_x64(True):
      logits = jnp.asarray(random_logits(5, (num_samples, 3, 6)), jnp.float64)
      f = lambda l: jnp.sum(uncertainty.predictive_entropy(l))
      grad = np.asarray(jax.grad(f)(logits))
      h = 1e-6
      flat = np.asarray(logits).ravel()
      numeric = np.empty_like(flat)
      for i in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (np_predictive_entropy(up.reshape(logits.shape)).sum() -
                      np_predictive_entropy(down.reshape(logits.shape)).sum()
                     ) / (2 * h)
      np.testing.assert_allclose(grad.ravel(), numeric, rtol=1e-6, atol=1e-8)

  def test_gradient_is_finite_for_saturated_logits(self):
    logits = jnp.zeros((3, 2, 10)).at[..., 0].set(1e4)
    grad = jax.grad(lambda l: uncertainty.predictive_entropy(l).sum())(logits)
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_unknown_measure_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, 'entropy'):
      uncertainty.get_measure('variance')


class SamplersTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.model = models.LeNet(dropout_rate=0.5)
    self.variables = models.init_variables(self.model, jax.random.PRNGKey(0),
                                           (28, 28, 1))
    self.x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    self.keys = jax.random.split(jax.random.PRNGKey(2), 5)

  @chex.all_variants(with_pmap=False)
  def test_vmapped_mc_dropout_equals_python_loop(self):
    sample = uncertainty.mc_dropout_sampler(self.model.apply, self.variables,
                                            self.keys)
    got = self.variant(sample)(self.x)
    chex.assert_shape(got, (5, 4, 10))
    looped = jnp.stack([
        self.model.apply(self.variables, self.x, mc_dropout=True,
                         rngs={'dropout': k}) for k in self.keys
    ])
    chex.assert_trees_all_close(got, looped, rtol=1e-5, atol=1e-6)

  def test_same_keys_same_output_different_keys_different_masks(self):
    sample = uncertainty.mc_dropout_sampler(self.model.apply, self.variables,
                                            self.keys)
    chex.assert_trees_all_equal(sample(self.x), sample(self.x))
    other = uncertainty.mc_dropout_sampler(
        self.model.apply, self.variables,
        jax.random.split(jax.random.PRNGKey(3), 5))
    self.assertFalse(np.allclose(sample(self.x), other(self.x)))
    # Within one call, each key draws its own mask.
    out = sample(self.x)
    for m in range(1, 5):
      self.assertFalse(np.allclose(out[0], out[m]))

  def test_without_mc_dropout_no_unit_is_dropped(self):
    # Eval mode must equal the same weights without dropout, even when a
    # dropout key is passed; only mc_dropout=True draws masks.
    no_dropout = models.LeNet(dropout_rate=0.0)
    reference = no_dropout.apply(self.variables, self.x)
    key = {'dropout': jax.random.PRNGKey(4)}
    chex.assert_trees_all_close(self.model.apply(self.variables, self.x),
                                reference, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        self.model.apply(self.variables, self.x, rngs=key), reference,
        rtol=1e-6, atol=1e-6)
    self.assertFalse(np.allclose(self.model.apply(
        self.variables, self.x, mc_dropout=True, rngs=key), reference))

  @chex.all_variants(with_pmap=False)
  def test_ensemble_equals_loop_over_members(self):
    members = [
        models.init_variables(self.model, jax.random.PRNGKey(10 + i),
                              (28, 28, 1)) for i in range(3)
    ]
    sample = uncertainty.ensemble_sampler(self.model.apply,
                                          uncertainty.stack_trees(members))
    got = self.variant(sample)(self.x)
    chex.assert_shape(got, (3, 4, 10))
    looped = jnp.stack([self.model.apply(v, self.x) for v in members])
    chex.assert_trees_all_close(got, looped, rtol=1e-5, atol=1e-6)

  def test_single_model_sampler_matches_entropy_of_the_model(self):
    sample = uncertainty.single_model_sampler(self.model.apply, self.variables)
    logits = self.model.apply(self.variables, self.x)
    np.testing.assert_array_equal(
        uncertainty.predictive_entropy(sample(self.x)),
        uncertainty.entropy_from_log_probs(jax.nn.log_softmax(logits)))


if __name__ == '__main__':
  absltest.main()
