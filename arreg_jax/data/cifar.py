"""CIFAR-10 and CIFAR-100 from the upstream files (https://www.cs.toronto.edu/~kriz/cifar.html).

Python versions (preferred when both are present):
  * ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a (Python 2) pickle of a
    dict with ``b'data'`` -- (10000, 3072) uint8, each row the 1024 red, then green, then blue values of a 32x32
    image in row-major order -- and ``b'labels'`` (a list of ints).
  * ``cifar-100-python/``: ``train`` and ``test``, the same dict with ``b'fine_labels'`` (used) and
    ``b'coarse_labels'``.
Binary versions:
  * ``cifar-10-batches-bin/``: ``data_batch_{1..5}.bin`` and ``test_batch.bin``, records of 1 label byte + 3072 bytes.
  * ``cifar-100-binary/``: ``train.bin`` and ``test.bin``, records of 1 coarse + 1 fine label byte + 3072 bytes.

Pickles are read with a restricted unpickler that only resolves the numpy names the upstream files use, so a
stray pickle in ``data_dir`` cannot run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, Sequence

import numpy as np

from arreg_jax.data import paths
from arreg_jax.data.dataset import SPECS
from arreg_jax.errors import DataError

_PIXELS = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one upstream variant keeps its files, and how they are encoded."""
  folder: str
  train: tuple[str, ...]
  test: tuple[str, ...]
  binary: bool
  label_key: bytes = b''  # python version: the dict key of the labels.
  label_bytes: int = 1  # binary version: label bytes per record (the last one is used).


_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    'cifar10': (
        _Layout('cifar-10-batches-py', tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',), binary=False,
                label_key=b'labels'),
        _Layout('cifar-10-batches-bin', tuple(f'data_batch_{i}.bin' for i in range(1, 6)), ('test_batch.bin',),
                binary=True, label_bytes=1),
    ),
    'cifar100': (
        _Layout('cifar-100-python', ('train',), ('test',), binary=False, label_key=b'fine_labels'),
        _Layout('cifar-100-binary', ('train.bin',), ('test.bin',), binary=True, label_bytes=2),
    ),
}

# The only globals upstream CIFAR pickles (and numpy arrays pickled by Python 3, protocol 2) refer to.
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the numpy array machinery (numpy 1.x module names mapped to numpy 2)."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f'refusing to load global {module}.{name}')
    if module.startswith('numpy.core'):
      module = 'numpy._core' + module[len('numpy.core'):]
    return super().find_class(module, name)


def _bad(name: str, path: str, what: str) -> DataError:
  return DataError(f'{name}: {path} {what}; download and extract the archive again. {SPECS[name].how_to_get}')


def _to_nhwc(rows: np.ndarray) -> np.ndarray:
  """(N, 3072) channel-major rows -> (N, 32, 32, 3)."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_pickle_batch(name: str, path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Reads one python-version CIFAR batch file as ((N, 32, 32, 3) uint8, (N,) int64)."""
  paths.require_file(name, path)
  try:
    with open(path, 'rb') as f:
      entry = _NumpyOnlyUnpickler(f, encoding='bytes').load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
          ImportError, UnicodeDecodeError, OverflowError, MemoryError) as e:
    raise _bad(name, path, f'is truncated or is not a CIFAR python pickle ({type(e).__name__}: {e})') from None
  if not isinstance(entry, dict) or b'data' not in entry or label_key not in entry:
    keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
    raise _bad(name, path, f"does not hold a dict with keys b'data' and {label_key!r} (found {keys})")
  data = np.asarray(entry[b'data'])
  labels = np.asarray(entry[label_key])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
    raise _bad(name, path, f"holds b'data' of shape {data.shape} and dtype {data.dtype}, expected (N, 3072) uint8")
  if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
    raise _bad(name, path, f'holds {labels.shape} labels of dtype {labels.dtype} for {data.shape[0]} images')
  return _to_nhwc(data), labels.astype(np.int64)


def read_binary_batch(name: str, path: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads one binary-version CIFAR file (records of label byte(s) + 3072 pixels); uses the last label byte."""
  paths.require_file(name, path)
  record = label_bytes + _PIXELS
  try:
    raw = np.fromfile(path, dtype=np.uint8)
  except OSError as e:
    raise DataError(f'{name}: cannot read {path} ({e}). {SPECS[name].how_to_get}') from None
  if raw.size == 0 or raw.size % record:
    raise _bad(name, path, f'is truncated: {raw.size} bytes is not a whole number of {record}-byte records')
  raw = raw.reshape(-1, record)
  return _to_nhwc(raw[:, label_bytes:]), raw[:, label_bytes - 1].astype(np.int64)


def _read_files(name: str, folder: str, files: Sequence[str], layout: _Layout):
  parts = []
  for fname in files:
    path = os.path.join(folder, fname)
    if layout.binary:
      parts.append(read_binary_batch(name, path, layout.label_bytes))
    else:
      parts.append(read_pickle_batch(name, path, layout.label_key))
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def find_layout(name: str, data_dir: str) -> tuple[str, _Layout]:
  """Returns (folder, layout) of the first upstream variant found at or below ``data_dir``."""
  for layout in _LAYOUTS[name]:
    folder = paths.find_folder(data_dir, [layout.folder], layout.train[0])
    if folder is not None:
      return folder, layout
  looked = ', '.join(f'{os.path.join(data_dir, l.folder)}/{l.train[0]}' for l in _LAYOUTS[name])
  raise DataError(f'{name}: no upstream CIFAR files found under {data_dir} (looked for {looked}, and for those '
                  f'files in {data_dir} itself). {SPECS[name].how_to_get}')


def load_files(name: str, data_dir: str | os.PathLike | None):
  """Loads CIFAR-10/100 from upstream files; returns ((train_x, train_y), (test_x, test_y), folder)."""
  if name not in _LAYOUTS:
    raise ValueError(f'not a CIFAR dataset: {name}')
  folder, layout = find_layout(name, paths.resolve_data_dir(name, data_dir))
  train = _read_files(name, folder, layout.train, layout)
  test = _read_files(name, folder, layout.test, layout)
  return train, test, folder
