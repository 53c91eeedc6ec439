"""MNIST / CIFAR-10 / CIFAR-100 from a prepared TensorFlow Datasets folder, read without TensorFlow.

``tensorflow-datasets`` is an optional dependency (``pip install 'arreg_jax[tfds]'``): it is imported only when a
dataset is loaded from this source, never when the package is imported.

Offline, a TFDS download retries for minutes before failing, so the builder is first asked whether the dataset is
already prepared (``builder.is_prepared()``: ``<data_dir>/<name>/<version>/dataset_info.json`` exists); unless
``download`` is set, an unprepared dataset fails at once with instructions.

Prepared data is read through ``builder.as_data_source`` (random access; needs the ``array_record`` file format and
no TensorFlow). Data prepared in the default TFRecord format can only be read with TensorFlow; it is used when
importable, otherwise the error says how to re-prepare.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from arreg_jax.errors import ConfigError, DataError

# Our name -> (TFDS name, image key, label key).
TFDS_NAMES = {
    'mnist': ('mnist', 'image', 'label'),
    'cifar10': ('cifar10', 'image', 'label'),
    'cifar100': ('cifar100', 'image', 'label'),
}
_SPLITS = {'train': 'train', 'test': 'test'}
_CHUNK = 1024


def _prepare_hint(tfds_name: str, data_dir: str | None) -> str:
  dir_arg = f' --data_dir {data_dir}' if data_dir else ''
  return (f'Prepare it on a machine with internet (`tfds build {tfds_name}{dir_arg} --file_format=array_record`) and '
          f'copy the folder here, or set data.tfds_download=True (needs internet), or use data.source=\'files\'.')


def _records_to_numpy(source, n: int, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first ``n`` records of a data source into stacked (images, labels)."""
  images, labels = [], []
  for start in range(0, n, _CHUNK):
    idx = list(range(start, min(start + _CHUNK, n)))
    batch = source.__getitems__(idx) if hasattr(source, '__getitems__') else [source[i] for i in idx]
    images.extend(np.asarray(r[image_key]) for r in batch)
    labels.extend(int(r[label_key]) for r in batch)
  return np.stack(images), np.asarray(labels, np.int64)


def _read_split(builder, name: str, split: str, n: int | None, image_key: str, label_key: str):
  """Reads one split (its first ``n`` examples if given) as (images, labels)."""
  total = builder.info.splits[split].num_examples
  n = total if n is None or n > total else n  # the caller reports n > total.
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:
    fmt = builder.info.file_format
    fmt = getattr(fmt, 'value', fmt)
    if importlib.util.find_spec('tensorflow') is None:
      raise DataError(
          f'{name}: the TFDS dataset at {builder.data_path} is prepared in the {fmt} format, which only TensorFlow '
          f'can read, and tensorflow is not installed. Install tensorflow, or prepare it again with '
          f'`tfds build {builder.name} --data_dir {os.path.dirname(os.path.dirname(builder.data_path))} '
          f'--file_format=array_record` (delete the old folder first), or use data.source=\'files\'.') from None
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data = tfds.as_numpy(builder.as_dataset(split=f'{split}[:{n}]', batch_size=-1))
    return np.asarray(data[image_key]), np.asarray(data[label_key], np.int64)
  except ImportError as e:
    raise DataError(f'{name}: reading the TFDS dataset at {builder.data_path} needs a missing module ({e}); '
                    f'`pip install array_record`.') from None
  try:
    return _records_to_numpy(source, n, image_key, label_key)
  except Exception as e:  # pylint: disable=broad-except  # array_record/protobuf/PIL errors on corrupt records.
    raise DataError(f'{name}: the TFDS dataset at {builder.data_path} could not be read ({type(e).__name__}: {e}); '
                    f'it is probably corrupt: delete it and prepare it again.') from None


def load_tfds(name: str, data_dir: str | os.PathLike | None, download: bool = False,
              train_size: int | None = None, test_size: int | None = None):
  """Loads a dataset from TFDS; returns ((train_x, train_y), (test_x, test_y), where).

  Args:
    name: 'mnist' | 'cifar10' | 'cifar100'.
    data_dir: the TFDS data dir (None: TFDS's default, ``~/tensorflow_datasets``).
    download: download and prepare (array_record format) if not prepared yet. Needs internet.
    train_size: read only the first n training examples (None: all).
    test_size: read only the first n test examples (None: all).

  Raises:
    ConfigError: a dataset TFDS does not provide here.
    DataError: not prepared (and ``download`` off), download failed, or unreadable.
  """
  if name not in TFDS_NAMES:
    raise ConfigError(f"{name}: data.source='tfds' supports {sorted(TFDS_NAMES)}; use data.source='files' for "
                      f'{name}.')
  tfds_name, image_key, label_key = TFDS_NAMES[name]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (an optional dependency)
  except ImportError as e:
    raise DataError(f"{name}: data.source='tfds' needs the package tensorflow-datasets, which cannot be imported "
                    f"here ({e}); install it with `pip install 'arreg_jax[tfds]'`, or use data.source='files'."
                    ) from None
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir))) if data_dir else None
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types for a bad data_dir.
    raise DataError(f'{name}: cannot open TFDS dataset {tfds_name} in {data_dir or "the default TFDS data dir"} '
                    f'({type(e).__name__}: {e}). {_prepare_hint(tfds_name, data_dir)}') from None
  if not builder.is_prepared():
    if not download:
      raise DataError(f'{name}: TFDS dataset {tfds_name} is not prepared in '
                      f'{data_dir or "the default TFDS data dir"} (no {builder.data_path}/dataset_info.json). '
                      f'{_prepare_hint(tfds_name, data_dir)}')
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # pylint: disable=broad-except  # network and filesystem errors of every kind.
      raise DataError(f'{name}: downloading TFDS dataset {tfds_name} into {builder.data_path} failed '
                      f'({type(e).__name__}: {e}). {_prepare_hint(tfds_name, data_dir)}') from None
  train = _read_split(builder, name, _SPLITS['train'], train_size, image_key, label_key)
  test = _read_split(builder, name, _SPLITS['test'], test_size, image_key, label_key)
  return train, test, f'TFDS {builder.data_path}'
