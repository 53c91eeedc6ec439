"""arreg_jax: adversarial robustness and the regularization it brings (Wen, Li & Jia, ICML 2020), in JAX.

The library — usable on any JAX model (Flax linen or NNX, Equinox, plain JAX):

* :mod:`arreg_jax.attacks` — PGD, FGSM, APGD, Square, AutoAttack as functions of ``(logits_fn, images, labels, key)``;
* :mod:`arreg_jax.analysis` — the paper's analyses as functions of ``(apply_fn, params, images, labels)``;
* :mod:`arreg_jax.spectral` — every layer's singular values (convolutions by FFT), spectral clipping;
* :mod:`arreg_jax.adapters` — a linen, NNX or Equinox model as ``Model(apply_fn, params)`` in one line;
* :mod:`arreg_jax.models` — the paper's networks; :mod:`arreg_jax.sharding` — the batch mapper over devices.

The experiment runner (``python -m arreg_jax.main``, ``python -m arreg_jax.analyze``) is built on them. Importing
``arreg_jax`` loads none of these (nor JAX): each subpackage loads on first use, ``arreg_jax.spectral`` and so on.
"""

import importlib

_SUBMODULES = ('adapters', 'analysis', 'attacks', 'models', 'sharding', 'spectral')

__all__ = ['__version__', *_SUBMODULES]


def _version() -> str:
  """The installed distribution's version (read on first use: importlib.metadata costs ~40 ms to import)."""
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version('arreg_jax')
  except Exception:  # pylint: disable=broad-except  (not installed: a source tree on sys.path)
    return '0+unknown'


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  if name == '__version__':
    globals()['__version__'] = version = _version()
    return version
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(__all__))
