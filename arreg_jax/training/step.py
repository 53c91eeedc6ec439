"""The compiled adversarial training step: its static spec, its traced hyper-parameters, and the step itself.

One training step is one pure function: gather the batch from the device-resident uint8 dataset, augment it (keyed),
craft adversarial examples against the current weights (PGD, FGSM, or none at AR strength 0; the attack's steps run
inside the same program), and apply one optax update on the adversarial batch (Madry et al. 2018):
θ ← θ − η ∇_θ (1/B) Σ_i CE(f_θ(x_i + δ_i*), y_i).

What the program depends on is split in two:

* :class:`StepSpec` — a small hashable value of exactly what changes the program (the model, the optimizer, the
  attack, the batch layout, whether each regularizer term is on, the microbatches). It is a *static* argument of
  :func:`train_steps`, so ``jax.jit``'s own cache keeps one compiled program per distinct spec;
* :class:`StepHyper` — a member's ε, regularizer weights λ, β and base key, *traced* arguments: the members of a
  sweep that share a spec (ε = 0.1, 0.2, 0.3 …) run one compiled program.

BatchNorm models (WRN-50-2, ``resnet*_bn``): by default the attack runs the network in inference mode (running
statistics) and never updates them, so crafting δ* does not move the statistics the update then uses; the config
switch ``attack.bn_mode = 'batch'`` makes the attack normalize with the batch's own statistics instead (still without
updating the running averages). The parameter update itself always uses batch statistics and updates the running
averages once per step, as in standard training.

The average-margin regularizer of poster 004 (``config.regularizer``, :mod:`arreg_jax.regularizers`) changes the
update's loss to ``mean CE − λ·mean clip_[0,γ](min_{k≠y}(w_y − w_k)ᵀΦ(x)) + β Σ_l ‖W_l W_lᵀ − I‖²_F`` on the same
(adversarial, when AR > 0) batch; the attack still maximizes the plain cross-entropy. With λ = β = 0 the step is
the same program as without the regularizer.

For a benchmark: ``spec = step_spec(config, module=..., adversarial=True, augment='cifar', steps_per_epoch=n,
batch_sharding=...)``, ``state = init_state(variables, spec.optimizer)``, then
``train_steps(spec, state, images, labels, perm, hyper)`` — the very program the runner trains with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from arreg_jax import attacks, models, regularizers
from arreg_jax.data import augment
from arreg_jax.training.state import Optimizer, TrainState

ATTACK_KINDS = ('pgd', 'fgsm', 'none')  # config.attack.kind ('none': standard training at every strength)
BN_MODES = ('eval', 'batch')  # config.attack.bn_mode: the statistics BatchNorm uses during the attack
Metrics = dict[str, jax.Array]
# ``progress(step, i)``: microbatch i (0-based) of training step ``step`` has its gradient (a host callback).
MicrobatchProgress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """The training attack of ``config.attack`` (PGD or FGSM), without its radius (ε is traced).

  ``step_size`` is absolute; when it is None the PGD step is ``step_size_rel`` × ε (traced with ε). FGSM takes
  ``step_size`` as given (None: its own default, a step of ε). ``batch_stats`` says whether the attack normalizes
  with the batch's own statistics (``bn_mode='batch'``) rather than the running ones.
  """
  kind: str
  norm: str
  steps: int
  step_size: float | None
  step_size_rel: float | None
  random_start: bool
  batch_stats: bool

  @classmethod
  def from_config(cls, attack_cfg: ml_collections.ConfigDict) -> 'AttackSpec':
    return cls(kind=attack_cfg.kind, norm=attack_cfg.norm, steps=1 if attack_cfg.kind == 'fgsm' else
               int(attack_cfg.steps), step_size=attack_cfg.step_size, step_size_rel=attack_cfg.step_size_rel,
               random_start=attack_cfg.random_start, batch_stats=attack_cfg.bn_mode == 'batch')

  def __call__(self, logits_fn, images, labels, key, eps):
    """Adversarial images for ``images`` (``eps`` may be traced, and the step size with it when relative)."""
    if self.kind == 'fgsm':
      return attacks.fgsm(logits_fn, images, labels, key, eps=eps, random_start=self.random_start,
                          step_size=self.step_size, norm=self.norm)
    step_size = self.step_size if self.step_size is not None else self.step_size_rel * eps
    return attacks.pgd(logits_fn, images, labels, key, eps=eps, step_size=step_size, steps=self.steps,
                       norm=self.norm, random_start=self.random_start)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything the compiled training program depends on besides its array arguments (a static argument: a
  different spec compiles a different program; equal specs share one).

  Attributes:
    module: the Flax module.
    optimizer: the :class:`~arreg_jax.training.state.Optimizer`.
    attack: the training attack, None for standard training (AR strength 0 or ``attack.kind='none'``).
    augment: the augmentation kind (:func:`arreg_jax.data.augment.preprocess`).
    batch_size: B, examples per step.
    steps_per_epoch: steps in one epoch (step t of an epoch trains on ``perm[t·B:(t+1)·B]``).
    steps_per_call: steps run by one call of :func:`train_steps` (a ``lax.scan``).
    microbatches: k; the batch is split into k microbatches of B/k, attacked and differentiated in turn.
    eps_ramp_steps: ε ramps linearly from 0 over this many steps (0: no ramp).
    margin_gamma: γ of the margin term, None when the term is off (λ = 0).
    ortho_on: whether the orthogonality term β Σ‖WWᵀ − I‖² is computed.
    batch_sharding: the sharding of a batch over the mesh (None: one device).
    progress: a host callback ``progress(step, i)`` after each microbatch's gradient (k > 1 only); the same
      object must be passed to every member that should share the program.
  """
  module: nn.Module
  optimizer: Optimizer
  attack: AttackSpec | None
  augment: str
  batch_size: int
  steps_per_epoch: int
  steps_per_call: int = 1
  microbatches: int = 1
  eps_ramp_steps: int = 0
  margin_gamma: float | None = None
  ortho_on: bool = False
  batch_sharding: jax.sharding.Sharding | None = None
  progress: MicrobatchProgress | None = None

  def replace(self, **changes) -> 'StepSpec':
    return dataclasses.replace(self, **changes)


def is_adversarial(config: ml_collections.ConfigDict, strength: float) -> bool:
  """Whether a member's training step crafts adversarial examples (AR strength > 0 and an attack configured)."""
  return float(strength) != 0 and config.attack.kind != 'none'


def step_spec(config: ml_collections.ConfigDict, *, module: nn.Module, adversarial: bool, augment: str,
              steps_per_epoch: int, batch_sharding=None, steps_per_call: int = 1, microbatches: int | None = None,
              progress: MicrobatchProgress | None = None) -> StepSpec:
  """The :class:`StepSpec` of a (validated) run config.

  Args:
    config: the run config (``train``, ``attack``, ``regularizer`` are read).
    module: the Flax module to train.
    adversarial: whether the step attacks (:func:`is_adversarial`).
    augment: the dataset's augmentation kind.
    steps_per_epoch: steps in one epoch.
    batch_sharding: the batch's sharding over the mesh (``arreg_jax.sharding.batch_sharding``), None: one device.
    steps_per_call: steps per call of :func:`train_steps`.
    microbatches: k (default ``config.train.microbatches``, which must then be an int: 'auto' is resolved by
      :mod:`arreg_jax.training.memory_plan`).
    progress: the in-step progress callback; kept only with microbatches > 1 (a step of one microbatch reports
      nothing from inside, and its spec — hence its compiled program — does not depend on the callback).

  Returns:
    The spec; a ``ValueError`` names a microbatch count that is not a positive int dividing the batch.
  """
  k = config.train.microbatches if microbatches is None else microbatches
  batch = int(config.train.batch_size)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1 or batch % k:
    raise ValueError(f'microbatches must be a positive int dividing the batch size {batch}, got {k!r}')
  reg = config.regularizer
  return StepSpec(module=module, optimizer=Optimizer.from_config(config.train, steps_per_epoch),
                  attack=AttackSpec.from_config(config.attack) if adversarial else None, augment=augment,
                  batch_size=batch, steps_per_epoch=int(steps_per_epoch), steps_per_call=int(steps_per_call),
                  microbatches=k, eps_ramp_steps=int(round(config.train.eps_ramp_epochs * steps_per_epoch)),
                  margin_gamma=float(reg.margin_gamma) if reg.margin_lambda else None,
                  ortho_on=bool(reg.ortho_beta), batch_sharding=batch_sharding,
                  progress=progress if k > 1 else None)


class StepHyper(flax.struct.PyTreeNode):
  """The values a member of a sweep gives its training program as arguments (traced), not as constants.

  ``eps`` is the AR radius ε = s × ``attack.strength_unit`` before the ramp (the PGD step size follows it when
  relative), ``margin_lambda`` and ``ortho_beta`` are the regularizer weights λ and β (poster 004), and ``key`` is
  the base key of the step randomness. Whether ε, λ and β are zero stays static (:class:`StepSpec`): a zero switches
  its part of the program off.
  """
  eps: jax.Array
  margin_lambda: jax.Array
  ortho_beta: jax.Array
  key: jax.Array


def step_hyper(config: ml_collections.ConfigDict, strength: float, key: jax.Array) -> StepHyper:
  """The :class:`StepHyper` of a member with AR strength ``strength`` and base key ``key`` (float32 scalars)."""
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  reg = config.regularizer
  return StepHyper(eps=f32(float(strength) * float(config.attack.strength_unit)),
                   margin_lambda=f32(reg.margin_lambda), ortho_beta=f32(reg.ortho_beta), key=key)


def attack_eps(eps, step, ramp_steps: int):
  """ε at a training step: the full radius ``eps`` ramped linearly from 0 over the first ``ramp_steps`` steps."""
  if ramp_steps > 0:
    eps = eps * jnp.minimum(1.0, (step + 1).astype(jnp.float32) / ramp_steps)
  return eps


def logits_fn_of(module: nn.Module, variables: dict, *, train: bool):
  """images -> logits with fixed ``variables``; batch statistics (if ``train``) are used but not kept."""
  if train and 'batch_stats' in variables:
    return lambda x: module.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  return lambda x: module.apply(variables, x, train=train)


def update_loss(module: nn.Module, params, batch_stats, x, y, lam, gamma: float | None, beta, *,
                margin_on: bool | None = None, ortho_on: bool | None = None):
  """The loss of the parameter update on batch ``(x, y)`` and ``(logits, new batch_stats, parts)``.

  Mean cross-entropy, with batch statistics (updated running averages returned); with λ or β on the poster-004
  regularized loss ``mean CE − λ·mean clip_[0,γ](feature margin) + β Σ_l ‖W_l W_lᵀ − I‖²_F``
  (:func:`arreg_jax.regularizers.regularized_loss`; ``parts`` holds its terms). ``lam`` and ``beta`` may be traced
  when ``margin_on`` / ``ortho_on`` say statically whether their terms are on (default: whether they are nonzero).
  """
  margin_on = bool(lam) if margin_on is None else margin_on
  ortho_on = bool(beta) if ortho_on is None else ortho_on
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  features = None
  if margin_on:  # the forward pass that also returns Φ(x) (poster 004)
    mutable = ['batch_stats'] if batch_stats else []
    logits, features, updates = models.apply_with_features(module, variables, x, train=True, mutable=mutable)
    new_stats = updates.get('batch_stats', {})
  elif batch_stats:
    logits, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
    new_stats = updates['batch_stats']
  else:
    logits, new_stats = module.apply(variables, x, train=True), {}
  ce = attacks.cross_entropy(logits, y)
  if not (margin_on or ortho_on):
    return jnp.mean(ce), (logits, new_stats, {})
  last_w = regularizers.effective_head({'params': params, 'batch_stats': batch_stats})[0] if margin_on else None
  loss, parts = regularizers.regularized_loss(ce, features, params, y, margin_lambda=lam, margin_gamma=gamma,
                                              ortho_beta=beta, last_w=last_w, margin_on=margin_on,
                                              ortho_on=ortho_on)
  return loss, (logits, new_stats, parts)


def _grads_and_metrics(spec: StepSpec, state: TrainState, images, labels, batch_index, k_aug, k_att,
                       hyper: StepHyper):
  """(gradient, new batch_stats, metric sums) of the update loss on the examples ``batch_index``."""
  x = images[batch_index]
  y = labels[batch_index]
  if spec.batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, spec.batch_sharding)
    y = jax.lax.with_sharding_constraint(y, spec.batch_sharding)
  x = augment.preprocess(k_aug, x, kind=spec.augment, train=True)
  if spec.attack is not None:
    fixed = logits_fn_of(spec.module, state.variables(), train=spec.attack.batch_stats)
    x = spec.attack(fixed, x, y, k_att, attack_eps(hyper.eps, state.step, spec.eps_ramp_steps))

  loss_fn = lambda params: update_loss(spec.module, params, state.batch_stats, x, y, hyper.margin_lambda,
                                       spec.margin_gamma, hyper.ortho_beta,
                                       margin_on=spec.margin_gamma is not None, ortho_on=spec.ortho_on)
  (loss, (logits, new_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  loss = parts.get('ce', loss)  # the cross-entropy part of the loss
  metrics = {
      'loss_sum': loss * y.shape[0],
      'correct': jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
      'count': jnp.asarray(y.shape[0], jnp.float32),
  }
  if 'margin_term' in parts:
    metrics['margin_term_sum'] = parts['margin_term'] * y.shape[0]
  return grads, new_stats, metrics


def _accumulated(spec: StepSpec, state: TrainState, images, labels, batch_index, k_aug, k_att, hyper: StepHyper):
  """:func:`_grads_and_metrics` over k microbatches (a scan): mean gradient, mean running statistics, summed
  metrics."""
  k = spec.microbatches

  def body(grad_sum, row_i):
    row, i = row_i
    g, stats, m = _grads_and_metrics(spec, state, images, labels, row, jax.random.fold_in(k_aug, i),
                                     jax.random.fold_in(k_att, i), hyper)
    if spec.progress is not None:
      # The third operand (one entry of the gradient) makes the callback wait for this microbatch's backward pass.
      report = lambda step, i, _: spec.progress(int(step), int(i))
      jax.debug.callback(report, state.step, i, jax.tree.leaves(g)[-1].reshape(-1)[0])
    return jax.tree.map(jnp.add, grad_sum, g), (stats, m)

  rows = (batch_index.reshape(k, -1), jnp.arange(k, dtype=jnp.int32))
  grad_sum, (stats, metrics) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, state.params), rows)
  mean = lambda t: jax.tree.map(lambda a: jnp.mean(a, axis=0), t)
  return (jax.tree.map(lambda g: g / k, grad_sum), mean(stats),
          jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics))


def train_step(spec: StepSpec, state: TrainState, images, labels, batch_index, hyper: StepHyper
               ) -> tuple[TrainState, Metrics]:
  """One training step on the examples ``batch_index``: ``(new state, metric sums)``. Pure; jit it with ``spec``
  static (``jax.jit(train_step, static_argnums=0)``), or run epochs with :func:`train_steps`.

  ``images``/``labels`` are the whole device-resident training set (uint8 NHWC, int32); ``batch_index`` (int32,
  shape (B,)) selects this step's examples; ``hyper`` (:class:`StepHyper`) holds the member's ε, λ, β and base key.
  The step's randomness is ``fold_in(hyper.key, state.step)``, so a run resumed from a checkpoint draws exactly the
  keys an uninterrupted run would. Metrics are sums over the batch (``loss_sum``, ``correct``, ``count``), measured
  on the examples trained on (adversarial ones when AR > 0); ``loss_sum`` is the cross-entropy part of the loss.
  With the margin regularizer on, ``margin_term_sum`` adds the batch sum of ``clip_[0,γ]`` of the feature-space
  margins (poster 004).

  ``spec.microbatches`` = k > 1 splits the batch into k consecutive microbatches of B/k, scanned in turn: each is
  augmented and attacked with keys ``fold_in(·, i)`` of the step's keys and differentiated on its own; the gradient
  applied is the mean of the k microbatch gradients (= the gradient of the batch's mean loss), in ONE optimizer
  update. The attacks all run against the step's starting weights and running statistics. BatchNorm normalizes with
  each microbatch's own statistics (as on k devices of a data-parallel run), and the running averages are updated
  once per step with the mean of the k microbatches' updates — so they move as far per step as with k = 1. k = 1 is
  the unsplit program.
  """
  chex.assert_type(images, jnp.uint8)
  chex.assert_shape((hyper.eps, hyper.margin_lambda, hyper.ortho_beta), ())
  key = jax.random.fold_in(hyper.key, state.step)
  k_aug, k_att = jax.random.split(key)
  grads_fn = _grads_and_metrics if spec.microbatches == 1 else _accumulated
  grads, new_stats, metrics = grads_fn(spec, state, images, labels, batch_index, k_aug, k_att, hyper)
  tx = spec.optimizer.transform()
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
  return new_state, metrics


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_steps(spec: StepSpec, state: TrainState, images, labels, perm, hyper: StepHyper
                ) -> tuple[TrainState, Metrics]:
  """``spec.steps_per_call`` training steps in one compiled call (a ``lax.scan``); returns the new state (the old
  one is donated) and the steps' summed metrics.

  Step t of an epoch trains on ``perm[t·B:(t+1)·B]``, with t = ``state.step mod steps_per_epoch`` read on the
  device, so in steady state the host sends nothing per call: the dataset, the epoch's permutation ``perm`` and
  ``hyper`` (:class:`StepHyper`) are already device arrays. Compiled once per distinct ``spec`` (jit's cache).
  """
  def body(state, _):
    start = (state.step % spec.steps_per_epoch) * spec.batch_size
    index = jax.lax.dynamic_slice(perm, (start,), (spec.batch_size,))
    return train_step(spec, state, images, labels, index, hyper)

  state, metrics = jax.lax.scan(body, state, None, length=spec.steps_per_call)
  return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)


@jax.jit
def add_metrics(a: Metrics, b: Metrics) -> Metrics:
  """``a + b`` leaf by leaf, as one compiled program (one dispatch, not one per leaf)."""
  return jax.tree.map(jnp.add, a, b)
