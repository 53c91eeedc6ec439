"""Analysis kernels: margins, distribution summaries, loss variation, boundary distance, bound terms, batching."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from arreg_jax import attacks, sharding
from arreg_jax import sharding
from arreg_jax.analysis import boundary, bounds, distributions, margins, singular_values, smoothness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  """A small fixed MLP (784 → 32 → 10, ReLU): cheap to compile, enough to exercise every kernel."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


@pytest.fixture(scope='module')
def tiny():
  module = TinyNet()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, size=(37, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=37)
  return module, variables, images, labels


# --- margins


def test_margins_hand_computed():
  logits = jnp.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [2.0, 2.0, 0.0], [2.0, 2.0, 0.0], [5.0, 5.0, 5.0]])
  labels = jnp.array([1, 0, 0, 2, 1])
  np.testing.assert_allclose(margins.margins(logits, labels), [1.0, -2.0, 0.0, -2.0, 0.0])


def test_margins_two_classes():
  logits = jnp.array([[0.5, -1.0], [0.5, -1.0], [-3.0, 4.0]])
  np.testing.assert_allclose(margins.margins(logits, jnp.array([0, 1, 1])), [1.5, -1.5, 7.0])


def test_margins_hundred_classes_against_a_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 100)).astype(np.float32)
  logits[3, 17] = logits[3, 42] = logits[3].max() + 1  # a tie at the top
  labels = rng.integers(0, 100, 64)
  labels[3] = 17
  expected = [logits[i, y] - np.max(np.delete(logits[i], y)) for i, y in enumerate(labels)]
  got = jax.jit(margins.margins)(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[3] == 0.0


def test_probability_and_loss_agree_with_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(32, 10)).astype(np.float32) * 5
  labels = rng.integers(0, 10, 32)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  out = margins.per_example(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
  np.testing.assert_allclose(out['prob'], p[np.arange(32), labels], rtol=1e-5)
  np.testing.assert_allclose(out['loss'], -np.log(p[np.arange(32), labels]), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(out['correct'], logits.argmax(1) == labels)
  np.testing.assert_array_equal(out['correct'], np.asarray(out['margin']) > 0)


# --- distributions


def test_histogram_counts_sum_to_n_and_clip_out_of_range_into_end_bins():
  edges = distributions.uniform_edges(-1.0, 1.0, 4)  # [-1, -.5, 0, .5, 1]
  v = jnp.array([-5.0, -1.0, -0.5, 0.0, 0.49, 0.5, 1.0, 7.0, jnp.nan, 0.2])
  counts = distributions.histogram(v, edges)
  # Bins [-1, -.5) [-.5, 0) [0, .5) [.5, 1] (the last closed); -5 is clipped into the first bin, 7 into the last;
  # NaN is not counted.
  np.testing.assert_array_equal(counts, [2, 1, 3, 3])
  s = distributions.summary_to_json(np.asarray(v), edges)
  assert sum(s['counts']) == s['n'] == 9 and s['nan'] == 1
  assert s['below'] == 1 and s['above'] == 1
  assert s['edges'] == [float(e) for e in edges]  # the edges are the given ones, never data-derived


def test_histogram_mask_and_fixed_edges_across_samples():
  edges = distributions.uniform_edges(0.0, 1.0, 10)
  a = jnp.linspace(0, 1, 101)
  mask = jnp.arange(101) < 50
  assert float(distributions.histogram(a, edges, mask).sum()) == 50
  h1 = distributions.summarize(a, edges)
  h2 = distributions.summarize(a * 0.5, edges)
  np.testing.assert_array_equal(h1['edges'], h2['edges'])
  assert float(h1['counts'].sum()) == float(h2['counts'].sum()) == 101


def test_summary_statistics_match_numpy_and_scipy():
  rng = np.random.default_rng(2)
  v = rng.gamma(2.0, 1.5, size=997).astype(np.float32)
  s = distributions.summary_to_json(v, distributions.uniform_edges(0, 30, 60), tau=1.0)
  np.testing.assert_allclose(s['mean'], v.mean(), rtol=1e-5)
  np.testing.assert_allclose(s['std'], v.std(), rtol=1e-4)
  np.testing.assert_allclose(s['skewness'], stats.skew(v), rtol=1e-3)
  for q, key in ((0.01, 'q01'), (0.5, 'q50'), (0.99, 'q99')):
    np.testing.assert_allclose(s['quantiles'][key], np.quantile(v, q), rtol=1e-5)
  np.testing.assert_allclose(s['frac_abs_below_tau'], np.mean(np.abs(v) < 1.0))
  assert s['min'] == pytest.approx(v.min()) and s['max'] == pytest.approx(v.max())


def test_masked_summary_equals_summary_of_the_kept_values():
  rng = np.random.default_rng(3)
  v = rng.normal(size=200).astype(np.float32)
  mask = rng.random(200) < 0.6
  edges = distributions.uniform_edges(-4, 4, 16)
  a = jax.device_get(jax.jit(distributions.summarize)(jnp.asarray(v), edges, mask=jnp.asarray(mask)))
  b = jax.device_get(distributions.summarize(jnp.asarray(v[mask]), edges))
  for k in ('counts', 'mean', 'std', 'skewness', 'quantiles', 'n', 'min', 'max'):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


# --- loss variation


def test_loss_variation_is_nonnegative_and_grows_with_eps(tiny, mnist_small):
  module, variables, _, _ = tiny
  x = jnp.asarray(mnist_small.test_images[:128], jnp.float32) / 255
  y = jnp.asarray(mnist_small.test_labels[:128], jnp.int32)
  logits_fn = lambda z: module.apply(variables, z)
  step = jax.jit(lambda xx, yy, eps: smoothness.max_loss_increase(logits_fn, xx, yy, eps=eps, step_size=0.4 * eps,
                                                                   steps=5))
  means = []
  for eps in (0.0, 0.02, 0.05, 0.1):
    inc = np.asarray(step(x, y, jnp.float32(eps)))
    assert inc.shape == (128,) and np.all(inc >= 0)
    means.append(inc.mean())
  assert means[0] == 0.0
  assert means[1] < means[2] < means[3], means
  # The estimate is at least the increase at PGD's last iterate.
  x_adv = attacks.pgd(logits_fn, x, y, None, eps=0.05, step_size=0.02, steps=5, random_start=False)
  ce = lambda z: np.asarray(margins.cross_entropy(logits_fn(z), y))
  best = np.asarray(step(x, y, jnp.float32(0.05)))
  assert np.all(best >= ce(x_adv) - ce(x) - 1e-5)


# --- boundary distance


def _linear_two_class(w, b):
  def logits_fn(x):
    z = jnp.sum(x.reshape(x.shape[0], -1) * w.reshape(1, -1), axis=1) + b
    return jnp.stack([z, jnp.zeros_like(z)], axis=1)
  return logits_fn


def test_boundary_distance_of_a_linear_classifier():
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.3, 0.7, size=(8, 4, 4, 1)), jnp.float32)
  b = -float(jnp.mean(jnp.sum(x * w, axis=(1, 2, 3))))
  fn = _linear_two_class(w, b)
  exact = np.abs(np.asarray(jnp.sum(x * w, axis=(1, 2, 3))) + b) / float(jnp.linalg.norm(w))
  d1, pred = boundary.first_order_distance(fn, x)
  np.testing.assert_allclose(d1, exact, rtol=1e-4)  # exact for a linear model
  out = jax.jit(lambda xx, yy: boundary.bisect_boundary_distance(fn, xx, yy, r_max=4.0, rounds=12, steps=10))(
      x, pred)
  d = np.asarray(out['distance'])
  assert np.all(np.asarray(out['found']))
  assert np.all(d >= exact * (1 - 1e-3))  # a certified upper bound
  np.testing.assert_allclose(d, exact, rtol=0.03, atol=2e-3)


# --- bound terms, SV comparison


def test_min_class_weight_distance_and_bound():
  rng = np.random.default_rng(5)
  w = rng.normal(size=(16, 7)).astype(np.float32)  # Flax (in, out): w_y are columns
  expected = min(np.linalg.norm(w[:, i] - w[:, j]) for i in range(7) for j in range(7) if i != j)
  np.testing.assert_allclose(bounds.min_class_weight_distance(jnp.asarray(w)), expected, rtol=1e-5)
  log_u = bounds.log_u_min(2.0, [0.5, 4.0], 0.25)
  assert log_u == pytest.approx(np.log(2.0 * 0.5 * 4.0 * 0.25))
  g = bounds.generalization_bound(log_u, gamma=0.5, c_x=1.0, k=2, eps=0.5, eta=0.05, m=100)
  assert g['margin_term'] == pytest.approx(0.0)  # u_min = 1 ≥ γ
  cov = np.sqrt(2 * np.log(2) * 1.0 ** 2 / (0.5 ** 2 * 100) + 2 * np.log(1 / 0.05) / 100)
  assert g['covering_term'] == pytest.approx(cov) and g['bound'] == pytest.approx(cov)
  assert bounds.log_u_min(1.0, [0.0, 1.0], 1.0) == -np.inf
  g = bounds.generalization_bound(-np.inf, gamma=1.0, c_x=10.0, k=5000, eps=0.01, eta=0.05, m=10)
  assert g['margin_term'] == 1.0 and g['covering_term'] == np.inf and np.isfinite(g['log10_covering_term'])


def test_sv_std_comparison_b2():
  a = [1.0, 2.0, 3.0, 0.5]
  b = [0.5, 1.0, 3.5, 0.5]
  c = singular_values.compare_std_json(a, b)
  assert c['decrease_count'] == 2 and c['decrease_sum'] == pytest.approx(1.5) and c['decrease_mean'] == 0.75
  assert c['increase_count'] == 1 and c['increase_sum'] == pytest.approx(0.5) and c['increase_mean'] == 0.5
  assert c['frac_decreased'] == 0.5


# --- batching / sharding


def test_map_batches_pads_and_trims(tiny):
  module, variables, images, labels = tiny
  out = sharding.map_batches(margins.make_kernel(module, 'none'), variables, images, labels, batch_size=16,
                             mesh=sharding.make_mesh())
  direct = margins.margins(module.apply(variables, jnp.asarray(images, jnp.float32) / 255),
                           jnp.asarray(labels, jnp.int32))
  assert out['margin'].shape == (37,)
  np.testing.assert_allclose(out['margin'], direct, rtol=1e-4, atol=1e-5)


_SHARDED = r'''
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from arreg_jax import sharding
from arreg_jax.analysis import margins, smoothness
assert jax.device_count() == 4
class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))
module = Net()
variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(30, 28, 28, 1), dtype=np.uint8)
labels = rng.integers(0, 10, size=30)
mesh = sharding.make_mesh()
out = sharding.map_batches(margins.make_kernel(module, 'none'), variables, images, labels, batch_size=8, mesh=mesh)
x = jnp.asarray(images, jnp.float32) / 255
y = jnp.asarray(labels, jnp.int32)
np.testing.assert_allclose(out['margin'], margins.margins(module.apply(variables, x), y), rtol=1e-4, atol=1e-5)
lv = sharding.map_batches(smoothness.make_kernel(module, 'none', 3, 0.4), variables, images, labels, batch_size=8,
                          mesh=mesh, extra=(np.float32(0.05),))
ref = smoothness.max_loss_increase(lambda z: module.apply(variables, z), x, y, eps=0.05, step_size=0.02, steps=3)
np.testing.assert_allclose(lv['loss_increase'], ref, rtol=1e-3, atol=1e-5)
print('OK')
'''


def test_kernels_on_a_four_device_mesh():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-c', _SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=180)
  assert r.returncode == 0 and 'OK' in r.stdout, r.stderr[-3000:]
