"""Tiny-ImageNet from the upstream ``tiny-imagenet-200/`` folder, decoded once into an array cache.

Upstream layout (http://cs231n.stanford.edu/tiny-imagenet-200.zip):
  * ``wnids.txt``: the class WordNet IDs, one a line; a class's label is its line index.
  * ``train/<wnid>/images/*.JPEG``: 500 64x64 training images per class.
  * ``val/images/*.JPEG`` and ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``): the
    labelled validation split, 50 per class, used as the test split.
Some images are grayscale; they are converted to RGB.

A partial ``train/`` (some class folders missing) loads what is present, with a warning. ``classes=K`` keeps only
the first K wnids of ``wnids.txt`` in both splits (labels stay 0..K-1), and is refused when the training folders
miss some of them.

Training examples are ordered class-interleaved (the first image of every class, then the second of every class,
...; files sorted by name within a class), so "the first n examples" (``data.train_size``) is class-balanced.
Validation examples keep the order of ``val_annotations.txt``.

Decoding ~15k-100k JPEGs takes seconds to minutes, so the decoded arrays are cached as an ``.npz`` in
``cache_dir``, under a name derived from a hash of the folder's absolute path, every used file's name, size and
mtime, and ``classes``. The cache is written to a temporary file and renamed into place, so an interrupted decode
never leaves a partial cache; a cache that fails to load (or whose stored key differs) is rebuilt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Sequence

from absl import logging
import numpy as np
from PIL import Image

from arreg_jax.data import paths
from arreg_jax.data.dataset import SPECS
from arreg_jax.errors import ConfigError, DataError

FOLDER = 'tiny-imagenet-200'
IMAGE_SIZE = 64
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'arreg_jax')
# Bump when the cache's content or layout changes, so old caches are not reused.
_CACHE_FORMAT = 1
_JPEG_SUFFIXES = ('.jpeg', '.jpg')


@dataclasses.dataclass(frozen=True)
class TinyImageNet:
  """Decoded Tiny-ImageNet arrays plus where they came from.

  Attributes:
    train: (uint8 (N, 64, 64, 3), int64 (N,)).
    val: (uint8 (M, 64, 64, 3), int64 (M,)).
    root: the ``tiny-imagenet-200`` folder.
    num_classes: K (the number of wnids kept).
    classes_present: how many of the K classes have training images.
    cache_path: the cache file used or written (None if caching failed).
    from_cache: whether the arrays were read from the cache rather than decoded.
  """
  train: tuple[np.ndarray, np.ndarray]
  val: tuple[np.ndarray, np.ndarray]
  root: str
  num_classes: int
  classes_present: int
  cache_path: str | None
  from_cache: bool


@dataclasses.dataclass(frozen=True)
class _FileEntry:
  path: str
  label: int
  size: int
  mtime_ns: int


def _how() -> str:
  return SPECS['tiny_imagenet'].how_to_get


def find_root(data_dir: str | os.PathLike | None) -> str:
  """Returns the ``tiny-imagenet-200`` folder at or below ``data_dir``."""
  data_dir = paths.resolve_data_dir('tiny_imagenet', data_dir)
  root = paths.find_folder(data_dir, [FOLDER], 'wnids.txt')
  if root is None:
    raise DataError(f'tiny_imagenet: no {FOLDER}/wnids.txt found under {data_dir} (looked at '
                    f'{os.path.join(data_dir, FOLDER, "wnids.txt")} and {os.path.join(data_dir, "wnids.txt")}). '
                    f'{_how()}')
  return root


def read_wnids(root: str) -> list[str]:
  """Reads ``wnids.txt`` (one WordNet ID per line, blank lines ignored) and checks the IDs are unique."""
  path = paths.require_file('tiny_imagenet', os.path.join(root, 'wnids.txt'))
  with open(path, encoding='utf-8', errors='replace') as f:
    wnids = [line.strip() for line in f if line.strip()]
  if not wnids:
    raise DataError(f'tiny_imagenet: {path} is empty; it must list the class wnids, one a line. {_how()}')
  if len(set(wnids)) != len(wnids):
    raise DataError(f'tiny_imagenet: {path} lists some wnids more than once. {_how()}')
  return wnids


def _jpegs(folder: str) -> list[os.DirEntry]:
  with os.scandir(folder) as it:
    entries = [e for e in it if e.name.lower().endswith(_JPEG_SUFFIXES) and e.is_file()]
  return sorted(entries, key=lambda e: e.name)


def _entry(e: os.DirEntry, label: int) -> _FileEntry:
  st = e.stat()
  return _FileEntry(e.path, label, st.st_size, st.st_mtime_ns)


def list_train(root: str, wnids: Sequence[str]) -> tuple[list[_FileEntry], int]:
  """Lists training JPEGs of ``wnids`` (class-interleaved order); returns (entries, number of classes present)."""
  per_class = []
  for label, wnid in enumerate(wnids):
    folder = os.path.join(root, 'train', wnid, 'images')
    if os.path.isdir(folder):
      files = [_entry(e, label) for e in _jpegs(folder)]
      if files:
        per_class.append(files)
  entries = [c[i] for i in range(max((len(c) for c in per_class), default=0)) for c in per_class if i < len(c)]
  return entries, len(per_class)


def list_val(root: str, wnids: Sequence[str], all_wnids: Sequence[str]) -> list[_FileEntry]:
  """Lists validation JPEGs whose annotated wnid is in ``wnids``, in ``val_annotations.txt`` order."""
  ann = paths.require_file('tiny_imagenet', os.path.join(root, 'val', 'val_annotations.txt'))
  images = os.path.join(root, 'val', 'images')
  if not os.path.isdir(images):
    raise DataError(f'tiny_imagenet: folder {images} is missing. {_how()}')
  with os.scandir(images) as it:
    present = {e.name: e for e in it}
  label_of = {w: i for i, w in enumerate(wnids)}
  known = set(all_wnids)
  entries = []
  with open(ann, encoding='utf-8', errors='replace') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip('\n').split('\t')
      if len(fields) < 2:
        raise DataError(f'tiny_imagenet: {ann} line {lineno} is not "file<TAB>wnid<TAB>...": {line.strip()!r}. '
                        f'{_how()}')
      name, wnid = fields[0], fields[1]
      if wnid not in known:
        raise DataError(f'tiny_imagenet: {ann} line {lineno} names wnid {wnid}, which is not in wnids.txt. '
                        f'{_how()}')
      if wnid not in label_of:
        continue
      if name not in present:
        raise DataError(f'tiny_imagenet: {os.path.join(images, name)} (listed in {ann}) is missing. {_how()}')
      entries.append(_entry(present[name], label_of[wnid]))
  if not entries:
    raise DataError(f'tiny_imagenet: {ann} lists no validation images for the selected classes. {_how()}')
  return entries


def decode_image(path: str) -> np.ndarray:
  """Decodes one JPEG as (64, 64, 3) uint8 RGB (grayscale and other modes are converted)."""
  try:
    with Image.open(path) as im:
      arr = np.asarray(im.convert('RGB'))
  except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated data, bad headers.
    raise DataError(f'tiny_imagenet: {path} is not a readable image ({e}); restore it from the upstream zip. '
                    f'{_how()}') from None
  if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise DataError(f'tiny_imagenet: {path} is {arr.shape[1]}x{arr.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}. '
                    f'{_how()}')
  return arr


def decode_all(entries: Sequence[_FileEntry], num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Decodes ``entries`` with a thread pool (PIL releases the GIL while decoding)."""
  images = np.empty((len(entries), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  labels = np.array([e.label for e in entries], np.int64)

  def work(i: int) -> None:
    images[i] = decode_image(entries[i].path)

  num_threads = num_threads or min(32, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for _ in pool.map(work, range(len(entries))):
      pass
  return images, labels


def cache_key(root: str, classes: int | None, train: Sequence[_FileEntry], val: Sequence[_FileEntry]) -> str:
  """Hash of everything the decoded arrays depend on."""
  h = hashlib.sha256()
  meta = {'format': _CACHE_FORMAT, 'root': os.path.abspath(root), 'classes': classes}
  for name in ('wnids.txt', os.path.join('val', 'val_annotations.txt')):
    st = os.stat(os.path.join(root, name))
    meta[name] = [st.st_size, st.st_mtime_ns]
  h.update(json.dumps(meta, sort_keys=True).encode())
  for split, entries in (('train', train), ('val', val)):
    h.update(split.encode())
    for e in entries:
      h.update(f'{os.path.relpath(e.path, root)}\0{e.label}\0{e.size}\0{e.mtime_ns}\n'.encode())
  return h.hexdigest()


def _read_cache(path: str, key: str, n_train: int, n_val: int):
  """Returns ((train_x, train_y), (val_x, val_y)) from the cache, or None if it is absent, stale or corrupt."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      if str(npz['key']) != key:
        raise ValueError('stored key differs')
      out = ((npz['train_images'], npz['train_labels']), (npz['val_images'], npz['val_labels']))
    for (x, y), n in zip(out, (n_train, n_val)):
      if x.shape != (n, IMAGE_SIZE, IMAGE_SIZE, 3) or x.dtype != np.uint8 or y.shape != (n,):
        raise ValueError(f'arrays of shape {x.shape}/{y.shape}, expected {n} examples')
    return out
  except Exception as e:  # pylint: disable=broad-except  # zipfile/numpy raise many types for a bad file.
    logging.warning('tiny_imagenet: cache %s is unreadable or stale (%s: %s); decoding again.', path,
                    type(e).__name__, e)
    return None


def _write_cache(path: str, key: str, train, val) -> bool:
  """Writes the cache atomically (temp file + rename); returns False (with a warning) if that fails.

  The final name only ever appears via ``os.replace`` of a completely written, fsynced file, so an interrupted
  write (exception, Ctrl-C, or a kill) can at worst leave a ``*.tmp`` file behind, never a partial cache.
  """
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=os.path.dirname(path))
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, key=np.array(key), train_images=train[0], train_labels=train[1], val_images=val[0],
               val_labels=val[1])
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    return True
  except OSError as e:
    logging.warning('tiny_imagenet: could not write the decode cache %s (%s); continuing without it. Set '
                    'data.cache_dir to a writable folder to avoid decoding again next time.', path, e)
    return False
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def load_files(data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
               classes: int | None = None, num_threads: int | None = None) -> TinyImageNet:
  """Loads Tiny-ImageNet (train + labelled val) from the upstream folder, through the decode cache.

  Args:
    data_dir: ``tiny-imagenet-200`` itself or the folder holding it.
    cache_dir: where the decoded ``.npz`` goes (default ``~/.cache/arreg_jax``).
    classes: keep only the first K wnids of ``wnids.txt`` (None: all).
    num_threads: decoder threads (default 2x the CPU count, at most 32).

  Returns:
    A ``TinyImageNet`` record.

  Raises:
    ConfigError: ``classes`` out of range, or more classes than the training folders hold.
    DataError: missing or corrupt files, or no training images for the selected classes.
  """
  root = find_root(data_dir)
  all_wnids = read_wnids(root)
  if classes is not None and not 1 <= int(classes) <= len(all_wnids):
    raise ConfigError(f'tiny_imagenet: data.classes={classes} is out of range; {root}/wnids.txt lists '
                      f'{len(all_wnids)} classes, so use 1..{len(all_wnids)} or None (all).')
  num_classes = len(all_wnids) if classes is None else int(classes)
  wnids = all_wnids[:num_classes]
  train_entries, present = list_train(root, wnids)
  if not train_entries:
    raise DataError(f'tiny_imagenet: no training JPEGs found in {os.path.join(root, "train", "<wnid>", "images")} '
                    f'for any of the {num_classes} selected classes. {_how()}')
  if classes is not None and present < num_classes:  # a request the data cannot meet
    raise ConfigError(f'tiny_imagenet: data.classes={classes}, but {os.path.join(root, "train")} holds training '
                      f'images for only {present} of the first {num_classes} classes of wnids.txt; lower '
                      'data.classes (it keeps the first K wnids), set it to None to train on the classes present, '
                      'or add the missing class folders')
  if present < num_classes:
    logging.warning('tiny_imagenet: %s has training images for only %d of the %d classes in use; training on '
                    'those %d images (the val split keeps all %d classes).', os.path.join(root, 'train'), present,
                    num_classes, len(train_entries), num_classes)
  val_entries = list_val(root, wnids, all_wnids)

  key = cache_key(root, classes, train_entries, val_entries)
  cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir or DEFAULT_CACHE_DIR)))
  cache_path = os.path.join(cache_dir, f'tiny_imagenet-{key[:24]}.npz')
  cached = _read_cache(cache_path, key, len(train_entries), len(val_entries))
  if cached is not None:
    logging.info('tiny_imagenet: loaded decoded arrays from cache %s', cache_path)
    train, val = cached
    return TinyImageNet(train, val, root, num_classes, present, cache_path, from_cache=True)

  logging.info('tiny_imagenet: decoding %d train + %d val JPEGs from %s', len(train_entries), len(val_entries),
               root)
  train = decode_all(train_entries, num_threads)
  val = decode_all(val_entries, num_threads)
  written = _write_cache(cache_path, key, train, val)
  return TinyImageNet(train, val, root, num_classes, present, cache_path if written else None, from_cache=False)
