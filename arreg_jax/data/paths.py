"""Locating a dataset's upstream folder under ``data.data_dir``.

Users point ``data_dir`` either at the folder that holds the dataset's upstream folder (``~/data`` holding
``cifar-10-batches-py/``) or at that folder itself (``~/data/cifar-10-batches-py``). ``find_folder`` accepts both
and otherwise raises one ``DataError`` that names every place it looked and how to provide the data.
"""

from __future__ import annotations

import os
from typing import Sequence

from arreg_jax.data.dataset import SPECS
from arreg_jax.errors import ConfigError, DataError


def resolve_data_dir(name: str, data_dir: str | os.PathLike | None) -> str:
  """Returns ``data_dir`` as an absolute path; raises if it is unset or not a directory."""
  how = SPECS[name].how_to_get
  if data_dir is None or str(data_dir) == '':
    raise ConfigError(f"{name}: data.source='files' needs data.data_dir (the folder holding the upstream files), "
                      f'but it is not set. {how}')
  path = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if not os.path.isdir(path):
    raise DataError(f'{name}: data.data_dir {path} does not exist or is not a directory. {how}')
  return path


def find_folder(data_dir: str, candidates: Sequence[str], marker: str) -> str | None:
  """Finds the first folder that contains ``marker`` among ``data_dir/<candidate>`` and ``data_dir`` itself.

  Args:
    data_dir: an existing directory.
    candidates: upstream folder names to try below ``data_dir`` (e.g. 'cifar-10-batches-py').
    marker: a file name whose presence identifies the folder (e.g. 'data_batch_1').

  Returns:
    The folder's path, or None if no candidate holds ``marker``.
  """
  for sub in list(candidates) + ['']:
    folder = os.path.join(data_dir, sub) if sub else data_dir
    if os.path.isfile(os.path.join(folder, marker)):
      return folder
  return None


def require_file(name: str, path: str) -> str:
  """Returns ``path`` if it is a file, else raises ``DataError`` naming it and how to provide the data."""
  if not os.path.isfile(path):
    raise DataError(f'{name}: expected file {path} is missing. {SPECS[name].how_to_get}')
  return path
