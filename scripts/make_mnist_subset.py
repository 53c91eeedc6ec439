"""Builds the MNIST subset shipped with the package (``arreg_jax/data/assets/mnist_subset.npz``).

The asset holds the FIRST ``--train`` training and FIRST ``--test`` test examples of the upstream IDX files, in
their upstream order, as uint8 NHWC images (N, 28, 28, 1) and uint8 labels, in a compressed ``.npz``:

  python scripts/make_mnist_subset.py --mnist_dir DIR_WITH_MNIST_GZ_FILES \
      --out arreg_jax/data/assets/mnist_subset.npz --train 10000 --test 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from arreg_jax.data import mnist


def build(mnist_dir: str, out: str, train: int, test: int) -> dict[str, np.ndarray]:
  """Reads the IDX files in ``mnist_dir`` and writes the first ``train``/``test`` examples to ``out``."""
  (train_x, train_y), (test_x, test_y), _ = mnist.load_files(mnist_dir)
  if not 0 < train <= len(train_y) or not 0 < test <= len(test_y):
    raise SystemExit(f'--train must be in [1, {len(train_y)}] and --test in [1, {len(test_y)}]')
  arrays = {
      'train_images': np.ascontiguousarray(train_x[:train]),
      'train_labels': np.ascontiguousarray(train_y[:train]),
      'test_images': np.ascontiguousarray(test_x[:test]),
      'test_labels': np.ascontiguousarray(test_y[:test]),
  }
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez_compressed(f, **arrays)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the asset ordinary file permissions.
    os.replace(tmp, out)
  except BaseException:
    os.unlink(tmp)
    raise
  return arrays


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mnist_dir', required=True, help='folder holding the four upstream IDX files (.gz or not)')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'arreg_jax', 'data',
                                                    'assets', mnist.EMBEDDED_ASSET))
  parser.add_argument('--train', type=int, default=10000, help='keep the first N training examples')
  parser.add_argument('--test', type=int, default=2000, help='keep the first N test examples')
  args = parser.parse_args(argv)
  arrays = build(args.mnist_dir, args.out, args.train, args.test)
  print(f'wrote {os.path.abspath(args.out)} ({os.path.getsize(args.out):,} bytes): '
        + ', '.join(f'{k} {v.shape} {v.dtype}' for k, v in arrays.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
