"""Tests of uta_jax.classifier: the one place that applies a model, single
or stacked ensemble, in input or latent space."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import uncertainty

from testutil import synthetic_images  # pylint: disable=g-bad-import-order


def _ensemble(size=3, **overrides):
  config = configs.get_config('fashion_mnist', {'model.ensemble_size': size,
                                                **overrides})
  model = classifier.create_model(config)
  variables = classifier.init_variables(config, model, jax.random.key(0),
                                        (28, 28, 1))
  return config, model, variables


def _member(variables, m):
  return jax.tree_util.tree_map(lambda a: a[m], variables)


class EnsembleTest(chex.TestCase):

  def test_members_have_their_own_initialisation(self):
    config, _, variables = _ensemble()
    self.assertTrue(classifier.is_ensemble(config))
    kernel = variables['params']['fc3']['Dense_0']['kernel']
    self.assertEqual(kernel.shape[0], 3)
    self.assertFalse(np.allclose(kernel[0], kernel[1]))

  def test_prediction_is_the_log_of_the_mean_softmax_of_the_members(self):
    _, model, variables = _ensemble()
    x, _ = synthetic_images(8, seed=1)
    # Independent computation: a Python loop over members, numpy softmax.
    looped = np.stack([np.asarray(model.apply(_member(variables, m), x))
                       for m in range(3)])
    probs = np.exp(looped - looped.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.log(probs.mean(0))
    got = classifier.predict_logits(model, variables, x, ensemble=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(
        classifier.member_logits(model, variables, x, ensemble=True), looped,
        atol=1e-5)

  def test_members_see_their_own_latent_codes(self):
    _, model, variables = _ensemble()
    x, _ = synthetic_images(4, seed=2)
    z = classifier.latent_codes(model, variables, x, ensemble=True)
    self.assertEqual(z.shape[:2], (3, 4))  # [M, B, l]
    z = z + jnp.arange(3.0)[:, None, None]  # a different shift per member
    got = classifier.member_logits(model, variables, z, ensemble=True,
                                   per_member_inputs=True,
                                   method=model.classify)
    for m in range(3):
      np.testing.assert_allclose(
          got[m], model.apply(_member(variables, m), z[m],
                              method=model.classify), atol=1e-5)

  def test_map_members_loops_over_the_leading_axis_of_every_argument(self):
    a = {'w': jnp.arange(6.0).reshape(3, 2)}
    b = jnp.array([10.0, 20.0, 30.0])
    out = uncertainty.map_members(lambda t, s: t['w'] * s, a, b)
    np.testing.assert_array_equal(out, [[0, 10], [40, 60], [120, 150]])

  def test_a_single_model_is_one_member(self):
    config = configs.get_config('fashion_mnist')
    self.assertFalse(classifier.is_ensemble(config))
    model = classifier.create_model(config)
    variables = classifier.init_variables(config, model, jax.random.key(0),
                                          (28, 28, 1))
    x, _ = synthetic_images(4, seed=3)
    members = classifier.member_logits(model, variables, x, ensemble=False)
    self.assertEqual(members.shape, (1, 4, 10))
    np.testing.assert_allclose(
        classifier.predict_logits(model, variables, x, ensemble=False),
        members[0])

  def test_bounds_are_the_pixel_box_except_for_the_toy(self):
    self.assertEqual(classifier.input_bounds(configs.get_config('mnist')),
                     (0.0, 1.0))
    self.assertIsNone(classifier.input_bounds(configs.get_config('toy2d')))


class ModelHeadTest(absltest.TestCase):

  def test_every_models_head_has_its_datasets_class_count(self):
    # toy2d has 2 classes; a 10-way head would make UTA maximise a 10-way
    # entropy on a 2-class problem.
    for dataset in data.DATASETS:
      for size in (1, 2):
        config = configs.get_config(dataset, {'model.ensemble_size': size})
        model = classifier.create_model(config)

        def logits(config=config, model=model):
          variables = classifier.init_variables(
              config, model, jax.random.key(0), data.INPUT_SHAPES[dataset])
          x = jnp.zeros((3, *data.INPUT_SHAPES[dataset]), jnp.float32)
          return classifier.predict_logits(
              model, variables, x, ensemble=classifier.is_ensemble(config))

        # Shapes only (no ResNet-18 is run): the head size is the point.
        logits = jax.eval_shape(logits)
        self.assertEqual(logits.shape, (3, data.NUM_CLASSES[dataset]),
                         (dataset, size))

  def test_class_count_matches_the_labels_of_the_offline_datasets(self):
    for dataset in ('toy2d', 'mnist_embedded'):
      ds = data.load_dataset(dataset)
      self.assertEqual(ds.num_classes, data.NUM_CLASSES[dataset])
      self.assertEqual(len(np.unique(ds.train.labels)), ds.num_classes)


if __name__ == '__main__':
  absltest.main()
