"""Datasets for arreg_jax: MNIST, CIFAR-10, CIFAR-100 and Tiny-ImageNet as in-memory uint8 arrays.

``get_dataset(cfg)`` loads one from the embedded MNIST subset, the upstream files, or a prepared TFDS folder and
returns a validated ``Dataset``; ``arreg_jax.data.augment.preprocess`` does the on-device preprocessing.
"""

from arreg_jax.data.dataset import Dataset
from arreg_jax.data.loader import get_dataset
from arreg_jax.data.loader import SOURCES
from arreg_jax.data.dataset import SPECS

DATASETS = tuple(SPECS)

__all__ = ['DATASETS', 'Dataset', 'SOURCES', 'get_dataset']
