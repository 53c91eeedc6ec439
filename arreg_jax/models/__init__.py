"""Model registry and the functional handle every other module uses.

``create(name, num_classes=..., key=...)`` returns ``(apply_fn, variables)`` with
``apply_fn(variables, images, *, train) -> logits``: images NHWC float in [0, 1], logits float32. ``variables`` is
the Flax variable dict (``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models). In ``train=True`` mode a
BatchNorm model normalizes with batch statistics but ``apply_fn`` discards their update; the training step calls
``get_module(...).apply(..., mutable=['batch_stats'])`` to keep it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from arreg_jax.errors import ConfigError
from arreg_jax.models import lenet, resnet, wrn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    'small_cnn': lambda num_classes, dtype: lenet.SmallCNN(num_classes, dtype),
    'lenet': lambda num_classes, dtype: lenet.LeNet(num_classes, dtype),
    'resnet20': lambda num_classes, dtype: resnet.CifarResNet(20, num_classes, dtype=dtype),
    'resnet56': lambda num_classes, dtype: resnet.CifarResNet(56, num_classes, dtype=dtype),
    'resnet110': lambda num_classes, dtype: resnet.CifarResNet(110, num_classes, dtype=dtype),
    'resnet20_bn': lambda num_classes, dtype: resnet.CifarResNet(20, num_classes, use_bn=True, dtype=dtype),
    'resnet56_bn': lambda num_classes, dtype: resnet.CifarResNet(56, num_classes, use_bn=True, dtype=dtype),
    'wrn50_2': lambda num_classes, dtype: wrn.WideResNet50(num_classes, widen_factor=2, dtype=dtype),
    # The same bottleneck/BatchNorm code at 1/8 width and one unit per group, for smoke runs and tests.
    'wrn_smoke': lambda num_classes, dtype: wrn.WideResNet50(num_classes, widen_factor=2, stage_sizes=(1, 1, 1, 1),
                                                             base_width=8, dtype=dtype),
}

# Input shape each model is designed for (used when ``create`` is not given one).
DEFAULT_INPUT_SHAPE = {
    'small_cnn': (28, 28, 1), 'lenet': (28, 28, 1),
    'resnet20': (32, 32, 3), 'resnet56': (32, 32, 3), 'resnet110': (32, 32, 3),
    'resnet20_bn': (32, 32, 3), 'resnet56_bn': (32, 32, 3),
    'wrn50_2': (56, 56, 3), 'wrn_smoke': (56, 56, 3),
}

MODEL_NAMES = tuple(sorted(_BUILDERS))


def get_module(name: str, *, num_classes: int, dtype: Any = None) -> nn.Module:
  """The Flax linen module called ``name`` (see ``MODEL_NAMES``); ``dtype`` is the computation dtype."""
  if name not in _BUILDERS:
    raise ConfigError(f'unknown model {name!r}; choose one of {", ".join(MODEL_NAMES)} (config.model.name)')
  if num_classes < 2:
    raise ConfigError(f'num_classes must be at least 2, got {num_classes}')
  return _BUILDERS[name](num_classes, dtype)


def has_batch_norm(variables) -> bool:
  return 'batch_stats' in variables


def create(name: str, *, num_classes: int, key: jax.Array, input_shape: tuple[int, int, int] | None = None,
           dtype: Any = None):
  """Builds model ``name`` and initializes it: returns ``(apply_fn, variables)``.

  ``apply_fn(variables, images, *, train=False)`` maps images (N, H, W, C) in [0, 1] to float32 logits
  (N, num_classes). ``input_shape`` (H, W, C) defaults to the shape the model was designed for.
  """
  module = get_module(name, num_classes=num_classes, dtype=dtype)
  shape = tuple(input_shape or DEFAULT_INPUT_SHAPE[name])
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, *shape), jnp.float32), train=False))(key)
  variables = dict(variables)

  def apply_fn(variables, images, *, train: bool = False):
    if train and has_batch_norm(variables):
      logits, _ = module.apply(variables, images, train=True, mutable=['batch_stats'])
      return logits
    return module.apply(variables, images, train=train)

  return apply_fn, variables
