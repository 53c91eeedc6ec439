"""Every linear layer of any JAX model, read from its traced program (linen, NNX, Equinox, Haiku or plain JAX alike).

:func:`layer_specs` traces ``apply_fn(params, x)`` once (``jax.make_jaxpr``, abstract input of ``input_shape``) and
follows every leaf of ``params`` through the program, nested programs included (``jit``, ``custom_vjp`` /
``custom_jvp`` — the explicit-VJP convolution of :mod:`arreg_jax.models.layers` —, ``checkpoint``, ``scan``, the
bodies of ``while`` loops). Each ``conv_general_dilated`` and ``dot_general`` that combines the input (anything
computed from ``x``) with a weight (anything computed from ``params`` alone) is a layer:

* a convolution's input size, strides, feature groups and **dimension numbers** (NHWC or NCHW, HWIO or OIHW, …) are
  read from the operation itself, never guessed from a framework's conventions; padding does not enter (the spectrum
  is that of the wrap-around operator, :mod:`arreg_jax.spectral.conv`), and a layer that pads its input itself before
  a 'VALID' convolution (``jnp.pad``: linen's ``padding='CIRCULAR'``, Equinox's ``padding_mode``) is analyzed at the
  unpadded size it is applied to (for circular padding, exactly the operator the layer applies);
* a ``dot_general``'s weight may be either operand with any axes contracted: ``(in, out)`` and ``(out, in)``
  weights are both read right, ``DenseGeneral``-style kernels with several input or output axes as the matrix
  (contracted axes) × (other axes);
* a convolution with input dilation is a **transposed convolution**; it is analyzed exactly, as the adjoint of a
  stride-``s`` convolution (kind ``'conv_transpose'``), never as a forward convolution;
* a weight is followed through casts, reshapes, transposes, reversals and static slices (these are recorded and
  inverted to write a clipped kernel back, :mod:`arreg_jax.spectral.layer`). Through anything else — spectral
  normalization's division by σ, a product with another parameter — the weight the operator applies is recomputed
  from ``params`` by replaying that part of the program (:class:`arreg_jax.spectral.layer.Recipe`): its spectrum is
  exact, and clipping refuses it by name.

What is refused with a clear error rather than answered wrongly: dilated convolutions, ``batch_group_count``,
weights with ``dot_general`` batch axes (per-head einsums), a weight that depends on a loop variable (``W[i]`` in a
``fori_loop`` with a traced trip count), layers inside ``lax.cond`` branches or inside primitives this module does
not know. Operators with a constant weight (closed over, not a leaf of ``params``) are not layers of ``params``;
they are reported with a warning. Operators whose two operands both depend on the input (attention scores) are not
weight layers and are not listed.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import adapters
from arreg_jax.spectral.layer import LayerSpec, Path, leaf_paths
from arreg_jax.spectral.weight_flow import DATA, Val, Walker

PyTree = Any


# ----------------------------------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------------------------------


def as_apply(model: Any, params: Any, apply_kwargs: Mapping[str, Any]) -> tuple[Callable[..., Any], PyTree]:
  """``(apply_fn(p, x), traced params)`` for a linen module with its variables, or an ``apply_fn(params, x)``."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  (flax is only needed for a linen module)
  if isinstance(model, nn.Module):
    if not isinstance(params, Mapping) or 'params' not in params:
      raise TypeError(f'with a linen Module, pass its variables dict (with a "params" collection) as params; got '
                      f'{type(params).__name__}')
    variables = params
    return (lambda p, x: model.apply({**variables, 'params': p}, x, **apply_kwargs)), variables['params']
  problem = adapters.not_an_apply_fn(model, 'model')
  if problem:
    raise TypeError(problem)
  return (lambda p, x: model(p, x, **apply_kwargs)), params


def _check_leaves(paths: Sequence[Path], leaves: Sequence[Any]) -> None:
  for path, leaf in zip(paths, leaves):
    if not (hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')) and not isinstance(leaf, (int, float, complex)):
      raise TypeError(f'params has a leaf that is not an array at {"/".join(path) or "<root>"} '
                      f'({type(leaf).__name__}): params must hold arrays only (an Equinox module: use '
                      'arreg_jax.adapters.equinox, which separates its static fields)')


def layer_specs(model: Any, params: PyTree, input_shape: Sequence[int], *, dtype: Any = jnp.float32,
                **apply_kwargs: Any) -> tuple[LayerSpec, ...]:
  """The linear layers of a model, in the order its program applies them, each with the input size it sees.

  Args:
    model: ``apply_fn(params, x) -> logits`` (any JAX function; ``arreg_jax.adapters`` turns a linen, NNX or
      Equinox model into one), or a linen ``Module``, then called as ``model.apply(variables, x, **apply_kwargs)``.
    params: the pytree of arrays ``apply_fn`` takes; for a linen ``Module``, its variables — the layers' weights are
      then looked up in ``variables['params']`` (the other collections are held fixed), as ``clip_params`` takes them.
    input_shape: the shape of one input batch in the model's own layout, e.g. ``(1, 32, 32, 3)`` (NHWC) or
      ``(1, 3, 32, 32)`` (NCHW); the batch size does not matter.
    dtype: dtype of the abstract input.
    **apply_kwargs: forwarded to the model (e.g. ``train=False``).

  Returns:
    A tuple of :class:`LayerSpec`, in forward order; a layer applied twice at the same input size is listed once.

  Raises:
    TypeError: ``model`` is not callable, ``params`` holds a non-array leaf.
    ValueError: ``input_shape`` is not a sequence of positive ints, or the program has no layer of ``params``.
    NotImplementedError: a layer the spectral functions cannot analyze exactly (see the module docstring).
  """
  apply_fn, traced = as_apply(model, params, apply_kwargs)
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
  if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
    raise ValueError(f'input_shape must be a sequence of positive ints, e.g. (1, 28, 28, 1); got {input_shape!r}')
  paths, leaves, _ = leaf_paths(traced)
  _check_leaves(paths, leaves)
  x = jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype)
  closed = jax.make_jaxpr(apply_fn)(traced, x)
  walker = Walker({path: int(np.prod(getattr(leaf, "shape", ()))) for path, leaf in zip(paths, leaves)})
  n_x = len(closed.jaxpr.invars) - len(paths)
  in_vals = [Val(leaves=frozenset([path]), chain=(path, ())) for path in paths] + [DATA] * n_x
  walker.walk(closed.jaxpr, closed.consts, in_vals)
  if walker.constant_ops:
    warnings.warn(f'{len(walker.constant_ops)} linear operator(s) of the program have a constant weight (not a leaf '
                  f'of params) and are not analyzed: {"; ".join(walker.constant_ops[:3])}', stacklevel=2)
  if not walker.specs:
    raise ValueError('no convolution or matrix product of the input with a leaf of params was found in the '
                     f'program of the model on inputs of shape {shape}; the weights must be leaves of params '
                     '(closed-over arrays are constants)')
  return tuple(walker.specs)
