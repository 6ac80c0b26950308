"""Section ``convs``: each 5x5 convolution of LeNet and SVHN LeNet at the
attack batch, forward and input gradient (the transposed convolution the
attack runs every step), as plain ``lax``, as ``uta_jax.fast_ops`` runs it,
and as PyTorch (``conv2d`` and ``convolution_backward``): where the CPU time
of the attacks goes, layer by layer. On a GPU ``fast_ops`` is lax (its CPU
forms are for XLA:CPU only) and PyTorch runs on the CPU: a CPU section.
"""

import statistics

import jax
import numpy as np

from benchmarks import common
from uta_jax import fast_ops

# (layer, input side, input channels, output channels, padding) at 5x5.
CONV_LAYERS = (('lenet conv1', 28, 1, 6, 2), ('lenet conv2', 14, 6, 16, 0),
               ('svhn_lenet conv1', 32, 3, 32, 2),
               ('svhn_lenet conv2', 16, 32, 64, 0))


def run(torch, opts) -> list:
  """Milliseconds per forward and input gradient of each layer: plain lax,
  fast_ops and PyTorch, interleaved."""
  fn = torch.nn.functional
  dn = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1),
                                      ('NHWC', 'HWIO', 'NHWC'))
  rng = np.random.default_rng(0)
  rows = []
  for layer, side, cin, cout, pad in CONV_LAYERS:
    x = rng.standard_normal((opts.batch_size, side, side, cin), np.float32)
    k = rng.standard_normal((5, 5, cin, cout), np.float32)
    padding = [(pad, pad)] * 2
    conv = lambda impl: jax.jit(lambda x_, k_: impl(
        x_, k_, (1, 1), padding, dimension_numbers=dn))
    plain, fast = conv(jax.lax.conv_general_dilated), conv(
        fast_ops.conv_general_dilated)
    g = rng.standard_normal(plain(x, k).shape, np.float32)
    input_grad = lambda f: jax.jit(lambda x_, k_, g_: jax.vjp(
        lambda a: f(a, k_), x_)[1](g_)[0])
    plain_grad, fast_grad = input_grad(plain), input_grad(fast)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    kt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
    gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
    torch_grad = lambda: torch.ops.aten.convolution_backward(
        gt, xt, kt, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
        [True, False, False])
    for op, fns in (
        ('forward', {'lax': lambda: plain(x, k).block_until_ready(),
                     'fast_ops': lambda: fast(x, k).block_until_ready(),
                     'torch': lambda: fn.conv2d(xt, kt, padding=pad)}),
        ('input gradient',
         {'lax': lambda: plain_grad(x, k, g).block_until_ready(),
          'fast_ops': lambda: fast_grad(x, k, g).block_until_ready(),
          'torch': torch_grad})):
      times = common.interleaved(fns, opts.reps)
      row = {'layer': layer, 'op': op, 'batch': opts.batch_size,
             **{f'{impl}_ms': 1e3 * statistics.median(t)
                for impl, t in times.items()}}
      rows.append(row)
      print(f"{layer:17s} {op:14s} lax {row['lax_ms']:7.2f} ms  fast_ops "
            f"{row['fast_ops_ms']:7.2f} ms  torch {row['torch_ms']:7.2f} ms",
            flush=True)
  return rows



def markdown(rows) -> str:
  """The README's per-layer table of the ``convs`` section."""
  lines = ['| layer | op | lax (ms) | fast_ops (ms) | PyTorch (ms) |',
           '| --- | --- | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f"| {r['layer']} | {r['op']} | {r['lax_ms']:.2f} | "
                 f"{r['fast_ops_ms']:.2f} | {r['torch_ms']:.2f} |")
  return '\n'.join(lines)


