"""A linen, NNX or Equinox model as ``Model(apply_fn, params)``: the one form the attacks and analyses take.

Every function of the library that needs a model takes either ``logits_fn(x) -> logits`` (the attacks) or
``apply_fn(params, x) -> logits`` with the pytree of arrays ``params`` (the analyses, the spectral toolkit): the
weights must be leaves of ``params`` for the spectra and clipping to find them. One line turns a model of each
framework into that form::

    from arreg_jax import adapters, spectral
    model = adapters.linen(module, variables, train=False)   # or adapters.nnx(net), adapters.equinox(net)
    layers = spectral.layer_singular_values(*model, (1, 28, 28, 1))
    x_adv = attacks.pgd(model.logits_fn, images, labels, key, eps=0.1, step_size=0.02, steps=10)
    clipped = spectral.clip_params(model.params, spectral.layer_specs(*model, (1, 28, 28, 1)), 1.0)
    net = model.rebuild(clipped)                              # the user's own object, with the clipped weights

``params`` keeps the framework's own structure, so whatever a function returns in its place (clipped weights) is
handed back as the user knows it: a linen variables dict, an ``nnx.State`` of the model's ``nnx.Param`` variables
(``nnx.update(net, clipped)`` writes it into the model), an Equinox module holding the model's floating-point arrays
(its other fields are kept aside and put back by :meth:`Model.rebuild`).

The models run in inference mode: ``apply_kwargs`` for linen (e.g. ``train=False``); NNX models are merged into a copy
set to ``.eval()``; Equinox models into a copy under ``eqx.nn.inference_mode`` and mapped over the batch with
``jax.vmap`` (Equinox layers take one example). Models with state beyond their parameters in Equinox
(``eqx.nn.State``) need an ``apply_fn`` of their own, e.g. ``lambda p, x: jax.vmap(lambda xi: eqx.combine(p,
static)(xi, state)[0])(x)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax

PyTree = Any


def framework_of(obj: Any) -> str | None:
  """``'linen'``, ``'nnx'`` or ``'equinox'`` when ``obj`` is a module of that framework (without importing any)."""
  for cls in type(obj).__mro__:
    mod = getattr(cls, '__module__', '') or ''
    if mod.startswith('flax.linen'):
      return 'linen'
    if mod.startswith('flax.nnx'):
      return 'nnx'
    if mod.startswith('equinox'):
      return 'equinox'
  return None


def not_an_apply_fn(obj: Any, name: str = 'apply_fn') -> str | None:
  """Why ``obj`` cannot serve as ``apply_fn(params, x)`` (with the fix), or None when it can."""
  framework = framework_of(obj)
  if framework is not None:
    args = 'module, variables' if framework == 'linen' else 'model'
    return (f'{name} is a {framework} module, not an apply function: pass the model through '
            f'arreg_jax.adapters.{framework}({args}) and unpack it, e.g. f(*adapters.{framework}({args}), ...)')
  if isinstance(obj, tuple) and hasattr(obj, 'apply_fn'):
    return f'{name} is an adapters.Model: unpack it (*model) or pass model.apply_fn, model.params'
  if not callable(obj):
    return f'{name} must be a callable apply_fn(params, x) -> logits, got {type(obj).__name__}'
  return None


class _Apply:
  """``apply_fn(params, x)`` that also knows how to rebuild the user's object from ``params``."""

  def __init__(self, fn: Callable[[PyTree, jax.Array], jax.Array], rebuild: Callable[[PyTree], Any], name: str):
    self._fn = fn
    self.rebuild = rebuild
    self.__name__ = name

  def __call__(self, params: PyTree, x: jax.Array) -> jax.Array:
    return self._fn(params, x)

  def __repr__(self) -> str:
    return f'<apply_fn of {self.__name__}>'


class Model(NamedTuple):
  """A model as a pure function and its parameters.

  Attributes:
    apply_fn: ``apply_fn(params, x) -> logits``; ``x`` a batch in the model's own layout, logits ``(N, classes)``.
    params: a pytree of arrays (the weights are leaves), in the framework's own structure.
  """
  apply_fn: Callable[[PyTree, jax.Array], jax.Array]
  params: PyTree

  @property
  def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
    """``x -> apply_fn(params, x)``: the form the attacks take (a new function at each access: keep one where a
    compiled program is cached by the function, e.g. a ``jax.jit`` static argument)."""
    apply_fn, params = self.apply_fn, self.params
    return lambda x: apply_fn(params, x)

  def rebuild(self, params: PyTree) -> Any:
    """The user's own object with ``params`` in place of the model's: a linen variables dict, an NNX module (a new
    one; ``nnx.update(net, params)`` updates the original in place), an Equinox module; ``params`` itself for an
    ``apply_fn`` without an adapter."""
    rebuild = getattr(self.apply_fn, 'rebuild', None)
    return params if rebuild is None else rebuild(params)


def linen(module: Any, variables: Mapping[str, Any], **apply_kwargs: Any) -> Model:
  """A Flax linen module and its variables: ``apply_fn(v, x) = module.apply(v, x, **apply_kwargs)``.

  Args:
    module: a ``flax.linen.Module``.
    variables: its variables, ``{'params': ..., 'batch_stats': ...}``; they are ``Model.params`` (so the layers'
      weights sit under the ``'params'`` collection).
    **apply_kwargs: passed to every call, e.g. ``train=False`` for the models of :mod:`arreg_jax.models`.

  Returns:
    ``Model(apply_fn, variables)``.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if not isinstance(module, nn.Module):
    raise TypeError(f'module must be a flax.linen.Module, got {type(module).__name__} (an NNX model: '
                    'adapters.nnx(model); an Equinox model: adapters.equinox(model))')
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise TypeError('variables must be the dict module.init returns, with a "params" collection; got '
                    f'{type(variables).__name__}')
  fn = lambda v, x: module.apply(v, x, **apply_kwargs)
  return Model(_Apply(fn, lambda v: v, type(module).__name__), variables)


def nnx(model: Any) -> Model:
  """A Flax NNX module: ``params`` is the ``nnx.State`` of its ``nnx.Param`` variables.

  ``apply_fn(params, x)`` merges ``params`` with the model's other state (BatchNorm statistics, RNG counters, held
  fixed) into a copy of the model set to ``.eval()`` and calls it; the model itself is never modified.

  Args:
    model: a ``flax.nnx.Module`` whose ``__call__(x)`` returns logits.

  Returns:
    ``Model(apply_fn, params)``.
  """
  from flax import nnx as flax_nnx  # pylint: disable=g-import-not-at-top
  if not isinstance(model, flax_nnx.Module):
    raise TypeError(f'model must be a flax.nnx.Module, got {type(model).__name__}')
  graphdef, params, rest = flax_nnx.split(model, flax_nnx.Param, ...)

  def fn(p, x):
    copy = flax_nnx.merge(graphdef, p, rest)
    copy.eval()
    return copy(x)

  return Model(_Apply(fn, lambda p: flax_nnx.merge(graphdef, p, rest), type(model).__name__), params)


def equinox(model: Any) -> Model:
  """An Equinox module taking one example: ``params`` is the module holding only its floating-point arrays.

  ``apply_fn(params, x)`` recombines ``params`` with the model's other fields, puts it in inference mode
  (``eqx.nn.inference_mode``: Dropout off) and maps it over the batch axis of ``x`` with ``jax.vmap``.

  Args:
    model: an ``equinox.Module`` whose ``__call__(x)`` maps one example (no batch axis) to its logits.

  Returns:
    ``Model(apply_fn, params)``; :meth:`Model.rebuild` gives back a whole module.
  """
  import equinox as eqx  # pylint: disable=g-import-not-at-top  (an optional dependency)
  if not isinstance(model, eqx.Module):
    raise TypeError(f'model must be an equinox.Module, got {type(model).__name__}')
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def fn(p, x):
    return jax.vmap(eqx.nn.inference_mode(eqx.combine(p, static)))(x)

  return Model(_Apply(fn, lambda p: eqx.combine(p, static), type(model).__name__), params)
