"""What the benchmark sections share: interleaved timing on one device,
the matmul peak, FLOPs from XLA's cost analysis, PyTorch on JAX's device."""

import time

import jax
import numpy as np


def interleaved(fns: dict, reps: int, *, warm_up: bool = True) -> dict:
  """Seconds per call for each fn: one warm-up each, then interleaved reps.

  Each fn must return only once its work is done (``block_until_ready`` on
  the JAX side, ``torch_sync`` on the PyTorch side).
  """
  for fn in fns.values() if warm_up else ():
    fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def torch_sync(torch, device: str) -> None:
  """Waits for PyTorch's queued GPU work (eager CUDA calls are asynchronous
  like JAX's dispatch); nothing to wait for on the CPU."""
  if device == 'cuda':
    torch.cuda.synchronize()


def set_matmul_precision(torch) -> str:
  """Full float32 matmuls and convolutions on both sides (no TF32 on a GPU:
  JAX's default precision may use it, PyTorch's cuDNN convolutions do by
  default). Returns the setting, for the JSON."""
  jax.config.update('jax_default_matmul_precision', 'highest')
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  return 'float32 (TF32 off in JAX and PyTorch)'


def matmul_peak_gflops(torch, device: str) -> float:
  """Best of JAX and torch float32 1024x1024 matmul throughput, GFLOP/s."""
  a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
  mm = jax.jit(lambda a: a @ a)
  ta = torch.randn(1024, 1024, device=device)

  def torch_mm():
    ta @ ta  # pylint: disable=pointless-statement
    torch_sync(torch, device)

  times = interleaved({'jax': lambda: mm(a).block_until_ready(),
                       'torch': torch_mm}, 5)
  return 2 * 1024**3 / min(min(t) for t in times.values()) / 1e9


def flops(jitted, *args) -> float:
  """FLOPs of one call of a jitted function, from XLA's cost analysis."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def to_nchw(torch, a: np.ndarray, device: str):
  """NHWC host array -> NCHW torch tensor on ``device``."""
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(
      device)
