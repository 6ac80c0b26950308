"""Tests of uta_jax.square: its schedule against the reference's, its
invariants, and the reference Square Attack replayed draw for draw."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uta_jax import data
from uta_jax import parallel
from uta_jax import square

from testutil import require, trained_mlp  # pylint: disable=g-bad-import-order

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator


class ScheduleTest(absltest.TestCase):

  def test_p_halves_after_the_references_iterations(self):
    ref = require('pyautoattack.square').SquareAttack(
        lambda x: x, eps=0.1, resc_schedule=False, n_queries=10000)
    ref.rescale_schedule = False
    for i in (0, 10, 11, 50, 51, 200, 201, 1000, 4001, 7999, 8001, 9999):
      self.assertEqual(square.p_schedule(i), ref.p_selection(i), i)

  def test_window_sides(self):
    sides = square.window_sides(5000, 28, 28)
    self.assertEqual(sides[0], round((0.8 * 784) ** 0.5))  # 25
    self.assertEqual(sides[11], round((0.4 * 784) ** 0.5))  # 18
    self.assertGreaterEqual(sides.min(), 1)
    self.assertTrue(np.all(np.diff(sides) <= 0))


class InvariantsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.variables, logits_fn, cls.test = trained_mlp(64)
    cls.logits_fn = staticmethod(logits_fn)
    cls.x = jnp.asarray(data.to_float(cls.test.images))
    cls.y = jnp.asarray(cls.test.labels)

  def run_square(self, **kw):
    return square.square_linf(self.logits_fn, self.x, self.y, eps=0.1,
                              num_queries=60, segment=25, **kw)

  def test_ball_box_and_misclassified_points(self):
    robust, x_adv = self.run_square(key=jax.random.key(0))
    self.assertLessEqual(float(jnp.abs(x_adv - self.x).max()), 0.1 + 1e-6)
    self.assertBetween(float(x_adv.min()), 0.0, 1.0)
    self.assertLessEqual(float(x_adv.max()), 1.0)
    pred = np.argmax(np.asarray(self.logits_fn(x_adv)), -1)
    clean = np.argmax(np.asarray(self.logits_fn(self.x)), -1) == self.y
    np.testing.assert_array_equal(robust, clean & (pred == np.asarray(self.y)))
    # Points misclassified when clean come back untouched.
    np.testing.assert_array_equal(x_adv[~clean], self.x[~clean])
    self.assertLess(robust.sum(), clean.sum())  # the attack finds some

  def test_the_key_decides_and_queries_only_help(self):
    a = self.run_square(key=jax.random.key(1))
    b = self.run_square(key=jax.random.key(1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    longer, _ = square.square_linf(self.logits_fn, self.x, self.y, eps=0.1,
                                   num_queries=120, segment=25,
                                   key=jax.random.key(1))
    self.assertTrue(np.all(longer <= a[0]))  # a point once fooled stays so

  def test_stop_between_segments_and_bad_input(self):
    with self.assertRaises(parallel.Stopped):
      self.run_square(key=jax.random.key(0), stop_requested=lambda: True)
    with self.assertRaisesRegex(ValueError, 'needs a key'):
      square.square_linf(self.logits_fn, self.x, self.y, eps=0.1)


class ReferenceReplayTest(absltest.TestCase):
  """The reference's own torch draws, recorded and replayed: the same
  points fooled, the same adversarial images."""

  def test_replayed_draws_give_the_reference_result(self):
    torch = require('torch')
    reference = require('pyautoattack.square')
    torch_bridge = require('uta_jax.torch_bridge')
    model, variables, logits_fn, test = trained_mlp(64)
    x = data.to_float(test.images)
    y = test.labels
    queries, eps = 150, 0.1
    attack = reference.SquareAttack(
        torch_bridge.bridge_module(model.apply, variables), eps=eps,
        n_queries=queries, p_init=0.8, norm='Linf', loss='margin',
        resc_schedule=False, seed=0, device='cpu')
    recorded = []
    draw_int, draw_sign = attack.random_int, attack.random_choice
    attack.random_int = lambda *a, **k: recorded.append(
        ('int', draw_int(*a, **k))) or recorded[-1][1]
    attack.random_choice = lambda shape: recorded.append(
        ('sign', draw_sign(shape))) or recorded[-1][1]
    x_nchw = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
    adv = attack.perturb(x_nchw, torch.from_numpy(y.astype(np.int64)))
    ref_adv = np.transpose(adv.numpy(), (0, 2, 3, 1))

    clean = np.argmax(np.asarray(logits_fn(jnp.asarray(x))), -1) == y
    stripes = np.ones((len(x), 1, x.shape[2], x.shape[3]), np.float32)
    kind, first = recorded[0]
    self.assertEqual(kind, 'sign')  # the start: [B_clean, C, 1, W]
    stripes[clean] = np.transpose(first.numpy(), (0, 2, 3, 1))
    corners = np.zeros((queries, 2), np.int32)
    signs = np.zeros((queries, x.shape[3]), np.float32)
    rest = recorded[1:]
    for i in range(len(rest) // 3):
      (_, vh), (_, vw), (_, s) = rest[3 * i:3 * i + 3]
      corners[i] = [int(vh), int(vw)]
      signs[i] = s.numpy().reshape(-1)
    draws = square.Draws(jnp.asarray(stripes), jnp.asarray(corners),
                         jnp.asarray(signs))
    robust, x_adv = square.square_linf(logits_fn, jnp.asarray(x),
                                       jnp.asarray(y), eps=eps,
                                       num_queries=queries, draws=draws,
                                       segment=50)
    ref_pred = np.argmax(np.asarray(logits_fn(jnp.asarray(ref_adv))), -1)
    np.testing.assert_array_equal(robust, ref_pred == y)
    self.assertLess(robust.sum(), clean.sum())
    np.testing.assert_allclose(np.asarray(x_adv)[~robust],
                               ref_adv[~robust], atol=1e-6)


if __name__ == '__main__':
  absltest.main()
