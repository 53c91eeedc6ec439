"""How every public attack compiles once: its computation is one ``jax.jit`` program with the model function and the
settings that fix shapes or loop lengths as static arguments, and the images, labels, key, ε and the model's
parameters as traced ones.

Called with concrete arrays (eagerly), an attack runs that program, compiled on the first call and reused by every
later call with the same model function, shapes and static settings — whatever ε, key or parameters. Called inside
a caller's own ``jax.jit`` (or ``grad``, ``vmap``), it is traced into the caller's program as is.

So that the program is reused across calls, keep the model function the same object: define ``logits_fn`` once
(not a new ``lambda`` per call), or pass a model pair ``(apply_fn, params)`` (anything with ``apply_fn`` and
``params`` attributes): its parameters are then a traced argument and new weights recompile nothing. A
``logits_fn`` that closes over its weights bakes them into the program as constants.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax

from arreg_jax.attacks.input_checks import is_concrete


def compiled_once(impl: Callable, static_argnames: Sequence[str]) -> Callable:
  """``impl`` jitted with ``static_argnames`` when its traced arguments are concrete, ``impl`` itself under a trace."""
  program = jax.jit(impl, static_argnames=tuple(static_argnames))
  static = frozenset(static_argnames)

  @functools.wraps(impl)
  def run(*args, **kwargs):
    traced = (args, {k: v for k, v in kwargs.items() if k not in static})
    return program(*args, **kwargs) if is_concrete(traced) else impl(*args, **kwargs)

  run.program = program
  return run
