"""Auto-PGD (APGD): step-size-free PGD with momentum, of Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020), Algorithm 1, L∞ and L2, as the authors' code runs it.

One run of N iterations, per example (the batch-summed loss is differentiated, so examples are independent):

* x⁽⁰⁾ = clip_[0,1](x + ε·u/‖u‖), u uniform in [−1, 1]ᵈ (L∞, ‖·‖∞) or standard normal (L2, ‖·‖₂);
  η⁽⁰⁾ = 2ε (both norms);
* z⁽ᵏ⁺¹⁾ = P_S(x⁽ᵏ⁾ + η⁽ᵏ⁾ d(∇f(x⁽ᵏ⁾))), d = sign (L∞) or g/‖g‖₂ (L2);
  x⁽ᵏ⁺¹⁾ = P_S(x⁽ᵏ⁾ + α(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)), α = 0.75, α = 1 on the first step;
  P_S the projection on the ε-ball around x intersected with [0, 1]ᵈ;
* checkpoints w_j = ⌈p_j N⌉ with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (in the
  authors' integer form: windows of ⌊0.22N⌋, then each 3% of N shorter, never under 6% of N). At w_j the step halves,
  η ← η/2, for examples where (1) f rose in at most ρ = 75% of the steps since w_{j−1}, or (2) η was not halved at
  w_{j−1} and the best loss f_max has not grown since; those examples restart from x_max (their best point, with its
  gradient);
* kept per example: x_max (highest loss seen) and the latest misclassified iterate (once misclassified, an example
  stays broken: no silent success).

Restarts and targets (``loss='dlr_targeted'``: one run per target, the 2nd … (n_targets+1)-th largest clean logit)
run one after another in a ``lax.fori_loop``; each run attacks the whole batch (static shapes) but only examples still
robust adopt its result, and a run is skipped (``lax.cond``) when none is left, which is what the authors' "attack only
the still-robust points" costs at most. Per example the result is the first misclassified point found, else the
highest-loss point over all runs, else (misclassified when clean) the clean input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arreg_jax.attacks import input_checks, noise
from arreg_jax.attacks.compiled import compiled_once
from arreg_jax.attacks.losses import LOSSES, per_example_loss
from arreg_jax.attacks.norm_balls import ascent_direction, l2_norms, project
from arreg_jax.attacks.pgd import LogitsFn

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> tuple[int, ...]:
  """The iterations w_j (number of steps done, 1 … N) after which APGD checks its step size.

  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), scaled by N in the authors' integers: the
  first window is max(⌊0.22N⌋, 1) steps and each next one max(previous − max(⌊0.03N⌋, 1), max(⌊0.06N⌋, 1)).
  """
  window = max(int(0.22 * steps), 1)
  shrink, smallest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
  out, w = [], 0
  while w + window <= steps:
    w += window
    out.append(w)
    window = max(window - shrink, smallest)
  return tuple(out)


def _schedule(steps: int):
  """Per iteration i (0-based): whether i + 1 is a checkpoint, and that checkpoint's window length."""
  is_check = np.zeros(steps, bool)
  window = np.ones(steps, np.float32)
  prev = 0
  for w in checkpoints(steps):
    is_check[w - 1], window[w - 1] = True, w - prev
    prev = w
  return jnp.asarray(is_check), jnp.asarray(window)


def _bcast(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _random_start(key, x0, eps, norm):
  """x⁽⁰⁾ = clip_[0,1](x + ε·u/‖u‖): u uniform in [−1, 1]ᵈ (L∞) or standard normal (L2), per example."""
  if norm == 'linf':
    t = noise.uniform(key, x0.shape, -1.0, 1.0)
    t = t / (jnp.max(jnp.abs(t), axis=tuple(range(1, t.ndim)), keepdims=True) + 1e-12)
  else:
    t = noise.normal(key, x0.shape)
    t = t / (l2_norms(t) + 1e-12)
  return jnp.clip(x0 + eps * t, 0.0, 1.0)


def _single_run(value_and_grad, x0, labels, targets, key, eps, norm, steps):
  """One APGD run of ``steps`` iterations on every example: (x_fooled, fooled, x_max, f_max)."""
  is_check, window = _schedule(steps)
  x = _random_start(key, x0, eps, norm)
  (_, (loss, logits)), g = value_and_grad(x, labels, targets)
  fooled = jnp.argmax(logits, -1) != labels
  b = x0.shape[0]
  init = dict(x=x, x_old=x, g=g, step=jnp.full((b,), 2.0, jnp.float32) * eps,
              x_max=x, g_max=g, f_max=loss, x_fooled=x, fooled=fooled, f_prev=loss,
              n_up=jnp.zeros((b,), jnp.float32), f_max_last=loss, reduced_last=jnp.ones((b,), bool))

  def body(i, s):
    alpha = jnp.where(i > 0, MOMENTUM, 1.0)
    z = project(s['x'] + _bcast(s['step'], x0) * ascent_direction(s['g'], norm), x0, eps, norm)
    x_new = project(s['x'] + alpha * (z - s['x']) + (1.0 - alpha) * (s['x'] - s['x_old']), x0, eps, norm)
    (_, (loss, logits)), g = value_and_grad(x_new, labels, targets)
    wrong = jnp.argmax(logits, -1) != labels
    better = loss > s['f_max']
    f_max = jnp.where(better, loss, s['f_max'])
    x_max = jnp.where(_bcast(better, x0), x_new, s['x_max'])
    g_max = jnp.where(_bcast(better, x0), g, s['g_max'])
    n_up = s['n_up'] + (loss > s['f_prev'])
    # Step-size checkpoint (only where is_check[i]; elsewhere every update below is the identity).
    check = is_check[i]
    oscillating = n_up <= window[i] * RHO
    stalled = ~s['reduced_last'] & (s['f_max_last'] >= f_max)
    reduce = check & (oscillating | stalled)
    return dict(
        x=jnp.where(_bcast(reduce, x0), x_max, x_new), x_old=s['x'], g=jnp.where(_bcast(reduce, x0), g_max, g),
        step=jnp.where(reduce, 0.5 * s['step'], s['step']), x_max=x_max, g_max=g_max, f_max=f_max,
        x_fooled=jnp.where(_bcast(wrong, x0), x_new, s['x_fooled']), fooled=s['fooled'] | wrong, f_prev=loss,
        n_up=jnp.where(check, 0.0, n_up), f_max_last=jnp.where(check, f_max, s['f_max_last']),
        reduced_last=jnp.where(check, reduce, s['reduced_last']))

  s = lax.fori_loop(0, steps, body, init)
  return s['x_fooled'], s['fooled'], s['x_max'], s['f_max']


def clean_targets(logits: jax.Array, n_targets: int) -> jax.Array:
  """(n_targets, B): for j = 0 … n_targets−1 the class of the (j+2)-th largest clean logit of each example."""
  order = jnp.argsort(-logits.astype(jnp.float32), axis=-1)
  return order[:, 1:n_targets + 1].T


def runs_of(loss: str, restarts: int = 1, n_targets: int = 9) -> tuple[tuple[str, int], ...]:
  """The (loss, target rank) of each run of :func:`apgd`, in order: rank 0 = untargeted, rank j ≥ 1 = the class of
  the (j+1)-th largest clean logit; ``restarts`` runs per target."""
  ranks = range(1, n_targets + 1) if loss == 'dlr_targeted' else (0,)
  return tuple((loss, j) for j in ranks for _ in range(restarts))


def apgd_runs(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, keys: jax.Array, active: jax.Array, *,
              eps, runs: tuple[tuple[str, int], ...], norm: str = 'linf', steps: int = 100,
              n_ranks: int = 0, rank_shift=0) -> tuple[jax.Array, jax.Array]:
  """APGD runs one after another (one ``lax.fori_loop``; run r uses ``runs[r]`` and ``keys[r]``) on the examples
  where ``active`` (B,); each run is skipped when no active example is left robust.

  A targeted run's rank j is shifted by ``rank_shift`` (may be traced; the ranks up to ``n_ranks`` are available):
  one compiled run then serves every target, as the front end uses it, one target at a time.

  Returns (images in float32: per example the first misclassified point found, else the highest-loss point, else
  the input; done (R, B) bool: active and misclassified — clean or at a point found — after runs 0 … r).
  """
  names = tuple(sorted({name for name, _ in runs}))
  loss_fns = [per_example_loss(name) for name in names]
  loss_id = jnp.asarray([names.index(name) for name, _ in runs], jnp.int32)
  rank = jnp.asarray([j for _, j in runs], jnp.int32)
  rank = jnp.where(rank > 0, rank + rank_shift, rank)
  x0 = images.astype(jnp.float32)

  def f(x, y, t, sel):
    logits = logits_fn(x.astype(images.dtype)).astype(jnp.float32)
    per_ex = jnp.stack([fn(logits, y, t) for fn in loss_fns])[sel]
    return jnp.sum(per_ex), (per_ex, logits)

  value_and_grad = jax.value_and_grad(f, has_aux=True)
  clean_logits = logits_fn(images).astype(jnp.float32)
  max_rank = max(n_ranks, max(j for _, j in runs))
  if max_rank + 1 > clean_logits.shape[-1]:
    raise ValueError(f'{max_rank} targets need at least {max_rank + 1} classes, the model has '
                     f'{clean_logits.shape[-1]}')
  # ranked[j] = class of the (j+1)-th largest clean logit; ranked[0] is replaced by the label (untargeted runs).
  ranked = jnp.concatenate([labels[None], clean_targets(clean_logits, max_rank)], 0) if max_rank else labels[None]
  done0 = ~active | (jnp.argmax(clean_logits, -1) != labels)

  def run(r, carry):
    out, done, best, hist = carry

    def attack(carry):
      out, done, best = carry
      x_f, fooled, x_max, f_max = _single_run(
          lambda x, y, t: value_and_grad(x, y, t, loss_id[r]), x0, labels, ranked[rank[r]], keys[r], eps, norm,
          steps)
      new = ~done & fooled
      better = ~done & ~fooled & (f_max > best)
      out = jnp.where(_bcast(new, x0), x_f, jnp.where(_bcast(better, x0), x_max, out))
      return out, done | new, jnp.where(better, f_max, best)

    out, done, best = lax.cond(jnp.any(~done), attack, lambda c: c, (out, done, best))
    return out, done, best, hist.at[r].set(done & active)

  init = (x0, done0, jnp.full(labels.shape, -jnp.inf, jnp.float32), jnp.zeros((len(runs),) + labels.shape, bool))
  out, _, _, hist = lax.fori_loop(0, len(runs), run, init)
  return lax.stop_gradient(out), hist


def _apgd(apply_fn, params, images, labels, key, eps, *, runs, norm, steps):
  logits_fn = lambda x: apply_fn(params, x)
  out, _ = apgd_runs(logits_fn, images, labels, noise.example_keys(key, len(runs)), jnp.ones(labels.shape, bool),
                     eps=eps, runs=runs, norm=norm, steps=steps)
  return out.astype(images.dtype)


_apgd_once = compiled_once(_apgd, ('apply_fn', 'runs', 'norm', 'steps'))

# The fewest classes each loss needs: DLR reads the 3 largest logits, targeted DLR the 4 largest.
MIN_CLASSES = {'ce': 2, 'dlr': 3, 'dlr_targeted': 4}


def check_loss(loss: str, num_classes: int, n_targets: int) -> None:
  """A ValueError naming ``loss`` or ``n_targets`` when the model's ``num_classes`` cannot support them."""
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
  if num_classes < MIN_CLASSES[loss]:
    raise ValueError(f"loss={loss!r} needs a model with at least {MIN_CLASSES[loss]} classes, this one has "
                     f"{num_classes}; use loss='ce'")
  if loss == 'dlr_targeted' and n_targets > num_classes - 1:
    raise ValueError(f'n_targets must be at most {num_classes - 1} (the classes other than the label) for a model '
                     f'with {num_classes} classes, got {n_targets}')


def apgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps, norm: str = 'linf',
         steps: int = 100, loss: str = 'ce', restarts: int = 1, n_targets: int = 9) -> jax.Array:
  """APGD (Croce & Hein, ICML 2020, Algorithm 1) on ``loss`` in the ``norm`` ε-ball, as the authors' code runs it.

  For ``loss='dlr_targeted'`` (APGD-T) the attack runs ``restarts`` times per target t ∈ {2nd, …,
  (n_targets+1)-th largest clean logit}, one target after another.

  Args:
    logits_fn: ``images -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params`` (the
      parameters then are a traced argument: new weights reuse the compiled program).
    images: float (N, ...) in [0, 1].
    labels: int (N,) true classes in [0, K).
    key: a ``jax.random.key``; run r draws its random start from ``fold_in(key, r)``, example i from
      ``fold_in(·, i)``.
    eps: radius, a scalar in (0, 1] (L∞) or > 0 (L2); may be traced (one compilation serves every ε).
    norm: 'linf' or 'l2' (also 'Linf', 'L2').
    steps: iterations N per run (static), 100 in AutoAttack.
    loss: 'ce' (K ≥ 2), 'dlr' (eq. 6, K ≥ 3) or 'dlr_targeted' (eq. 7, K ≥ 4) (static).
    restarts: runs per target (static).
    n_targets: target classes of 'dlr_targeted', at most K − 1 (static).

  Returns:
    Images with the input's shape and dtype: per example the first misclassified point found (over restarts and
    targets, in order), else the highest-loss point, else the clean input if it is misclassified.
  """
  norm, k = input_checks.check_attack_inputs(logits_fn, images, labels, eps, norm)
  if jnp.ndim(eps) != 0:
    raise ValueError(f'eps must be a scalar for apgd, got shape {jnp.shape(eps)}')
  steps = input_checks.static_int(steps, 'steps')
  restarts = input_checks.static_int(restarts, 'restarts')
  n_targets = input_checks.static_int(n_targets, 'n_targets')
  check_loss(loss, k, n_targets)
  apply_fn, params = input_checks.split_model(logits_fn)
  return _apgd_once(apply_fn, params, images, labels, key, eps, runs=runs_of(loss, restarts, n_targets), norm=norm,
                    steps=steps)
