"""Helpers the tests share: paths, subprocess runs of the scripts, data.

Imported after ``conftest`` has set XLA_FLAGS (4 fake CPU devices), which
the scripts run here as subprocesses inherit.
"""

import glob
import importlib
import json
import os
import struct
import subprocess
import sys
import time
import unittest

import jax
import jax.numpy as jnp
import numpy as np

from uta_jax import checkpointing
from uta_jax import classifier
from uta_jax import configs
from uta_jax import data
from uta_jax import runs
from uta_jax import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'experiments', 'train.py')
QUICK = ['--max_train_examples=512', '--max_eval_examples=64',
         '--batch_size=32', '--eval_pgd_restarts=2', '--eval_pgd_steps=5',
         '--eval_eps=0.1,0.2', '--eps_train=0.1', '--log_every=4']


def train_command(workdir, *args):
  return [sys.executable, TRAIN, f'--workdir={workdir}', *QUICK, *args]


# Optional dependency -> the extra (or package) that installs it.
OPTIONAL = {
    'torch': "pip install torch==2.13.0 'uta-jax[torch]'",
    'pyautoattack': "pip install 'uta-jax[torch]'",
    'tensorflow_datasets': "pip install 'uta-jax[tfds]'",
}


def require(module: str):
  """``module`` imported, or the test skipped naming how to install it
  (CI installs every extra, so there nothing is skipped)."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise unittest.SkipTest(
        f'needs {module}: {OPTIONAL[module.split(".")[0]]}') from None


def run_train(workdir, *args, env=None, timeout=300):
  return subprocess.run(train_command(workdir, *args), capture_output=True,
                        text=True, timeout=timeout, env=env)


def final_state(workdir, overrides=None):
  """The newest valid checkpoint of a quick MNIST-MLP run in ``workdir``
  (``overrides``: the run's settings other than the preset's)."""
  config = configs.get_config('mnist_embedded', overrides)
  model = classifier.create_model(config)
  tx = steps.make_optimizer(config, 1)
  target = jax.device_get(steps.create_train_state(config, model, tx,
                                                   (28, 28, 1)))
  ck = checkpointing.Checkpointer(os.path.join(workdir, runs.CHECKPOINTS))
  state, step = ck.restore_latest(target)
  ck.close()
  return state, step


def wait_for_checkpoint(workdir, proc, min_step=1, timeout=120):
  """Polls checksums.json until a step >= ``min_step`` is recorded."""
  path = os.path.join(workdir, runs.CHECKPOINTS, checkpointing.CHECKSUMS)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    try:
      with open(path) as f:
        if any(int(s) >= min_step for s in json.load(f)):
          return
    except (OSError, ValueError):
      pass
    time.sleep(0.005)
  raise AssertionError(f'no checkpoint >= {min_step} before the run ended')


def run_script(name, *args, timeout=600):
  """``python experiments/<name>.py args`` from the repository root."""
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', f'{name}.py'),
       *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def synthetic_images(num: int, *, seed: int, shape=(28, 28, 1),
                     num_classes: int = 10):
  """Learnable images: a fixed random prototype per class plus noise, in [0, 1]."""
  prototypes = np.random.default_rng(1234).uniform(
      size=(num_classes, *shape)).astype(np.float32)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=num)
  noise = rng.normal(scale=0.3, size=(num, *shape)).astype(np.float32)
  images = np.clip(prototypes[labels] + noise, 0.0, 1.0)
  return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def tensorboard_scalars(path):
  """(tag, step, value) of an event file, or of every event file in a
  folder, read as TFRecords (no TensorFlow)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    return [s for f in sorted(glob.glob(os.path.join(
        path, 'events.out.tfevents.*'))) for s in tensorboard_scalars(f)]
  out = []
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    payload = data[offset + 12:offset + 12 + length]
    offset += 12 + length + 4  # length, its crc, the record, its crc
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      out.append((value.tag, event.step, round(value.simple_value, 6)))
  return out


def trained_mlp(num_test: int):
  """(model, variables, jitted logits_fn, test split of ``num_test``
  points): the embedded-MNIST MLP after 60 clean steps, for attack tests."""
  config = configs.get_config('mnist_embedded', {'attack.name': 'none'})
  ds = data.load_dataset('mnist_embedded', max_eval_examples=num_test)
  model, variables = steps.fit(config, ds.train, num_steps=60)
  logits_fn = jax.jit(lambda x: classifier.predict_logits(
      model, variables, x, ensemble=False))
  return model, variables, logits_fn, ds.test
