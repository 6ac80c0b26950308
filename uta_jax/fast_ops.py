"""Convolution and 2x2 max-pool: XLA:CPU-fast forms on CPUs, lax elsewhere.

The models call ``conv_general_dilated``, ``max_pool_2x2`` and
``conv_max_pool_2x2``. Each picks its form when the program is lowered
(``lax.platform_dependent``): for the CPU the forms below, measured to win
on XLA:CPU; for every other platform
(cuDNN on GPUs, TPUs) plain ``lax.conv_general_dilated`` and the
``reduce_window`` max-pool, which the CPU forms made ResNet-18's train step
2.1x slower on an H200. A program lowered for a GPU or TPU holds no CPU
form (tested by exporting for them); the CPU forms run under the named
scope ``CPU_SCOPE``, so a lowered program shows whether it holds any.

Attacks differentiate the model with respect to its input K times inside a
``lax.fori_loop``. On XLA's CPU backend two parts of that gradient are slow:

* the input gradient of a convolution (a transposed convolution): inside a
  while loop XLA lowers it with the kernel in a layout that misses its fast
  convolution path, about 2x slower than the same step outside the loop;
* the gradient of max-pooling (``select_and_scatter_add``), a scalar loop.

On the CPU, for stride-1, undilated, ungrouped convolutions the input
gradient is an ordinary forward convolution of the cotangent with the
explicitly flipped and transposed kernel, and the 2x2 max-pool pools
non-overlapping windows by a reshape and routes the gradient to each
window's first maximum, as ``select_and_scatter_add`` does, with an
elementwise mask that XLA fuses. Forward values are identical and
gradients equal up to float rounding (tested, ties included); anything
else falls back to ``lax``.

XLA:CPU's convolution is also slow with few channels (measured per layer
with ``python experiments/benchmark.py --sections=convs``). For NHWC/HWIO
stride-1 convolutions the forward and the input gradient therefore take
the fastest of three forms:

* few input channels (``FEW_CHANNELS``: grey or RGB first layers): a sum of
  shifted inputs times kernel entries, one fused elementwise loop (LeNet's
  first layer ~15x faster than the convolution). Being a cheap fused
  loop, XLA also recomputes it inside each consumer of its output (the
  pool and the ReLU's gradient masks) instead of reading it; an RGB
  layer's forward (75 products per output) is therefore one matmul of
  im2col patches, whose output XLA stores once (slower alone, but SVHN
  LeNet's AT step 1.4x faster than with shifted products);
* one output channel (the input gradient of a grey first layer): one
  matmul per input position for every tap, then a sum of shifted planes;
* otherwise XLA's convolution; in the forward pass over batch chunks of
  ``CHUNK_EXAMPLES``, which XLA runs faster than one (SVHN LeNet's second
  layer ~2.5x; LeNet's unchanged).

The kernel gradient (training only) is autodiff's, summed over the same
chunks (1.1-1.5x faster than over the whole batch).

A grey layer followed by a 2x2 max-pool (LeNet's first) is one op,
``conv_max_pool_2x2``: pooling the shifted products, XLA fused them into
the pool's strided reads and ran the pair 8x slower than either alone, so
the CPU form computes the convolution at the four phases of the pool
windows (contiguous slices of the even and odd rows and columns) and takes
their maximum: LeNet's forward pass 6x faster, Square's query 5x.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def _is_plain_stride1(window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count,
                      batch_group_count, precision,
                      preferred_element_type) -> bool:
  """A ``conv_general_dilated`` call that the CPU forms compute: stride 1,
  explicit padding, no dilation, groups, precision or output type."""
  del dimension_numbers  # each form checks the layout it needs
  ones = lambda v: v is None or all(d == 1 for d in v)
  return (all(s == 1 for s in window_strides) and ones(lhs_dilation) and
          ones(rhs_dilation) and feature_group_count == 1 and
          batch_group_count == 1 and not isinstance(padding, str) and
          precision is None and preferred_element_type is None)


CPU_SCOPE = 'fast_ops_cpu'  # named scope of the CPU forms in a program
FEW_CHANNELS = 3  # input channels up to which shifted products win
CHUNK_EXAMPLES = 32  # batch chunk of the remaining forward convolutions
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _lax_conv(lhs, rhs, padding, dimension_numbers):
  return lax.conv_general_dilated(lhs, rhs, (1,) * len(padding), padding,
                                  dimension_numbers=dimension_numbers)


def _padded(lhs: jax.Array, kernel_hw: Tuple[int, int],
            padding) -> Tuple[jax.Array, int, int]:
  """The zero-padded input [B, H + pads, W + pads, C] and the output height
  and width H', W' of a stride-1 kernel of ``kernel_hw`` over it."""
  x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  return x, x.shape[1] - kernel_hw[0] + 1, x.shape[2] - kernel_hw[1] + 1


def _shifted_windows(lhs: jax.Array, kernel_hw: Tuple[int, int],
                     padding) -> list:
  """The kh * kw views of the padded input a stride-1 kernel sees:
  [B, H, W, C] -> kh * kw arrays [B, H', W', C], row-major over the taps."""
  kh, kw = kernel_hw
  x, h, w = _padded(lhs, kernel_hw, padding)
  return [x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]


def _sum_of_taps(windows: list, rhs: jax.Array) -> jax.Array:
  """Sum over taps (row-major) and input channels of each tap's window
  [B, H', W', I] times its kernel entries [I, O]: [B, H', W', O]."""
  kw, cin = rhs.shape[1], rhs.shape[2]
  out = None
  for tap, window in enumerate(windows):
    for c in range(cin):
      term = window[..., c:c + 1] * rhs[tap // kw, tap % kw, c]
      out = term if out is None else out + term
  return out


def _shifted_products(lhs: jax.Array, rhs: jax.Array, padding) -> jax.Array:
  """NHWC/HWIO convolution as a sum of shifted inputs times kernel entries:
  [B, H, W, I] x [kh, kw, I, O] -> [B, H', W', O], one fused loop."""
  return _sum_of_taps(_shifted_windows(lhs, rhs.shape[:2], padding), rhs)


def _patch_products(lhs: jax.Array, rhs: jax.Array, padding) -> jax.Array:
  """NHWC/HWIO convolution as one matmul of im2col patches:
  [B, H, W, I] x [kh, kw, I, O] -> [B, H', W', O].

  ``patches[b, y, x]`` is the padded input window at (y, x) flattened in
  ``rhs``'s (kh, kw, I) order, [B, H', W', kh * kw * I], built by two
  concatenations of at most ``max(kh, kw)`` shifted slices each (XLA fuses
  both into one loop; one concatenation of all kh * kw windows, too many
  operands for XLA:CPU to fuse, was slower).
  """
  kh, kw, cin, cout = rhs.shape
  x, h, w = _padded(lhs, (kh, kw), padding)
  rows = jnp.concatenate([x[:, :, j:j + w, :] for j in range(kw)],
                         axis=-1)  # [B, H + pads, W', kw * I]
  patches = jnp.concatenate([rows[:, i:i + h] for i in range(kh)], axis=-1)
  return jnp.einsum('bhwk,ko->bhwo', patches,
                    rhs.reshape(kh * kw * cin, cout))


def _tap_products(lhs: jax.Array, rhs: jax.Array, padding) -> jax.Array:
  """NHWC/HWIO convolution as one matmul and a sum of shifted planes:
  [B, H, W, I] x [kh, kw, I, O] -> [B, H', W', O].

  ``taps[b, u, v, t] = lhs[b, u, v] @ rhs[t]`` ([B, H, W, T, O]: one
  matmul at the input positions, no padding zeros multiplied); output
  position (y, x) sums tap t = (i, j) of padded input position (y + i,
  x + j), i.e. T shifted planes of the padded taps, one fused loop.
  """
  kh, kw, cin, cout = rhs.shape
  b, h, w, _ = lhs.shape
  (top, bottom), (left, right) = padding
  out_h, out_w = h + top + bottom - kh + 1, w + left + right - kw + 1
  taps = jnp.einsum('bhwi,tio->bhwto', lhs,
                    rhs.reshape(kh * kw, cin, cout))  # [B, H, W, T, O]
  # Padded like the input, row y + i of ``taps`` feeds output row y.
  taps = jnp.pad(taps, ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0)))
  out = 0
  for i in range(kh):
    for j in range(kw):
      # [B, H', W' * O]: a wide last axis keeps XLA's loop vectorised.
      out = out + taps[:, i:i + out_h, j:j + out_w, i * kw + j].reshape(
          b, out_h, out_w * cout)
  return out.reshape(b, out_h, out_w, cout)


def _chunks(x: jax.Array) -> Optional[list]:
  """``x`` split over its batch into chunks of ``CHUNK_EXAMPLES``, or None
  when the batch is not a multiple of several chunks."""
  b = x.shape[0]
  if b % CHUNK_EXAMPLES or b < 2 * CHUNK_EXAMPLES:
    return None
  return jnp.split(x, b // CHUNK_EXAMPLES)


def _forward(lhs, rhs, padding, dimension_numbers, *,
             primal: bool) -> jax.Array:
  """A stride-1 convolution in the fastest of its CPU forms (measured);
  ``primal``: the layer's own forward, else its input gradient."""
  if dimension_numbers != _NHWC or min(min(pair) for pair in padding) < 0:
    return _lax_conv(lhs, rhs, padding, dimension_numbers)
  if rhs.shape[2] <= FEW_CHANNELS:
    if primal and rhs.shape[2] > 1:
      return _patch_products(lhs, rhs, padding)
    return _shifted_products(lhs, rhs, padding)
  if rhs.shape[3] == 1:  # with 3 or more outputs XLA's conv is faster
    return _tap_products(lhs, rhs, padding)
  chunks = _chunks(lhs) if primal else None
  if chunks is None:
    return _lax_conv(lhs, rhs, padding, dimension_numbers)
  return jnp.concatenate(
      [_lax_conv(c, rhs, padding, dimension_numbers) for c in chunks])


def _kernel_gradient(lhs, rhs, padding, dimension_numbers, g) -> jax.Array:
  """d rhs of a stride-1 convolution with cotangent ``g``: [kh, kw, I, O]."""
  vjp = lambda x, gx: jax.vjp(
      lambda r: _lax_conv(x, r, padding, dimension_numbers), rhs)[1](gx)[0]
  chunks = _chunks(lhs) if dimension_numbers == _NHWC else None
  if chunks is None:
    return vjp(lhs, g)
  return sum(vjp(x, gx) for x, gx in zip(chunks, jnp.split(g, len(chunks))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_stride1(lhs: jax.Array, rhs: jax.Array,
                  padding: Tuple[Tuple[int, int], ...],
                  dimension_numbers: lax.ConvDimensionNumbers) -> jax.Array:
  return _forward(lhs, rhs, padding, dimension_numbers, primal=True)


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
  d_lhs = _forward(g, transposed, back_padding, dimension_numbers,
                   primal=False)
  # d rhs: only needed for training (pruned from attacks).
  d_rhs = _kernel_gradient(lhs, rhs, padding, dimension_numbers, g)
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """Drop-in ``lax.conv_general_dilated``: on the CPU, a stride-1
  convolution takes its fastest measured form; elsewhere it is lax's."""
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if not _is_plain_stride1(window_strides, padding, lhs_dilation,
                           rhs_dilation, dimension_numbers,
                           feature_group_count, batch_group_count, precision,
                           preferred_element_type):
    return plain(lhs, rhs)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)

  def cpu(lhs, rhs):
    with jax.named_scope(CPU_SCOPE):
      return _conv_stride1(lhs, rhs, pads, dn)

  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=plain)


def _windows2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, 2, W/2, 2, C]: the windows of a 2x2 pool."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _window_position(shape, dtype) -> jax.Array:
  """Row-major position 0..3 of each element of windows of ``shape``
  [B, H/2, 2, W/2, 2, C] inside its 2x2 window."""
  return (2 * lax.broadcasted_iota(dtype, shape, 2) +
          lax.broadcasted_iota(dtype, shape, 4))


def _expand(a: jax.Array) -> jax.Array:
  """[B, H/2, W/2, C] -> [B, H/2, 1, W/2, 1, C], broadcast over windows."""
  return a[:, :, None, :, None, :]


@jax.custom_vjp
def _pool2(x: jax.Array) -> jax.Array:
  return _windows2(x).max(axis=(2, 4))


def _pool2_fwd(x):
  windows = _windows2(x)
  y = windows.max(axis=(2, 4))
  # Position of the first maximum of each window, [B, H/2, W/2, C]: where
  # autodiff's select_and_scatter_add sends the whole gradient, ties too.
  position = _window_position(windows.shape, x.dtype)
  first = jnp.where(windows == _expand(y), position, 4).min(axis=(2, 4))
  return y, first


def _pool2_bwd(first, g):
  # An elementwise mask, fused into the consumer. It reads only pooled
  # arrays: a mask read from the pooled input made XLA recompute the fused
  # convolution below it inside the consumer.
  b, h, w, c = first.shape
  windows = (b, h, 2, w, 2, c)
  grad = jnp.where(_window_position(windows, g.dtype) == _expand(first),
                   _expand(g), jnp.zeros((), g.dtype))
  return (grad.reshape(b, 2 * h, 2 * w, c),)


_pool2.defvjp(_pool2_fwd, _pool2_bwd)


def _reduce_window_pool(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (2, 2), strides=(2, 2))``: XLA's own 2x2 max-pool,
  its gradient ``select_and_scatter_add`` (cuDNN and TPU kernels)."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                           'VALID')


def _phase_products(lhs: jax.Array, rhs: jax.Array, padding) -> list:
  """A stride-1 NHWC/HWIO convolution at the four phases of its 2x2 pool
  windows: [B, H, W, I] x [kh, kw, I, O] -> 4 arrays [B, H'/2, W'/2, O],
  phase 2a + b holding output (2i + a, 2j + b); H', W' even.

  Shifted products as ``_shifted_products`` (the same taps in the same
  order), each read from a contiguous slice of the input split into its
  even and odd rows and columns: one fused loop per phase that XLA never
  recomputes inside a consumer (pooling the full-size output, XLA fused the
  products into the pool's strided reads and ran LeNet's first layer with
  its pool 8x slower than either alone).
  """
  kh, kw, cin, _ = rhs.shape
  x, h, w = _padded(lhs, (kh, kw), padding)
  batch, hp, wp, _ = x.shape
  x = jnp.pad(x, ((0, 0), (0, hp % 2), (0, wp % 2), (0, 0)))
  split = x.reshape(batch, (hp + 1) // 2, 2, (wp + 1) // 2, 2, cin)

  def rows_cols(r, c):  # x[:, r + 2i, c + 2j] for i < H'/2, j < W'/2
    return split[:, r // 2:r // 2 + h // 2, r % 2, c // 2:c // 2 + w // 2,
                 c % 2]

  return [_sum_of_taps([rows_cols(a + i, b + j) for i in range(kh)
                        for j in range(kw)], rhs)
          for a in range(2) for b in range(2)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_pool_phases(lhs, rhs, padding, dimension_numbers):
  phases = _phase_products(lhs, rhs, padding)
  return functools.reduce(jnp.maximum, phases)


def _conv_pool_phases_fwd(lhs, rhs, padding, dimension_numbers):
  phases = _phase_products(lhs, rhs, padding)
  y = functools.reduce(jnp.maximum, phases)
  # The first phase holding the maximum: the row-major first maximum of the
  # window, where ``_pool2``'s gradient goes (``_window_position`` order).
  first = jnp.full(y.shape, 4, jnp.int32)
  for position in reversed(range(4)):
    first = jnp.where(phases[position] == y, position, first)
  return y, (lhs, rhs, first.astype(lhs.dtype))


def _conv_pool_phases_bwd(padding, dimension_numbers, residuals, g):
  lhs, rhs, first = residuals
  (d_conv,) = _pool2_bwd(first, g)
  return _conv_stride1_bwd(padding, dimension_numbers, (lhs, rhs), d_conv)


_conv_pool_phases.defvjp(_conv_pool_phases_fwd, _conv_pool_phases_bwd)


def conv_max_pool_2x2(lhs: jax.Array, rhs: jax.Array,
                      window_strides: Sequence[int], padding: Any,
                      lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count: int = 1,
                      batch_group_count: int = 1, precision=None,
                      preferred_element_type=None) -> jax.Array:
  """``max_pool_2x2(conv_general_dilated(lhs, rhs, ...))``: [B, H, W, I] ->
  [B, H'/2, W'/2, O], a drop-in ``conv_general_dilated`` for ``nn.Conv``.

  On the CPU a one-channel stride-1 NHWC convolution with even output sizes
  is computed at its pool windows' four phases (``_phase_products``) and
  maximised: LeNet's forward pass ~6x faster on 2 cores. Values equal the
  composition's up to float rounding, gradients go to each window's first
  maximum as ``max_pool_2x2``'s (ties included); elsewhere (GPUs, TPUs,
  other convolutions) it is the composition.
  """
  args = (window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count,
          precision, preferred_element_type)
  composed = lambda lhs, rhs: max_pool_2x2(conv_general_dilated(lhs, rhs,
                                                                *args))
  if not _is_plain_stride1(*args):
    return composed(lhs, rhs)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  out_hw = [lhs.shape[1 + a] + sum(pads[a]) - rhs.shape[a] + 1
            for a in range(2)]
  # Grey layers only: an RGB layer's patch matmul and pool were faster.
  if (dn != _NHWC or rhs.shape[2] != 1 or
      min(min(pair) for pair in pads) < 0 or out_hw[0] % 2 or out_hw[1] % 2):
    return composed(lhs, rhs)

  def cpu(lhs, rhs):
    with jax.named_scope(CPU_SCOPE):
      return _conv_pool_phases(lhs, rhs, pads, dn)

  def default(lhs, rhs):
    return _reduce_window_pool(lax.conv_general_dilated(lhs, rhs, *args))

  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=default)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, on NHWC: [B, H, W, C] -> [B, H/2, W/2, C].

  Values and gradients equal ``nn.max_pool``'s: the gradient of each window
  goes to its first maximum in row-major order, also on ties (a blank image
  region gives a ReLU layer equal positive values). On the CPU, with even H
  and W, the gradient is an elementwise mask instead of XLA's scalar
  ``select_and_scatter_add`` loop; elsewhere, and for odd sizes, it is
  ``lax.reduce_window``'s.
  """
  if not (x.ndim == 4 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0):
    return _reduce_window_pool(x)

  def cpu(x):
    with jax.named_scope(CPU_SCOPE):
      return _pool2(x)

  return lax.platform_dependent(x, cpu=cpu, default=_reduce_window_pool)
