"""Tests of uta_jax.trainer: adversarial training of a user's own module."""

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uta_jax import attacks
from uta_jax import trainer


class Plain(nn.Module):
  """A user's module: ``__call__(self, x)``, no ``train`` argument."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


class WithTrain(nn.Module):
  """Dropout and BatchNorm, switched by ``train``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(32)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    return nn.Dense(4)(x)


class TrainWithoutDefault(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    return nn.Dense(4)(x)


def teacher_data(num=512, seed=0):
  """Points in [0, 1]^8 labelled by a fixed linear teacher (4 classes)."""
  rng = np.random.default_rng(seed)
  x = rng.random((num, 8)).astype(np.float32)
  w = np.random.default_rng(99).normal(size=(8, 4))
  return x, np.argmax((x - 0.5) @ w, -1).astype(np.int32)


class FitTest(absltest.TestCase):

  def test_a_module_without_train_learns_and_keeps_its_layout(self):
    x, y = teacher_data()
    variables = trainer.fit(Plain(), (x, y), attack='uta', eps=0.02,
                            num_steps=3, epochs=8, batch_size=64,
                            optimizer=optax.adam(1e-2))
    logits = Plain().apply(variables, jnp.asarray(x))  # the user's layout
    self.assertGreater(float(np.mean(np.argmax(logits, -1) == y)), 0.8)

  def test_train_mode_modules_keep_batch_stats(self):
    x, y = teacher_data()
    seen = []
    variables = trainer.fit(WithTrain(), (x, y), attack='pgd', eps=0.02,
                            num_steps=2, epochs=2, batch_size=64,
                            callback=lambda step, m: seen.append(step))
    self.assertIn('batch_stats', variables)
    self.assertEqual(seen, list(range(1, 17)))  # 2 epochs x 8 batches
    self.assertFalse(np.allclose(
        variables['batch_stats']['BatchNorm_0']['mean'], 0.0))

  def test_the_seed_decides_everything_and_the_attack_matters(self):
    x, y = teacher_data()
    run = lambda **kw: trainer.fit(Plain(), (x, y), epochs=1, batch_size=64,
                                   **kw)
    a, b = run(seed=3), run(seed=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    none = run(seed=3, attack='none')
    self.assertFalse(np.allclose(a['params']['Dense_0']['kernel'],
                                 none['params']['Dense_0']['kernel']))

  def test_an_iterable_of_batches(self):
    x, y = teacher_data()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    steps = []
    trainer.fit(Plain(), iter(batches), callback=lambda s, m: steps.append(s))
    self.assertEqual(steps, [1, 2, 3, 4])

  def test_bad_input_is_refused_with_one_clear_error(self):
    x, y = teacher_data()
    with self.assertRaisesRegex(ValueError, 'unknown attack'):
      trainer.fit(Plain(), (x, y), attack='cw')
    with self.assertRaisesRegex(ValueError, 'no batches'):
      trainer.fit(Plain(), iter([]))
    with self.assertRaisesRegex(ValueError, 'fewer than one batch'):
      trainer.fit(Plain(), (x[:10], y[:10]), batch_size=64)
    with self.assertRaisesRegex(ValueError, 'labels'):
      trainer.fit(Plain(), (x, y[:5]))
    with self.assertRaisesRegex(TypeError, 'flax.linen Module'):
      trainer.fit(lambda v: v, (x, y))
    with self.assertRaisesRegex(TypeError, 'train without a default'):
      trainer.fit(TrainWithoutDefault(), (x, y))


class EvaluateTest(absltest.TestCase):

  def test_accuracies_match_direct_attacks(self):
    x, y = teacher_data(300, seed=1)
    variables = trainer.fit(Plain(), teacher_data(), attack='none',
                            epochs=3, batch_size=64)
    got = trainer.evaluate(Plain(), variables, (x, y), eps=0.05,
                           num_steps=5, batch_size=128)
    logits_fn = lambda v: Plain().apply(variables, v)
    clean = np.argmax(logits_fn(x), -1) == y
    x_pgd = attacks.pgd(logits_fn, jnp.asarray(x), jnp.asarray(y), eps=0.05,
                        num_steps=5, step_size=2.5 * 0.05 / 5)
    robust = clean & (np.argmax(logits_fn(x_pgd), -1) == y)
    self.assertAlmostEqual(got['clean'], 100 * clean.mean(), places=4)
    self.assertAlmostEqual(got['pgd'], 100 * robust.mean(), places=4)
    self.assertLessEqual(got['uta'], got['clean'])
    self.assertLess(got['pgd'], got['clean'])


if __name__ == '__main__':
  absltest.main()
