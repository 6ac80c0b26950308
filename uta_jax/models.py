"""The paper's classifiers (App. B) as Flax linen modules.

Every model maps NHWC float images in [0, 1] to logits and splits into two
methods so that attacks can run in latent space (Eq. UTA with encoder E):

    z = model.apply(variables, x, method=model.encode)      # [B, latent_dim]
    logits = model.apply(variables, z, method=model.classify)  # [B, classes]

Two switches control randomness and statistics separately:

* ``train``: BatchNorm uses batch statistics (and updates ``batch_stats``).
* ``mc_dropout``: dropout is active outside training, for MC-dropout samples.
  Dropout is active when ``train or mc_dropout``; it needs a ``'dropout'`` rng.

Weights use PyTorch's default initialisation (uniform in +-1/sqrt(fan_in)),
as the paper states. Any input normalisation lives inside the model.

Example:

  >>> model = LeNet()
  >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  >>> model.apply(variables, jnp.zeros((4, 28, 28, 1))).shape
  (4, 10)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uta_jax import fast_ops

# CIFAR-10 channel statistics, used by ResNet-18's built-in normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def torch_default_kernel_init() -> Callable[..., jax.Array]:
  """PyTorch's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  # kaiming_uniform(a=sqrt(5)) == variance_scaling(1/3, fan_in, uniform).
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchDense(nn.Module):
  """`nn.Dense` with PyTorch's default initialisation of kernel and bias."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(
        self.features,
        kernel_init=torch_default_kernel_init(),
        bias_init=torch_default_bias_init(x.shape[-1]),
    )(x)


class TorchConv(nn.Module):
  """`nn.Conv` (NHWC) with PyTorch's default initialisation.

  ``pool``: a 2x2 max-pool of the convolution before its bias is added
  (``fast_ops.conv_max_pool_2x2``). Max-pooling commutes exactly with a
  per-channel bias and a ReLU (both monotone, float rounding too), so
  ``relu(TorchConv(pool=True)(x))`` is ``max_pool(relu(TorchConv()(x)))``
  with the same parameters, computed faster on the CPU.
  """
  features: int
  kernel_size: int
  padding: int = 0
  stride: int = 1
  use_bias: bool = True
  pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1] * self.kernel_size**2
    return nn.Conv(
        self.features,
        (self.kernel_size, self.kernel_size),
        strides=(self.stride, self.stride),
        padding=[(self.padding, self.padding)] * 2,
        use_bias=self.use_bias,
        kernel_init=torch_default_kernel_init(),
        bias_init=torch_default_bias_init(fan_in),
        # lax's on GPUs and TPUs; on the CPU its fastest form (fast_ops).
        conv_general_dilated=(fast_ops.conv_max_pool_2x2 if self.pool else
                              fast_ops.conv_general_dilated),
    )(x)


def _normalise(x: jax.Array, mean: Optional[Sequence[float]],
               std: Optional[Sequence[float]]) -> jax.Array:
  if mean is None:
    return x
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


class MLP(nn.Module):
  """MNIST MLP (App. B.1.1): flatten, 784 -> 256, ReLU, 256 -> 10.

  ``encode`` is the hidden layer (z of size 256), ``classify`` the last layer.
  """
  num_classes: int = 10
  hidden: int = 256
  dropout_rate: float = 0.0

  def setup(self):
    self.fc1 = TorchDense(self.hidden)
    self.fc2 = TorchDense(self.num_classes)
    self.drop = nn.Dropout(self.dropout_rate)

  def encode(self, x, *, train: bool = False, mc_dropout: bool = False):
    x = x.reshape((x.shape[0], -1))  # [B, H*W*C]
    return nn.relu(self.fc1(x))  # [B, hidden]

  def classify(self, z, *, train: bool = False, mc_dropout: bool = False):
    z = self.drop(z, deterministic=not (train or mc_dropout))
    return self.fc2(z)  # [B, classes]

  def __call__(self, x, *, train: bool = False, mc_dropout: bool = False):
    z = self.encode(x, train=train, mc_dropout=mc_dropout)
    return self.classify(z, train=train, mc_dropout=mc_dropout)


class LeNet(nn.Module):
  """LeNet of Table 3 (Fashion-MNIST) and, with wider layers, Table 4 (SVHN).

  conv5(pad 2) -> ReLU -> pool2 -> conv5 -> ReLU -> pool2 -> flatten ->
  fc1 -> ReLU -> fc2 -> ReLU -> fc3. ``encode`` is the convolutions plus fc1
  (z of size ``fc_features[0]``, 120 for Table 3), ``classify`` the last two
  layers, as in §5.2. Optional dropout (``dropout_rate``) sits after each
  hidden fc layer so MC-dropout UTA works on this model too.
  """
  num_classes: int = 10
  conv_features: Sequence[int] = (6, 16)
  fc_features: Sequence[int] = (120, 84)
  dropout_rate: float = 0.0

  def setup(self):
    # Each convolution with its 2x2 max-pool (before the bias and ReLU).
    self.conv1 = TorchConv(self.conv_features[0], kernel_size=5, padding=2,
                           pool=True)
    self.conv2 = TorchConv(self.conv_features[1], kernel_size=5, pool=True)
    self.fc1 = TorchDense(self.fc_features[0])
    self.fc2 = TorchDense(self.fc_features[1])
    self.fc3 = TorchDense(self.num_classes)
    self.drop = nn.Dropout(self.dropout_rate)

  def encode(self, x, *, train: bool = False, mc_dropout: bool = False):
    x = nn.relu(self.conv1(x))  # conv, pool: [B, H/2, W/2, c1]
    x = nn.relu(self.conv2(x))  # [B, (H/2-4)/2, (W/2-4)/2, c2]
    x = x.reshape((x.shape[0], -1))
    return nn.relu(self.fc1(x))  # [B, fc_features[0]]

  def classify(self, z, *, train: bool = False, mc_dropout: bool = False):
    deterministic = not (train or mc_dropout)
    z = self.drop(z, deterministic=deterministic)
    z = self.drop(nn.relu(self.fc2(z)), deterministic=deterministic)
    return self.fc3(z)  # [B, classes]

  def __call__(self, x, *, train: bool = False, mc_dropout: bool = False):
    z = self.encode(x, train=train, mc_dropout=mc_dropout)
    return self.classify(z, train=train, mc_dropout=mc_dropout)


def svhn_lenet(**kwargs: Any) -> LeNet:
  """The wider LeNet of Table 4 for 32x32x3 inputs (fc1 is 64*6*6 -> 256)."""
  return LeNet(conv_features=(32, 64), fc_features=(256, 120), **kwargs)


class BasicBlock(nn.Module):
  """ResNet basic block with MC-dropout after each conv block (Table 5)."""
  features: int
  stride: int
  dropout_rate: float
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool, mc_dropout: bool):
    deterministic = not (train or mc_dropout)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                axis_name=self.bn_axis_name)
    y = TorchConv(self.features, 3, padding=1, stride=self.stride,
                  use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = TorchConv(self.features, 3, padding=1, use_bias=False)(y)
    y = norm()(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = TorchConv(self.features, 1, stride=self.stride, use_bias=False)(x)
      x = norm()(x)
    y = nn.relu(y + x)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class ResNet18(nn.Module):
  """ResNet-18 for CIFAR-10 (Table 5) with MC-dropout p = 0.2 and BatchNorm.

  3x3 stem (no max-pool), four stages of two basic blocks (64, 128, 256, 512
  channels), global average pooling. ``encode`` returns the pooled features
  (z of size 512), ``classify`` the final linear layer. Inputs are normalised
  with the CIFAR-10 channel statistics inside the model.

  ``bn_axis_name``: in training, BatchNorm statistics over that mapped axis
  too, i.e. over the global batch of a data-parallel step (the train step
  sets it), so the result does not depend on the number of devices.
  ``base_width`` (64) and ``stage_sizes`` shrink it for tests.
  """
  num_classes: int = 10
  dropout_rate: float = 0.2
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  mean: Optional[Sequence[float]] = CIFAR10_MEAN
  std: Optional[Sequence[float]] = CIFAR10_STD
  bn_axis_name: Optional[str] = None
  base_width: int = 64

  def setup(self):
    self.stem_conv = TorchConv(self.base_width, 3, padding=1, use_bias=False)
    self.stem_bn = nn.BatchNorm(momentum=0.9, axis_name=self.bn_axis_name)
    self.drop = nn.Dropout(self.dropout_rate)
    self.blocks = [
        BasicBlock(self.base_width * 2**stage,
                   2 if stage > 0 and block == 0 else 1, self.dropout_rate,
                   self.bn_axis_name)
        for stage, num_blocks in enumerate(self.stage_sizes)
        for block in range(num_blocks)
    ]
    self.head = TorchDense(self.num_classes)

  def encode(self, x, *, train: bool = False, mc_dropout: bool = False):
    x = _normalise(x, self.mean, self.std)
    x = self.stem_bn(self.stem_conv(x), use_running_average=not train)
    x = self.drop(nn.relu(x), deterministic=not (train or mc_dropout))
    for block in self.blocks:
      x = block(x, train=train, mc_dropout=mc_dropout)
    return jnp.mean(x, axis=(1, 2))  # [B, 512]

  def classify(self, z, *, train: bool = False, mc_dropout: bool = False):
    return self.head(z)  # [B, classes]

  def __call__(self, x, *, train: bool = False, mc_dropout: bool = False):
    z = self.encode(x, train=train, mc_dropout=mc_dropout)
    return self.classify(z, train=train, mc_dropout=mc_dropout)


# name -> (constructor, input shape [H, W, C]) of the paper's models.
MODELS = {
    'mlp': (MLP, (28, 28, 1)),
    'lenet': (LeNet, (28, 28, 1)),
    'svhn_lenet': (svhn_lenet, (32, 32, 3)),
    'resnet18': (ResNet18, (32, 32, 3)),
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered model by name; ``kwargs`` go to its constructor."""
  if name not in MODELS:
    raise ValueError(
        f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  return MODELS[name][0](**kwargs)


def init_variables(model: nn.Module, key: jax.Array,
                   input_shape: Sequence[int]) -> dict:
  """Initialises ``{'params': ..., ['batch_stats': ...]}`` for [1, *input_shape]."""
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
