"""Tests of uta_jax.fab: the L-inf projection and FAB-T against the
reference (``pyautoattack``), and their invariants."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uta_jax import data
from uta_jax import fab

from testutil import require, trained_mlp  # pylint: disable=g-bad-import-order

# Numerics that mean something on an accelerator: JAX_PLATFORMS=cuda
# python -m pytest -m accelerator runs them there.
pytestmark = pytest.mark.accelerator


class ProjectionTest(absltest.TestCase):

  def test_equals_the_references_projection(self):
    torch = require('torch')
    projections = require('pyautoattack.fab_projections')
    rng = np.random.default_rng(0)
    n, d = 64, 784
    t = rng.uniform(size=(n, d)).astype(np.float32)
    t[:, :300] = rng.integers(0, 2, size=(n, 300))  # many exact 0/1 pixels
    # A quarter on five grey levels: large groups of equal p everywhere.
    t[:16] = rng.integers(0, 5, size=(16, d)) / 4
    w = rng.normal(size=(n, d)).astype(np.float32)
    w[16:24] = np.round(w[16:24])  # equal |w| p products, zero weights too
    w[:8, ::7] = 0.0  # zero weights, as a flat gradient has
    # Offsets on both sides and far away (the box-limited case).
    b = (np.sum(w * t, 1) + rng.normal(size=n) * np.r_[
        np.full(32, 5.0), np.full(32, 500.0)]).astype(np.float32)
    ours = np.asarray(fab.projection_linf(jnp.asarray(t), jnp.asarray(w),
                                          jnp.asarray(b)))
    ref = projections.projection_linf(torch.from_numpy(t), torch.from_numpy(w),
                                      torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # The projected points stay in the box.
    self.assertGreaterEqual((t + ours).min(), -1e-6)
    self.assertLessEqual((t + ours).max(), 1 + 1e-6)


class FabTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.variables, logits_fn, test = trained_mlp(48)
    cls.logits_fn = staticmethod(logits_fn)
    cls.x = data.to_float(test.images)
    cls.y = test.labels
    cls.result = fab.fab_t(logits_fn, jnp.asarray(cls.x), jnp.asarray(cls.y),
                           num_targets=3, num_steps=15)

  def test_robust_at_any_eps_and_invariants(self):
    r = self.result
    self.assertEqual(r.distances.shape, (3, len(self.x)))
    for eps in (0.05, 0.1, 0.3):
      robust, x_adv = r.robust_at(eps)
      self.assertTrue(np.all(robust <= r.clean))
      fooled = r.clean & ~robust
      dist = np.abs(x_adv - self.x).reshape(len(self.x), -1).max(1)
      self.assertTrue(np.all(dist[fooled] <= eps + 1e-6))
      pred = np.argmax(np.asarray(self.logits_fn(jnp.asarray(x_adv))), -1)
      self.assertTrue(np.all(pred[fooled] != self.y[fooled]))
      np.testing.assert_array_equal(x_adv[robust], self.x[robust])
    # A larger eps fools at least the same points.
    self.assertTrue(np.all(r.robust_at(0.3)[0] <= r.robust_at(0.1)[0]))

  def test_after_1_3_and_10_iterations_equals_the_reference(self):
    torch = require('torch')
    fab_pt = require('pyautoattack.fab_pt')
    torch_bridge = require('uta_jax.torch_bridge')
    module = torch_bridge.bridge_module(self.model.apply, self.variables)
    x_nchw = torch.from_numpy(np.transpose(self.x, (0, 3, 1, 2)).copy())
    y = torch.from_numpy(self.y.astype(np.int64))
    for steps_ in (1, 3, 10):
      ours = fab.fab_t(self.logits_fn, jnp.asarray(self.x),
                       jnp.asarray(self.y), num_targets=2, num_steps=steps_)
      attack = fab_pt.FABAttack_PT(module, norm='Linf', n_restarts=1,
                                   n_iter=steps_, eps=0.2, targeted=True,
                                   n_target_classes=2, device='cpu')
      adv = np.transpose(attack.perturb(x_nchw, y).numpy(), (0, 2, 3, 1))
      dist = np.abs(adv - self.x).reshape(len(self.x), -1).max(1)
      pred = np.argmax(np.asarray(self.logits_fn(jnp.asarray(adv))), -1)
      robust, x_adv = ours.robust_at(0.2)
      np.testing.assert_array_equal(
          robust, ((pred == self.y) | (dist > 0.2)) & ours.clean, steps_)
      np.testing.assert_allclose(x_adv[~robust], adv[~robust], atol=1e-4)

  def test_equals_the_reference_fab_t(self):
    torch = require('torch')
    fab_pt = require('pyautoattack.fab_pt')
    torch_bridge = require('uta_jax.torch_bridge')
    module = torch_bridge.bridge_module(self.model.apply, self.variables)
    x_nchw = torch.from_numpy(np.transpose(self.x, (0, 3, 1, 2)).copy())
    y = torch.from_numpy(self.y.astype(np.int64))
    for eps in (0.05, 0.15):
      attack = fab_pt.FABAttack_PT(module, norm='Linf', n_restarts=1,
                                   n_iter=15, eps=eps, targeted=True,
                                   n_target_classes=3, device='cpu')
      adv = np.transpose(attack.perturb(x_nchw, y).numpy(), (0, 2, 3, 1))
      dist = np.abs(adv - self.x).reshape(len(self.x), -1).max(1)
      pred = np.argmax(np.asarray(self.logits_fn(jnp.asarray(adv))), -1)
      ref_robust = (pred == self.y) | (dist > eps)
      robust, x_adv = self.result.robust_at(eps)
      np.testing.assert_array_equal(robust, ref_robust & self.result.clean)
      self.assertLess(robust.sum(), self.result.clean.sum())
      np.testing.assert_allclose(x_adv[~robust], adv[~robust], atol=1e-4)

  def test_the_traced_form_equals_the_per_target_runs(self):
    run = jax.jit(lambda x, y: fab.fab_t_at(self.logits_fn, x, y, 0.1,
                                            num_targets=3, num_steps=15))
    robust, x_adv = run(jnp.asarray(self.x), jnp.asarray(self.y))
    want_robust, want_adv = self.result.robust_at(0.1)
    np.testing.assert_array_equal(np.asarray(robust), want_robust)
    np.testing.assert_allclose(np.asarray(x_adv), want_adv, atol=1e-6)

  def test_needs_enough_classes(self):
    with self.assertRaisesRegex(ValueError, 'at least 10 classes'):
      fab.fab_t(lambda v: v.reshape(v.shape[0], -1)[:, :5],
                jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32))


if __name__ == '__main__':
  absltest.main()
