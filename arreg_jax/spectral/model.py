"""Every weight layer of a model at once: its spectrum, and one compiled call that clips them all.

:func:`layer_specs` finds a Flax model's conv and dense layers in forward order, each with the input size it really
sees; :func:`layer_singular_values` and :func:`clip_params` apply the single-kernel functions of
:mod:`arreg_jax.spectral.conv` to all of them in one compiled program, layers of equal shape stacked into one batched
call (never a Python loop of compiled per-layer calls).

Performance notes (XLA:CPU, jax/jaxlib 0.10.2; measured on 2 cores):

* The cost is the batched LAPACK SVD (``cgesdd``); the DFTs are small matrix products. Clipping all 55 conv layers of
  ResNet-56 (32×32) takes ≈ 1.3–2.6 s on 2 shared cores, all spectra ≈ 0.7–1.3 s (``benchmarks/spectral_clip.py``).
* Set ``OPENBLAS_NUM_THREADS=1`` in the environment of CPU runs (before numpy/scipy are imported). jaxlib's LAPACK
  kernels use scipy's OpenBLAS, whose own threads oversubscribe the cores already used by XLA's pool: batched SVDs
  were 3–30× slower and erratic without it.
* Two batched LAPACK calls running concurrently inside one XLA:CPU program can deadlock it; the batched functions
  here run their groups one after another (see ``_after``). Code elsewhere that puts several independent
  ``jnp.linalg.svd``/``eigh`` calls into one jitted CPU program needs the same care.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arreg_jax.spectral.conv import (ConvPlan, conv_clip_single, conv_svs_single, dense_clip_single,
                                     make_plan, pair)

PyTree = Any
IntPair = tuple[int, int]

# Upper bound on the bytes of per-frequency matrices (and their SVD factors) that one vmapped chunk of a batched
# clip may hold; groups of equal layers bigger than this are processed in chunks with ``lax.map(batch_size=...)``.
_CHUNK_BYTES = 1 << 29

# ----------------------------------------------------------------------------------------------------------------
# Layers of a model.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One weight layer of a model as the spectral functions see it (hashable: it is a static jit argument).

  Attributes:
    path: module path inside ``params``; the kernel is ``params[path[0]]...[path[-1]]['kernel']``.
    kind: ``'conv'`` or ``'dense'``.
    kernel_shape: HWIO ``(kh, kw, cin, cout)`` for convs, ``(in, out)`` for dense layers.
    stride: the conv's stride ``(s_h, s_w)``; ``None`` for dense layers.
    input_hw: spatial size of the inputs the conv really sees in the model; ``None`` for dense layers.
  """
  path: tuple[str, ...]
  kind: str
  kernel_shape: tuple[int, ...]
  stride: IntPair | None = None
  input_hw: IntPair | None = None

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  @property
  def exact(self) -> bool:
    """False when the stride does not divide the input size (then the size is rounded up, see operator_hw)."""
    if self.kind != 'conv':
      return True
    return self.input_hw[0] % self.stride[0] == 0 and self.input_hw[1] % self.stride[1] == 0

  @property
  def operator_hw(self) -> IntPair | None:
    """Input size of the circular operator analysed: ``input_hw`` rounded up to a multiple of the stride."""
    if self.kind != 'conv':
      return None
    return tuple(-(-n // s) * s for n, s in zip(self.input_hw, self.stride))  # type: ignore[return-value]

  def plan(self) -> ConvPlan:
    return make_plan(self.kernel_shape, self.operator_hw, self.stride)

  @property
  def num_singular_values(self) -> int:
    return self.plan().count if self.kind == 'conv' else min(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class LayerSingularValues:
  """The spectrum of one weight layer (see the module docstring for the conventions).

  Attributes:
    name: ``'/'``-joined module path.
    path: module path inside ``params``.
    kind: ``'conv'`` or ``'dense'``.
    kernel_shape: the kernel's shape.
    stride: conv stride, ``None`` for dense layers.
    input_hw: spatial input size the conv sees in the model, ``None`` for dense layers.
    singular_values: float32 numpy array, descending, the operator's full multiset (multiplicities included).
    exact: False when the stride does not divide ``input_hw`` and the spectrum is that of the rounded-up size.
  """
  name: str
  path: tuple[str, ...]
  kind: str
  kernel_shape: tuple[int, ...]
  stride: IntPair | None
  input_hw: IntPair | None
  singular_values: np.ndarray
  exact: bool


def _is_conv_module(module: nn.Module) -> bool:
  return all(hasattr(module, a) for a in ('features', 'kernel_size', 'strides'))


def _check_plain_conv(module: nn.Module) -> None:
  for attr in ('kernel_dilation', 'input_dilation'):
    if pair(getattr(module, attr, None), attr) != (1, 1):
      raise NotImplementedError(f'{type(module).__name__} at {module.path}: {attr} != 1 is not supported')
  if getattr(module, 'feature_group_count', 1) != 1:
    raise NotImplementedError(f'{type(module).__name__} at {module.path}: grouped convolutions are not supported')


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
  """A jitted function may not re-run its Python (cached trace), which interceptors need: call the wrapped one."""
  while hasattr(fn, 'lower') and hasattr(fn, '__wrapped__'):
    fn = fn.__wrapped__
  return fn


def _get_subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def layer_specs(model: nn.Module | Callable[..., Any], variables: Mapping[str, Any],
                input_shape: Sequence[int], *, dtype: Any = jnp.float32,
                **apply_kwargs: Any) -> tuple[LayerSpec, ...]:
  """The weight layers of a model in forward order, each conv with the spatial size it really sees.

  The model runs once under ``jax.eval_shape`` inside ``flax.linen.intercept_methods``: every ``__call__`` of a
  conv-like module (one with ``features``, ``kernel_size`` and ``strides`` attributes, e.g.
  ``arreg_jax.models.layers.Conv`` or ``flax.linen.Conv``) or of a ``flax.linen.Dense`` records the module path,
  the input shape and the stride. Nothing else about the model is assumed. A module called again with the same
  input size is listed once; called at two different sizes it is listed twice (and ``clip_params`` refuses it).

  Args:
    model: a linen ``Module`` (called as ``model.apply(variables, x, **apply_kwargs)``) or an
      ``apply_fn(variables, x, **apply_kwargs)`` such as the one ``arreg_jax.models.create`` returns.
    variables: the model's variables; kernels are read from ``variables['params']``.
    input_shape: shape of one input batch, NHWC, e.g. ``(1, 32, 32, 3)``.
    dtype: dtype of the abstract input.
    **apply_kwargs: forwarded to the model (e.g. ``train=False``).

  Returns:
    A tuple of :class:`LayerSpec`, in the order the layers are called.
  """
  fn = model.apply if isinstance(model, nn.Module) else _unwrap(model)
  params = variables['params']
  records: list[LayerSpec] = []
  depth = [0]

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or depth[0] > 0:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Dense):
      kind = 'dense'
    elif _is_conv_module(module):
      kind = 'conv'
      _check_plain_conv(module)
    else:
      return next_fun(*args, **kwargs)
    depth[0] += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1
    path = tuple(str(p) for p in module.path)
    try:
      kernel = _get_subtree(params, path)['kernel']
    except (KeyError, TypeError) as e:
      raise ValueError(f'{type(module).__name__} at {"/".join(path)} has no params[...]["kernel"]') from e
    if kind == 'conv':
      x_shape = args[0].shape
      spec = LayerSpec(path, 'conv', tuple(kernel.shape), pair(module.strides, 'strides'),
                       (int(x_shape[-3]), int(x_shape[-2])))
    else:
      spec = LayerSpec(path, 'dense', tuple(kernel.shape))
    if spec not in records:
      records.append(spec)
    return out

  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, xx: fn(v, xx, **apply_kwargs), variables, x)
  if not records:
    raise ValueError('no conv or dense layer was called: is the model a flax.linen model, and is its apply '
                     'function not a cached jax.jit?')
  return tuple(records)


def _group_specs(specs: Sequence[LayerSpec]) -> dict[tuple[Any, ...], list[int]]:
  """Indices of specs that share (kind, kernel shape, operator size, stride): one vmapped computation each."""
  groups: dict[tuple[Any, ...], list[int]] = collections.OrderedDict()
  for i, spec in enumerate(specs):
    groups.setdefault((spec.kind, spec.kernel_shape, spec.operator_hw, spec.stride), []).append(i)
  return groups


def _after(x: jax.Array, dep: PyTree | None) -> jax.Array:
  """``x``, made to wait for ``dep`` through a real data dependency; ``x`` itself if ``dep`` is None.

  Why: on XLA:CPU (jax/jaxlib 0.10.2) a batched LAPACK custom call (``svd``, ``eigh``) splits its batch over the
  intra-op thread pool (``jax::ParallelBatchMap``) and blocks its worker until the pieces are done. Two such calls
  that XLA runs concurrently can park every worker of the pool (both, on a 2-core machine) and the program hangs
  with idle CPUs: seen with the 6 groups of ResNet-56 in one program, native stacks in ``lapack_cgesdd_ffi`` →
  ``BlockingCounter::Wait`` on both workers. Chaining the groups keeps one batched decomposition in flight at a
  time; each still uses every core through its own batch split. ``lax.optimization_barrier`` is not enough: the
  CPU thunk executor orders thunks by the buffers they touch, and a barrier only aliases buffers. So ``x`` gets
  ``+ 0·nan_to_num(one element of dep)``, which XLA does not fold for floats (NaN/Inf semantics) and which leaves
  ``x`` unchanged (``x + -0.0 == x``, ``nan_to_num`` keeps it finite).
  """
  if dep is None:
    return x
  leaf = jax.tree_util.tree_leaves(dep)[0]
  element = jnp.real(leaf.reshape(-1)[0]).astype(jnp.float32)
  tie = jnp.nan_to_num(element) * -0.0
  return x + tie.astype(x.dtype)


def _batched(fn: Callable[[jax.Array], jax.Array], stacked: jax.Array, bytes_per_item: int) -> jax.Array:
  """vmap ``fn`` over the leading axis, in chunks that keep the per-frequency matrices under ``_CHUNK_BYTES``."""
  n = stacked.shape[0]
  per_chunk = max(1, _CHUNK_BYTES // max(bytes_per_item, 1))
  if per_chunk >= n:
    return jax.vmap(fn)(stacked)
  return lax.map(fn, stacked, batch_size=per_chunk)


def on_one_device(tree: PyTree) -> PyTree:
  """``tree`` on this process's first device. The batched SVDs are not data-parallel: on parameters replicated over
  several XLA:CPU devices, XLA runs them on every device and synchronizes the devices in between, and with the
  WRN-50-2 smoke model on Tiny-ImageNet on two CPU devices the process aborted at that rendezvous (XLA's 40 s
  timeout). One device computes them once; callers place the result where they need it. With several processes a
  replicated global array contributes this process's own copy."""
  device = jax.local_devices()[0]

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return jax.device_put(x, device)

  return jax.tree.map(one, tree)


@functools.lru_cache(maxsize=64)
def _compiled_svs(specs: tuple[LayerSpec, ...]) -> Callable[[PyTree], tuple[jax.Array, ...]]:

  def run(params):
    out: list[jax.Array | None] = [None] * len(specs)
    svs = None
    for key, idx in _group_specs(specs).items():
      stacked = jnp.stack([_get_subtree(params, specs[i].path)['kernel'] for i in idx])
      stacked = _after(stacked, svs)  # one batched SVD in flight at a time (see _after)
      if key[0] == 'dense':
        svs = jax.vmap(lambda w: jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False))(stacked)
      else:
        plan = specs[idx[0]].plan()
        svs = _batched(lambda k, plan=plan: conv_svs_single(k, plan), stacked, plan.freq_bytes())
      for j, i in enumerate(idx):
        out[i] = svs[j]
    return tuple(out)

  return jax.jit(run)


def layer_singular_values(model: nn.Module | Callable[..., Any], variables: Mapping[str, Any],
                          input_shape: Sequence[int], *, specs: Sequence[LayerSpec] | None = None,
                          **apply_kwargs: Any) -> list[LayerSingularValues]:
  """Singular values of every weight layer of a model, in forward order (one compiled call for all layers).

  Convs are analysed at the spatial size they really see (found by :func:`layer_specs`), strided convs exactly by
  the polyphase decomposition, 1×1 convs as their matrix repeated at every frequency, dense layers as matrices; see
  the module docstring for the conventions.

  Args:
    model: linen ``Module`` or ``apply_fn(variables, x, **apply_kwargs)``.
    variables: the model's variables (``{'params': ..., ...}``).
    input_shape: NHWC shape of an input batch, e.g. ``(1, 32, 32, 3)``.
    specs: precomputed :func:`layer_specs` (skips tracing the model).
    **apply_kwargs: forwarded to the model when tracing it.

  Returns:
    A list of :class:`LayerSingularValues`, in forward order.
  """
  if specs is None:
    specs = layer_specs(model, variables, input_shape, **apply_kwargs)
  specs = tuple(specs)
  svs = jax.device_get(_compiled_svs(specs)(on_one_device(variables['params'])))
  return [
      LayerSingularValues(s.name, s.path, s.kind, s.kernel_shape, s.stride, s.input_hw, np.asarray(v), s.exact)
      for s, v in zip(specs, svs)
  ]


def _check_specs(specs: Sequence[LayerSpec]) -> tuple[LayerSpec, ...]:
  seen: dict[tuple[str, ...], LayerSpec] = {}
  for spec in specs:
    if spec.path in seen and seen[spec.path] != spec:
      raise ValueError(f'layer {spec.name} is used at two input sizes ({seen[spec.path].input_hw} and '
                       f'{spec.input_hw}); one kernel cannot be clipped for both operators')
    seen[spec.path] = spec
  return tuple(seen.values())


@functools.lru_cache(maxsize=64)
def _compiled_clip(specs: tuple[LayerSpec, ...], rounds: int) -> Callable[[PyTree, jax.Array], PyTree]:

  def run(params, max_sv):
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_path]
    index = {tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in kp): i
             for i, (kp, _) in enumerate(leaves_with_path)}
    clipped = None
    for key, idx in _group_specs(specs).items():
      leaf_ids = []
      for i in idx:
        spec = specs[i]
        leaf_id = index.get(spec.path + ('kernel',))
        if leaf_id is None:
          raise ValueError(f'params have no kernel at {spec.name}/kernel')
        if tuple(leaves[leaf_id].shape) != spec.kernel_shape:
          raise ValueError(f'{spec.name}/kernel has shape {leaves[leaf_id].shape}, the spec says '
                           f'{spec.kernel_shape}')
        leaf_ids.append(leaf_id)
      stacked = _after(jnp.stack([leaves[j] for j in leaf_ids]), clipped)  # one group at a time (see _after)
      if key[0] == 'dense':
        clipped = jax.vmap(lambda w: dense_clip_single(w, max_sv))(stacked)
      else:
        plan = specs[idx[0]].plan()
        clipped = _batched(lambda k, plan=plan: conv_clip_single(k, max_sv, plan, rounds), stacked,
                           plan.freq_bytes())
      for j, leaf_id in enumerate(leaf_ids):
        leaves[leaf_id] = clipped[j]
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return jax.jit(run)


def clip_params(params: PyTree, layer_specs: Sequence[LayerSpec], max_sv: float | jax.Array, *,
                rounds: int = 1) -> PyTree:
  """Clips the singular values of every listed layer at ``max_sv``, all layers in one compiled call.

  Layers that share (kind, kernel shape, input size, stride) are stacked and clipped together with ``vmap``
  (chunked with ``lax.map`` when a group's per-frequency matrices would exceed ~0.5 GiB). Conv kernels get
  :func:`clip_conv_kernel` (``rounds`` rounds, strided ones through their polyphase form), dense kernels and 1×1
  convs an exact matrix clip. The compiled function is cached per (specs, rounds); ``max_sv`` is a traced argument,
  so changing it does not recompile. Kernels not listed in ``layer_specs`` and all other leaves are returned as is.

  Args:
    params: the model's parameters (``variables['params']``); this is the traced argument.
    layer_specs: from :func:`layer_specs` (static).
    max_sv: the clipping threshold ``c``.
    rounds: project-and-clip rounds for conv kernels (see :func:`clip_conv_kernel` on why one is inexact).

  Returns:
    The clipped params, same pytree structure, shapes and dtypes.
  """
  if rounds < 0:
    raise ValueError(f'rounds must be >= 0, got {rounds}')
  specs = _check_specs(layer_specs)
  if jax.process_count() == 1:  # the clipped kernels go back to every process's devices: keep them global there
    params = on_one_device(params)
  return _compiled_clip(specs, int(rounds))(params, jnp.asarray(max_sv, jnp.float32))
