"""Convolution and 2x2 max-pool with CPU-friendly gradients (custom VJPs).

Attacks differentiate the model with respect to its input K times inside a
``lax.fori_loop``. On XLA's CPU backend two parts of that gradient are slow:

* the input gradient of a convolution (a transposed convolution): inside a
  while loop XLA lowers it with the kernel in a layout that misses its fast
  convolution path, about 2x slower than the same step outside the loop;
* the gradient of max-pooling (``select_and_scatter_add``), a scalar loop.

``conv_general_dilated`` has the same signature and forward as
``lax.conv_general_dilated``; for stride-1, undilated, ungrouped
convolutions its input gradient is an ordinary forward convolution of the
cotangent with the explicitly flipped and transposed kernel. ``max_pool_2x2``
pools non-overlapping 2x2 windows by a reshape and routes the gradient with
an elementwise mask that XLA fuses. Forward values are identical and
gradients equal up to float rounding (tested); anything else falls back to
``lax``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def _is_fast_case(window_strides, padding, lhs_dilation, rhs_dilation,
                  feature_group_count) -> bool:
  ones = lambda v: v is None or all(d == 1 for d in v)
  return (all(s == 1 for s in window_strides) and ones(lhs_dilation) and
          ones(rhs_dilation) and feature_group_count == 1 and
          not isinstance(padding, str))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_stride1(lhs: jax.Array, rhs: jax.Array,
                  padding: Tuple[Tuple[int, int], ...],
                  dimension_numbers: lax.ConvDimensionNumbers) -> jax.Array:
  return lax.conv_general_dilated(lhs, rhs, (1,) * len(padding), padding,
                                  dimension_numbers=dimension_numbers)


def _conv_stride1_fwd(lhs, rhs, padding, dimension_numbers):
  return _conv_stride1(lhs, rhs, padding, dimension_numbers), (lhs, rhs)


def _conv_stride1_bwd(padding, dimension_numbers, residuals, g):
  lhs, rhs = residuals
  rhs_spec = dimension_numbers.rhs_spec  # (out, in, *spatial) axes of rhs
  spatial = rhs_spec[2:]
  # d lhs: correlate g with the kernel flipped in space, in/out swapped.
  flipped = jnp.flip(rhs, axis=spatial)
  perm = list(range(rhs.ndim))
  perm[rhs_spec[0]], perm[rhs_spec[1]] = perm[rhs_spec[1]], perm[rhs_spec[0]]
  transposed = jnp.transpose(flipped, perm)
  back_padding = tuple((rhs.shape[a] - 1 - lo, rhs.shape[a] - 1 - hi)
                       for a, (lo, hi) in zip(spatial, padding))
  d_lhs = lax.conv_general_dilated(g, transposed, (1,) * len(padding),
                                   back_padding,
                                   dimension_numbers=dimension_numbers)
  # d rhs: the ordinary VJP (only needed for training, pruned otherwise).
  _, rhs_vjp = jax.vjp(
      lambda r: lax.conv_general_dilated(lhs, r, (1,) * len(padding), padding,
                                         dimension_numbers=dimension_numbers),
      rhs)
  return d_lhs.astype(lhs.dtype), rhs_vjp(g)[0]


_conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """Drop-in ``lax.conv_general_dilated`` with a fast stride-1 input gradient."""
  if (_is_fast_case(window_strides, padding, lhs_dilation, rhs_dilation,
                    feature_group_count) and batch_group_count == 1 and
      precision is None and preferred_element_type is None):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_stride1(lhs, rhs, pads, dn)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def _upsample2(a: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2)


@jax.custom_vjp
def _pool2(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool2_fwd(x):
  y = _pool2(x)
  return y, (x, y)


def _pool2_bwd(residuals, g):
  x, y = residuals
  return (jnp.where(x == _upsample2(y), _upsample2(g), 0).astype(x.dtype),)


_pool2.defvjp(_pool2_fwd, _pool2_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, on NHWC: [B, H, W, C] -> [B, H/2, W/2, C].

  With even H and W the gradient is an elementwise mask (exact ties, which
  ReLU inputs only produce at 0 where the gradient vanishes anyway, would
  each receive it); odd sizes fall back to ``nn.max_pool`` semantics.
  """
  if x.ndim == 4 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
    return _pool2(x)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                           'VALID')
