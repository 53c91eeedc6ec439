"""The checks every public attack and evaluation runs on its arguments at the door, so a bad input is an error that
names the argument and the fix, never a silently wrong robust accuracy.

* ``images``: a floating-point array (N, …) with every value in [0, 1] (uint8 or [0, 255] images, or normalized
  ones, are refused: normalization belongs inside ``logits_fn``); NHWC where the attack reads the spatial layout
  (Square), with a clear error for images that look NCHW;
* ``labels``: integer class indices, rank 1, one per image, each in [0, K) for a model with K outputs;
* ``eps``: in (0, 1] for L∞ (a value > 1 is most likely meant /255), > 0 for L2;
* ``norm``: 'linf' / 'l2', also spelled 'Linf' / 'L2' as in the AutoAttack and torchattacks APIs;
* the model: ``logits_fn(images) -> (N, K)`` logits with K ≥ 2, or a model pair with ``apply_fn`` and ``params``
  attributes (``apply_fn(params, images) -> logits``); outputs that look like probabilities (rows in [0, 1] summing
  to 1, the AutoAttack authors' ``check_range_output``) give a :class:`ProbabilitiesWarning`;
* static arguments (iteration counts) must be Python ints, not traced values.

Value checks (ranges) run only on concrete arrays: inside a caller's ``jax.jit`` the values are not known, and only
shapes and dtypes are checked. Every error is a ``ValueError`` or ``TypeError`` whose message starts with the
argument's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_NORM_SPELLINGS = {'linf': 'linf', 'l2': 'l2', 'inf': 'linf'}


class ProbabilitiesWarning(UserWarning):
  """The model's outputs look like probabilities; the attacks' losses (CE, DLR, margins) need logits."""


def is_concrete(x: Any) -> bool:
  """Whether ``x`` holds known values (not a tracer of an enclosing ``jax.jit``/``vmap``/``grad``)."""
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def is_local(x: Any) -> bool:
  """Whether every array of ``x`` lives on this process's devices (not a global array spanning several hosts)."""
  return all(getattr(leaf, 'is_fully_addressable', True) for leaf in jax.tree.leaves(x))


def norm_name(norm: Any) -> str:
  """'linf' or 'l2' for ``norm`` ∈ {'linf', 'Linf', 'l2', 'L2'} (any case); a ValueError otherwise."""
  key = str(norm).lower() if isinstance(norm, str) else None
  if key not in _NORM_SPELLINGS:
    raise ValueError(f"norm must be 'Linf' or 'L2' (also 'linf', 'l2'), got {norm!r}")
  return _NORM_SPELLINGS[key]


def static_int(value: Any, name: str, minimum: int = 1) -> int:
  """``value`` as a Python int ≥ ``minimum``; a TypeError for a traced or non-integer value."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f'{name} must be a Python int: it fixes the shape or length of the compiled loop, so it cannot '
                    f'be a traced value; pass it as a static argument (jax.jit(..., static_argnames=({name!r},)))')
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__} {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


def check_images(images: Any, *, rank: int | None = None, name: str = 'images') -> None:
  """Floating point, at least rank 2 (``rank`` if given), values in [0, 1] when concrete."""
  dtype = getattr(images, 'dtype', None)
  shape = getattr(images, 'shape', None)
  if dtype is None or shape is None:
    raise TypeError(f'{name} must be an array (N, ...) of floats in [0, 1], got {type(images).__name__}')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{name} must be floating point with values in [0, 1], got dtype {dtype}: convert uint8 images '
                    f'with {name}.astype(np.float32) / 255')
  if rank is not None and len(shape) != rank:
    raise ValueError(f'{name} must have rank {rank} (N, H, W, C), got shape {tuple(shape)}')
  if len(shape) < 2 or shape[0] == 0:
    raise ValueError(f'{name} must have shape (N, ...) with N >= 1 examples, got shape {tuple(shape)}')
  if is_concrete(images):
    with jax.ensure_compile_time_eval():  # concrete values inside a caller's trace: evaluate now, not in its program
      lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError(f'{name} holds NaN or infinite values')
    if lo < 0.0 or hi > 1.0:
      hint = (f'divide by 255 ({name} / 255)' if hi > 1.0 and lo >= 0.0 else
              'pass unnormalized images and put the normalization inside logits_fn')
      raise ValueError(f'{name} must lie in [0, 1] (the attacks clip to that box), found values in [{lo:g}, {hi:g}]: '
                       f'{hint}')


def check_layout(images: Any, layout: str) -> str:
  """``layout`` ('NHWC' or 'NCHW') for rank-4 ``images``; a ValueError when NHWC images look NCHW."""
  layout = str(layout).upper()
  if layout not in ('NHWC', 'NCHW'):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  shape = tuple(images.shape)
  if len(shape) != 4:
    raise ValueError(f'images must have rank 4 ({layout}) for this attack, got shape {shape}')
  c_first, c_last = (shape[1], shape[3]) if layout == 'NHWC' else (shape[3], shape[1])
  if c_first in (1, 3) and c_last not in (1, 2, 3, 4) and shape[2] == c_last:
    raise ValueError(f'images of shape {shape} look {"NCHW" if layout == "NHWC" else "NHWC"}, but layout is '
                     f'{layout!r}: pass layout={"NCHW" if layout == "NHWC" else "NHWC"!r} (the attack reads the '
                     'spatial layout), or transpose the images')
  return layout


def check_labels(labels: Any, n: int, num_classes: int | None = None) -> None:
  """Integer, rank 1, ``n`` entries, each in [0, ``num_classes``) when concrete and ``num_classes`` is known."""
  dtype = getattr(labels, 'dtype', None)
  shape = getattr(labels, 'shape', None)
  if dtype is None or shape is None:
    raise TypeError(f'labels must be an integer array (N,), got {type(labels).__name__}')
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f'labels must be integer class indices, got dtype {dtype}: pass labels.astype(np.int32)')
  if len(shape) != 1:
    raise ValueError(f'labels must have rank 1 (one class index per image), got shape {tuple(shape)}')
  if shape[0] != n:
    raise ValueError(f'labels has {shape[0]} entries but images has {n}: pass one label per image')
  if num_classes is not None and is_concrete(labels):
    with jax.ensure_compile_time_eval():
      lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
    if lo < 0 or hi >= num_classes:
      raise ValueError(f'labels must lie in [0, {num_classes}) for a model with {num_classes} outputs, found values '
                       f'in [{lo}, {hi}]')


def check_eps(eps: Any, norm: str) -> None:
  """ε in (0, 1] (L∞) or > 0 (L2), scalar or per example; values are checked when concrete."""
  if isinstance(eps, (str, bytes)) or eps is None:
    raise TypeError(f'eps must be a number (the radius of the {norm} ball), got {eps!r}')
  if not is_concrete(eps):
    return
  e = np.asarray(eps, np.float64)
  if not np.all(np.isfinite(e)):
    raise ValueError(f'eps must be finite, got {eps!r}')
  if np.any(e <= 0):
    raise ValueError(f'eps must be > 0 (the radius of the {norm} ball), got {float(e.min()):g}')
  if norm == 'linf' and np.any(e > 1):
    v = float(e.max())
    raise ValueError(f'eps must be in (0, 1] for norm=linf on images in [0, 1], got {v:g}: did you mean '
                     f'{v:g}/255 = {v / 255:.6g}?')


def logits_shape(logits_fn: Callable, images: Any) -> tuple[int, int]:
  """(N, K) of ``logits_fn(images)`` from its abstract evaluation; a ValueError unless it is (N, K ≥ 2)."""
  try:
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(images.shape, images.dtype))
  except (TypeError, ValueError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f'logits_fn must map images of shape {tuple(images.shape)} to logits (N, K), but calling it '
                     f'failed: {first} (is the layout or image size the one the model takes?)') from e
  shape = tuple(getattr(out, 'shape', ()))
  if len(shape) != 2 or shape[0] != images.shape[0]:
    raise ValueError(f'logits_fn must map images {tuple(images.shape)} to logits (N, K) = ({images.shape[0]}, K), '
                     f'got an output of shape {shape}')
  if shape[1] < 2:
    raise ValueError(f'logits_fn must output K >= 2 logits per image, got {shape[1]}')
  return shape


def looks_like_probabilities(logits: Any, tol: float = 1e-5) -> bool:
  """The authors' ``check_range_output``: every output in [0, 1] and every row summing to 1 (within ``tol``)."""
  z = np.asarray(logits, np.float64)
  return bool(z.max() < 1 + tol and z.min() > -tol and np.all(np.abs(z.sum(-1) - 1) < tol))


def warn_if_probabilities(logits: Any) -> bool:
  """Warns (:class:`ProbabilitiesWarning`) when ``logits`` look like probabilities; returns whether they do."""
  if looks_like_probabilities(logits):
    warnings.warn('logits_fn seems to return probabilities (every row in [0, 1] and summing to 1): the attacks need '
                  'the logits (the inputs of the softmax); remove the final softmax from logits_fn',
                  ProbabilitiesWarning, stacklevel=3)
    return True
  return False


@dataclasses.dataclass(frozen=True)
class LogitsOnly:
  """``apply_fn(params, x) = logits_fn(x)`` for a bare ``logits_fn`` (params ignored); equal for the same function,
  so a compiled program keyed on it is reused."""
  logits_fn: Callable

  def __call__(self, params, x):
    del params
    return self.logits_fn(x)


def split_model(model: Any, name: str = 'logits_fn') -> tuple[Callable, Any]:
  """``(apply_fn, params)`` with ``apply_fn(params, images) -> logits``: from a model pair (anything with
  ``apply_fn`` and ``params`` attributes, e.g. ``arreg_jax.adapters``' ``Model``) or from a bare ``logits_fn``
  (params None)."""
  if hasattr(model, 'apply_fn') and hasattr(model, 'params'):
    if not callable(model.apply_fn):
      raise TypeError(f'{name}.apply_fn must be callable as apply_fn(params, images) -> logits')
    return model.apply_fn, model.params
  if not callable(model):
    raise TypeError(f'{name} must be a callable images -> logits, or a model with apply_fn and params attributes '
                    f'(apply_fn(params, images) -> logits), got {type(model).__name__}')
  return LogitsOnly(model), None


def check_attack_inputs(model: Any, images: Any, labels: Any, eps: Any, norm: Any, *, rank: int | None = None,
                        name: str = 'logits_fn') -> tuple[str, int]:
  """The door of every public attack: model, images, labels (in range of the logits), ε and norm.

  Returns ``(norm, K)``: the canonical norm name and the model's number of outputs.
  """
  norm = norm_name(norm)
  apply_fn, params = split_model(model, name)
  check_images(images, rank=rank)
  _, k = logits_shape(lambda x: apply_fn(params, x), images)
  check_labels(labels, images.shape[0], k)
  check_eps(eps, norm)
  # An eager call: the forward pass of a few images tells logits from probabilities.
  if is_concrete((params, images)) and is_local((params, images)):
    with jax.ensure_compile_time_eval():
      logits = apply_fn(params, images[:8])
    if is_concrete(logits):
      warn_if_probabilities(logits)
  return norm, k
