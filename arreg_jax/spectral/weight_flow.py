"""How each leaf of ``params`` flows through a traced program to the operators that apply it (the walk behind
:func:`arreg_jax.spectral.layer_specs`, whose docstring states what is found and what is refused).

Every value of the program is classified (:class:`Val`): computed from the input ``x`` (data), varying with a loop's
iterations, or a function of ``params`` and constants alone — then either a *chain* (one leaf seen through layout
operations, inverted when a clipped kernel is written back) or a *recipe* (a replay of the program's operations,
evaluated when the spectrum is computed). A ``conv_general_dilated`` or ``dot_general`` of data with a weight is a
layer (:class:`Walker.operator`); nested programs are walked with their inputs mapped one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend as jex

from arreg_jax.spectral.layer import LayerSpec, Op, Path, Recipe, apply_ops

# Primitives whose sub-program takes the equation's inputs one to one (and returns its outputs).
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
          'remat2': 'jaxpr', 'checkpoint': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
          'custom_vjp_call': 'call_jaxpr', 'custom_vjp_call_jaxpr': 'fun_jaxpr'}
# Primitives that leave values unchanged (a weight seen through them is the weight).
_IDENTITY = ('convert_element_type', 'copy', 'copy_p', 'stop_gradient', 'sharding_constraint', 'pvary',
             'optimization_barrier')
_OPERATORS = ('conv_general_dilated', 'dot_general')


class _Node:
  """One step of a weight's recipe: ``fn(leaves, *input values)``."""
  __slots__ = ('fn', 'inputs')

  def __init__(self, fn: Callable[..., Any], inputs: Sequence['_Node'] = ()):
    self.fn = fn
    self.inputs = tuple(inputs)


def _evaluate(node: _Node, leaves: Mapping[Path, jax.Array], memo: dict[int, Any]) -> Any:
  if id(node) not in memo:
    memo[id(node)] = node.fn(leaves, *[_evaluate(n, leaves, memo) for n in node.inputs])
  return memo[id(node)]


@dataclasses.dataclass(frozen=True)
class Val:
  """What the walk knows about one value of the program."""
  data: bool = False                     # computed from the input x
  loop: bool = False                     # varies with a loop's iterations (a carry, or computed from one)
  leaves: frozenset = frozenset()        # params leaves it is computed from
  chain: tuple[Path, tuple[Op, ...]] | None = None  # (leaf path, layout ops): a view of one leaf
  node: _Node | None = None              # how to compute it from params (non-data, non-loop values)
  via: str = ''                          # the first primitive that is not a layout operation on the way
  unpadded: tuple[int, ...] | None = None  # data padded explicitly (jnp.pad, lax.pad): its shape before

  def as_node(self) -> _Node | None:
    if self.node is not None or self.chain is None:
      return self.node
    path, ops = self.chain
    return _Node(lambda leaves: apply_ops(leaves[path], ops))


DATA = Val(data=True)


def _const(value: Any) -> Val:
  return Val(node=_Node(lambda leaves: value))


def _sub_closed(j: Any) -> tuple[Any, Sequence[Any]]:
  """``(jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr."""
  if hasattr(j, 'jaxpr') and hasattr(j, 'consts'):
    return j.jaxpr, j.consts
  return j, ()


def _contains_operator(jaxpr: Any) -> bool:
  jaxpr, _ = _sub_closed(jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _OPERATORS:
      return True
    if any(_contains_operator(j) for j in jex.core.jaxprs_in_params(eqn.params)):
      return True
  return False


def _bind(eqn: Any, *args: Any) -> list[Any]:
  bind_params = eqn.primitive.get_bind_params(eqn.params)  # jax < 0.5 returned (subfuns, params)
  subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  out = eqn.primitive.bind(*subfuns, *args, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _layout_op(eqn: Any, in_shape: tuple[int, ...]) -> Op | None | bool:
  """The layout operation ``eqn`` applies to its one input; True for an identity; None if it is not one."""
  name, p = eqn.primitive.name, eqn.params
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if name in _IDENTITY and len(eqn.invars) == 1:
    return True
  if name in ('reshape', 'squeeze', 'expand_dims') and p.get('dimensions') is None:
    return ('reshape', in_shape, out_shape)
  if name == 'broadcast_in_dim' and math.prod(in_shape) == math.prod(out_shape):
    dims = tuple(p['broadcast_dimensions'])
    if list(dims) == sorted(dims):
      return ('reshape', in_shape, out_shape)
  if name == 'transpose':
    return ('transpose', tuple(int(a) for a in p['permutation']))
  if name == 'rev':
    return ('rev', tuple(int(a) for a in p['dimensions']))
  if name == 'slice' and (p.get('strides') is None or all(s == 1 for s in p['strides'])):
    return ('slice', tuple(int(a) for a in p['start_indices']), tuple(int(a) for a in p['limit_indices']))
  return None


def _moved_padding(eqn: Any, unpadded: tuple[int, ...]) -> tuple[int, ...] | None:
  """The pre-padding shape of the output of a cast or of a reshape that only adds or drops unit axes."""
  name = eqn.primitive.name
  if name not in _IDENTITY + ('reshape', 'squeeze', 'expand_dims', 'broadcast_in_dim') or len(eqn.invars) != 1:
    return None
  in_shape, out_shape = tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape)
  if name in _IDENTITY:
    return unpadded
  if [d for d in in_shape if d != 1] != [d for d in out_shape if d != 1]:
    return None
  sizes = iter(u for d, u in zip(in_shape, unpadded) if d != 1)
  return tuple(next(sizes) if d != 1 else 1 for d in out_shape)


def _letters(spec: Sequence[int], names: str) -> str:
  out = [''] * len(spec)
  for letter, dim in zip(names, spec):
    out[dim] = letter
  return ''.join(out)


class Walker:
  """Walks a program, following params leaves; collects the layers in the order the program applies them."""

  def __init__(self, leaf_sizes: Mapping[Path, int]):
    self.leaf_sizes = leaf_sizes
    self.specs: list[LayerSpec] = []
    self._seen: set[tuple[Any, ...]] = set()
    self.constant_ops: list[str] = []
    self.inside: str | None = None  # a primitive whose layers cannot be analyzed (lax.cond branches)
    self.recording = True

  # -- the walk -------------------------------------------------------------------------------------------------

  def walk(self, jaxpr: Any, consts: Sequence[Any], in_vals: Sequence[Val]) -> list[Val]:
    env: dict[Any, Val] = {v: _const(c) for v, c in zip(jaxpr.constvars, consts)}
    for v, val in zip(jaxpr.invars, in_vals):
      env[v] = val

    def read(a):
      return _const(a.val) if isinstance(a, jex.core.Literal) else env[a]

    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(a) for a in eqn.invars])
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(a) for a in jaxpr.outvars]

  def eqn(self, eqn: Any, ins: list[Val]) -> list[Val]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    data_in = any(v.data for v in ins)
    if name in _OPERATORS and data_in:
      self.operator(eqn, ins)
      return [Val(data=True, loop=any(v.loop for v in ins))] * n_out
    if name in _CALLS and _CALLS[name] in eqn.params:
      jaxpr, consts = _sub_closed(eqn.params[_CALLS[name]])
      outs = self.walk(jaxpr, consts, ins)
      if eqn.params.get('name') == '_pad' and ins[0].data:  # jnp.pad of the input of a layer
        return [dataclasses.replace(outs[0], unpadded=ins[0].unpadded or tuple(eqn.invars[0].aval.shape))]
      return outs
    if ins and ins[0].data and ins[0].unpadded is not None and len(eqn.outvars) == 1:
      moved = _moved_padding(eqn, ins[0].unpadded)  # unit axes added or dropped around the padded input
      if moved is not None:
        return [Val(data=True, loop=any(v.loop for v in ins), unpadded=moved)]
    if name == 'pad' and ins[0].data and all(interior == 0 for _, _, interior in eqn.params['padding_config']):
      return [Val(data=True, loop=ins[0].loop, unpadded=ins[0].unpadded or tuple(eqn.invars[0].aval.shape))]
    if not data_in:
      return self.weight_op(eqn, ins)
    if name == 'scan':
      return self.scan(eqn, ins)
    if name == 'while':
      return self.while_loop(eqn, ins)
    if name == 'cond':
      return self.cond(eqn, ins)
    if any(_contains_operator(j) for j in jex.core.jaxprs_in_params(eqn.params)):
      raise NotImplementedError(
          f'the program applies convolutions or matrix products inside `{name}`, a primitive whose operands the '
          'layer discovery cannot follow; write that part with jax.jit, lax.scan or a Python loop, or pass the '
          'layers to the spectral functions by hand (spectral.LayerSpec)')
    return [Val(data=True, loop=any(v.loop for v in ins))] * n_out

  def weight_op(self, eqn: Any, ins: list[Val]) -> list[Val]:
    """An operation on weights and constants only: a layout step of a leaf's chain, or a step of a recipe."""
    leaves = frozenset().union(*[v.leaves for v in ins]) if ins else frozenset()
    n_out = len(eqn.outvars)
    if any(v.loop for v in ins):
      return [Val(loop=True, leaves=leaves)] * n_out
    if len(ins) == 1 and ins[0].chain is not None and n_out == 1:
      op = _layout_op(eqn, tuple(eqn.invars[0].aval.shape))
      if op is not None:
        path, ops = ins[0].chain
        return [Val(leaves=leaves, chain=(path, ops if op is True else ops + (op,)))]
    if len(ins) == 1 and n_out == 1 and eqn.primitive.name in _IDENTITY:
      return [ins[0]]
    # the operation that hides a leaf from the layout chain (e.g. 'div' for W / σ), for messages
    via = eqn.primitive.name if any(v.chain for v in ins) else next((v.via for v in ins if v.via), eqn.primitive.name)
    node = _Node(lambda leaves, *args, eqn=eqn: _bind(eqn, *args), [v.as_node() for v in ins])
    return [Val(leaves=leaves, via=via, node=_Node(lambda leaves, outs, i=i: outs[i], [node]))
            for i in range(n_out)]

  # -- loops and branches ---------------------------------------------------------------------------------------

  def _loop_body(self, jaxpr: Any, consts: Sequence[Any], fixed: list[Val], carry: list[Val],
                 rest: list[Val], carry_out: Callable[[list[Val]], list[Val]]) -> list[Val]:
    """Walks a loop body with its carries marked as loop values, to a fixed point of which carries hold data."""
    carry = [dataclasses.replace(c, loop=True, chain=None, node=None) for c in carry]
    recording, self.recording = self.recording, False
    try:
      for _ in range(len(carry) + 1):
        new = carry_out(self.walk(jaxpr, consts, fixed + carry + rest))
        grown = [dataclasses.replace(c, data=c.data or n.data, leaves=c.leaves | n.leaves)
                 for c, n in zip(carry, new)]
        if grown == carry:
          break
        carry = grown
    finally:
      self.recording = recording
    return carry

  def scan(self, eqn: Any, ins: list[Val]) -> list[Val]:
    p = eqn.params
    jaxpr, consts = _sub_closed(p['jaxpr'])
    n_c, n_carry, length = p['num_consts'], p['num_carry'], int(p['length'])
    fixed, carry, xs = ins[:n_c], ins[n_c:n_c + n_carry], ins[n_c + n_carry:]
    xs_avals = [a.aval for a in eqn.invars[n_c + n_carry:]]
    carry = self._loop_body(jaxpr, consts, fixed, carry, [_index(v, a, 0) for v, a in zip(xs, xs_avals)],
                            lambda outs: outs[:n_carry])
    per_step = any(v.leaves and not v.data for v in xs)
    for t in range(length if per_step else 1):
      i = length - 1 - t if p['reverse'] else t
      self.walk(jaxpr, consts, fixed + carry + [_index(v, a, i) for v, a in zip(xs, xs_avals)])
    return [Val(data=True, loop=True)] * len(eqn.outvars)

  def while_loop(self, eqn: Any, ins: list[Val]) -> list[Val]:
    p = eqn.params
    body, body_consts = _sub_closed(p['body_jaxpr'])
    n_cond, n_body = p['cond_nconsts'], p['body_nconsts']
    fixed, carry = ins[n_cond:n_cond + n_body], ins[n_cond + n_body:]
    carry = self._loop_body(body, body_consts, fixed, carry, [], lambda outs: outs)
    self.walk(body, body_consts, fixed + carry)
    return [Val(data=True, loop=True)] * len(eqn.outvars)

  def cond(self, eqn: Any, ins: list[Val]) -> list[Val]:
    inside, self.inside = self.inside, 'lax.cond'
    try:
      for branch in eqn.params['branches']:
        jaxpr, consts = _sub_closed(branch)
        self.walk(jaxpr, consts, ins[1:])
    finally:
      self.inside = inside
    return [Val(data=True, loop=any(v.loop for v in ins))] * len(eqn.outvars)

  # -- layers ---------------------------------------------------------------------------------------------------

  def operator(self, eqn: Any, ins: list[Val]) -> None:
    lhs, rhs = ins[0], ins[1]
    if lhs.data and rhs.data:
      return  # both operands depend on the input: not a weight layer (e.g. attention scores)
    side = 0 if rhs.data else 1
    weight = ins[side]
    kind = 'convolution' if eqn.primitive.name == 'conv_general_dilated' else 'matrix product'
    shape = tuple(eqn.invars[side].aval.shape)
    if not weight.leaves:
      if not weight.loop and self.recording:
        self.constant_ops.append(f'{kind} with a constant {shape} operand')
      return
    where = f'the {kind} whose weight has shape {shape} (from {self._leaf_list(weight)})'
    if weight.loop:
      raise NotImplementedError(
          f'{where} changes with a loop variable (e.g. W[i] inside lax.fori_loop with a traced trip count): '
          'use lax.scan over the stacked weights, or a Python loop')
    if self.inside:
      raise NotImplementedError(f'{where} sits inside {self.inside}, whose branch the analysis cannot know; '
                                'compute the branch outside the traced function')
    if not self.recording:
      return
    if eqn.primitive.name == 'conv_general_dilated':
      spec = self.conv_spec(eqn, side, weight, where, lhs)
    else:
      spec = self.dense_spec(eqn, side, weight, where)
    key = (spec.path, spec.kind, spec.kernel_shape, spec.stride, spec.input_hw, spec.ops, spec.groups,
           spec.recipe is None)
    if key not in self._seen:
      self._seen.add(key)
      self.specs.append(spec)

  def _leaf_list(self, weight: Val) -> str:
    return ', '.join('/'.join(p) for p in sorted(weight.leaves)) or 'constants'

  def _source(self, weight: Val) -> tuple[Path, tuple[Op, ...], Recipe | None]:
    if weight.chain is not None:
      return weight.chain[0], weight.chain[1], None
    node = weight.as_node()
    leaves = tuple(sorted(weight.leaves))
    main = max(leaves, key=lambda p: (self.leaf_sizes.get(p, 0), p))
    recipe = Recipe(lambda values, node=node: _evaluate(node, values, {}), leaves, weight.via)
    return main, (), recipe

  def conv_spec(self, eqn: Any, side: int, weight: Val, where: str, ins_lhs: Val) -> LayerSpec:
    p = eqn.params
    if side == 0:
      raise NotImplementedError(f'{where} is the convolution\'s input (lhs), not its kernel')
    dn = p['dimension_numbers']
    lhs_shape, rhs_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    n_sp = len(rhs_shape) - 2
    if n_sp not in (1, 2):
      raise NotImplementedError(f'{where} is a {n_sp}-D convolution; only 1-D and 2-D ones are supported')
    if p['batch_group_count'] != 1:
      raise NotImplementedError(f'{where} has batch_group_count={p["batch_group_count"]}: not supported')
    rhs_dil, lhs_dil = tuple(p['rhs_dilation'] or (1,) * n_sp), tuple(p['lhs_dilation'] or (1,) * n_sp)
    strides = tuple(p['window_strides'])
    if any(d != 1 for d in rhs_dil):
      raise NotImplementedError(f'{where} is dilated (rhs_dilation={rhs_dil}): dilated convolutions are not '
                                'supported')
    transposed = any(d != 1 for d in lhs_dil)
    groups = int(p['feature_group_count'])
    if transposed and (any(s != 1 for s in strides) or groups != 1):
      raise NotImplementedError(f'{where} combines input dilation {lhs_dil} with strides {strides} or '
                                f'{groups} feature groups: not supported')
    o_dim, i_dim, *sp = dn.rhs_spec
    hw = [int(lhs_shape[d]) for d in dn.lhs_spec[2:]]
    padded_before = (ins_lhs.unpadded is not None and len(ins_lhs.unpadded) == len(lhs_shape)
                     and all(lo == 0 and hi == 0 for lo, hi in p['padding'])
                     and all(0 < ins_lhs.unpadded[d] <= lhs_shape[d] for d in dn.lhs_spec[2:]))
    if padded_before:  # the layer pads its input itself (circular, reflect, …): it applies to the unpadded size
      hw = [int(ins_lhs.unpadded[d]) for d in dn.lhs_spec[2:]]
    path, ops, recipe = self._source(weight)
    ops = _canonical(ops, tuple(rhs_shape), (*sp, i_dim, o_dim))
    k = [int(rhs_shape[d]) for d in sp]
    cin, cout = int(rhs_shape[i_dim]), int(rhs_shape[o_dim])
    step = lhs_dil if transposed else strides
    if n_sp == 1:  # a 1-D convolution is a 2-D one of height 1
      ops = ops + (('reshape', (k[0], cin, cout), (1, k[0], cin, cout)),)
      k, hw, step = [1, k[0]], [1, hw[0]], (1, step[0])
    if transposed:  # analyzed as its adjoint: the stride-s conv with the flipped, in/out-swapped kernel
      ops = ops + (('rev', (0, 1)), ('transpose', (0, 1, 3, 2)))
      cin, cout = cout, cin
    layout = (f'{_letters(dn.lhs_spec, "NC" + "HW"[-n_sp:])}/{_letters(dn.rhs_spec, "OI" + "HW"[-n_sp:])}'
              + (' transposed' if transposed else '') + (' padded before' if padded_before else ''))
    return LayerSpec(path, 'conv_transpose' if transposed else 'conv', (k[0], k[1], cin, cout),
                     (int(step[0]), int(step[1])), (hw[0], hw[1]), ops, groups, recipe, layout)

  def dense_spec(self, eqn: Any, side: int, weight: Val, where: str) -> LayerSpec:
    (contract, batch) = eqn.params['dimension_numbers']
    c_dims, b_dims = tuple(int(d) for d in contract[side]), tuple(int(d) for d in batch[side])
    if b_dims:
      raise NotImplementedError(f'{where} has batch axes {b_dims} in the dot_general (e.g. a per-head einsum): '
                                'its blocks are not one matrix; not supported')
    shape = tuple(int(d) for d in eqn.invars[side].aval.shape)
    free = tuple(d for d in range(len(shape)) if d not in c_dims)
    path, ops, recipe = self._source(weight)
    ops = _canonical(ops, shape, c_dims + free)
    rows, cols = math.prod(shape[d] for d in c_dims), math.prod(shape[d] for d in free)
    permuted = tuple(shape[d] for d in c_dims + free)
    if permuted != (rows, cols):
      ops = ops + (('reshape', permuted, (rows, cols)),)
    return LayerSpec(path, 'dense', (rows, cols), ops=ops, recipe=recipe,
                     layout=f'dense {shape} contracting axes {c_dims}')


def _canonical(ops: tuple[Op, ...], shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[Op, ...]:
  perm = tuple(int(d) for d in perm)
  return ops if perm == tuple(range(len(shape))) else ops + (('transpose', perm),)


def _index(val: Val, aval: Any, i: int) -> Val:
  """Iteration ``i``'s slice of a scanned-over value."""
  if val.data:
    return DATA
  shape = tuple(aval.shape)
  if val.chain is not None:
    path, ops = val.chain
    start, limit = (i,) + (0,) * (len(shape) - 1), (i + 1,) + shape[1:]
    return Val(leaves=val.leaves, chain=(path, ops + (('slice', start, limit), ('reshape', (1,) + shape[1:],
                                                                                   shape[1:]))))
  node = val.as_node()
  return Val(leaves=val.leaves, via=val.via, node=_Node(lambda leaves, a: a[i], [node]) if node else None)
