"""The checks every analysis of ``(apply_fn, params, images, labels)`` makes at the door, as the attacks do.

A wrong input must never come back as a wrong number: images must be floats in [0, 1] with a batch axis, labels
integers of rank 1 with one per image and in ``[0, classes)``, the model must map a batch to ``(batch, classes)``
logits with at least two classes. Each failure is a ``TypeError`` or ``ValueError`` that names the argument and says
what to pass instead. With ``preprocess`` (a function the compiled program applies to each batch, e.g. uint8 → float)
the images are checked after it, on the first example, for shape and dtype only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import adapters

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _limited(x: Any, limit: int | None) -> Any:
  return x if limit is None else x[:limit]


def check_images(images: Any, *, name: str = 'images', rank: int = 4, limit: int | None = None) -> None:
  """Floating point, ``rank`` dims with a batch axis first, at least one example, every value in [0, 1]."""
  if not hasattr(images, 'shape') or not hasattr(images, 'dtype'):
    raise TypeError(f'{name} must be an array, got {type(images).__name__}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    hint = ' (uint8 images: pass images / 255, or preprocess=...)' if images.dtype == np.uint8 else ''
    raise TypeError(f'{name} must be floating point in [0, 1], got dtype {images.dtype}{hint}')
  if images.ndim != rank:
    raise ValueError(f'{name} must have {rank} dimensions (batch first, e.g. NHWC or NCHW as the model takes them), '
                     f'got shape {tuple(images.shape)}')
  if images.shape[0] == 0:
    raise ValueError(f'{name} holds no examples')
  part = _limited(images, limit)
  xp = np if isinstance(part, np.ndarray) else jnp
  lo, hi, finite = float(xp.min(part)), float(xp.max(part)), bool(xp.all(xp.isfinite(part)))
  if not (finite and lo >= 0.0 and hi <= 1.0):
    found = f'values in [{lo}, {hi}]' if finite else 'NaN or infinite values'
    raise ValueError(f'{name} must lie in [0, 1] (the attacks\' and analyses\' image domain), got {found}; '
                     'rescale them (e.g. / 255) and fold any normalization into the model')


def check_labels(labels: Any, n: int, classes: int | None = None, *, name: str = 'labels') -> np.ndarray:
  """Integers of shape ``(n,)``, each in ``[0, classes)``; returned as a host int32 array."""
  if not hasattr(labels, 'shape') or not hasattr(labels, 'dtype'):
    raise TypeError(f'{name} must be an integer array, got {type(labels).__name__}')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'{name} must be integer class indices, got dtype {labels.dtype} (one-hot labels: pass '
                    'argmax(labels, -1))')
  if labels.ndim != 1:
    raise ValueError(f'{name} must have shape (batch,), got {tuple(labels.shape)}')
  if labels.shape[0] != n:
    raise ValueError(f'{name} has {labels.shape[0]} entries but images has {n} examples; pass one label per image')
  host = np.asarray(labels)
  if classes is not None and host.size and (host.min() < 0 or host.max() >= classes):
    raise ValueError(f'{name} must lie in [0, {classes}) (the model has {classes} classes), got values in '
                     f'[{host.min()}, {host.max()}]')
  return host.astype(np.int32)


_LOGITS: dict[Any, Any] = {}  # (model, input, params structure) -> the logits' abstract value


def _logits(apply_fn: ApplyFn, params: Any, images: Any, preprocess: Callable[[jax.Array], jax.Array] | None):
  """The logits' abstract value on one example, traced once per (model, input shape, params structure): the
  several analyses of a run and the members of a sweep share it."""
  one = jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)
  leaves, treedef = jax.tree.flatten(params)
  key = (apply_fn, preprocess, one.shape, str(one.dtype), treedef,
         tuple((tuple(getattr(l, 'shape', ())), str(getattr(l, 'dtype', type(l).__name__))) for l in leaves))
  try:
    hit = _LOGITS.get(key)
  except TypeError:  # an unhashable apply_fn or preprocess
    hit, key = None, None
  if hit is None:
    prep = preprocess or (lambda x: x)
    hit = jax.eval_shape(lambda p, x: apply_fn(p, prep(x)), params, one)
    if key is not None:
      if len(_LOGITS) >= 64:
        _LOGITS.clear()
      _LOGITS[key] = hit
  return hit


def num_classes(apply_fn: ApplyFn, params: Any, images: Any,
                preprocess: Callable[[jax.Array], jax.Array] | None = None) -> int:
  """The number of classes of ``apply_fn`` on one example of ``images`` (traced, not run)."""
  problem = adapters.not_an_apply_fn(apply_fn)
  if problem:
    raise TypeError(problem)
  logits = _logits(apply_fn, params, images, preprocess)
  if not hasattr(logits, 'shape') or len(logits.shape) != 2 or logits.shape[0] != 1:
    raise ValueError(f'apply_fn must map a batch of images to logits of shape (batch, classes), got '
                     f'{getattr(logits, "shape", type(logits).__name__)} for one image of shape '
                     f'{(1, *images.shape[1:])}')
  if logits.shape[1] < 2:
    raise ValueError(f'apply_fn gives {logits.shape[1]} logit per example; margins and losses need at least 2 '
                     'classes (a binary model with one logit z: return [0, z])')
  return int(logits.shape[1])


def check_model_inputs(apply_fn: ApplyFn, params: Any, images: Any, labels: Any | None = None, *,
                       preprocess: Callable[[jax.Array], jax.Array] | None = None,
                       limit: int | None = None) -> tuple[int, np.ndarray | None]:
  """All the checks above; returns ``(classes, labels as host int32)``."""
  if preprocess is None:
    check_images(images, limit=limit)
  else:
    if not hasattr(images, 'shape') or len(images.shape) < 1 or images.shape[0] == 0:
      raise ValueError(f'images must be a non-empty batch, got {getattr(images, "shape", type(images).__name__)}')
    out = jax.eval_shape(preprocess, jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype))
    if not jnp.issubdtype(out.dtype, jnp.floating) or len(out.shape) != 4:
      raise ValueError(f'preprocess must give float image batches with 4 dimensions, gives {out.dtype} {out.shape}')
  if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
    raise ValueError(f'limit must be a positive number of examples or None, got {limit!r}')
  classes = num_classes(apply_fn, params, images, preprocess)
  host = None if labels is None else check_labels(labels, images.shape[0], classes)
  return classes, host
