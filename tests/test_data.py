"""Tests of arreg_jax.data: every upstream format, the embedded subset, TFDS, errors and augmentation.

Synthetic files are written in the exact upstream layouts. Tests on the real files in the shared data folder
(``$ARREG_SHARED_DATA`` or ``<repo>/../shared/data``) are skipped when it is absent.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import pathlib
import pickle
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from arreg_jax.data import augment
from arreg_jax.data import cifar
from arreg_jax.data import get_dataset
from arreg_jax.data import mnist
from arreg_jax.data import tiny_imagenet
from arreg_jax.data import Dataset
from arreg_jax.errors import ConfigError, DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def _shared_data() -> pathlib.Path | None:
  env = os.environ.get('ARREG_SHARED_DATA')
  path = pathlib.Path(env) if env else REPO.parent / 'shared' / 'data'
  return path if path.is_dir() else None


@pytest.fixture(scope='module')
def shared_mnist() -> pathlib.Path:
  root = _shared_data()
  if root is None or not (root / 'mnist').is_dir():
    pytest.skip('shared MNIST files not present (set ARREG_SHARED_DATA or provide <repo>/../shared/data/mnist)')
  return root / 'mnist'


@pytest.fixture(scope='module')
def shared_tiny() -> pathlib.Path:
  root = _shared_data()
  if root is None or not (root / 'tiny-imagenet-200' / 'wnids.txt').is_file():
    pytest.skip('shared tiny-imagenet-200 not present (set ARREG_SHARED_DATA or provide '
                '<repo>/../shared/data/tiny-imagenet-200)')
  return root


# --------------------------------------------------------------------------------------------------------------
# Writers for the upstream formats.


def _write_idx(path: pathlib.Path, arr: np.ndarray, magic: int, gz: bool) -> None:
  header = magic.to_bytes(4, 'big') + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
  data = header + np.ascontiguousarray(arr, np.uint8).tobytes()
  if gz:
    path = path.with_name(path.name + '.gz')
    with gzip.open(path, 'wb') as f:
      f.write(data)
  else:
    path.write_bytes(data)


def _make_mnist(folder: pathlib.Path, n_train=37, n_test=11, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for split, n in (('train', n_train), ('t10k', n_test)):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, (n,), dtype=np.uint8)
    _write_idx(folder / f'{split}-images-idx3-ubyte', x, 0x803, gz)
    _write_idx(folder / f'{split}-labels-idx1-ubyte', y, 0x801, gz)
    arrays[split] = (x, y)
  return arrays


def _upstream_pickle(obj) -> bytes:
  """Protocol-2 pickle naming numpy's arrays the way the upstream (numpy 1.x) files do."""
  return pickle.dumps(obj, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')


def _cifar_rows(rng, n):
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _rows_to_nhwc_reference(rows: np.ndarray) -> np.ndarray:
  """Upstream definition, pixel by pixel: row[c * 1024 + y * 32 + x] is channel c at (y, x)."""
  out = np.zeros((rows.shape[0], 32, 32, 3), np.uint8)
  for c in range(3):
    for y in range(32):
      out[:, y, :, c] = rows[:, c * 1024 + y * 32: c * 1024 + y * 32 + 32]
  return out


def _make_cifar10_py(folder: pathlib.Path, per_batch=7, n_test=5, seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  train_rows, train_labels = [], []
  for i in range(1, 6):
    rows, labels = _cifar_rows(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
    entry = {b'batch_label': f'training batch {i} of 5'.encode(), b'labels': labels, b'data': rows,
             b'filenames': [f'img_{i}_{j}.png'.encode() for j in range(per_batch)]}
    (folder / f'data_batch_{i}').write_bytes(_upstream_pickle(entry))
    train_rows.append(rows)
    train_labels += labels
  rows, labels = _cifar_rows(rng, n_test), [int(v) for v in rng.integers(0, 10, n_test)]
  (folder / 'test_batch').write_bytes(_upstream_pickle(
      {b'batch_label': b'testing batch 1 of 1', b'labels': labels, b'data': rows, b'filenames': []}))
  (folder / 'batches.meta').write_bytes(_upstream_pickle({b'label_names': [b'airplane'] * 10}))
  return (np.concatenate(train_rows), np.array(train_labels)), (rows, np.array(labels))


def _make_cifar100_py(folder: pathlib.Path, n_train=23, n_test=9, seed=1):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  out = []
  for split, n in (('train', n_train), ('test', n_test)):
    rows = _cifar_rows(rng, n)
    fine = [int(v) for v in rng.integers(0, 100, n)]
    fine[0] = 99
    entry = {b'filenames': [b'x.png'] * n, b'batch_label': split.encode(), b'fine_labels': fine,
             b'coarse_labels': [v // 5 for v in fine], b'data': rows}
    (folder / split).write_bytes(_upstream_pickle(entry))
    out.append((rows, np.array(fine)))
  return out


def _make_cifar_bin(folder: pathlib.Path, files, label_bytes, num_classes, n=6, seed=2):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  rows_all, labels_all = [], []
  for fname in files:
    rows = _cifar_rows(rng, n)
    labels = rng.integers(0, num_classes, (n, label_bytes), dtype=np.uint8)
    (folder / fname).write_bytes(np.concatenate([labels, rows], axis=1).tobytes())
    rows_all.append(rows)
    labels_all.append(labels[:, -1])
  return np.concatenate(rows_all), np.concatenate(labels_all)


def _jpeg(path: pathlib.Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path, format='JPEG', quality=90)


def _make_tiny(root: pathlib.Path, wnids=('n001', 'n002', 'n003', 'n004'), train_wnids=('n001', 'n002', 'n004'),
               per_class=3, val_per_class=2, seed=3):
  """A tiny fake tiny-imagenet-200 folder (with some grayscale JPEGs); returns {path: label}."""
  rng = np.random.default_rng(seed)
  folder = root / 'tiny-imagenet-200'
  folder.mkdir(parents=True)
  (folder / 'wnids.txt').write_text(''.join(w + '\n' for w in wnids))
  (folder / 'words.txt').write_text(''.join(f'{w}\tthing {w}\n' for w in wnids))
  labels = {}
  for wnid in train_wnids:
    boxes = []
    for j in range(per_class):
      gray = j == 1
      img = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3), dtype=np.uint8)
      p = folder / 'train' / wnid / 'images' / f'{wnid}_{j}.JPEG'
      _jpeg(p, img)
      labels[p] = wnids.index(wnid)
      boxes.append(f'{wnid}_{j}.JPEG\t0\t0\t63\t63\n')
    (folder / 'train' / wnid / f'{wnid}_boxes.txt').write_text(''.join(boxes))
  ann = []
  k = 0
  for j in range(val_per_class):
    for wnid in wnids:
      gray = k == 2
      img = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3), dtype=np.uint8)
      p = folder / 'val' / 'images' / f'val_{k}.JPEG'
      _jpeg(p, img)
      ann.append(f'val_{k}.JPEG\t{wnid}\t1\t2\t60\t61\n')
      labels[p] = wnids.index(wnid)
      k += 1
  (folder / 'val' / 'val_annotations.txt').write_text(''.join(ann))
  return folder


def _pil_rgb(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def _check_dataset(ds: Dataset, name: str, raw_shape, num_classes: int) -> None:
  assert isinstance(ds, Dataset)
  assert ds.name == name and ds.num_classes == num_classes
  for x, y in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    assert x.dtype == np.uint8 and x.shape[1:] == raw_shape and x.flags.c_contiguous
    assert y.dtype == np.int32 and y.shape == (x.shape[0],)
    assert y.min() >= 0 and y.max() < num_classes


# --------------------------------------------------------------------------------------------------------------
# MNIST.


@pytest.mark.parametrize('gz', [True, False])
@pytest.mark.parametrize('sub', ['', 'mnist'])
def test_mnist_idx_round_trip(tmp_path, gz, sub):
  arrays = _make_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
  ds = get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))
  _check_dataset(ds, 'mnist', (28, 28, 1), 10)
  assert ds.augment == 'none' and ds.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays['train'][0])
  np.testing.assert_array_equal(ds.train_labels, arrays['train'][1])
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays['t10k'][0])
  np.testing.assert_array_equal(ds.test_labels, arrays['t10k'][1])


def test_mnist_sizes_keep_first_examples(tmp_path):
  arrays = _make_mnist(tmp_path)
  ds = get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path), train_size=5, test_size=3))
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays['train'][0][:5])
  np.testing.assert_array_equal(ds.test_labels, arrays['t10k'][1][:3])
  with pytest.raises(ConfigError, match=r'train_size=38.*only 37'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path), train_size=38))
  with pytest.raises(ConfigError, match='positive integer'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path), train_size=0))


def test_mnist_full_real_files(shared_mnist):
  ds = get_dataset(_cfg(name='mnist', source='files', data_dir=str(shared_mnist.parent)))
  _check_dataset(ds, 'mnist', (28, 28, 1), 10)
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.train_labels).tolist() == MNIST_TRAIN_COUNTS
  assert np.bincount(ds.test_labels).tolist() == MNIST_TEST_COUNTS
  assert ds.train_images.mean() == pytest.approx(33.32, abs=0.01)
  assert ds.test_images.mean() == pytest.approx(33.79, abs=0.01)


def test_embedded_subset_loads():
  ds = get_dataset(_cfg(name='mnist', source='embedded'))
  _check_dataset(ds, 'mnist', (28, 28, 1), 10)
  assert ds.num_train == 10000 and ds.num_test == 2000
  assert set(np.unique(ds.train_labels)) == set(range(10))
  small = get_dataset(_cfg(name='mnist', source='embedded', train_size=100, test_size=10))
  np.testing.assert_array_equal(small.train_images, ds.train_images[:100])
  assert small.num_test == 10


def test_embedded_subset_equals_real_files(shared_mnist):
  emb = get_dataset(_cfg(name='mnist', source='embedded'))
  real = get_dataset(_cfg(name='mnist', source='files', data_dir=str(shared_mnist)))
  np.testing.assert_array_equal(emb.train_images, real.train_images[:10000])
  np.testing.assert_array_equal(emb.train_labels, real.train_labels[:10000])
  np.testing.assert_array_equal(emb.test_images, real.test_images[:2000])
  np.testing.assert_array_equal(emb.test_labels, real.test_labels[:2000])


def test_embedded_asset_is_small_and_packaged():
  path = REPO / 'arreg_jax' / 'data' / 'assets' / mnist.EMBEDDED_ASSET
  assert path.is_file() and path.stat().st_size < 5_000_000


def test_embedded_asset_missing_is_data_error(monkeypatch):
  monkeypatch.setattr(mnist, 'EMBEDDED_ASSET', 'no_such_asset.npz')
  with pytest.raises(DataError, match='no_such_asset.npz.*missing from the package.*make_mnist_subset'):
    get_dataset(_cfg(name='mnist', source='embedded'))


def test_make_mnist_subset_script(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('make_mnist_subset', REPO / 'scripts' / 'make_mnist_subset.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  arrays = _make_mnist(tmp_path / 'src')
  out = tmp_path / 'out' / 'subset.npz'
  assert script.main(['--mnist_dir', str(tmp_path / 'src'), '--out', str(out), '--train', '7', '--test', '4']) == 0
  with np.load(out) as npz:
    np.testing.assert_array_equal(npz['train_images'][..., 0], arrays['train'][0][:7])
    np.testing.assert_array_equal(npz['test_labels'], arrays['t10k'][1][:4])
    assert npz['train_images'].dtype == np.uint8


# --------------------------------------------------------------------------------------------------------------
# CIFAR.


def test_cifar_row_layout_helper_matches_reference():
  rows = _cifar_rows(np.random.default_rng(0), 3)
  np.testing.assert_array_equal(cifar._to_nhwc(rows), _rows_to_nhwc_reference(rows))  # pylint: disable=protected-access


@pytest.mark.parametrize('point_at_folder', [False, True])
def test_cifar10_pickles_round_trip(tmp_path, point_at_folder):
  folder = tmp_path / 'cifar-10-batches-py'
  (train_rows, train_y), (test_rows, test_y) = _make_cifar10_py(folder)
  ds = get_dataset(_cfg(name='cifar10', source='files', data_dir=str(folder if point_at_folder else tmp_path)))
  _check_dataset(ds, 'cifar10', (32, 32, 3), 10)
  assert ds.augment == 'cifar' and ds.image_shape == (32, 32, 3)
  assert ds.num_train == 35 and ds.num_test == 5
  np.testing.assert_array_equal(ds.train_images, _rows_to_nhwc_reference(train_rows))
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_images, _rows_to_nhwc_reference(test_rows))
  np.testing.assert_array_equal(ds.test_labels, test_y)


def test_cifar100_pickles_round_trip(tmp_path):
  (train_rows, train_y), (test_rows, test_y) = _make_cifar100_py(tmp_path / 'cifar-100-python')
  ds = get_dataset(_cfg(name='cifar100', source='files', data_dir=str(tmp_path)))
  _check_dataset(ds, 'cifar100', (32, 32, 3), 100)
  np.testing.assert_array_equal(ds.train_images, _rows_to_nhwc_reference(train_rows))
  np.testing.assert_array_equal(ds.train_labels, train_y)  # fine labels, including 99.
  np.testing.assert_array_equal(ds.test_images, _rows_to_nhwc_reference(test_rows))
  np.testing.assert_array_equal(ds.test_labels, test_y)


@pytest.mark.parametrize('point_at_folder', [False, True])
def test_cifar10_binary_round_trip(tmp_path, point_at_folder):
  folder = tmp_path / 'cifar-10-batches-bin'
  train_rows, train_y = _make_cifar_bin(folder, [f'data_batch_{i}.bin' for i in range(1, 6)], 1, 10)
  test_rows, test_y = _make_cifar_bin(folder, ['test_batch.bin'], 1, 10, seed=9)
  ds = get_dataset(_cfg(name='cifar10', source='files', data_dir=str(folder if point_at_folder else tmp_path)))
  _check_dataset(ds, 'cifar10', (32, 32, 3), 10)
  assert ds.num_train == 30
  np.testing.assert_array_equal(ds.train_images, _rows_to_nhwc_reference(train_rows))
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_images, _rows_to_nhwc_reference(test_rows))
  np.testing.assert_array_equal(ds.test_labels, test_y)


def test_cifar100_binary_uses_fine_label(tmp_path):
  folder = tmp_path / 'cifar-100-binary'
  train_rows, train_y = _make_cifar_bin(folder, ['train.bin'], 2, 100)
  _, test_y = _make_cifar_bin(folder, ['test.bin'], 2, 100, seed=5)
  ds = get_dataset(_cfg(name='cifar100', source='files', data_dir=str(tmp_path)))
  np.testing.assert_array_equal(ds.train_images, _rows_to_nhwc_reference(train_rows))
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_labels, test_y)


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  _make_cifar10_py(folder)
  marker = tmp_path / 'pwned'

  class Evil:

    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  (folder / 'data_batch_3').write_bytes(pickle.dumps({b'data': Evil(), b'labels': []}, protocol=2))
  with pytest.raises(DataError, match=r'data_batch_3.*not a CIFAR python pickle'):
    get_dataset(_cfg(name='cifar10', source='files', data_dir=str(tmp_path)))
  assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Tiny-ImageNet (fake folder).


def test_tiny_imagenet_fake_folder(tmp_path, caplog):
  folder = _make_tiny(tmp_path / 'data')
  cache = tmp_path / 'cache'
  with caplog.at_level(logging.WARNING):
    tin = tiny_imagenet.load_files(str(tmp_path / 'data'), cache_dir=str(cache))
  assert 'only 3 of the 4 classes' in caplog.text
  assert not tin.from_cache and tin.classes_present == 3 and tin.num_classes == 4
  (x, y), (vx, vy) = tin.train, tin.val
  # Class-interleaved training order: first image of each present class, then the second, ...
  expect_train = [folder / 'train' / w / 'images' / f'{w}_{j}.JPEG' for j in range(3) for w in ('n001', 'n002',
                                                                                                  'n004')]
  assert y.tolist() == [0, 1, 3] * 3
  for i, p in enumerate(expect_train):
    np.testing.assert_array_equal(x[i], _pil_rgb(p))  # exact: same decoder, grayscale replicated to RGB.
  assert vy.tolist() == [0, 1, 2, 3] * 2
  for i in range(8):
    np.testing.assert_array_equal(vx[i], _pil_rgb(folder / 'val' / 'images' / f'val_{i}.JPEG'))
  gray = vx[2]
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

  ds = get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(folder), cache_dir=str(cache)))
  _check_dataset(ds, 'tiny_imagenet', (64, 64, 3), 4)
  assert ds.augment == 'tiny_imagenet' and ds.image_shape == (56, 56, 3)
  np.testing.assert_array_equal(ds.train_images, x)


def test_tiny_imagenet_classes_subset(tmp_path):
  _make_tiny(tmp_path)
  ds = get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(tmp_path), classes=2,
                        cache_dir=str(tmp_path / 'cache')))
  assert ds.num_classes == 2
  assert ds.train_labels.tolist() == [0, 1] * 3
  assert ds.test_labels.tolist() == [0, 1] * 2
  with pytest.raises(ConfigError, match=r'classes=5.*1\.\.4'):
    get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(tmp_path), classes=5,
                     cache_dir=str(tmp_path / 'cache')))


def test_tiny_imagenet_cache_hit_stale_and_corrupt(tmp_path, monkeypatch):
  folder = _make_tiny(tmp_path / 'data')
  cache = tmp_path / 'cache'
  first = tiny_imagenet.load_files(str(folder), cache_dir=str(cache))
  assert not first.from_cache and os.path.isfile(first.cache_path)
  assert os.listdir(cache) == [os.path.basename(first.cache_path)]  # no temp files left.

  real_decode = tiny_imagenet.decode_all

  def no_decode(*a, **k):
    raise AssertionError('decoded although the cache should have been used')

  monkeypatch.setattr(tiny_imagenet, 'decode_all', no_decode)
  second = tiny_imagenet.load_files(str(folder), cache_dir=str(cache))
  assert second.from_cache and second.cache_path == first.cache_path
  np.testing.assert_array_equal(second.train[0], first.train[0])
  np.testing.assert_array_equal(second.val[1], first.val[1])

  # A flipped byte inside the array data is caught (zip CRC) and the cache is rebuilt.
  monkeypatch.setattr(tiny_imagenet, 'decode_all', real_decode)
  blob = bytearray(pathlib.Path(first.cache_path).read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  pathlib.Path(first.cache_path).write_bytes(bytes(blob))
  rebuilt = tiny_imagenet.load_files(str(folder), cache_dir=str(cache))
  assert not rebuilt.from_cache
  np.testing.assert_array_equal(rebuilt.train[0], first.train[0])
  # A truncated cache, too.
  pathlib.Path(first.cache_path).write_bytes(bytes(blob[:1000]))
  assert not tiny_imagenet.load_files(str(folder), cache_dir=str(cache)).from_cache
  assert tiny_imagenet.load_files(str(folder), cache_dir=str(cache)).from_cache

  # Changing an image (size/mtime) changes the key: a new cache entry is decoded.
  p = folder / 'train' / 'n001' / 'images' / 'n001_0.JPEG'
  _jpeg(p, np.zeros((64, 64, 3), np.uint8))
  changed = tiny_imagenet.load_files(str(folder), cache_dir=str(cache))
  assert not changed.from_cache and changed.cache_path != first.cache_path
  np.testing.assert_array_equal(changed.train[0][0], _pil_rgb(p))


def test_tiny_imagenet_interrupted_cache_write_leaves_no_cache(tmp_path, monkeypatch):
  folder = _make_tiny(tmp_path / 'data')
  cache = tmp_path / 'cache'

  def killed_savez(f, **arrays):
    f.write(b'PK\x03\x04 partial')
    raise KeyboardInterrupt

  monkeypatch.setattr(tiny_imagenet.np, 'savez', killed_savez)
  with pytest.raises(KeyboardInterrupt):
    tiny_imagenet.load_files(str(folder), cache_dir=str(cache))
  assert os.listdir(cache) == []
  monkeypatch.undo()
  assert not tiny_imagenet.load_files(str(folder), cache_dir=str(cache)).from_cache
  assert tiny_imagenet.load_files(str(folder), cache_dir=str(cache)).from_cache


def test_tiny_imagenet_unwritable_cache_still_loads(tmp_path, caplog):
  folder = _make_tiny(tmp_path / 'data')
  blocker = tmp_path / 'file_not_dir'
  blocker.write_text('x')
  with caplog.at_level(logging.WARNING):
    tin = tiny_imagenet.load_files(str(folder), cache_dir=str(blocker / 'cache'))
  assert tin.cache_path is None and tin.train[0].shape == (9, 64, 64, 3)
  assert 'could not write the decode cache' in caplog.text


def test_tiny_imagenet_corrupt_jpeg(tmp_path):
  folder = _make_tiny(tmp_path)
  bad = folder / 'val' / 'images' / 'val_5.JPEG'
  bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(DataError, match=r'val_5\.JPEG is not a readable image.*tiny-imagenet-200\.zip'):
    get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(tmp_path), cache_dir=str(tmp_path / 'c')))


def test_tiny_imagenet_wrong_image_size(tmp_path):
  folder = _make_tiny(tmp_path)
  _jpeg(folder / 'train' / 'n002' / 'images' / 'n002_2.JPEG', np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(DataError, match=r'n002_2\.JPEG is 32x32, expected 64x64'):
    get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(tmp_path), cache_dir=str(tmp_path / 'c')))


def test_tiny_imagenet_missing_metadata(tmp_path):
  folder = _make_tiny(tmp_path)
  (folder / 'val' / 'val_annotations.txt').unlink()
  with pytest.raises(DataError, match=r'val_annotations\.txt is missing.*tiny-imagenet-200\.zip'):
    get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(tmp_path), cache_dir=str(tmp_path / 'c')))
  with pytest.raises(DataError, match=r'no tiny-imagenet-200/wnids\.txt found under .*empty'):
    (tmp_path / 'empty').mkdir()
    get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(tmp_path / 'empty')))


# --------------------------------------------------------------------------------------------------------------
# Tiny-ImageNet (real shared files).


@pytest.fixture(scope='module')
def tiny10(shared_tiny, tmp_path_factory):
  cache = tmp_path_factory.mktemp('tiny_cache')
  t0 = time.perf_counter()
  tin = tiny_imagenet.load_files(str(shared_tiny), cache_dir=str(cache), classes=10)
  print(f'\ntiny_imagenet classes=10 decode: {time.perf_counter() - t0:.2f}s')
  return tin, cache


def test_tiny_imagenet_real_classes10(tiny10):
  tin, _ = tiny10
  assert tin.num_classes == 10 and tin.classes_present == 10
  (x, y), (vx, vy) = tin.train, tin.val
  assert x.shape == (5000, 64, 64, 3) and vx.shape == (500, 64, 64, 3)
  assert np.bincount(y).tolist() == [500] * 10 and np.bincount(vy).tolist() == [50] * 10
  assert y[:10].tolist() == list(range(10))  # class-interleaved.


def test_tiny_imagenet_real_second_load_hits_cache(tiny10, shared_tiny, monkeypatch):
  tin, cache = tiny10
  monkeypatch.setattr(tiny_imagenet, 'decode_all', lambda *a, **k: pytest.fail('decoded despite the cache'))
  t0 = time.perf_counter()
  ds = get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(shared_tiny / 'tiny-imagenet-200'),
                        classes=10, cache_dir=str(cache), train_size=1000))
  print(f'\ntiny_imagenet classes=10 cache hit: {time.perf_counter() - t0:.2f}s')
  _check_dataset(ds, 'tiny_imagenet', (64, 64, 3), 10)
  assert ds.num_train == 1000 and np.bincount(ds.train_labels).tolist() == [100] * 10
  np.testing.assert_array_equal(ds.test_images, tin.val[0])


def test_tiny_imagenet_real_all_classes(shared_tiny, tmp_path, caplog):
  t0 = time.perf_counter()
  with caplog.at_level(logging.WARNING):
    ds = get_dataset(_cfg(name='tiny_imagenet', source='files', data_dir=str(shared_tiny),
                          cache_dir=str(tmp_path)))
  print(f'\ntiny_imagenet all classes (5000 train + 10000 val) decode: {time.perf_counter() - t0:.2f}s')
  assert 'only 10 of the 200 classes' in caplog.text
  assert ds.num_classes == 200 and ds.num_train == 5000 and ds.num_test == 10000
  assert np.bincount(ds.test_labels, minlength=200).tolist() == [50] * 200


# --------------------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_name_and_source():
  with pytest.raises(ConfigError, match=r"data.name='imagenet'.*mnist, cifar10, cifar100, tiny_imagenet"):
    get_dataset(_cfg(name='imagenet', source='files'))
  with pytest.raises(ConfigError, match=r"data.source='web'.*embedded, files, tfds"):
    get_dataset(_cfg(name='mnist', source='web'))
  with pytest.raises(ConfigError, match=r"data.source=None"):
    get_dataset(_cfg(name='mnist'))
  with pytest.raises(ConfigError, match=r"source='embedded' is not available for cifar10; use one of files, tfds"):
    get_dataset(_cfg(name='cifar10', source='embedded'))
  with pytest.raises(ConfigError, match="source='tfds' is not available for tiny_imagenet"):
    get_dataset(_cfg(name='tiny_imagenet', source='tfds'))
  with pytest.raises(ConfigError, match='classes applies to tiny_imagenet only'):
    get_dataset(_cfg(name='mnist', source='embedded', classes=3))


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'cifar100', 'tiny_imagenet'])
def test_missing_dir(tmp_path, name):
  missing = tmp_path / 'nowhere'
  with pytest.raises(DataError, match=rf'{name}: data.data_dir {missing} does not exist') as e:
    get_dataset(_cfg(name=name, source='files', data_dir=str(missing)))
  assert 'http' in str(e.value)  # says where to get the data.
  with pytest.raises(ConfigError, match="source='files' needs data.data_dir"):
    get_dataset(_cfg(name=name, source='files', data_dir=None))


@pytest.mark.parametrize('name,fix', [('mnist', 'train-images-idx3-ubyte'), ('cifar10', 'cifar-10-batches-py'),
                                      ('cifar100', 'cifar-100-python')])
def test_empty_dir(tmp_path, name, fix):
  with pytest.raises(DataError, match=rf'{name}: no .*{tmp_path}.*{fix}'):
    get_dataset(_cfg(name=name, source='files', data_dir=str(tmp_path)))


def test_missing_file(tmp_path):
  _make_mnist(tmp_path)
  (tmp_path / 't10k-images-idx3-ubyte.gz').unlink()
  with pytest.raises(DataError, match=rf'{tmp_path}/t10k-images-idx3-ubyte\[\.gz\] is missing.*embedded'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))
  folder = tmp_path / 'cifar-10-batches-py'
  _make_cifar10_py(folder)
  (folder / 'data_batch_4').unlink()
  with pytest.raises(DataError, match=r'data_batch_4 is missing.*cifar-10-python\.tar\.gz'):
    get_dataset(_cfg(name='cifar10', source='files', data_dir=str(tmp_path)))


@pytest.mark.parametrize('gz', [True, False])
def test_truncated_idx(tmp_path, gz):
  _make_mnist(tmp_path, gz=gz)
  path = tmp_path / ('train-images-idx3-ubyte' + ('.gz' if gz else ''))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(DataError, match=rf'{path}.*truncated.*download it again'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))


def test_truncated_idx_header(tmp_path):
  _make_mnist(tmp_path, gz=False)
  path = tmp_path / 'train-labels-idx1-ubyte'
  path.write_bytes(path.read_bytes()[:6])
  with pytest.raises(DataError, match=rf'{path} is truncated inside its IDX header'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))


def test_wrong_magic(tmp_path):
  _make_mnist(tmp_path, gz=False)
  images = tmp_path / 'train-images-idx3-ubyte'
  labels = tmp_path / 'train-labels-idx1-ubyte'
  img_bytes = images.read_bytes()
  images.write_bytes(labels.read_bytes())  # a label file where the image file belongs.
  with pytest.raises(DataError, match=rf'{images} has magic number 0x00000801, expected 0x00000803'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))
  images.write_bytes(gzip.compress(img_bytes))  # gzipped but without the .gz suffix.
  with pytest.raises(DataError, match=r'magic number 0x1f8b.*gzip-compressed'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))


def test_wrong_shape_and_mismatched_counts(tmp_path):
  _make_mnist(tmp_path, gz=False)
  _write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((37, 32, 32), np.uint8), 0x803, gz=False)
  with pytest.raises(DataError, match=r'images of shape \(37, 32, 32\), expected \(N, 28, 28\)'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))
  _write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((36, 28, 28), np.uint8), 0x803, gz=False)
  with pytest.raises(DataError, match=r'36 images but .* 37 labels'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))


def test_label_out_of_range(tmp_path):
  _make_mnist(tmp_path, gz=False)
  _write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.full((11,), 10, np.uint8), 0x801, gz=False)
  with pytest.raises(DataError, match=r'mnist test split .*labels span \[10, 10\], expected \[0, 9\]'):
    get_dataset(_cfg(name='mnist', source='files', data_dir=str(tmp_path)))


def test_truncated_cifar_files(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  _make_cifar10_py(folder)
  path = folder / 'data_batch_2'
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(DataError, match=rf'{path} is truncated or is not a CIFAR python pickle'):
    get_dataset(_cfg(name='cifar10', source='files', data_dir=str(tmp_path)))
  path.write_bytes(_upstream_pickle({b'data': np.zeros((3, 100), np.uint8), b'labels': [0, 1, 2]}))
  with pytest.raises(DataError, match=r"data_batch_2 holds b'data' of shape \(3, 100\)"):
    get_dataset(_cfg(name='cifar10', source='files', data_dir=str(tmp_path)))

  folder = tmp_path / 'bin' / 'cifar-10-batches-bin'
  _make_cifar_bin(folder, [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin'], 1, 10)
  path = folder / 'test_batch.bin'
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(DataError, match=rf'{path} is truncated: .*3073-byte records'):
    get_dataset(_cfg(name='cifar10', source='files', data_dir=str(tmp_path / 'bin')))


# --------------------------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_unprepared_fails_fast(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(DataError) as e:
    get_dataset(_cfg(name='cifar10', source='tfds', data_dir=str(tmp_path)))
  elapsed = time.perf_counter() - t0
  msg = str(e.value)
  assert elapsed < 5.0, f'took {elapsed:.1f}s'
  assert 'not prepared' in msg and str(tmp_path) in msg
  assert f'tfds build cifar10 --data_dir {tmp_path}' in msg and 'tfds_download=True' in msg
  assert "source='files'" in msg


def test_tfds_download_failure_is_data_error(tmp_path, monkeypatch):
  from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top
  calls = []

  def offline(self, **kwargs):
    calls.append(kwargs)
    raise ConnectionError('no route to host')

  monkeypatch.setattr(dataset_builder.DatasetBuilder, 'download_and_prepare', offline)
  with pytest.raises(DataError, match=r'downloading TFDS dataset mnist into .* failed \(ConnectionError'):
    get_dataset(_cfg(name='mnist', source='tfds', data_dir=str(tmp_path), tfds_download=True))
  assert calls == [{'file_format': 'array_record'}]


def _png(a: np.ndarray) -> io.BytesIO:
  buf = io.BytesIO()
  Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format='PNG')
  buf.seek(0)
  return buf


def _prepare_fake_tfds(name: str, data_dir: pathlib.Path, n_train: int, n_test: int):
  """Prepares a real TFDS ``name`` folder (array_record) with random examples; returns {split: (x, y)}."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shape = {'mnist': (28, 28, 1)}.get(name, (32, 32, 3))
  num_classes = 100 if name == 'cifar100' else 10
  rng = np.random.default_rng(0)
  made = {s: (rng.integers(0, 256, (n,) + shape, dtype=np.uint8), rng.integers(0, num_classes, n))
          for s, n in (('train', n_train), ('test', n_test))}

  class Fake(tfds.builder_cls(name), skip_registration=True):
    """The real builder (same name, version and features) with generated examples instead of a download."""

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in made}

    def _generate_examples(self, split):  # pylint: disable=arguments-differ
      for i, (img, label) in enumerate(zip(*made[split])):
        ex = {'image': _png(img), 'label': int(label)}
        if name != 'mnist':
          ex['id'] = f'{split}_{i}'
        if name == 'cifar100':
          ex['coarse_label'] = int(label) // 5
        yield i, ex

  Fake.name = name
  Fake(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return made


def _sorted_by_bytes(x, y):
  order = sorted(range(len(x)), key=lambda i: x[i].tobytes())
  return x[order], y[order]


@pytest.mark.parametrize('name', ['mnist', 'cifar100'])
def test_tfds_prepared_array_record(tmp_path, name):
  made = _prepare_fake_tfds(name, tmp_path, 40, 12)
  ds = get_dataset(_cfg(name=name, source='tfds', data_dir=str(tmp_path)))
  _check_dataset(ds, name, made['train'][0].shape[1:], 100 if name == 'cifar100' else 10)
  # TFDS shuffles the order when preparing; compare as sets of (image, label) pairs.
  for (x, y), (mx, my) in (((ds.train_images, ds.train_labels), made['train']),
                           ((ds.test_images, ds.test_labels), made['test'])):
    x, y = _sorted_by_bytes(x, y)
    mx, my = _sorted_by_bytes(mx, my)
    np.testing.assert_array_equal(x, mx)
    np.testing.assert_array_equal(y, my)
  small = get_dataset(_cfg(name=name, source='tfds', data_dir=str(tmp_path), train_size=5, test_size=2))
  np.testing.assert_array_equal(small.train_images, ds.train_images[:5])
  assert small.num_test == 2


def test_tfds_tfrecord_without_tensorflow(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('tensorflow is installed: TFRecord data would be readable')
  _prepare_fake_tfds('mnist', tmp_path, 4, 2)
  info_path = next(tmp_path.glob('mnist/*/dataset_info.json'))
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(DataError, match=r'tfrecord format.*tensorflow is not installed.*--file_format=array_record'):
    get_dataset(_cfg(name='mnist', source='tfds', data_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------------------------------
# Augmentation.


def _random_uint8(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_preprocess_none_and_test_modes_exact():
  x = _random_uint8((5, 28, 28, 1))
  out = augment.preprocess(jax.random.key(0), x, kind='none', train=True)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, x / 255.0, rtol=1e-6)
  c = _random_uint8((5, 32, 32, 3))
  np.testing.assert_allclose(augment.preprocess(None, c, kind='cifar', train=False), c / 255.0, rtol=1e-6)
  t = _random_uint8((5, 64, 64, 3))
  out = augment.preprocess(None, t, kind='tiny_imagenet', train=False)
  assert out.shape == (5, 56, 56, 3)
  np.testing.assert_allclose(out, t[:, 4:60, 4:60] / 255.0, rtol=1e-6)


def test_cifar_crops_are_crops_of_padded_image_and_flip_half():
  n = 512
  x = _random_uint8((n, 32, 32, 3), seed=1)
  out = np.asarray(augment.preprocess(jax.random.key(1), x, kind='cifar', train=True))
  assert out.shape == x.shape and out.dtype == np.float32
  got = np.rint(out * 255).astype(np.uint8)
  np.testing.assert_allclose(out, got / 255.0, rtol=1e-6)  # exact multiples of 1/255.
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  found = np.zeros(n, bool)
  flipped = np.zeros(n, bool)
  offsets = np.full((n, 2), -1)
  for oy in range(9):
    for ox in range(9):
      crop = padded[:, oy:oy + 32, ox:ox + 32]
      for flip in (False, True):
        cand = crop[:, :, ::-1] if flip else crop
        match = (cand == got).reshape(n, -1).all(axis=1) & ~found
        found |= match
        flipped[match] = flip
        offsets[match] = (oy, ox)
  assert found.all(), f'{(~found).sum()} outputs are not crops of the padded image'
  assert 0.4 < flipped.mean() < 0.6
  assert len({tuple(o) for o in offsets}) > 60  # all 81 offsets are possible.
  assert offsets.min() == 0 and offsets.max() == 8


def test_crop_and_resize_equals_resize_of_slice():
  imgs = np.random.default_rng(2).random((8, 64, 64, 3), dtype=np.float32)
  boxes = np.array([[0, 0, 64, 64], [5, 1, 56, 53], [13, 6, 17, 41], [0, 0, 64, 50], [63, 63, 1, 1],
                    [2, 30, 30, 20], [10, 0, 40, 64], [0, 8, 56, 56]], np.int32)
  flip = np.array([False, True] * 4)
  out = np.asarray(jax.jit(augment.crop_and_resize, static_argnums=3)(imgs, boxes, flip, 56))
  for i, (y0, x0, h, w) in enumerate(boxes):
    ref = np.asarray(jax.image.resize(imgs[i, y0:y0 + h, x0:x0 + w], (56, 56, 3), 'linear'))
    if flip[i]:
      ref = ref[:, ::-1]
    np.testing.assert_allclose(out[i], ref, atol=2e-5)
  np.testing.assert_allclose(out[7], imgs[7, 0:56, 8:64][:, ::-1], atol=1e-6)  # a 56x56 box: exact (flipped) crop.


def test_tiny_imagenet_train_output():
  n = 128
  key = jax.random.key(3)
  x = _random_uint8((n, 64, 64, 3), seed=3)
  out = np.asarray(augment.preprocess(key, x, kind='tiny_imagenet', train=True))
  assert out.shape == (n, 56, 56, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  # The output is the documented composition: boxes and flips from the two halves of the key.
  @jax.jit
  def reference(key, x):
    k_box, k_flip = jax.random.split(key)
    boxes = augment.sample_crop_boxes(k_box, n, 64, 64)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    return augment.crop_and_resize(x.astype(jnp.float32) / 255.0, boxes, flip, 56)

  np.testing.assert_allclose(out, np.clip(reference(key, x), 0, 1), atol=1e-5)
  # Constant images stay constant; a left-to-right ramp reveals the flips (about half).
  const = np.full((n, 64, 64, 3), 200, np.uint8)
  np.testing.assert_allclose(augment.preprocess(key, const, kind='tiny_imagenet', train=True), 200 / 255, atol=1e-5)
  ramp = np.broadcast_to((np.arange(64) * 4).astype(np.uint8)[None, None, :, None], (n, 64, 64, 3))
  r = np.asarray(augment.preprocess(jax.random.key(4), np.ascontiguousarray(ramp), kind='tiny_imagenet',
                                    train=True))
  slope = r[:, 28, -1, 0] - r[:, 28, 0, 0]
  assert (slope != 0).all()
  assert 0.4 < (slope < 0).mean() < 0.6


def test_random_resized_crop_box_distribution():
  n = 20000
  sample = jax.jit(augment.sample_crop_boxes, static_argnums=(1, 2, 3))
  boxes = np.asarray(sample(jax.random.key(5), n, 64, 64))
  y0, x0, h, w = boxes.T
  assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 64).all() and (x0 + w <= 64).all()
  assert (h >= 1).all() and (w >= 1).all()
  frac = h * w / 64.0 ** 2
  ratio = w / h
  assert frac.min() > 0.06 and frac.max() <= 1.0  # 0.08 up to integer rounding.
  assert ratio.min() > 0.70 and ratio.max() < 1.43  # [3/4, 4/3] up to integer rounding.
  assert 0.4 < np.median(frac) < 0.6  # uniform area fraction (large boxes redrawn, so a little lower).
  assert (np.log(ratio) < 0).mean() == pytest.approx(0.5, abs=0.05)  # log-uniform ratio: symmetric.
  assert len(np.unique(y0)) > 30 and len(np.unique(x0)) > 30


def test_preprocess_does_not_retrace(monkeypatch):
  traces = []
  real = augment.cifar_crop_flip
  monkeypatch.setattr(augment, 'cifar_crop_flip', lambda *a, **k: traces.append(1) or real(*a, **k))
  shape = (7, 32, 32, 3)  # a shape no other test compiles.
  for i in range(3):
    augment.preprocess(jax.random.key(i), _random_uint8(shape, seed=i), kind='cifar', train=True)
  augment.preprocess(jax.random.key(9), jnp.asarray(_random_uint8(shape)), kind='cifar', train=True)
  assert len(traces) == 1  # traced once; numpy and jax.Array inputs of one shape share the trace.


def test_preprocess_rejects_bad_inputs():
  with pytest.raises(AssertionError):
    augment.preprocess(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32), kind='cifar', train=True)
  with pytest.raises(AssertionError):
    augment.preprocess(jax.random.key(0), np.zeros((32, 32, 3), np.uint8), kind='cifar', train=True)
  with pytest.raises(ConfigError, match='unknown augmentation kind'):
    augment.preprocess(jax.random.key(0), np.zeros((2, 32, 32, 3), np.uint8), kind='imagenet', train=True)
  with pytest.raises(ConfigError, match='needs a PRNG key'):
    augment.preprocess(None, np.zeros((2, 32, 32, 3), np.uint8), kind='cifar', train=True)
  assert augment.output_shape((64, 64, 3), 'tiny_imagenet') == (56, 56, 3)
  assert augment.output_shape((32, 32, 3), 'cifar') == (32, 32, 3)
