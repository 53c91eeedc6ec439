"""The training state, the compiled adversarial training step and the evaluation step.

One training step is one pure function, jitted once per sweep with its state donated: gather the batch from the
device-resident uint8 dataset, augment it (keyed), craft adversarial examples against the current weights (PGD,
FGSM, or none at AR strength 0; the attack's steps run inside the same program), and apply one optax update on the
adversarial batch (Madry et al. 2018): θ ← θ − η ∇_θ (1/B) Σ_i CE(f_θ(x_i + δ_i*), y_i). A member's ε, regularizer
weights and keys are traced arguments (:class:`StepHyper`), so the members of a sweep that share a model and an
attack kind run one compiled program.

BatchNorm models (WRN-50-2, ``resnet*_bn``): by default the attack runs the network in inference mode (running
statistics) and never updates them, so crafting δ* does not move the statistics the update then uses; the config
switch ``attack.bn_mode = 'batch'`` makes the attack normalize with the batch's own statistics instead (still without
updating the running averages). The parameter update itself always uses batch statistics and updates the running
averages once per step, as in standard training.

The average-margin regularizer of poster 004 (``config.regularizer``, :mod:`arreg_jax.regularizers`) changes the
update's loss to ``mean CE − λ·mean clip_[0,γ](min_{k≠y}(w_y − w_k)ᵀΦ(x)) + β Σ_l ‖W_l W_lᵀ − I‖²_F`` on the same
(adversarial, when AR > 0) batch; the attack still maximizes the plain cross-entropy. With λ = β = 0 the step is
the same program as without the regularizer.
"""

from __future__ import annotations

import collections
import contextlib
import json
from typing import Any, Callable

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from arreg_jax import attacks, config_json, models, regularizers, sharding
from arreg_jax.data import augment

Metrics = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training (and is checkpointed): a pytree of arrays."""
  step: jax.Array
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats} if self.batch_stats else {'params': self.params}


def lr_schedule(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """The learning rate of update ``count`` (0-based): ``learning_rate``, multiplied by ``lr_decay`` at each epoch in
  ``lr_boundaries`` (SPEC §3; CIFAR: 0.05, ÷10 at epochs 100 and 150)."""
  return optax.piecewise_constant_schedule(
      train_cfg.learning_rate,
      {int(b) * steps_per_epoch: float(train_cfg.lr_decay) for b in train_cfg.lr_boundaries})


def make_optimizer(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum (or Adam) on :func:`lr_schedule` (SPEC §3).

  ``weight_decay`` adds λθ to the gradient before the momentum, as PyTorch's SGD does.
  """
  schedule = lr_schedule(train_cfg, steps_per_epoch)
  if train_cfg.optimizer == 'sgd':
    opt = optax.sgd(schedule, momentum=train_cfg.momentum or None, nesterov=bool(train_cfg.nesterov))
  else:
    opt = optax.adam(schedule)
  if train_cfg.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(train_cfg.weight_decay), opt)
  return opt


def init_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params))


class StepHyper(flax.struct.PyTreeNode):
  """The values a member of a sweep gives its training program as arguments (traced), not as constants.

  Members that differ only in these share one compiled program (:func:`program_key`): ``eps`` is the AR radius
  ε = s × ``attack.strength_unit`` before the ramp (the PGD step size follows it when relative), ``margin_lambda``
  and ``ortho_beta`` are the regularizer weights λ and β (poster 004), and ``key`` is the base key of the step
  randomness. Whether ε, λ and β are zero stays static: a zero switches its part of the program off.
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


def is_adversarial(config: ml_collections.ConfigDict, strength: float) -> bool:
  """Whether a member's training step crafts adversarial examples (AR strength > 0 and an attack configured)."""
  return float(strength) != 0 and config.attack.kind != 'none'


def program_key(config: ml_collections.ConfigDict, strength: float) -> str:
  """What a member's compiled training and evaluation programs depend on, as a string: its config with the
  :class:`StepHyper` values (and the spectral-clipping threshold, a traced argument of its own program) replaced by
  whether they are on, and without the seed (whose keys are arguments). Two members with equal keys can run the
  same compiled programs."""
  c = config_json.to_dict(config)
  c.pop('seed', None)
  c['adversarial'] = is_adversarial(config, strength)
  for k in ('margin_lambda', 'ortho_beta'):
    c['regularizer'][k] = bool(config.regularizer[k])
  c['spectral']['clip_to'] = config.spectral.clip_to is not None
  return json.dumps(c, sort_keys=True, default=str)


def attack_eps(eps, step, ramp_steps: int):
  """ε at a training step: the full radius ``eps`` ramped linearly from 0 over the first ``ramp_steps`` steps."""
  if ramp_steps > 0:
    eps = eps * jnp.minimum(1.0, (step + 1).astype(jnp.float32) / ramp_steps)
  return eps


def make_attack(attack_cfg: ml_collections.ConfigDict) -> Callable:
  """``attack(logits_fn, images, labels, key, eps) -> adversarial images`` for ``attack_cfg`` (PGD or FGSM); ``eps``
  may be traced, and so is the step size when it is relative (``step_size_rel`` × ε)."""
  steps = 1 if attack_cfg.kind == 'fgsm' else int(attack_cfg.steps)

  def attack(logits_fn, images, labels, key, eps):
    if attack_cfg.kind == 'fgsm':
      return attacks.fgsm(logits_fn, images, labels, key, eps=eps, random_start=attack_cfg.random_start,
                          step_size=attack_cfg.step_size if attack_cfg.step_size is not None else None,
                          norm=attack_cfg.norm)
    step_size = attack_cfg.step_size if attack_cfg.step_size is not None else attack_cfg.step_size_rel * eps
    return attacks.pgd(logits_fn, images, labels, key, eps=eps, step_size=step_size, steps=steps,
                       norm=attack_cfg.norm, random_start=attack_cfg.random_start)
  return attack


def logits_fn_of(module: nn.Module, variables: dict, *, train: bool):
  """images -> logits with fixed ``variables``; batch statistics (if ``train``) are used but not kept."""
  if train and 'batch_stats' in variables:
    return lambda x: module.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  return lambda x: module.apply(variables, x, train=train)


def update_loss(module: nn.Module, params, batch_stats, x, y, lam, gamma: float, beta, *,
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
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  if not (margin_on or ortho_on):
    return jnp.mean(ce), (logits, new_stats, {})
  last_w = regularizers.effective_head({'params': params, 'batch_stats': batch_stats})[0] if margin_on else None
  loss, parts = regularizers.regularized_loss(ce, features, params, y, margin_lambda=lam, margin_gamma=gamma,
                                              ortho_beta=beta, last_w=last_w, margin_on=margin_on,
                                              ortho_on=ortho_on)
  return loss, (logits, new_stats, parts)


_microbatch_listeners: list[Callable[[int, int], None]] = []


@contextlib.contextmanager
def microbatch_listener(fn: Callable[[int, int], None]):
  """While active, ``fn(step, i)`` runs on the host when microbatch i of training step ``step`` has its gradient,
  in steps compiled with microbatches > 1: in-epoch progress for steps that take minutes (WRN-50-2 on a CPU). It is
  a device→host callback (``jax.debug.callback``) that the device makes when it gets there; the host never waits
  for it. With several devices it may arrive once per device."""
  _microbatch_listeners.append(fn)
  try:
    yield
  finally:
    _microbatch_listeners.remove(fn)


def _microbatch_done(step, i, _):
  for fn in list(_microbatch_listeners):
    fn(int(step), int(i))


def train_step_fn(module: nn.Module, tx: optax.GradientTransformation, *, config: ml_collections.ConfigDict,
                  adversarial: bool, augment_kind: str, steps_per_epoch: int, batch_sharding,
                  microbatches: int | None = None):
  """Returns the pure ``train_step(state, images, labels, batch_index, hyper) -> (state, metrics)``.

  ``images``/``labels`` are the whole device-resident training set (uint8 NHWC, int32); ``batch_index`` (int32,
  shape (B,)) selects this step's examples; ``hyper`` (:class:`StepHyper`, from :func:`step_hyper`) holds the
  member's ε, λ, β and base key as traced values, so every member of a sweep with the same :func:`program_key`
  runs this one program. ``adversarial`` (static, :func:`is_adversarial`) says whether the step attacks at all. The
  step's randomness is ``fold_in(hyper.key, state.step)``, so a run resumed from a checkpoint draws exactly the keys
  an uninterrupted run would. Metrics are sums over the batch (``loss_sum``, ``correct``, ``count``), measured on the
  examples trained on (adversarial ones when AR > 0); ``loss_sum`` is the cross-entropy part of the loss. With the
  margin regularizer on, ``margin_term_sum`` adds the batch sum of ``clip_[0,γ]`` of the feature-space margins
  (poster 004).

  ``microbatches`` = k (default ``config.train.microbatches``, an int here: 'auto' is resolved by
  :mod:`arreg_jax.memory_plan`) > 1 splits the batch into k consecutive microbatches of B/k, scanned in turn
  (``lax.scan``): each is augmented and attacked with keys ``fold_in(·, i)`` of the step's keys and differentiated
  on its own; the gradient applied is the mean of the k microbatch gradients (= the gradient of the batch's mean
  loss), in ONE optimizer update. The attacks all run against the step's starting weights and running statistics.
  BatchNorm normalizes with each microbatch's own statistics (as on k devices of a data-parallel run), and the
  running averages are updated once per step with the mean of the k microbatches' updates — i.e. momentum applied
  to the mean of the microbatch statistics — so they move as far per step as with k = 1. k = 1 is the unsplit
  program.
  """
  attack = make_attack(config.attack) if adversarial else None
  reg = config.regularizer
  gamma, margin_on, ortho_on = float(reg.margin_gamma), bool(reg.margin_lambda), bool(reg.ortho_beta)
  ramp_steps = int(round(config.train.eps_ramp_epochs * steps_per_epoch))
  attack_train_mode = config.attack.bn_mode == 'batch'
  k = int(config.train.microbatches if microbatches is None else microbatches)

  def grads_and_metrics(state: TrainState, images, labels, batch_index, k_aug, k_att, hyper: StepHyper):
    """(gradient, new batch_stats, metric sums) of the update loss on the examples ``batch_index``."""
    x = jax.lax.with_sharding_constraint(images[batch_index], batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[batch_index], batch_sharding)
    x = augment.preprocess(k_aug, x, kind=augment_kind, train=True)
    if attack is not None:
      fixed = logits_fn_of(module, state.variables(), train=attack_train_mode)
      x = attack(fixed, x, y, k_att, attack_eps(hyper.eps, state.step, ramp_steps))

    loss_fn = lambda params: update_loss(module, params, state.batch_stats, x, y, hyper.margin_lambda, gamma,
                                         hyper.ortho_beta, margin_on=margin_on, ortho_on=ortho_on)
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

  def accumulated(state: TrainState, images, labels, batch_index, k_aug, k_att, hyper: StepHyper):
    """:func:`grads_and_metrics` over k microbatches (a scan): mean gradient, mean running statistics, summed
    metrics."""
    def body(grad_sum, row_i):
      row, i = row_i
      g, stats, m = grads_and_metrics(state, images, labels, row, jax.random.fold_in(k_aug, i),
                                      jax.random.fold_in(k_att, i), hyper)
      # The third operand (one entry of the gradient) makes the callback wait for this microbatch's backward pass.
      jax.debug.callback(_microbatch_done, state.step, i, jax.tree.leaves(g)[-1].reshape(-1)[0])
      return jax.tree.map(jnp.add, grad_sum, g), (stats, m)

    rows = (batch_index.reshape(k, -1), jnp.arange(k, dtype=jnp.int32))
    grad_sum, (stats, metrics) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, state.params), rows)
    mean = lambda t: jax.tree.map(lambda a: jnp.mean(a, axis=0), t)
    return (jax.tree.map(lambda g: g / k, grad_sum), mean(stats),
            jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics))

  def train_step(state: TrainState, images, labels, batch_index, hyper: StepHyper):
    chex.assert_type(images, jnp.uint8)
    chex.assert_shape((hyper.eps, hyper.margin_lambda, hyper.ortho_beta), ())
    key = jax.random.fold_in(hyper.key, state.step)
    k_aug, k_att = jax.random.split(key)
    grads_fn = grads_and_metrics if k == 1 else accumulated
    grads, new_stats, metrics = grads_fn(state, images, labels, batch_index, k_aug, k_att, hyper)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_train_step(module: nn.Module, tx: optax.GradientTransformation, **kw):
  """The jitted, state-donating single step of :func:`train_step_fn`:
  ``train_step(state, images, labels, batch_index, hyper) -> (state, metrics)``."""
  return jax.jit(train_step_fn(module, tx, **kw), donate_argnums=(0,))


def make_multi_step(module: nn.Module, tx: optax.GradientTransformation, *, steps_per_call: int, batch_size: int,
                    steps_per_epoch: int, **kw):
  """Returns the jitted ``multi_step(state, images, labels, perm, hyper) -> (state, metric sums)``.

  Runs ``steps_per_call`` training steps in one dispatch (a ``lax.scan``); step t of an epoch trains on
  ``perm[t·B:(t+1)·B]``, with t = ``state.step mod steps_per_epoch`` read on the device, so in steady state the host
  sends nothing per call: the dataset, the epoch's permutation ``perm`` and ``hyper`` (:class:`StepHyper`) are
  already device arrays.
  """
  step_fn = train_step_fn(module, tx, steps_per_epoch=steps_per_epoch, **kw)

  def multi_step(state: TrainState, images, labels, perm, hyper: StepHyper):
    def body(state, _):
      start = (state.step % steps_per_epoch) * batch_size
      index = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
      return step_fn(state, images, labels, index, hyper)

    state, metrics = jax.lax.scan(body, state, None, length=steps_per_call)
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  return jax.jit(multi_step, donate_argnums=(0,))


@jax.jit
def add_metrics(a: Metrics, b: Metrics) -> Metrics:
  """``a + b`` leaf by leaf, as one compiled program (one dispatch, not one per leaf)."""
  return jax.tree.map(jnp.add, a, b)


def run_epoch(multi_steps: dict[int, Callable], calls: list[int], state: TrainState, images, labels, perm,
              hyper: StepHyper, *, progress: Callable[[int], None] | None = None, progress_due: Callable[[], bool] | None = None
              ) -> tuple[TrainState, dict[str, float]]:
  """Runs one epoch as ``multi_steps[k](state, images, labels, perm, hyper)`` for each ``k`` in ``calls`` (see
  :func:`make_multi_step`); returns the new state and the epoch's metric sums as floats (one device→host copy).

  The host keeps at most :data:`arreg_jax.sharding.MAX_IN_FLIGHT` calls in flight: on several XLA:CPU devices a host
  that runs 32 programs ahead deadlocks the next all-reduce (:mod:`arreg_jax.sharding`). When ``progress_due()``
  says so at a dispatch boundary, the host waits for the oldest call in flight (the newer ones stay queued, so the
  devices never idle) and calls ``progress(steps finished)``; no other host sync happens per call.
  """
  total = sum(calls)
  pending = collections.deque()  # (steps done once this call has finished, its outputs), oldest first
  sums, done = None, 0
  for k in calls:
    state, m = multi_steps[k](state, images, labels, perm, hyper)
    sums = m if sums is None else add_metrics(sums, m)
    done += k
    pending.append((done, sums))
    finished = None
    while len(pending) > sharding.MAX_IN_FLIGHT:
      finished, oldest = pending.popleft()
      jax.block_until_ready(oldest)
    if progress is not None and done < total and progress_due():
      if finished is None and len(pending) >= 2:
        finished, oldest = pending.popleft()
        jax.block_until_ready(oldest)
      if finished is not None:
        progress(finished)
  return state, {k: float(v) for k, v in jax.device_get(sums).items()}
