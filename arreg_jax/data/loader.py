"""``get_dataset``: the one entry point that turns a run config's ``data`` block into a ``Dataset``.

Config fields (``ml_collections.ConfigDict``; optional ones may be absent):
  name:          'mnist' | 'cifar10' | 'cifar100' | 'tiny_imagenet'.
  source:        'embedded' (MNIST only: the 10k/2k subset shipped in the package) | 'files' (upstream files in
                 data_dir) | 'tfds' (a prepared TFDS folder in data_dir).
  data_dir:      str | None.
  train_size:    int | None: keep the first n training examples.
  test_size:     int | None: keep the first n test examples.
  tfds_download: bool (default False): let TFDS download and prepare (needs internet).
  cache_dir:     str | None: Tiny-ImageNet's decode cache (default ~/.cache/arreg_jax).
  classes:       int | None: Tiny-ImageNet only: keep the first K wnids (labels 0..K-1).
  keep_classes:  tuple of class indices (default ()): keep only their examples, relabelled 0..K-1 in the order
                 given (e.g. (0, 1) for MNIST 0 vs 1); applied before train_size / test_size.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import numpy as np

from arreg_jax.data import cifar
from arreg_jax.data import mnist
from arreg_jax.data import tfds_source
from arreg_jax.data import tiny_imagenet
from arreg_jax.data.dataset import Dataset, SPECS, make_dataset
from arreg_jax.errors import ConfigError

SOURCES = ('embedded', 'files', 'tfds')
# Which sources serve which dataset.
_SUPPORTED = {
    'mnist': ('embedded', 'files', 'tfds'),
    'cifar10': ('files', 'tfds'),
    'cifar100': ('files', 'tfds'),
    'tiny_imagenet': ('files',),
}


def _get(cfg: Any, field: str, default: Any = None) -> Any:
  """``cfg.get(field, default)`` for ConfigDicts and mappings, ``getattr`` for other objects."""
  if hasattr(cfg, 'get'):
    return cfg.get(field, default)
  return getattr(cfg, field, default)


def _size(cfg: Any, field: str) -> int | None:
  value = _get(cfg, field)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f'data.{field} must be a positive integer or None, got {value!r}.')
  return int(value)


def _first(split: tuple[np.ndarray, np.ndarray], n: int | None, name: str, field: str, source: str):
  images, labels = split
  if n is None:
    return images, labels
  if n > len(labels):
    raise ConfigError(f"data.{field}={n}, but {name} (source='{source}') has only {len(labels)} examples in "
                      f'that split; lower data.{field} or set it to None.')
  return images[:n], labels[:n]


def _keep(split: tuple[np.ndarray, np.ndarray], keep: tuple[int, ...]):
  images, labels = split
  relabel = np.full(max(int(labels.max()), max(keep)) + 1, -1, np.int64)
  relabel[list(keep)] = np.arange(len(keep))
  sel = relabel[labels] >= 0
  return images[sel], relabel[labels[sel]].astype(np.int32)


def get_dataset(cfg: Any) -> Dataset:
  """Loads the dataset described by a run config's ``data`` block (see the module docstring).

  Args:
    cfg: ``ml_collections.ConfigDict`` (or any mapping / attribute object) with the fields above.

  Returns:
    A validated ``Dataset``.

  Raises:
    ConfigError: unknown name or source, unsupported combination, or bad sizes.
    DataError: the data is missing, corrupt or not prepared (the message says how to provide it).
  """
  name = _get(cfg, 'name')
  if name not in SPECS:
    raise ConfigError(f'data.name={name!r} is not a known dataset; valid names: {", ".join(SPECS)}.')
  source = _get(cfg, 'source')
  if source not in SOURCES:
    raise ConfigError(f'data.source={source!r} is not a known source; valid sources: {", ".join(SOURCES)}.')
  if source not in _SUPPORTED[name]:
    raise ConfigError(f"data.source='{source}' is not available for {name}; use one of "
                      f'{", ".join(_SUPPORTED[name])}.')
  data_dir = _get(cfg, 'data_dir')
  train_size = _size(cfg, 'train_size')
  test_size = _size(cfg, 'test_size')
  classes = _size(cfg, 'classes')
  if classes is not None and name != 'tiny_imagenet':
    raise ConfigError(f'data.classes applies to tiny_imagenet only; set it to None for {name}.')

  num_classes = None
  if source == 'embedded':
    train, test, where = mnist.load_embedded()
  elif source == 'tfds':
    train, test, where = tfds_source.load_tfds(name, data_dir, download=bool(_get(cfg, 'tfds_download', False)),
                                               train_size=train_size, test_size=test_size)
  elif name == 'mnist':
    train, test, where = mnist.load_files(data_dir)
  elif name in ('cifar10', 'cifar100'):
    train, test, where = cifar.load_files(name, data_dir)
  else:
    tin = tiny_imagenet.load_files(data_dir, cache_dir=_get(cfg, 'cache_dir'), classes=classes)
    train, test, where, num_classes = tin.train, tin.val, tin.root, tin.num_classes

  keep = tuple(int(k) for k in (_get(cfg, 'keep_classes') or ()))
  if keep:
    total = num_classes if num_classes is not None else SPECS[name].num_classes
    if max(keep) >= total:  # the rest of the rule (distinct, >= 0, at least two) is configuration.validate's
      raise ConfigError(f'data.keep_classes={keep} names a class that {name} does not have (0..{total - 1}).')
    train, test, num_classes = _keep(train, keep), _keep(test, keep), len(keep)
  train = _first(train, train_size, name, 'train_size', source)
  test = _first(test, test_size, name, 'test_size', source)
  ds = make_dataset(name, train, test, where=where, num_classes=num_classes)
  logging.info('Loaded %s from %s: %d train, %d test examples, %d classes.', name, where, ds.num_train,
               ds.num_test, ds.num_classes)
  return ds
