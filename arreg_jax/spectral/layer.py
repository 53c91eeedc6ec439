"""One weight layer as the spectral functions see it: which operator it applies, and where its kernel lives.

A :class:`LayerSpec` is found by :mod:`arreg_jax.spectral.discovery` in the traced program of a model. It records the
operator (a 2-D convolution, a transposed convolution or a dense matrix, with the input size it really sees) and how
the operator's kernel is read from ``params``: the weight leaf at ``path``, then a short chain of invertible layout
operations (:data:`Op`: reshape, transpose, reversal, a static slice) that ends in the **canonical layout** every
function of :mod:`arreg_jax.spectral.conv` takes —

* convolutions: HWIO ``(kh, kw, cin_per_group, cout)``, whatever layout (OIHW, HWIO, …) the program used;
* transposed convolutions: HWIO of their **adjoint**, a stride-``s`` convolution (see :attr:`LayerSpec.kind`);
* dense layers: ``(in, out)``, whichever of a ``dot_general``'s operands holds the weight and whichever of its axes
  are contracted (a Flax ``(in, out)`` kernel and an Equinox/PyTorch ``(out, in)`` weight both end as ``(in, out)``).

Because every operation of the chain is invertible, a clipped canonical kernel is written back into the leaf in the
user's own layout (:func:`write_kernel`). A weight that reaches its operator through anything else (spectral
normalization's division by σ, a product with another parameter, …) is still analyzed exactly: its canonical kernel
is recomputed from ``params`` by replaying that part of the program (:class:`Recipe`), but such a layer cannot be
clipped in ``params`` and :func:`arreg_jax.spectral.clip_params` refuses it by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arreg_jax.spectral.conv import ConvPlan, make_plan

PyTree = Any
IntPair = tuple[int, int]
Path = tuple[str, ...]
# A layout operation on a kernel: ('reshape', in_shape, out_shape) | ('transpose', perm) | ('rev', dims) |
# ('slice', start, limit). Each is invertible given the array it was applied to.
Op = tuple[Any, ...]

KINDS = ('conv', 'conv_transpose', 'dense')


def key_name(key: Any) -> str:
  """One entry of a ``jax.tree_util`` key path as a string: a dict key, an attribute name or a sequence index."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(tree: PyTree) -> tuple[list[Path], list[Any], Any]:
  """``(paths, leaves, treedef)`` of a pytree, each path a tuple of strings (see :func:`key_name`)."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(key_name(k) for k in p) for p, _ in with_path], [leaf for _, leaf in with_path], treedef


def layer_name(path: Path) -> str:
  """A layer's display name: the path of the object holding its weight (``conv1`` for ``conv1/kernel``; an NNX
  ``Variable``'s trailing ``value`` is dropped too)."""
  parts = list(path)
  if len(parts) > 1 and parts[-1] == 'value':
    parts.pop()
  if len(parts) > 1:
    parts.pop()
  return '/'.join(parts)


class Recipe:
  """How a weight that is not a plain view of one leaf is computed from ``params`` (a replay of the program's
  operations). Compared by identity: two discoveries give two recipes, hence two compiled programs."""

  def __init__(self, fn: Callable[[Mapping[Path, jax.Array]], jax.Array], leaves: tuple[Path, ...], via: str):
    self.fn = fn          # {leaf path: value} -> the weight as the operator takes it (before the canonical ops)
    self.leaves = leaves  # the params leaves it reads
    self.via = via        # the primitive that hides the weight from the layout chain, for messages (e.g. 'div')

  def __repr__(self) -> str:
    return f'Recipe(via={self.via!r}, leaves={["/".join(p) for p in self.leaves]})'


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One linear layer of a model (hashable: it is a static argument of the compiled spectral programs).

  Attributes:
    path: key path of the weight leaf in ``params`` (for a linen module and its variables: inside
      ``variables['params']``, e.g. ``('conv1', 'kernel')``).
    kind: ``'conv'`` (a 2-D convolution; 1-D ones are 2-D with height 1), ``'conv_transpose'`` (a convolution with
      input dilation, analyzed exactly as the adjoint of a stride-``s`` convolution) or ``'dense'``.
    kernel_shape: shape of the canonical kernel: HWIO ``(kh, kw, cin_per_group, cout)`` for convs (for
      ``conv_transpose``: of the adjoint conv, ``(kh, kw, cout, cin)``), ``(in, out)`` for dense layers.
    stride: the conv's stride ``(s_h, s_w)`` (for ``conv_transpose``: its upsampling factor); None for dense layers.
    input_hw: spatial size of the inputs the conv really sees in the model; None for dense layers.
    ops: the layout operations from the leaf to the canonical kernel (empty when the leaf already is it).
    groups: the conv's feature groups (a grouped conv is the direct sum of ``groups`` convolutions).
    recipe: set when the weight reaches the operator through an operation the chain cannot express; the canonical
      kernel is then ``ops`` applied to ``recipe.fn(leaves)``.
    layout: the operator's layout as the program wrote it, e.g. ``'NHWC/HWIO'`` or ``'dense (out, in)'``.
  """
  path: Path
  kind: str
  kernel_shape: tuple[int, ...]
  stride: IntPair | None = None
  input_hw: IntPair | None = None
  ops: tuple[Op, ...] = ()
  groups: int = 1
  recipe: Recipe | None = None
  layout: str = ''

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {self.kind!r}')

  @property
  def name(self) -> str:
    return layer_name(self.path)

  @property
  def exact(self) -> bool:
    """False when the stride does not divide the input size (then the size is rounded up, see operator_hw)."""
    if self.kind != 'conv':
      return True
    return self.input_hw[0] % self.stride[0] == 0 and self.input_hw[1] % self.stride[1] == 0

  @property
  def operator_hw(self) -> IntPair | None:
    """Input size of the circular convolution analyzed: ``input_hw`` rounded up to a multiple of the stride; for a
    transposed conv, the size of its output (``s·input_hw``), the input of its adjoint."""
    if self.kind == 'dense':
      return None
    if self.kind == 'conv_transpose':
      return tuple(n * s for n, s in zip(self.input_hw, self.stride))  # type: ignore[return-value]
    return tuple(-(-n // s) * s for n, s in zip(self.input_hw, self.stride))  # type: ignore[return-value]

  @property
  def group_kernel_shape(self) -> tuple[int, ...]:
    """The kernel of one feature group: ``(kh, kw, cin_per_group, cout // groups)``."""
    kh, kw, cin, cout = self.kernel_shape
    return (kh, kw, cin, cout // self.groups)

  def plan(self) -> ConvPlan:
    return make_plan(self.group_kernel_shape, self.operator_hw, self.stride)

  @property
  def num_singular_values(self) -> int:
    return self.groups * self.plan().count if self.kind != 'dense' else min(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class LayerSingularValues:
  """The spectrum of one weight layer (see :mod:`arreg_jax.spectral.conv` for the conventions).

  Attributes:
    name: the layer's name (:func:`layer_name` of its path).
    path: key path of its weight leaf in ``params``.
    kind: ``'conv'``, ``'conv_transpose'`` or ``'dense'``.
    kernel_shape: the canonical kernel's shape (:class:`LayerSpec`).
    stride: conv stride, None for dense layers.
    input_hw: spatial input size the conv sees in the model, None for dense layers.
    singular_values: float32 numpy array, descending, the operator's full multiset (multiplicities included).
    exact: False when the stride does not divide ``input_hw`` and the spectrum is that of the rounded-up size.
  """
  name: str
  path: Path
  kind: str
  kernel_shape: tuple[int, ...]
  stride: IntPair | None
  input_hw: IntPair | None
  singular_values: np.ndarray
  exact: bool


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing a layer's kernel.
# ----------------------------------------------------------------------------------------------------------------


def apply_op(x: jax.Array, op: Op) -> jax.Array:
  name = op[0]
  if name == 'reshape':
    return jnp.reshape(x, op[2])
  if name == 'transpose':
    return jnp.transpose(x, op[1])
  if name == 'rev':
    return lax.rev(x, op[1])
  if name == 'slice':
    return lax.slice(x, op[1], op[2])
  raise ValueError(f'unknown layout operation {op!r}')


def _undo_op(before: jax.Array, op: Op, after: jax.Array) -> jax.Array:
  """The array that ``op`` maps to ``after``, given the one it was applied to (``before``)."""
  name = op[0]
  if name == 'reshape':
    return jnp.reshape(after, op[1])
  if name == 'transpose':
    return jnp.transpose(after, np.argsort(op[1]))
  if name == 'rev':
    return lax.rev(after, op[1])
  if name == 'slice':
    return lax.dynamic_update_slice(before, after.astype(before.dtype), op[1])
  raise ValueError(f'unknown layout operation {op!r}')


def apply_ops(x: jax.Array, ops: Sequence[Op]) -> jax.Array:
  for op in ops:
    x = apply_op(x, op)
  return x


def write_kernel(leaf: jax.Array, ops: Sequence[Op], kernel: jax.Array) -> jax.Array:
  """The leaf whose view through ``ops`` is ``kernel`` (and that equals ``leaf`` outside a sliced region)."""
  if not ops:
    return kernel.astype(leaf.dtype)
  inner = apply_op(leaf, ops[0])
  return _undo_op(leaf, ops[0], write_kernel(inner, ops[1:], kernel)).astype(leaf.dtype)


def read_kernel(spec: LayerSpec, leaves: Mapping[Path, jax.Array]) -> jax.Array:
  """The canonical kernel of ``spec`` from ``{path: leaf}`` of the params it was found in (traceable)."""
  if spec.recipe is not None:
    return apply_ops(spec.recipe.fn(leaves), spec.ops)
  if spec.path not in leaves:
    raise ValueError(f'params have no leaf at {"/".join(spec.path)} (layer {spec.name}): pass the params '
                     'layer_specs found the layer in')
  return apply_ops(leaves[spec.path], spec.ops)
