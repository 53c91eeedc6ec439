"""The in-memory ``Dataset`` record, the facts known about each dataset, and array validation.

Every loader (embedded asset, upstream files, TFDS) returns plain numpy arrays; ``make_dataset`` checks them
against the dataset's known layout and wraps them in a ``Dataset``. A failed check raises ``DataError`` naming the
dataset and where the arrays came from, so a corrupt or mislabelled source never reaches training.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from arreg_jax.errors import DataError

# Augmentation kinds understood by ``arreg_jax.data.augment.preprocess``.
AUGMENT_KINDS = ('none', 'cifar', 'tiny_imagenet')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about one dataset.

  Attributes:
    name: the dataset's name in configs.
    raw_shape: (H, W, C) of the stored uint8 images.
    num_classes: number of classes of the full dataset.
    augment: which preprocessing applies (see ``augment.preprocess``).
    model_shape: (H, W, C) of what the model sees after preprocessing.
    how_to_get: a sentence telling the user how to provide the data.
  """
  name: str
  raw_shape: tuple[int, int, int]
  num_classes: int
  augment: str
  model_shape: tuple[int, int, int]
  how_to_get: str


SPECS: dict[str, DatasetSpec] = {
    'mnist': DatasetSpec(
        name='mnist', raw_shape=(28, 28, 1), num_classes=10, augment='none', model_shape=(28, 28, 1),
        how_to_get=(
            "Put the four upstream IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], e.g. from "
            "https://ossci-datasets.s3.amazonaws.com/mnist/) in data.data_dir, or set data.source='embedded' "
            "(a 10k/2k subset shipped with the package) or data.source='tfds'.")),
    'cifar10': DatasetSpec(
        name='cifar10', raw_shape=(32, 32, 3), num_classes=10, augment='cifar', model_shape=(32, 32, 3),
        how_to_get=(
            "Download cifar-10-python.tar.gz (or cifar-10-binary.tar.gz) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it in data.data_dir so that "
            "data_dir/cifar-10-batches-py/ (or cifar-10-batches-bin/) exists, or set data.source='tfds'.")),
    'cifar100': DatasetSpec(
        name='cifar100', raw_shape=(32, 32, 3), num_classes=100, augment='cifar', model_shape=(32, 32, 3),
        how_to_get=(
            "Download cifar-100-python.tar.gz (or cifar-100-binary.tar.gz) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it in data.data_dir so that "
            "data_dir/cifar-100-python/ (or cifar-100-binary/) exists, or set data.source='tfds'.")),
    'tiny_imagenet': DatasetSpec(
        name='tiny_imagenet', raw_shape=(64, 64, 3), num_classes=200, augment='tiny_imagenet',
        model_shape=(56, 56, 3),
        how_to_get=(
            "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it in data.data_dir so that "
            "data_dir/tiny-imagenet-200/wnids.txt exists (data.source='files').")),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A whole dataset held in host memory as uint8 NHWC images and int32 labels.

  ``eq=False``: instances compare and hash by identity (field-wise ``==`` on arrays is ambiguous).

  Attributes:
    name: 'mnist' | 'cifar10' | 'cifar100' | 'tiny_imagenet'.
    train_images: uint8 (N, H, W, C); MNIST has C=1.
    train_labels: int32 (N,).
    test_images: uint8 (M, H, W, C) (Tiny-ImageNet: the labelled val split).
    test_labels: int32 (M,).
    num_classes: labels lie in [0, num_classes).
    augment: 'none' | 'cifar' | 'tiny_imagenet': which preprocessing applies.
    image_shape: (H, W, C) of what the model sees after preprocessing (56, 56, 3 for Tiny-ImageNet).
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  augment: str
  image_shape: tuple

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_labels.shape[0])


def check_split(name: str, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                where: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates one split's arrays and returns them as (uint8 images, int32 labels).

  Args:
    name: dataset name (for messages and the expected image shape).
    split: 'train' or 'test' (for messages).
    images: candidate images, (N, H, W, C).
    labels: candidate labels, (N,), any integer dtype.
    num_classes: labels must lie in [0, num_classes).
    where: the path or source the arrays came from (for messages).

  Returns:
    ``(images, labels)`` with dtypes uint8 and int32, C-contiguous.

  Raises:
    DataError: on a wrong dtype, rank, image shape, count mismatch or out-of-range label.
  """
  spec = SPECS[name]
  images = np.asarray(images)
  labels = np.asarray(labels)
  prefix = f'{name} {split} split from {where}:'
  if images.dtype != np.uint8:
    raise DataError(f'{prefix} images have dtype {images.dtype}, expected uint8. {spec.how_to_get}')
  if images.ndim != 4 or tuple(images.shape[1:]) != spec.raw_shape:
    raise DataError(f'{prefix} images have shape {images.shape}, expected (N, *{spec.raw_shape}). '
                    f'{spec.how_to_get}')
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{prefix} labels have shape {labels.shape} and dtype {labels.dtype}, expected a 1-D '
                    f'integer array. {spec.how_to_get}')
  if labels.shape[0] != images.shape[0]:
    raise DataError(f'{prefix} {images.shape[0]} images but {labels.shape[0]} labels. {spec.how_to_get}')
  if images.shape[0] == 0:
    raise DataError(f'{prefix} the split is empty. {spec.how_to_get}')
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    raise DataError(f'{prefix} labels span [{lo}, {hi}], expected [0, {num_classes - 1}]. {spec.how_to_get}')
  return np.ascontiguousarray(images), np.ascontiguousarray(labels.astype(np.int32, copy=False))


def make_dataset(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 where: str, num_classes: int | None = None) -> Dataset:
  """Validates both splits and builds the ``Dataset`` (``num_classes`` defaults to the dataset's own)."""
  spec = SPECS[name]
  num_classes = spec.num_classes if num_classes is None else int(num_classes)
  train_images, train_labels = check_split(name, 'train', *train, num_classes=num_classes, where=where)
  test_images, test_labels = check_split(name, 'test', *test, num_classes=num_classes, where=where)
  return Dataset(name=name, train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels, num_classes=num_classes, augment=spec.augment,
                 image_shape=spec.model_shape)
