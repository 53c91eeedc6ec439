"""MNIST from the upstream IDX files, and the real 10k/2k MNIST subset shipped with the package.

IDX layout (http://yann.lecun.com/exdb/mnist/): a big-endian header -- two zero bytes, a type byte (0x08 for
unsigned byte), a byte giving the number of dimensions, then one uint32 per dimension -- followed by the data in
C order. Image files therefore start with magic 0x00000803 and label files with 0x00000801. Files may be
gzip-compressed (``*.gz``, as distributed) or not.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import os
import zlib

import numpy as np

from arreg_jax.data import paths
from arreg_jax.data.dataset import SPECS
from arreg_jax.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b'\x1f\x8b'

TRAIN_IMAGES = 'train-images-idx3-ubyte'
TRAIN_LABELS = 'train-labels-idx1-ubyte'
TEST_IMAGES = 't10k-images-idx3-ubyte'
TEST_LABELS = 't10k-labels-idx1-ubyte'
# Folders (relative to data_dir) that may hold the IDX files; '' is data_dir itself.
_FOLDERS = ('', 'mnist', os.path.join('MNIST', 'raw'))

EMBEDDED_ASSET = 'mnist_subset.npz'


def _how() -> str:
  return SPECS['mnist'].how_to_get


def _read_bytes(path: str) -> bytes:
  """Reads a file, gunzipping ``*.gz``; corrupt or truncated gzip streams raise ``DataError``."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise DataError(f'mnist: {path} is not a valid gzip file or is truncated ({e}); download it again. '
                    f'{_how()}') from None
  except OSError as e:
    raise DataError(f'mnist: cannot read {path} ({e.strerror or e}). {_how()}') from None


def parse_idx(data: bytes, magic: int, path: str) -> np.ndarray:
  """Parses an unsigned-byte IDX buffer and checks its magic number and size.

  Args:
    data: the whole (decompressed) file.
    magic: the expected magic number (``IMAGES_MAGIC`` or ``LABELS_MAGIC``).
    path: the file the bytes came from (for messages).

  Returns:
    A uint8 array with the shape given by the header.

  Raises:
    DataError: wrong magic, truncated header or data, or trailing bytes.
  """
  kind = 'image' if magic == IMAGES_MAGIC else 'label'
  if len(data) < 4:
    raise DataError(f'mnist: {path} is truncated ({len(data)} bytes, no IDX header); download it again. {_how()}')
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    hint = ''
    if data[:2] == _GZIP_MAGIC:
      hint = ' It is gzip-compressed: give it a .gz suffix or gunzip it.'
    raise DataError(f'mnist: {path} has magic number 0x{found:08x}, expected 0x{magic:08x} (an IDX {kind} file); '
                    f'it is not the upstream MNIST {kind} file.{hint} {_how()}')
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f'mnist: {path} is truncated inside its IDX header; download it again. {_how()}')
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  size = int(np.prod(dims, dtype=np.int64))
  if len(data) - header != size:
    state = 'is truncated' if len(data) - header < size else 'has trailing bytes'
    raise DataError(f'mnist: {path} {state}: header says {dims} = {size} bytes of data, file holds '
                    f'{len(data) - header}; download it again. {_how()}')
  return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims)


def read_idx(path: str, magic: int) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file; see ``parse_idx``."""
  return parse_idx(_read_bytes(path), magic, path)


def _find(folder: str, base: str) -> str:
  for candidate in (os.path.join(folder, base), os.path.join(folder, base + '.gz')):
    if os.path.isfile(candidate):
      return candidate
  raise DataError(f'mnist: expected file {os.path.join(folder, base)}[.gz] is missing. {_how()}')


def read_split(folder: str, images_base: str, labels_base: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split's image and label files from ``folder`` as ((N, 28, 28, 1) uint8, (N,) uint8)."""
  images_path = _find(folder, images_base)
  labels_path = _find(folder, labels_base)
  images = read_idx(images_path, IMAGES_MAGIC)
  labels = read_idx(labels_path, LABELS_MAGIC)
  if images.ndim != 3 or images.shape[1:] != (28, 28):
    raise DataError(f'mnist: {images_path} holds images of shape {images.shape}, expected (N, 28, 28). {_how()}')
  if labels.ndim != 1:
    raise DataError(f'mnist: {labels_path} holds labels of shape {labels.shape}, expected (N,). {_how()}')
  if labels.shape[0] != images.shape[0]:
    raise DataError(f'mnist: {images_path} holds {images.shape[0]} images but {labels_path} holds '
                    f'{labels.shape[0]} labels; the files do not belong together. {_how()}')
  return images[..., None], labels


def find_mnist_folder(data_dir: str) -> str:
  """Returns the folder under ``data_dir`` (itself, mnist/ or MNIST/raw/) that holds the IDX files."""
  for sub in _FOLDERS:
    folder = os.path.join(data_dir, sub) if sub else data_dir
    if any(os.path.isfile(os.path.join(folder, TRAIN_IMAGES + ext)) for ext in ('', '.gz')):
      return folder
  looked = ', '.join(os.path.join(data_dir, sub) if sub else data_dir for sub in _FOLDERS)
  raise DataError(f'mnist: no {TRAIN_IMAGES}[.gz] found in {looked}. {_how()}')


def load_files(data_dir: str | os.PathLike | None):
  """Loads full MNIST from upstream IDX files; returns ((train_x, train_y), (test_x, test_y), folder)."""
  folder = find_mnist_folder(paths.resolve_data_dir('mnist', data_dir))
  train = read_split(folder, TRAIN_IMAGES, TRAIN_LABELS)
  test = read_split(folder, TEST_IMAGES, TEST_LABELS)
  return train, test, folder


def load_embedded():
  """Loads the MNIST subset shipped in the package; returns ((train_x, train_y), (test_x, test_y), where).

  The asset holds the first 10,000 training and first 2,000 test examples of the upstream IDX files, built by
  ``scripts/make_mnist_subset.py``.
  """
  resource = importlib.resources.files('arreg_jax.data').joinpath('assets').joinpath(EMBEDDED_ASSET)
  where = f'the embedded asset {resource}'
  fix = ('Reinstall arreg_jax, or rebuild the asset with scripts/make_mnist_subset.py, or set '
         "data.source='files' with data.data_dir holding the upstream MNIST files.")
  try:
    blob = resource.read_bytes()
  except OSError:
    raise DataError(f'mnist: {where} is missing from the package. {fix}') from None
  try:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in ('train_images', 'train_labels', 'test_images', 'test_labels')}
  except Exception as e:  # pylint: disable=broad-except  # zipfile/numpy raise many types for a bad file.
    raise DataError(f'mnist: {where} is corrupt ({type(e).__name__}: {e}). {fix}') from None
  return ((arrays['train_images'], arrays['train_labels']), (arrays['test_images'], arrays['test_labels']),
          where)
