"""Every layer of a model at once: its spectrum, and one compiled call that clips them all.

:func:`layer_singular_values` and :func:`clip_params` apply the single-kernel functions of
:mod:`arreg_jax.spectral.conv` to every layer that :func:`arreg_jax.spectral.layer_specs` finds in a model's program,
in one compiled program, layers of equal shape stacked into one batched call (never a Python loop of compiled
per-layer calls). Each layer's kernel is read from ``params`` in the canonical layout (:mod:`arreg_jax.spectral.layer`)
and a clipped kernel is written back in the user's own layout, so ``clip_params`` returns ``params`` in the structure it
was given (a linen dict, an ``nnx.State``, an Equinox module).

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
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arreg_jax.spectral.conv import conv_clip_single, conv_svs_single, dense_clip_single
from arreg_jax.spectral.discovery import as_apply, layer_specs
from arreg_jax.spectral.layer import (LayerSingularValues, LayerSpec, Path, apply_ops, leaf_paths, read_kernel,
                                      write_kernel)

PyTree = Any

# Upper bound on the bytes of per-frequency matrices (and their SVD factors) that one vmapped chunk of a batched
# clip may hold; groups of equal layers bigger than this are processed in chunks with ``lax.map(batch_size=...)``.
_CHUNK_BYTES = 1 << 29


def _group_specs(specs: Sequence[LayerSpec]) -> dict[tuple[Any, ...], list[int]]:
  """Indices of specs that share (kind, kernel shape, operator size, stride, groups): one vmapped computation each."""
  groups: dict[tuple[Any, ...], list[int]] = collections.OrderedDict()
  for i, spec in enumerate(specs):
    kind = 'dense' if spec.kind == 'dense' else 'conv'  # a transposed conv is analyzed as its adjoint conv
    groups.setdefault((kind, spec.kernel_shape, spec.operator_hw, spec.stride, spec.groups), []).append(i)
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


def _per_group(fn: Callable[[jax.Array], jax.Array], kernel: jax.Array, groups: int, concat: bool) -> jax.Array:
  """``fn`` on each feature group's kernel ``(kh, kw, cin_g, cout/groups)`` of a grouped conv's HWIO kernel; the
  results concatenated (``concat``: spectra, sorted descending) or put back into one kernel."""
  if groups == 1:
    return fn(kernel)
  kh, kw, cin, cout = kernel.shape
  parts = jnp.moveaxis(kernel.reshape(kh, kw, cin, groups, cout // groups), 3, 0)
  out = jax.vmap(fn)(parts)
  if concat:
    return -jnp.sort(-out.reshape(-1))
  return jnp.moveaxis(out, 0, 3).reshape(kernel.shape)


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
    paths, leaves, _ = leaf_paths(params)
    by_path = dict(zip(paths, leaves))
    out: list[jax.Array | None] = [None] * len(specs)
    svs = None
    for key, idx in _group_specs(specs).items():
      stacked = jnp.stack([read_kernel(specs[i], by_path) for i in idx])
      stacked = _after(stacked, svs)  # one batched SVD in flight at a time (see _after)
      if key[0] == 'dense':
        svs = jax.vmap(lambda w: jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False))(stacked)
      else:
        plan, groups = specs[idx[0]].plan(), key[-1]
        svs = _batched(lambda k, plan=plan, g=groups: _per_group(lambda kk: conv_svs_single(kk, plan), k, g, True),
                       stacked, groups * plan.freq_bytes())
      for j, i in enumerate(idx):
        out[i] = svs[j]
    return tuple(out)

  return jax.jit(run)


def _traced_params(model: Any, params: PyTree) -> PyTree:
  """The params whose leaves the specs of ``model`` refer to (``variables['params']`` for a linen Module)."""
  return as_apply(model, params, {})[1]


def layer_singular_values(model: Any, params: PyTree, input_shape: Sequence[int], *,
                          specs: Sequence[LayerSpec] | None = None, **apply_kwargs: Any) -> list[LayerSingularValues]:
  """Singular values of every linear layer of a model, in forward order (one compiled call for all layers).

  Convs are analyzed at the spatial size they really see, as wrap-around operators (Sedghi et al. 2019), strided
  ones exactly by the polyphase decomposition, transposed ones exactly as the adjoint of a strided conv, grouped ones
  as the direct sum of their groups; dense layers as matrices. See :mod:`arreg_jax.spectral.conv` for the
  conventions and :func:`arreg_jax.spectral.layer_specs` for how the layers are found.

  Args:
    model: ``apply_fn(params, x) -> logits`` (e.g. ``*arreg_jax.adapters.nnx(model)``), or a linen ``Module``.
    params: the pytree of arrays ``apply_fn`` takes; for a linen ``Module``, its variables (``{'params': ...}``).
    input_shape: shape of an input batch in the model's layout, e.g. ``(1, 32, 32, 3)``.
    specs: precomputed :func:`layer_specs` of this model (skips tracing it).
    **apply_kwargs: forwarded to the model when tracing it.

  Returns:
    A list of :class:`LayerSingularValues`, in forward order.
  """
  if specs is None:
    specs = layer_specs(model, params, input_shape, **apply_kwargs)
  specs = tuple(specs)
  svs = jax.device_get(_compiled_svs(specs)(on_one_device(_traced_params(model, params))))
  return [
      LayerSingularValues(s.name, s.path, s.kind, s.kernel_shape, s.stride, s.input_hw, np.asarray(v), s.exact)
      for s, v in zip(specs, svs)
  ]


def layer_kernels(params: PyTree, specs: Sequence[LayerSpec]) -> list[jax.Array]:
  """Each layer's kernel as its operator applies it, in the canonical layout, whatever the model's own.

  Args:
    params: the params the specs were found in.
    specs: from :func:`layer_specs`.

  Returns:
    One array per spec: HWIO ``(kh, kw, cin_per_group, cout)`` for a conv (for a transposed conv: of its adjoint),
    ``(in, out)`` for a dense layer (so the class vectors of a classifier are its columns).
  """
  paths, leaves, _ = leaf_paths(params)
  by_path = dict(zip(paths, leaves))
  return [read_kernel(s, by_path) for s in specs]


def _check_specs(specs: Sequence[LayerSpec]) -> tuple[LayerSpec, ...]:
  seen: dict[Path, LayerSpec] = {}
  out = []
  for spec in specs:
    if spec.recipe is not None:
      raise ValueError(
          f'layer {spec.name} applies a weight computed from params through `{spec.recipe.via}` (e.g. spectral '
          'normalization\'s division by σ), not the leaf itself: clipping its singular values cannot be written '
          'back into params. Clip the layers whose weights are plain leaves (filter the specs), or fold the '
          'transformation into the weights first')
    old = seen.get(spec.path)
    if old is None:
      seen[spec.path] = spec
      out.append(spec)
      continue
    if old == spec:
      continue
    if old.ops == spec.ops and old.input_hw != spec.input_hw:
      raise ValueError(f'layer {spec.name} is used at two input sizes ({old.input_hw} and {spec.input_hw}); '
                       'one kernel cannot be clipped for both operators')
    if not any(op[0] == 'slice' for op in old.ops + spec.ops):
      raise ValueError(f'the weight of layer {spec.name} is used by two operators ({old.layout or old.kind} and '
                       f'{spec.layout or spec.kind}); one kernel cannot be clipped for both')
    out.append(spec)
  return tuple(out)


@functools.lru_cache(maxsize=64)
def _compiled_clip(specs: tuple[LayerSpec, ...], rounds: int) -> Callable[[PyTree, jax.Array], PyTree]:

  def run(params, max_sv):
    paths, leaves, treedef = leaf_paths(params)
    index = {path: i for i, path in enumerate(paths)}
    clipped = None
    for key, idx in _group_specs(specs).items():
      leaf_ids, kernels = [], []
      for i in idx:
        spec = specs[i]
        leaf_id = index.get(spec.path)
        if leaf_id is None:
          raise ValueError(f'params have no leaf at {"/".join(spec.path)} (layer {spec.name}): pass the params '
                           'layer_specs found the layer in')
        kernel = apply_ops(leaves[leaf_id], spec.ops)
        if tuple(kernel.shape) != spec.kernel_shape:
          raise ValueError(f'{spec.name}: the kernel has shape {kernel.shape}, the spec says {spec.kernel_shape}')
        leaf_ids.append(leaf_id)
        kernels.append(kernel)
      stacked = _after(jnp.stack(kernels), clipped)  # one group at a time (see _after)
      if key[0] == 'dense':
        clipped = jax.vmap(lambda w: dense_clip_single(w, max_sv))(stacked)
      else:
        plan, groups = specs[idx[0]].plan(), key[-1]
        clip_one = lambda k, plan=plan: conv_clip_single(k, max_sv, plan, rounds)
        clipped = _batched(lambda k, g=groups, f=clip_one: _per_group(f, k, g, False), stacked,
                           groups * plan.freq_bytes())
      for j, (i, leaf_id) in enumerate(zip(idx, leaf_ids)):
        leaves[leaf_id] = write_kernel(leaves[leaf_id], specs[i].ops, clipped[j])
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return jax.jit(run)


def clip_params(params: PyTree, layer_specs: Sequence[LayerSpec], max_sv: float | jax.Array, *,
                rounds: int = 1) -> PyTree:
  """Clips the singular values of every listed layer at ``max_sv`` (appendix B.4.2), all layers in one compiled call.

  Layers that share (kind, kernel shape, input size, stride) are stacked and clipped together with ``vmap``
  (chunked with ``lax.map`` when a group's per-frequency matrices would exceed ~0.5 GiB). Conv kernels get
  :func:`clip_conv_kernel` (``rounds`` rounds, strided ones through their polyphase form, transposed ones through
  their adjoint, grouped ones group by group), dense kernels and 1×1 convs an exact matrix clip. The compiled function
  is cached per (specs, rounds); ``max_sv`` is a traced argument, so changing it does not recompile. Each clipped
  kernel is written back in the leaf's own layout; leaves not listed and all other leaves are returned as they are.

  Args:
    params: the params the specs were found in (for a linen Module: ``variables['params']``); traced.
    layer_specs: from :func:`layer_specs` (static); a layer whose weight reaches its operator through a
      transformation other than a layout change (e.g. spectral normalization) is refused.
    max_sv: the clipping threshold ``c`` > 0.
    rounds: project-and-clip rounds for conv kernels (see :func:`clip_conv_kernel` on why one is inexact).

  Returns:
    The clipped params, same pytree structure and type (a linen dict, an ``nnx.State``, an Equinox module), shapes
    and dtypes.
  """
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
    raise ValueError(f'rounds must be an int >= 0, got {rounds!r}')
  if not isinstance(max_sv, jax.Array) and not float(max_sv) > 0:
    raise ValueError(f'max_sv must be > 0, got {max_sv!r}')
  specs = _check_specs(layer_specs)
  if jax.process_count() == 1:  # the clipped kernels go back to every process's devices: keep them global there
    params = on_one_device(params)
  return _compiled_clip(specs, int(rounds))(params, jnp.asarray(max_sv, jnp.float32))
