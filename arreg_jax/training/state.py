"""The training state and its optimizer: what changes during training (and is checkpointed), and how it is updated.

:class:`Optimizer` is the optimizer of SPEC §3 as a small hashable value — SGD with momentum (or Adam) on a
piecewise-constant learning rate — so that the compiled training step can take it as part of its static spec
(:class:`arreg_jax.training.step.StepSpec`) and build the optax transformation inside the program: two members of a
sweep with equal optimizers run one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'adam')  # config.train.optimizer


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training (and is checkpointed): a pytree of arrays."""
  step: jax.Array
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats} if self.batch_stats else {'params': self.params}


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """SGD with momentum (or Adam) on a piecewise-constant learning rate, as a hashable value.

  Attributes:
    name: one of :data:`OPTIMIZERS`: 'sgd' or 'adam'.
    learning_rate: η of the first update.
    momentum: SGD momentum (0: none); nesterov: Nesterov momentum.
    weight_decay: λ added as λθ to the gradient before the momentum, as PyTorch's SGD does (0: none).
    boundaries: the update counts (0-based) at which the rate is multiplied by ``decay``.
    decay: the factor applied at each boundary.
  """
  name: str
  learning_rate: float
  momentum: float
  nesterov: bool
  weight_decay: float
  boundaries: tuple[int, ...]
  decay: float

  @classmethod
  def from_config(cls, train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> 'Optimizer':
    """The optimizer of ``config.train`` (SPEC §3; CIFAR: 0.05, ÷10 at epochs 100 and 150) for epochs of
    ``steps_per_epoch`` updates."""
    return cls(name=train_cfg.optimizer, learning_rate=train_cfg.learning_rate, momentum=train_cfg.momentum,
               nesterov=bool(train_cfg.nesterov), weight_decay=train_cfg.weight_decay,
               boundaries=tuple(int(b) * steps_per_epoch for b in train_cfg.lr_boundaries),
               decay=float(train_cfg.lr_decay))

  def schedule(self) -> optax.Schedule:
    """The learning rate of update ``count`` (0-based)."""
    return optax.piecewise_constant_schedule(self.learning_rate, {b: self.decay for b in self.boundaries})

  def transform(self) -> optax.GradientTransformation:
    """The optax transformation (pure: building it twice gives the same updates)."""
    if self.name == 'sgd':
      tx = optax.sgd(self.schedule(), momentum=self.momentum or None, nesterov=self.nesterov)
    else:
      tx = optax.adam(self.schedule())
    if self.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(self.weight_decay), tx)
    return tx


def init_state(variables: dict, optimizer: Optimizer) -> TrainState:
  """The state at step 0: the model's initial ``variables`` and the optimizer's initial state."""
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=optimizer.transform().init(params))
