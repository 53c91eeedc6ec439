"""Model registry and the functional handle every other module uses.

``create(name, num_classes=..., key=...)`` returns ``(apply_fn, variables)`` with
``apply_fn(variables, images, *, train) -> logits``: images NHWC float in [0, 1], logits float32. ``variables`` is
the Flax variable dict (``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models). In ``train=True`` mode a
BatchNorm model normalizes with batch statistics but ``apply_fn`` discards their update; the training step calls
``get_module(...).apply(..., mutable=['batch_stats'])`` to keep it.

The fast CPU layers are public drop-ins for users' own linen models: :class:`Conv` (for ``flax.linen.Conv``,
padding 'SAME') and :func:`max_pool_2x2` (for ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``), whose input
gradients XLA:CPU runs fast inside an attack's loop (:mod:`arreg_jax.models.layers`).

Every model sows the input of its last layer (the penultimate features Φ(x) of the average-margin regularizer,
poster 004) as ``intermediates/features`` and names its last layer ``head``; :func:`apply_with_features` returns
both. A model name ending in ``_sn`` is the same network with Miyato spectral normalization on every layer (draft
003; ``layers.py``): its power-iteration vectors live in the ``batch_stats`` collection, updated only by a
``train=True`` call with that collection mutable (the train step's parameter update), never by the attack.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from arreg_jax.errors import ConfigError
from arreg_jax.models import layers, lenet, mlp, resnet, vgg, wrn
from arreg_jax.models.layers import Conv, conv2d, max_pool_2x2

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

# Models with a spectrally normalized variant '<name>_sn': builder(num_classes, dtype, spectral_norm).
_SN_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    'small_cnn': lenet.SmallCNN,
    'lenet': lenet.LeNet,
    'cifar_cnn': lenet.CifarCNN,
    'mlp': lambda num_classes, dtype, spectral_norm: mlp.MLP(num_classes, dtype=dtype, spectral_norm=spectral_norm),
    'logreg': mlp.LogReg,
    'vgg16': lambda num_classes, dtype, spectral_norm: vgg.make('vgg16', num_classes, dtype, spectral_norm),
    'vgg19': lambda num_classes, dtype, spectral_norm: vgg.make('vgg19', num_classes, dtype, spectral_norm),
    'vgg_smoke': lambda num_classes, dtype, spectral_norm: vgg.make('vgg_smoke', num_classes, dtype, spectral_norm),
}
for _name, _build in _SN_BUILDERS.items():
  _BUILDERS.setdefault(_name, lambda num_classes, dtype, _b=_build: _b(num_classes, dtype, False))
  _BUILDERS[_name + '_sn'] = lambda num_classes, dtype, _b=_build: _b(num_classes, dtype, True)

# Input shape each model is designed for (used when ``create`` is not given one).
DEFAULT_INPUT_SHAPE = {
    'small_cnn': (28, 28, 1), 'lenet': (28, 28, 1),
    'resnet20': (32, 32, 3), 'resnet56': (32, 32, 3), 'resnet110': (32, 32, 3),
    'resnet20_bn': (32, 32, 3), 'resnet56_bn': (32, 32, 3),
    'wrn50_2': (56, 56, 3), 'wrn_smoke': (56, 56, 3),
    'cifar_cnn': (32, 32, 3), 'mlp': (28, 28, 1), 'logreg': (28, 28, 1),
    'vgg16': (32, 32, 3), 'vgg19': (32, 32, 3), 'vgg_smoke': (32, 32, 3),
}
DEFAULT_INPUT_SHAPE.update({n + '_sn': DEFAULT_INPUT_SHAPE[n] for n in _SN_BUILDERS})

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
  variables = dict(_init_fn(module, shape)(key))

  def apply_fn(variables, images, *, train: bool = False):
    if train and has_batch_norm(variables):
      logits, _ = module.apply(variables, images, train=True, mutable=['batch_stats'])
      return logits
    return module.apply(variables, images, train=train)

  return apply_fn, variables


@functools.lru_cache(maxsize=None)
def inference_apply(module: nn.Module) -> Callable:
  """``apply_fn(variables, images) -> logits`` of ``module`` in inference mode (``train=False``), one object per
  module: programs compiled for it (``jax.jit`` keyed on the function, e.g. the attacks' and AutoAttack's) serve
  every set of weights of that architecture, passed as the traced ``variables``."""
  return lambda variables, images: module.apply(variables, images, train=False)


@functools.lru_cache(maxsize=None)
def _init_fn(module: nn.Module, shape: tuple[int, ...]):
  """The jitted ``key -> variables`` of ``module`` on inputs of ``shape``, compiled once per (module, shape): the
  members of a sweep initialize with one program."""
  return jax.jit(lambda k: module.init(k, jnp.zeros((1, *shape), jnp.float32), train=False))


def compute_dtype(precision: str):
  """The models' computation dtype for ``config.precision``: bfloat16 activations and matmuls for ``'bfloat16'``;
  parameters, optimizer state, logits, softmax and loss stay float32 (None: the parameters' dtype)."""
  return jnp.bfloat16 if precision == 'bfloat16' else None


FEATURES = ('intermediates', 'features')


def apply_with_features(module: nn.Module, variables, images, *, train: bool, mutable=()):
  """``(logits, features, updated_state)``: the forward pass with the sown penultimate features Φ(x).

  ``mutable`` lists further collections to return (e.g. ``['batch_stats']`` in the train step); ``updated_state``
  holds them (without the intermediates).
  """
  logits, state = module.apply(variables, images, train=train, mutable=[*mutable, FEATURES[0]])
  state = dict(state)
  feats = state.pop(FEATURES[0])[FEATURES[1]]
  if len(feats) != 1:
    raise ValueError(f'{type(module).__name__} sowed {len(feats)} feature tensors, expected exactly one')
  return logits, feats[0], state


def fold_spectral_norm(variables: dict) -> dict:
  """``variables`` with every spectrally normalized kernel replaced by the kernel the forward pass applies.

  For each layer with a power-iteration vector ``batch_stats[...]['sn_u']`` the ``kernel`` becomes ``kernel / σ``,
  σ the stored estimate (:func:`arreg_jax.spectral.power_iteration` with no further round). Inference is unchanged —
  σ of the folded kernel with the same ``u`` is exactly 1 — but analyses that read ``params`` (singular values,
  bound terms, the last layer's rows) now see the normalized operator. Models without SN are returned as they are.
  """
  from arreg_jax import spectral  # pylint: disable=g-import-not-at-top
  stats = variables.get('batch_stats') or {}
  found = [(tuple(getattr(k, 'key', k) for k in path[:-1]), u)
           for path, u in jax.tree_util.tree_flatten_with_path(stats)[0]
           if getattr(path[-1], 'key', None) == 'sn_u']
  if not found:
    return variables
  params = jax.tree.map(lambda x: x, dict(variables['params']))  # a copy we may edit

  def edit(tree, path, fn):
    tree = dict(tree)
    tree[path[0]] = fn(tree[path[0]]) if len(path) == 1 else edit(tree[path[0]], path[1:], fn)
    return tree

  for path, u in found:
    def fold(layer, u=u):
      layer = dict(layer)
      sigma, _ = spectral.power_iteration(spectral.miyato_matrix(layer['kernel']), u, n_iter=0)
      layer['kernel'] = layer['kernel'] / sigma
      return layer
    params = edit(params, path, fold)
  return {**variables, 'params': params}
