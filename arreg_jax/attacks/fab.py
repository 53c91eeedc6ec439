"""FAB, the fast adaptive boundary attack (Croce & Hein, "Minimally distorted adversarial examples with a fast
adaptive boundary attack", ICML 2020), L∞ and L2, as AutoAttack runs it (the authors' ``fab_base.py``,
``fab_pt.py``): a minimum-norm attack, whose point counts against the ε-ball only at the end.

One run of N iterations on a batch, per example (x₀ the clean image, y its label):

* start x⁽⁰⁾ = x₀ (the first run of each target), or a random point at distance ε/2 (later restarts);
* linearize at x⁽ᵏ⁾: for FAB-T the difference f = z_t − z_y with t the target class; for untargeted FAB every
  f_j = z_j − z_y, j ≠ y, keeping the class j whose hyperplane is closest, |f_j| / ‖∇f_j‖_q (q the dual norm);
* project both x⁽ᵏ⁾ and x₀ onto the hyperplane ⟨∇f, z⟩ = ⟨∇f, x⁽ᵏ⁾⟩ − f within [0, 1]ᵈ
  (:mod:`.hyperplane_projection`): steps δ₁ and δ₂;
* x⁽ᵏ⁺¹⁾ = clip_[0,1]((x⁽ᵏ⁾ + η δ₁)(1 − α) + (x₀ + η δ₂) α), α = min(max(‖δ₁‖/(‖δ₁‖ + ‖δ₂‖), 0), α_max), with the
  overshoot η = 1.05 and α_max = 0.1;
* if x⁽ᵏ⁺¹⁾ is misclassified, keep it when it is the closest to x₀ so far and step back toward x₀:
  x⁽ᵏ⁺¹⁾ ← x₀ + β (x⁽ᵏ⁺¹⁾ − x₀), β = 0.9.

FAB-T (AutoAttack's standard version): one run per target t ∈ {2nd, …, (n_targets+1)-th largest clean logit},
100 iterations, 1 restart, no random start; a point is broken by the first run whose closest adversarial point has
‖x − x₀‖ ≤ ε, and only the points still robust are attacked by the next run (the authors' ``perturb``).
Untargeted FAB (AutoAttack's 'plus' version): ``restarts`` runs, random starts from the second on.

Static shapes: every run attacks the whole batch (a ``lax.fori_loop`` over runs, one over iterations), the points
no longer active keep their result, and a run is skipped (``lax.cond``) when no active point is left robust. A
targeted iteration costs one forward and backward pass plus one forward pass (the authors' too); an untargeted one
differentiates all K logits (K backward passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from arreg_jax.attacks import input_checks, noise
from arreg_jax.attacks.apgd import clean_targets
from arreg_jax.attacks.compiled import compiled_once
from arreg_jax.attacks.hyperplane_projection import project_l2, project_linf
from arreg_jax.attacks.norm_balls import l2_norms, norms
from arreg_jax.attacks.pgd import LogitsFn

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9
_FAR = 1e10  # the authors' "no adversarial point yet" norm


def _bcast(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _linearization(logits_fn, x, labels, target, targeted: bool, norm: str):
  """(f (B,), ∇f (B, d)) of the closest linearized boundary at x: z_t − z_y (targeted), else the z_j − z_y, j ≠ y,
  with the least |f_j| / ‖∇f_j‖_q (the authors' ``get_diff_logits_grads_batch[_targeted]``)."""
  b = x.shape[0]
  if targeted:
    def diff(z):
      logits = logits_fn(z).astype(jnp.float32)
      d = jnp.take_along_axis(logits, target[:, None], 1)[:, 0] - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
      return jnp.sum(d), d
    (_, f), g = jax.value_and_grad(diff, has_aux=True)(x)
    return f, g.reshape(b, -1).astype(jnp.float32)
  logits, vjp = jax.vjp(lambda z: logits_fn(z).astype(jnp.float32), x)
  k = logits.shape[-1]
  jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(jnp.eye(k, dtype=jnp.float32))  # (K, B, ...)
  jac = jnp.swapaxes(jac.reshape(k, b, -1), 0, 1).astype(jnp.float32)  # (B, K, d)
  onehot = jax.nn.one_hot(labels, k, dtype=bool)
  f = logits - jnp.take_along_axis(logits, labels[:, None], 1)
  f = jnp.where(onehot, 1e10, f)
  g = jac - jnp.take_along_axis(jac, labels[:, None, None], 1)
  dual = jnp.sum(jnp.abs(g), -1) if norm == 'linf' else jnp.sqrt(jnp.sum(g * g, -1))
  j = jnp.argmin(jnp.abs(f) / (1e-12 + dual), axis=1)
  return jnp.take_along_axis(f, j[:, None], 1)[:, 0], jnp.take_along_axis(g, j[:, None, None], 1)[:, 0]


def _random_start(key, x0, eps, norm):
  """The authors' restart point: x₀ + (ε/2)·u/‖u‖, u uniform in [−1, 1]ᵈ (L∞) or normal (L2), clipped to [0, 1]."""
  if norm == 'linf':
    u = noise.uniform(key, x0.shape, -1.0, 1.0)
    u = u / _bcast(norms(u, 'linf'), u)
  else:
    u = noise.normal(key, x0.shape)
    u = u / l2_norms(u)
  return jnp.clip(x0 + 0.5 * eps * u, 0.0, 1.0)


def _single_run(logits_fn, x0, labels, target, key, eps, *, targeted, random_start, norm, steps, alpha_max, eta,
                beta):
  """One FAB run on every example: (closest misclassified point found, its ‖x − x₀‖ or 1e10 if none)."""
  b = x0.shape[0]
  project = project_linf if norm == 'linf' else project_l2
  flat0 = x0.reshape(b, -1)
  x1 = lax.cond(random_start, lambda: _random_start(key, x0, eps, norm), lambda: x0)

  def body(_, carry):
    x1, best, best_norm = carry
    f, w = _linearization(logits_fn, x1, labels, target, targeted, norm)
    flat1 = x1.reshape(b, -1)
    offset = -f + jnp.sum(w * flat1, axis=1)
    d = project(jnp.concatenate([flat1, flat0]), jnp.concatenate([w, w]), jnp.concatenate([offset, offset]))
    size = jnp.maximum(norms(d, norm), 1e-8)
    a1, a2 = size[:b], size[b:]
    alpha = jnp.minimum(jnp.maximum(a1 / (a1 + a2), 0.0), alpha_max)[:, None]
    flat = jnp.clip((flat1 + eta * d[:b]) * (1 - alpha) + (flat0 + eta * d[b:]) * alpha, 0.0, 1.0)
    x1 = flat.reshape(x0.shape)
    adv = jnp.argmax(logits_fn(x1), -1) != labels
    dist = norms(x1 - x0, norm)
    closer = adv & (dist < best_norm)
    best = jnp.where(_bcast(closer, x0), x1, best)
    best_norm = jnp.where(closer, dist, best_norm)
    x1 = jnp.where(_bcast(adv, x0), x0 + (x1 - x0) * beta, x1)
    return x1, best, best_norm

  _, best, best_norm = lax.fori_loop(0, steps, body, (x1, x0, jnp.full((b,), _FAR, jnp.float32)))
  return best, best_norm


def runs_of(targeted: bool, n_targets: int = 9, restarts: int = 1) -> tuple[tuple[int, bool], ...]:
  """(target rank, random start) of each run: rank j ≥ 1 targets the (j+1)-th largest clean logit, rank 0 is
  untargeted; ``restarts`` runs per target, the first without a random start (the authors' ``counter > 0``)."""
  ranks = range(1, n_targets + 1) if targeted else (0,)
  return tuple((j, r > 0) for j in ranks for r in range(restarts))


def fab_runs(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, keys: jax.Array, active: jax.Array, *, eps,
             runs: tuple[tuple[int, bool], ...], norm: str = 'linf', steps: int = 100, alpha_max: float = ALPHA_MAX,
             eta: float = ETA, beta: float = BETA, n_ranks: int = 0,
             rank_shift=0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FAB runs one after another on the points where ``active`` (B,); run r uses ``runs[r]`` and ``keys[r]``; a
  targeted run's rank is shifted by ``rank_shift`` (may be traced; ranks up to ``n_ranks`` available).

  Returns (images in float32: per example the point of the first run that broke it, else the input; broken (B,):
  active, correctly classified when clean, and a misclassified point within ε found; its norm ‖x − x₀‖ (B,), 1e10
  where none was found within ε).
  """
  x0 = images.astype(jnp.float32)
  f32_logits = lambda x: logits_fn(x.astype(images.dtype))
  clean_logits = f32_logits(x0).astype(jnp.float32)
  max_rank = max(n_ranks, max(j for j, _ in runs))
  ranked = (jnp.concatenate([labels[None], clean_targets(clean_logits, max_rank)], 0) if max_rank
            else labels[None])
  rank = jnp.asarray([j for j, _ in runs], jnp.int32)
  rank = jnp.where(rank > 0, rank + rank_shift, rank)
  rand = jnp.asarray([s for _, s in runs], bool)
  targeted = max_rank > 0
  correct = jnp.argmax(clean_logits, -1) == labels
  robust0 = active & correct

  def run(r, carry):
    out, robust, dist = carry

    def attack(carry):
      out, robust, dist = carry
      best, best_norm = _single_run(f32_logits, x0, labels, ranked[rank[r]], keys[r], eps, targeted=targeted,
                                    random_start=rand[r], norm=norm, steps=steps, alpha_max=alpha_max, eta=eta,
                                    beta=beta)
      broken = robust & (best_norm <= eps) & (jnp.argmax(f32_logits(best), -1) != labels)
      return (jnp.where(_bcast(broken, x0), best, out), robust & ~broken, jnp.where(broken, best_norm, dist))

    return lax.cond(jnp.any(robust), attack, lambda c: c, (out, robust, dist))

  init = (x0, robust0, jnp.full(labels.shape, _FAR, jnp.float32))
  out, robust, dist = lax.fori_loop(0, len(runs), run, init)
  return lax.stop_gradient(out), robust0 & ~robust, dist


def _fab(apply_fn, params, images, labels, key, eps, *, runs, norm, steps, alpha_max, eta, beta):
  logits_fn = lambda x: apply_fn(params, x)
  out, _, _ = fab_runs(logits_fn, images, labels, noise.example_keys(key, len(runs)), jnp.ones(labels.shape, bool),
                       eps=eps, runs=runs, norm=norm, steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
  return out.astype(images.dtype)


_fab_once = compiled_once(_fab, ('apply_fn', 'runs', 'norm', 'steps', 'alpha_max', 'eta', 'beta'))


def fab(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps, norm: str = 'linf',
        targeted: bool = True, n_targets: int = 9, steps: int = 100, restarts: int = 1,
        alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA) -> jax.Array:
  """FAB (Croce & Hein, ICML 2020): the closest misclassified point it finds, kept when within the ε-ball.

  Defaults are AutoAttack's FAB-T: targeted at the 2nd … 10th largest clean logits, 100 iterations, 1 restart (no
  random start), α_max 0.1, η 1.05, β 0.9. With ``targeted=False`` it is the untargeted FAB of AutoAttack's 'plus'
  version (``restarts=5`` there). FAB minimizes the norm; ε only decides at the end which points count as broken,
  so ``eps=1`` (L∞) returns every adversarial point found.

  Args:
    logits_fn: ``images -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params``.
    images: float (N, ...) in [0, 1].
    labels: int (N,) true classes in [0, K).
    key: a ``jax.random.key`` (used by the random starts of restarts after the first).
    eps: radius, in (0, 1] (L∞) or > 0 (L2); a scalar, may be traced.
    norm: 'linf' or 'l2' (also 'Linf', 'L2').
    targeted: FAB-T (True) or untargeted FAB (static).
    n_targets: targets of FAB-T, at most K − 1 (static).
    steps: iterations per run (static).
    restarts: runs per target (static).
    alpha_max, eta, beta: FAB's α_max, overshoot η and backward step β (static).

  Returns:
    Images with the input's shape and dtype: per example the first adversarial point found within the ε-ball
    (over targets and restarts, in order), else the clean input.
  """
  norm, k = input_checks.check_attack_inputs(logits_fn, images, labels, eps, norm)
  if jnp.ndim(eps) != 0:
    raise ValueError(f'eps must be a scalar for fab, got shape {jnp.shape(eps)}')
  steps = input_checks.static_int(steps, 'steps')
  restarts = input_checks.static_int(restarts, 'restarts')
  n_targets = input_checks.static_int(n_targets, 'n_targets')
  if targeted and n_targets > k - 1:
    raise ValueError(f'n_targets must be at most {k - 1} (the classes other than the label) for a model with {k} '
                     f'classes, got {n_targets}')
  apply_fn, params = input_checks.split_model(logits_fn)
  return _fab_once(apply_fn, params, images, labels, key, eps, runs=runs_of(bool(targeted), n_targets, restarts),
                   norm=norm, steps=steps, alpha_max=float(alpha_max), eta=float(eta), beta=float(beta))
