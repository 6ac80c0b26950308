"""Export a JAX classifier as a ``torch.nn.Module`` (for AutoAttack).

The module's forward runs the jitted JAX model; its backward runs the JAX
VJP, through a ``torch.autograd.Function``. The forward with gradients
returns the VJP's residuals from ``jit`` (``jax.vjp``'s function is a pytree),
so the backward reuses them instead of running the model again; a forward
without gradients (``torch.no_grad()``, or an input that does not require
grad) runs a cheaper forward-only program.

The torch side takes what AutoAttack feeds: NCHW float tensors in [0, 1] (a
4-D [B, 1, 28, 28] also for the MLP), and returns logits in the input dtype.
Batches are padded on the torch side to the next power of two, so
AutoAttack's shrinking batches compile at most log2(B) programs. On CPU
inputs cross as zero-copy NumPy views and the (small) outputs as copies; on
GPU both cross through DLPack without copies.

torch is imported lazily: the rest of uta_jax never needs it.

  >>> module = bridge_module(lambda v, x: model.apply(v, x), variables)
  >>> logits = module(torch.rand(8, 1, 28, 28))   # torch.Tensor [8, 10]

``native_torch_model`` builds the paper's MLP / LeNet directly in PyTorch with
the same weights, the reference the bridge is tested and benchmarked against.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[..., jax.Array]  # (variables, x_nhwc[, key]) -> logits


def require_torch():
  """Imports torch, or raises ImportError naming the extra to install."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the AutoAttack bridge needs PyTorch: pip install "
                      "torch==2.13.0 'uta-jax[torch]'") from e
  return torch


def torch_device() -> str:
  """The torch device next to JAX's: 'cuda' when JAX runs on a GPU and
  torch sees one, else 'cpu'. AutoAttack keeps its own tensors there, so its
  bookkeeping does not run on the host while the bridged model runs on the
  GPU (DLPack hands tensors across without copies)."""
  torch = require_torch()
  if jax.default_backend() == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return 'cpu'


def bucket_size(n: int) -> int:
  """The padded batch size for ``n`` examples: the next power of two."""
  return 1 << max(0, (n - 1).bit_length())


def _to_nhwc(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


class JaxPrograms:
  """The three jitted programs behind a bridged module.

  ``apply_fn(variables, x_nhwc)`` (or ``apply_fn(variables, x_nhwc, key)``
  when ``stochastic``) must return logits [B, C]. A stochastic program takes
  the call counter and derives its key inside the program (a ``fold_in``
  dispatched from Python would cost as much as a small forward pass).
  """

  def __init__(self, apply_fn: ApplyFn, *, stochastic: bool, seed: int = 0):
    if stochastic:
      def logits(variables, x_nchw, call):
        key = jax.random.fold_in(jax.random.key(seed), call)
        return apply_fn(variables, _to_nhwc(x_nchw), key)
    else:
      def logits(variables, x_nchw):
        return apply_fn(variables, _to_nhwc(x_nchw))

    self.forward = jax.jit(logits)
    self.forward_with_vjp = jax.jit(
        lambda v, x, *call: jax.vjp(lambda x_: logits(v, x_, *call), x))
    self.backward = jax.jit(lambda vjp_fn, g: vjp_fn(g)[0])


def _from_torch(tensor) -> Any:
  """A torch tensor as a jit argument: a NumPy view on CPU, DLPack on GPU.

  On CPU a DLPack-imported array leaves jit's fast dispatch path (measured
  214 us vs 93 us per MLP call), while a NumPy view costs nothing to make.
  """
  tensor = tensor.detach().contiguous()
  if tensor.device.type == 'cpu':
    return tensor.numpy()
  return jax.dlpack.from_dlpack(tensor)


def _to_torch(array: jax.Array, device):
  """A JAX result as a torch tensor: a small host copy on CPU, DLPack on GPU."""
  torch = require_torch()
  if device.type == 'cpu':
    return torch.from_numpy(np.array(array))
  return torch.from_dlpack(array)


def _pad_rows(tensor, rows: int):
  """Zero-pads the leading axis of a torch tensor up to ``rows``."""
  n = tensor.shape[0]
  if n == rows:
    return tensor
  torch = require_torch()
  pad = tensor.new_zeros((rows - n,) + tuple(tensor.shape[1:]))
  return torch.cat([tensor, pad])


def bridge_module(apply_fn: ApplyFn, variables: Any, *,
                  stochastic: bool = False, seed: int = 0):
  """A ``torch.nn.Module`` computing ``apply_fn(variables, x)`` in JAX.

  Args:
    apply_fn: ``(variables, x_nhwc) -> logits`` (eval mode), or
      ``(variables, x_nhwc, key) -> logits`` when ``stochastic``.
    variables: the model's variables (kept on the JAX side).
    stochastic: draw a new key per call (MC dropout evaluated with
      AutoAttack's ``version='rand'``); keys are ``fold_in(key(seed), i)``
      for call i.
    seed: seed of the per-call keys.
  """
  torch = require_torch()
  programs = JaxPrograms(apply_fn, stochastic=stochastic, seed=seed)
  variables = jax.device_put(variables)

  class _Bridge(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, *call):  # pylint: disable=arguments-differ
      logits, vjp_fn = programs.forward_with_vjp(variables, _from_torch(x),
                                                 *call)
      ctx.vjp_fn = vjp_fn
      return _to_torch(logits, x.device)

    @staticmethod
    def backward(ctx, g):  # pylint: disable=arguments-differ
      cotangent = _from_torch(g.to(torch.float32))
      return (_to_torch(programs.backward(ctx.vjp_fn, cotangent), g.device),
              *([None] * stochastic))

  class JaxModule(torch.nn.Module):
    """JAX model behind a torch interface: NCHW in [0, 1] -> logits."""

    def __init__(self):
      super().__init__()
      self.calls = 0

    def forward(self, x):  # pylint: disable=arguments-differ
      n, dtype = x.shape[0], x.dtype
      call = (np.uint32(self.calls),) if stochastic else ()
      self.calls += 1
      padded = _pad_rows(x.to(torch.float32), bucket_size(n))
      if torch.is_grad_enabled() and x.requires_grad:
        logits = _Bridge.apply(padded, *call)
      else:
        logits = _to_torch(programs.forward(variables, _from_torch(padded),
                                            *call), x.device)
      return logits[:n].to(dtype)

  return JaxModule().eval()


# ----------------------------------------------- native PyTorch references


def _linear(torch, dense: dict):
  layer = torch.nn.Linear(*dense['kernel'].shape)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(np.asarray(dense['kernel']).T.copy()))
    layer.bias.copy_(torch.from_numpy(np.array(dense['bias'])))
  return layer


def _conv(torch, conv: dict, padding: int):
  kernel = np.asarray(conv['kernel'])  # HWIO
  layer = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0],
                          padding=padding)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
    layer.bias.copy_(torch.from_numpy(np.array(conv['bias'])))
  return layer


def native_torch_model(name: str, params: Any, *, dropout_rate: float = 0.0):
  """The paper's MLP or LeNet written in PyTorch with the same weights.

  Dropout (active in ``train()`` mode) sits where the Flax models put it.
  Flax flattens NHWC feature maps as (h, w, c) and PyTorch NCHW ones as
  (c, h, w), so LeNet's fc1 rows are permuted accordingly.
  """
  torch = require_torch()
  nn = torch.nn
  p = jax.tree_util.tree_map(np.asarray, params)
  dense = lambda layer: p[layer]['Dense_0']
  drop = lambda: nn.Dropout(dropout_rate)
  if name == 'mlp':
    return nn.Sequential(nn.Flatten(), _linear(torch, dense('fc1')), nn.ReLU(),
                         drop(), _linear(torch, dense('fc2'))).eval()
  if name in ('lenet', 'svhn_lenet'):
    conv2 = p['conv2']['Conv_0']['kernel']
    fc1 = dict(dense('fc1'))
    side = int(round((fc1['kernel'].shape[0] / conv2.shape[3]) ** 0.5))
    fc1['kernel'] = (fc1['kernel'].reshape(side, side, conv2.shape[3], -1)
                     .transpose(2, 0, 1, 3).reshape(fc1['kernel'].shape))
    return nn.Sequential(
        _conv(torch, p['conv1']['Conv_0'], 2), nn.ReLU(), nn.MaxPool2d(2),
        _conv(torch, p['conv2']['Conv_0'], 0), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), _linear(torch, fc1), nn.ReLU(), drop(),
        _linear(torch, dense('fc2')), nn.ReLU(), drop(),
        _linear(torch, dense('fc3'))).eval()
  raise ValueError(f'no native PyTorch version of {name!r}; choose mlp, '
                   'lenet or svhn_lenet')


def resnet18_variables(state_dict: Any) -> dict:
  """Flax variables of ``models.ResNet18`` from a PyTorch CIFAR ResNet-18
  ``state_dict`` in the layout of the reference code (``conv1``, ``bn1``,
  ``layer{1-4}.{0,1}.{conv,bn}{1,2}``, ``shortcut.{0,1}``, ``linear``),
  e.g. the model shipped with ``pyautoattack``. Build the module with
  ``mean=None, std=None`` when the PyTorch model normalises nothing.
  """
  t = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v,
                     np.float32) for k, v in state_dict.items()}
  conv = lambda name: {'Conv_0': {'kernel': t[f'{name}.weight'].transpose(
      2, 3, 1, 0)}}  # OIHW -> HWIO

  def norm(name):
    return ({'scale': t[f'{name}.weight'], 'bias': t[f'{name}.bias']},
            {'mean': t[f'{name}.running_mean'],
             'var': t[f'{name}.running_var']})

  params, stats = {}, {}
  params['stem_conv'] = conv('conv1')
  params['stem_bn'], stats['stem_bn'] = norm('bn1')
  for i in range(8):
    prefix = f'layer{i // 2 + 1}.{i % 2}'
    block_params, block_stats = {}, {}
    names = [('conv1', 'bn1'), ('conv2', 'bn2')]
    if f'{prefix}.shortcut.0.weight' in t:
      names.append(('shortcut.0', 'shortcut.1'))
    for j, (c, b) in enumerate(names):
      block_params[f'TorchConv_{j}'] = conv(f'{prefix}.{c}')
      block_params[f'BatchNorm_{j}'], block_stats[f'BatchNorm_{j}'] = norm(
          f'{prefix}.{b}')
    params[f'blocks_{i}'], stats[f'blocks_{i}'] = block_params, block_stats
  params['head'] = {'Dense_0': {'kernel': t['linear.weight'].T,
                                'bias': t['linear.bias']}}
  return {'params': params, 'batch_stats': stats}
