"""Tests of uta_jax.data on real offline images, IDX files and TFDS mocks."""

import gzip
import os
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from uta_jax import data

from testutil import require  # pylint: disable=g-bad-import-order


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_idx_folder(folder, n_train=20, n_test=10):
  rng = np.random.default_rng(0)
  for split, n in (('train', n_train), ('test', n_test)):
    images_stem, labels_stem = data.IDX_FILES[split]
    write_idx(os.path.join(folder, images_stem + '.gz'),
              rng.integers(0, 256, (n, 28, 28)))
    write_idx(os.path.join(folder, labels_stem),
              rng.integers(0, 10, (n,)))


class RealDataTest(absltest.TestCase):

  def test_embedded_mnist_is_real_and_stratified(self):
    ds = data.load_dataset('mnist_embedded')
    self.assertEqual(ds.input_shape, (28, 28, 1))
    self.assertEqual(ds.train.images.dtype, np.uint8)
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [100] * 10)
    # Real digits: mostly black background, bright strokes, centred ink.
    images = ds.train.images.astype(np.float32) / 255
    self.assertBetween(float(images.mean()), 0.08, 0.2)
    self.assertEqual(int(ds.train.images.max()), 255)
    ink = images.mean(axis=(0, 3))
    self.assertGreater(ink[10:18, 10:18].mean(), 5 * ink[:3, :].mean())

  def test_debian_fashion_mnist_idx_files(self):
    self.assertTrue(
        data.idx_folder_has(data.DEBIAN_FASHION_MNIST),
        'real-data test needs: apt-get install dataset-fashion-mnist')
    ds = data.load_dataset('fashion_mnist')
    self.assertIn('IDX', ds.source)
    self.assertEqual(ds.train.images.shape, (60000, 28, 28, 1))
    self.assertEqual(ds.test.images.shape, (10000, 28, 28, 1))
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)

  def test_max_examples(self):
    ds = data.load_dataset('mnist_embedded', max_train_examples=100,
                           max_eval_examples=7)
    self.assertLen(ds.train, 100)
    self.assertLen(ds.test, 7)
    # Prefixes of the embedded set mix the classes.
    self.assertGreater(len(set(ds.train.labels.tolist())), 5)


class IdxTest(absltest.TestCase):

  def test_check_available_names_the_source_without_reading_it(self):
    folder = self.create_tempdir().full_path
    write_idx_folder(folder)
    self.assertEqual(data.check_available('mnist_embedded'), 'built in')
    self.assertEqual(data.check_available('mnist', folder), f'IDX {folder}')
    with self.assertRaisesRegex(data.DataError, 'unknown dataset'):
      data.check_available('imagenet')
    with self.assertRaisesRegex(data.DataError, 'not a readable folder'):
      data.check_available('mnist', os.path.join(folder, 'missing'))
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(data.DataError, 'svhn_cropped is not '
                                'prepared'):
      data.check_available('svhn', empty)

  def test_idx_folder_via_data_dir(self):
    folder = self.create_tempdir().full_path
    write_idx_folder(folder)
    ds = data.load_dataset('mnist', data_dir=folder)
    self.assertEqual(ds.train.images.shape, (20, 28, 28, 1))
    self.assertEqual(ds.test.labels.shape, (10,))
    self.assertEqual(ds.test.labels.dtype, np.int32)

  def test_truncated_and_foreign_files_are_clear_errors(self):
    folder = self.create_tempdir().full_path
    path = os.path.join(folder, 'x')
    with open(path, 'wb') as f:
      f.write(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with self.assertRaisesRegex(data.DataError, 'truncated'):
      data.read_idx(path)
    with open(path, 'wb') as f:
      f.write(b'PK\x03\x04 not idx')
    with self.assertRaisesRegex(data.DataError, 'not an IDX'):
      data.read_idx(path)


class TfdsTest(parameterized.TestCase):

  @parameterized.parameters('svhn', 'cifar10')
  def test_tfds_path_with_tfds_mock_data(self, name):
    tfds = require('tensorflow_datasets')
    # mock_data points builders at a folder that does not exist, so the
    # prepared-check would refuse; the mock itself stands for prepared data.
    with tfds.testing.mock_data(num_examples=24), mock.patch.object(
        tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
      ds = data.load_dataset(name)
    self.assertEqual(ds.source, f'tfds {data.TFDS_NAMES[name]}, release '
                     'order (by example id)')
    self.assertEqual(ds.train.images.shape, (24, 32, 32, 3))
    self.assertEqual(ds.train.images.dtype, np.uint8)
    self.assertEqual(ds.test.labels.dtype, np.int32)
    batch = data.get_batch(ds.train, np.arange(8))
    self.assertEqual(batch['image'].dtype, np.float32)
    self.assertTrue(0 <= batch['image'].min() and batch['image'].max() <= 1)

  @parameterized.parameters('svhn', 'cifar10')
  @pytest.mark.slow  # TFDS mock data prepared for two datasets
  def test_test_points_come_in_release_order(self, name):
    # --max_eval_examples=N must mean the first N of the original release,
    # not of TFDS's prepared (hash-shuffled) order.
    tfds = require('tensorflow_datasets')
    with tfds.testing.mock_data(num_examples=24), mock.patch.object(
        tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
      ds = data.load_dataset(name, max_eval_examples=10)
      prepared = list(tfds.as_numpy(tfds.builder(
          data.TFDS_NAMES[name]).as_dataset(split='test')))
    by_id = sorted(prepared, key=lambda e: e['id'])
    self.assertNotEqual([e['id'] for e in prepared], [e['id'] for e in by_id])
    np.testing.assert_array_equal(ds.test.images,
                                  np.stack([e['image'] for e in by_id[:10]]))
    np.testing.assert_array_equal(ds.test.labels,
                                  [e['label'] for e in by_id[:10]])

  def test_release_order_sorts_fixed_width_ids(self):
    ids = np.array([b'test00002', b'test00010', b'test00000', b'test00001'])
    np.testing.assert_array_equal(data.release_order(ids), [2, 3, 0, 1])

  def test_offline_without_prepared_data_fails_fast_and_clean(self):
    folder = self.create_tempdir().full_path
    start = time.time()
    with self.assertRaisesRegex(data.DataError,
                                'TFDS_DATA_DIR.*download_and_prepare'):
      data.load_dataset('svhn', data_dir=folder)
    self.assertLess(time.time() - start, 10)
    self.assertEqual(os.listdir(folder), [])  # nothing half-written

  def test_unknown_dataset_and_missing_data_dir(self):
    with self.assertRaisesRegex(data.DataError, 'unknown dataset'):
      data.load_dataset('imagenet')
    with self.assertRaisesRegex(data.DataError, 'not a readable folder'):
      data.load_dataset('mnist', data_dir='/nonexistent/folder')


class OrderTest(absltest.TestCase):

  def test_permutation_depends_on_seed_and_epoch_only(self):
    a = data.epoch_permutation(3, 5, 100)
    np.testing.assert_array_equal(a, data.epoch_permutation(3, 5, 100))
    self.assertFalse(np.array_equal(a, data.epoch_permutation(3, 6, 100)))
    self.assertFalse(np.array_equal(a, data.epoch_permutation(4, 5, 100)))
    np.testing.assert_array_equal(np.sort(a), np.arange(100))

  def test_steps_walk_epochs_and_hosts_partition_the_batch(self):
    kwargs = dict(seed=0, num_examples=50, global_batch=8)
    # 6 steps per epoch: step 6 is the first batch of epoch 1.
    np.testing.assert_array_equal(
        data.host_batch_indices(step=6, **kwargs),
        data.epoch_permutation(0, 1, 50)[:8])
    seen = np.concatenate([
        data.host_batch_indices(step=0, process_index=p, process_count=2,
                                **kwargs) for p in range(2)])
    np.testing.assert_array_equal(seen, data.host_batch_indices(step=0,
                                                                **kwargs))

  def test_steps_per_epoch_drops_the_partial_batch_and_rejects_big_batches(self):
    self.assertEqual(data.steps_per_epoch(50, 8), 6)
    with self.assertRaisesRegex(data.DataError, 'lower batch_size') as e:
      data.steps_per_epoch(50, 64)
    self.assertEqual(e.exception.paths, ('batch_size',))

  def test_augment_crops_the_padded_image_and_flips_it(self):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
    ids = np.array([5, 17, 2, 40, 41, 9])
    out = data.augment(images, seed=1, step=3, example_ids=ids)
    self.assertEqual(out.shape, images.shape)
    # Independent computation: each output is one of the 9 x 9 x 2 crops of
    # its zero-padded image (flipped or not); find it by search.
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    kinds = set()
    for i in range(6):
      found = [(dy, dx, f) for dy in range(9) for dx in range(9)
               for f in (False, True)
               if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(
                   padded[i, dy:dy + 8, dx:dx + 8]))]
      self.assertNotEmpty(found, i)
      kinds.add(found[0])
    self.assertGreater(len(kinds), 1)  # not one crop for all

  def test_augment_flips_half_the_images_and_crops_uniformly(self):
    # Two marked pixels side by side (1 left of 2) near the centre of a
    # 12x12 image survive every crop; their new places show each image's
    # offset and whether it was flipped.
    n, size, pad = 2000, 12, data.AUGMENT_PADDING
    images = np.zeros((n, size, size, 1), np.float32)
    images[:, 6, 5], images[:, 6, 6] = 1.0, 2.0
    out = data.augment(images, seed=0, step=0, example_ids=np.arange(n))
    _, row_1, col_1, _ = np.nonzero(out == 1.0)
    _, _, col_2, _ = np.nonzero(out == 2.0)
    self.assertEqual(len(row_1), n)
    flipped = col_2 < col_1
    # A fair coin: 1,000 +- 22 (std) flips; a flip drawn with odds 4/9
    # would give ~889.
    self.assertAlmostEqual(flipped.mean(), 0.5, delta=0.04)
    # Vertical offsets: each of the 2 * pad + 1 shifts ~n / 9 = 222 times.
    counts = np.bincount(row_1 - 6 + pad, minlength=2 * pad + 1)
    self.assertEqual(len(counts), 2 * pad + 1)
    self.assertTrue(np.all(np.abs(counts - n / (2 * pad + 1)) < 60), counts)

  def test_augment_draws_depend_on_seed_step_and_example_only(self):
    images = np.random.default_rng(1).uniform(size=(4, 8, 8, 1))
    ids = np.array([3, 8, 1, 6])
    a = data.augment(images, seed=0, step=7, example_ids=ids)
    np.testing.assert_array_equal(
        a, data.augment(images, seed=0, step=7, example_ids=ids))
    # The same example in another batch (another host's slice) is drawn
    # the same: no dependence on its position or its neighbours.
    np.testing.assert_array_equal(
        a[2:3], data.augment(images[2:3], seed=0, step=7, example_ids=ids[2:3]))
    for other in (dict(seed=1, step=7), dict(seed=0, step=8)):
      self.assertFalse(np.array_equal(
          a, data.augment(images, example_ids=ids, **other)))

  def test_get_batch_augments_only_when_asked(self):
    split = data.Split(np.random.default_rng(2).integers(
        0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10, dtype=np.int32))
    idx = np.array([4, 1, 7])
    plain = data.get_batch(split, idx)
    np.testing.assert_array_equal(plain['image'], data.to_float(
        split.images[idx]))
    aug = data.get_batch(split, idx, augment_seed=(0, 5))
    np.testing.assert_array_equal(aug['image'], data.augment(
        plain['image'], seed=0, step=5, example_ids=idx))
    np.testing.assert_array_equal(aug['label'], [4, 1, 7])

  def test_toy2d_is_non_isotropic(self):
    ds = data.load_dataset('toy2d')
    x, y = ds.train.images, ds.train.labels
    left = x[:, 0] < 0
    gap_left = x[left & (y == 0), 1].min() - x[left & (y == 1), 1].max()
    gap_right = x[~left & (y == 0), 1].min() - x[~left & (y == 1), 1].max()
    self.assertGreater(gap_right, 5 * gap_left)
    self.assertEqual(ds.num_classes, 2)


if __name__ == '__main__':
  absltest.main()
