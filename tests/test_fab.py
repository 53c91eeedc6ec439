"""FAB and its projection: the projection against brute-force solvers, FAB-T's known answer on linear models, the
box, the ε rule (a point counts only if its adversarial lies within ε), and the clean point where FAB fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from arreg_jax import attacks
from arreg_jax.attacks import hyperplane_projection, norm_balls

KEY = jax.random.key(0)


def _brute_force(t, w, b, norm):
  """In float64, by brute force: h(λ) (the decrease of ⟨w, ·⟩ when every coordinate moves by λ against w, up to the
  box) evaluated at every breakpoint, then λ* on its segment; the box corner when the hyperplane is out of reach."""
  out = np.zeros_like(t, dtype=np.float64)
  for i in range(len(t)):
    ti, wi = t[i].astype(np.float64), w[i].astype(np.float64)
    excess = wi @ ti - float(b[i])
    if excess < 0:
      wi, excess = -wi, -excess
    moves = np.abs(wi) > (0.0 if norm == 'linf' else 1e-8)
    if norm == 'linf':
      limit, weight, step = np.where(wi < 0, 1 - ti, ti), np.abs(wi), lambda lam: -np.sign(wi) * np.minimum(lam, limit)
    else:
      safe = np.where(moves, wi, 1.0)
      limit, weight = np.maximum(ti / safe, (ti - 1) / safe), wi * wi
      step = lambda lam: -wi * np.minimum(lam, limit)
    limit, weight = np.where(moves, limit, 0.0), np.where(moves, weight, 0.0)
    h = lambda lam: float(np.sum(weight * np.minimum(lam, limit)))
    if h(limit.max()) <= excess:
      delta = step(limit.max())
    else:
      points = np.sort(np.concatenate([[0.0], limit[moves]]))
      values = np.array([h(p) for p in points])
      lo = points[np.searchsorted(values, excess, side='right') - 1]
      at_box = limit <= lo
      lam = (excess - np.sum(weight * limit * at_box)) / np.sum(weight * ~at_box)
      delta = step(lam)
    out[i] = delta * moves
  return out


def _problems(seed, n=24, d=40):
  """Rows of every kind: first segment, later segments, out of reach, zero weights, wide-ranging |w|."""
  rng = np.random.default_rng(seed)
  t = rng.random((n, d)).astype(np.float32)
  w = (rng.normal(size=(n, d)) * np.exp(rng.normal(size=(n, d)) * 1.5)).astype(np.float32)
  w[:, :3] = 0.0
  scale = np.array([0.02, 0.3, 1.0, 3.0, 30.0, -1.0])[np.arange(n) % 6]
  b = np.sum(w * t, 1) + scale * np.abs(w).sum(1) / np.sqrt(d)
  return t, w, b.astype(np.float32)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_projection_matches_brute_force(norm, seed):
  t, w, b = _problems(seed)
  fn = hyperplane_projection.project_linf if norm == 'linf' else hyperplane_projection.project_l2
  got = np.asarray(jax.jit(fn)(t, w, b))
  want = _brute_force(t, w, b, norm)
  np.testing.assert_allclose(got, want, atol=2e-6 * max(1.0, np.abs(want).max()))
  assert (t + got).min() >= -1e-6 and (t + got).max() <= 1 + 1e-6  # inside the box
  reach = np.abs(np.sum(w * (t + want), 1) - b) < 1e-6 * np.abs(w).sum(1)
  assert 0 < reach.sum() < len(b)  # both kinds of rows were drawn
  np.testing.assert_allclose(np.sum(w * (t + got), 1)[reach], b[reach], atol=1e-4 * np.abs(b).max())


def test_linf_projection_is_the_linear_program_optimum():
  """min s s.t. ⟨w, δ⟩ = b − ⟨w, t⟩, −s ≤ δ ≤ s, −t ≤ δ ≤ 1 − t: scipy's LP solver gives the same ‖δ‖∞."""
  t, w, b = _problems(3, n=12, d=12)
  got = np.asarray(hyperplane_projection.project_linf(t, w, b))
  for i in range(len(b)):
    d = t.shape[1]
    c = np.r_[np.zeros(d), 1.0]
    a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
    bounds = [(-float(ti), 1.0 - float(ti)) for ti in t[i]] + [(0, None)]
    res = optimize.linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[w[i], 0.0][None],
                           b_eq=[float(b[i]) - float(w[i] @ t[i])], bounds=bounds)
    if res.status == 0:  # reachable: the same optimal norm
      assert np.abs(got[i]).max() == pytest.approx(res.fun, rel=1e-4, abs=1e-6)
    else:  # out of reach: the box corner toward b
      assert res.status == 2


def _linear(classes=10, d=64, seed=0):
  w = jax.random.normal(jax.random.key(seed), (d, classes)) / 8
  logits_fn = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ w
  x = 0.4 + 0.2 * jax.random.uniform(jax.random.key(seed + 1), (16, 8, 8, 1))  # away from the box
  return logits_fn, w, x, jnp.argmax(logits_fn(x), -1).astype(jnp.int32)


def _exact_distance(logits_fn, w, x, y, targets, norm):
  """|f| / ‖∇f‖_dual for f = z_t − z_y, the distance to a linear model's boundary between y and t (box inactive)."""
  z = logits_fn(x)
  f = jnp.take_along_axis(z, targets[:, None], 1)[:, 0] - jnp.take_along_axis(z, y[:, None], 1)[:, 0]
  g = (w[:, targets] - w[:, y]).T
  dual = jnp.sum(jnp.abs(g), 1) if norm == 'linf' else jnp.linalg.norm(g, axis=1)
  return np.asarray(jnp.abs(f) / dual)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_fab_t_finds_the_boundary_of_a_linear_model(norm):
  """The first step lands at exactly η = 1.05 times the distance to the target's hyperplane; after 100 iterations
  FAB-T's point is at the distance up to its overshoot (1.0052×), never closer."""
  logits_fn, w, x, y = _linear()
  second = jnp.argsort(-logits_fn(x), -1)[:, 1]
  exact = _exact_distance(logits_fn, w, x, y, second, norm)
  big = 1.0 if norm == 'linf' else 20.0
  one = attacks.fab(logits_fn, x, y, KEY, eps=big, norm=norm, n_targets=1, steps=1)
  np.testing.assert_allclose(np.asarray(norm_balls.norms(one - x, norm)), 1.05 * exact, rtol=2e-4)
  adv = attacks.fab(logits_fn, x, y, KEY, eps=big, norm=norm, n_targets=1)
  ratio = np.asarray(norm_balls.norms(adv - x, norm)) / exact
  assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.0055, ratio
  assert np.all(np.asarray(jnp.argmax(logits_fn(adv), -1)) == np.asarray(second))  # it crossed into the target


def test_untargeted_fab_finds_the_closest_boundary():
  logits_fn, w, x, y = _linear(classes=5)
  dist = np.stack([_exact_distance(logits_fn, w, x, y, jnp.full_like(y, c), 'linf') for c in range(5)], 1)
  dist[np.arange(len(y)), np.asarray(y)] = np.inf
  adv = attacks.fab(logits_fn, x, y, KEY, eps=1.0, targeted=False)
  ratio = np.asarray(norm_balls.norms(adv - x, 'linf')) / dist.min(1)
  assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.0055, ratio


def test_fab_stays_in_the_box_and_keeps_only_points_within_eps(trained_cnn):
  logits_fn, x, y = trained_cnn
  x, y = x[:32], y[:32]
  run = jax.jit(lambda e: attacks.fab(logits_fn, x, y, KEY, eps=e, n_targets=2, steps=30))
  free = run(1.0)  # every adversarial point FAB finds
  assert float(free.min()) >= 0.0 and float(free.max()) <= 1.0
  dist = np.asarray(norm_balls.norms(free - x, 'linf'))
  fooled = np.asarray(jnp.argmax(logits_fn(free), -1) != y)
  assert fooled.mean() > 0.5
  eps = float(np.median(dist[fooled & (dist > 0)]))
  capped = run(eps)
  d2 = np.asarray(norm_balls.norms(capped - x, 'linf'))
  changed = d2 > 0
  assert d2.max() <= eps + 1e-6 and changed.any()
  np.testing.assert_array_equal(np.asarray(capped)[~changed], np.asarray(x)[~changed])  # failures: the clean point
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(capped), -1) != y), changed | ~np.asarray(
      jnp.argmax(logits_fn(x), -1) == y))


def test_fab_returns_clean_points_when_it_fails_and_for_misclassified_points():
  logits_fn, _, x, y = _linear()
  y = y.at[:4].set((y[:4] + 1) % 10)  # misclassified when clean: not attacked
  adv = attacks.fab(logits_fn, x, y, KEY, eps=1e-4)  # far too small for any point of this model
  np.testing.assert_array_equal(np.asarray(adv), np.asarray(x))
  assert adv.dtype == x.dtype and adv.shape == x.shape
