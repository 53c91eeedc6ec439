"""The compiled programs of a sweep's members, built once and shared by every member that can run them.

A member's training and evaluation programs depend on its config only through :func:`arreg_jax.train.program_key`:
its ε, regularizer weights and random keys are traced arguments (:class:`arreg_jax.train.StepHyper`), and the
spectral-clipping threshold is an argument of the clipping program. So the AR-trained members of a sweep (ε = 0.1,
0.2, 0.3 …) share one set of programs, and standard training (AR 0, no attack) has its own: a sweep compiles — and
plans the memory of — each distinct program once, not once per member. :class:`ProgramCache` holds them for the
length of one sweep (``arreg_jax.trainer.train_sweep``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from arreg_jax import evaluation, memory_plan, models, regularizers, sharding, spectral, train


@dataclasses.dataclass
class Programs:
  """The compiled (or jitted) programs of one :func:`~arreg_jax.train.program_key`, with what built them."""
  module: Any
  microbatches: int
  calls: list[int]  # steps per dispatch over one epoch
  multi_steps: dict[int, Callable]  # steps per call -> multi_step(state, images, labels, perm, hyper)
  permutation: Callable  # (key, epoch) -> the epoch's int32 permutation of the training set, replicated
  eval_step: Callable  # clean + PGD metrics (evaluation.make_eval_step), compiled ahead for the test set
  clean_eval_step: Callable
  clip: Callable | None  # (params, clip_to) -> params with every layer's spectrum clipped at clip_to
  ortho: Callable | None  # params -> Σ_l ‖W_l W_lᵀ − I‖²_F


def epoch_calls(steps_per_epoch: int, steps_per_call: int) -> list[int]:
  """The steps of each dispatch of one epoch: ``steps_per_call`` at a time, the leftover in a shorter last call."""
  per_call = min(steps_per_call, steps_per_epoch)
  return [per_call] * (steps_per_epoch // per_call) + ([steps_per_epoch % per_call] if steps_per_epoch % per_call
                                                         else [])


def build(config: ml_collections.ConfigDict, strength: float, ds, data, mesh, state: train.TrainState,
          hyper: train.StepHyper, eval_key: jax.Array, what: str) -> Programs:
  """Builds, compiles ahead and memory-plans the programs of a member (``state``, ``hyper`` and ``eval_key`` give
  the arguments' shapes and shardings; their values are not baked in)."""
  module = models.get_module(config.model.name, num_classes=ds.num_classes,
                             dtype=models.compute_dtype(config.precision))
  batch = config.train.batch_size
  steps_per_epoch = data.num_train // batch
  tx = train.make_optimizer(config.train, steps_per_epoch)
  calls = epoch_calls(steps_per_epoch, config.train.steps_per_call)
  step_kw = dict(config=config, adversarial=train.is_adversarial(config, strength), augment_kind=ds.augment,
                 steps_per_epoch=steps_per_epoch, batch_size=batch, batch_sharding=sharding.batch_sharding(mesh))
  make = lambda n, k: train.make_multi_step(module, tx, steps_per_call=n, microbatches=k, **step_kw)
  micro, planned = memory_plan.plan_training(config, make, calls[0], state, hyper, data.train_images,
                                             data.train_labels, mesh, what)
  multi_steps = {n: planned if n == calls[0] else make(n, micro) for n in set(calls)}
  clip = None
  if config.spectral.clip_to is not None:
    specs = spectral.layer_specs(module, state.variables(), (1, *ds.image_shape), train=False)
    clip = lambda params, clip_to: jax.device_put(
        spectral.clip_params(params, specs, clip_to, rounds=config.spectral.rounds), sharding.replicated(mesh))
  num_train = data.num_train
  permutation = jax.jit(lambda key, epoch: jax.random.permutation(jax.random.fold_in(key, epoch), num_train
                                                                  ).astype(jnp.int32),
                        out_shardings=sharding.replicated(mesh))
  pgd_cfg = ml_collections.ConfigDict({'eps': config.eval.pgd_eps, 'step_size': config.eval.pgd_step_size,
                                       'steps': config.eval.pgd_steps})
  make_eval = lambda k: evaluation.make_eval_step(module, augment_kind=ds.augment, pgd_cfg=pgd_cfg, chunks=k)
  eval_step = memory_plan.plan_evaluation(config, make_eval, state, data.test_images, data.test_labels, eval_key,
                                          mesh, what)
  ortho = jax.jit(regularizers.orthogonality_penalty) if (config.regularizer.ortho_beta or config.margins.track
                                                          ) else None
  return Programs(module=module, microbatches=micro, calls=calls, multi_steps=multi_steps, permutation=permutation,
                  eval_step=eval_step,
                  clean_eval_step=evaluation.make_eval_step(module, augment_kind=ds.augment, pgd_cfg=None), clip=clip,
                  ortho=ortho)


class ProgramCache:
  """The :class:`Programs` of a sweep by :func:`~arreg_jax.train.program_key` (and the data and mesh they were
  compiled for); ``built`` counts the distinct sets compiled, ``reused`` the members that found theirs here."""

  def __init__(self):
    self._entries: dict[tuple, Programs] = {}
    self.built = self.reused = 0

  def get(self, config, strength: float, ds, data, mesh, state, hyper, eval_key, what: str) -> Programs:
    key = (train.program_key(config, strength), data.num_train, data.train_images.shape, data.test_images.shape,
           ds.num_classes, ds.augment, tuple(d.id for d in mesh.devices.flat))
    if key in self._entries:
      self.reused += 1
      logging.info('%s: runs the programs compiled for an earlier member (only ε, λ, β and keys differ)', what)
      return self._entries[key]
    self.built += 1
    self._entries[key] = build(config, strength, ds, data, mesh, state, hyper, eval_key, what)
    return self._entries[key]
