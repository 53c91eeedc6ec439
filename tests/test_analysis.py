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

from arreg_jax import attacks
from arreg_jax.analysis import decision_boundary, distributions, generalization_bound, margins, singular_values
from arreg_jax.analysis import smoothness
from arreg_jax.attacks import losses

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
  np.testing.assert_allclose(margins.per_example(logits, labels)['margin'], [1.0, -2.0, 0.0, -2.0, 0.0])


def test_margins_two_classes():
  logits = jnp.array([[0.5, -1.0], [0.5, -1.0], [-3.0, 4.0]])
  np.testing.assert_allclose(losses.margin(logits, jnp.array([0, 1, 1])), [1.5, -1.5, 7.0])


def test_margins_hundred_classes_against_a_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 100)).astype(np.float32)
  logits[3, 17] = logits[3, 42] = logits[3].max() + 1  # a tie at the top
  labels = rng.integers(0, 100, 64)
  labels[3] = 17
  expected = [logits[i, y] - np.max(np.delete(logits[i], y)) for i, y in enumerate(labels)]
  got = jax.jit(losses.margin)(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
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
  v = np.array([-5.0, -1.0, -0.5, 0.0, 0.49, 0.5, 1.0, 7.0, np.nan, 0.2], np.float32)
  counts = distributions.histogram(v, edges)
  # Bins [-1, -.5) [-.5, 0) [0, .5) [.5, 1] (the last closed); -5 is clipped into the first bin, 7 into the last;
  # NaN is not counted.
  np.testing.assert_array_equal(counts, [2, 1, 3, 3])
  s = distributions.summarize(v, edges)
  assert sum(s['counts']) == s['n'] == 9 and s['nan'] == 1
  assert s['below'] == 1 and s['above'] == 1
  assert s['edges'] == [float(e) for e in edges]  # the edges are the given ones, never data-derived
  assert s['mode'] == 0.25 and s['max'] == 7.0  # the fullest bin (first of the ties); NaN left out of the moments


def test_histograms_of_different_samples_share_the_given_bins():
  edges = distributions.uniform_edges(0.0, 1.0, 10)
  a = np.linspace(0, 1, 101)
  h1, h2 = distributions.summarize(a, edges), distributions.summarize(a * 0.5, edges)
  assert h1['edges'] == h2['edges']
  assert sum(h1['counts']) == sum(h2['counts']) == 101
  assert h2['counts'][5] == 1 and h2['counts'][6:] == [0, 0, 0, 0] and h2['above'] == 0  # 0.5 opens [0.5, 0.6)
  with pytest.raises(ValueError, match='increasing'):
    distributions.histogram(a, [0.0, 0.0, 1.0])


def test_summary_statistics_match_numpy_and_scipy():
  rng = np.random.default_rng(2)
  v = rng.gamma(2.0, 1.5, size=997).astype(np.float32)
  s = distributions.summarize(v, distributions.uniform_edges(0, 30, 60), tau=1.0)
  np.testing.assert_allclose(s['mean'], v.mean(), rtol=1e-5)
  np.testing.assert_allclose(s['std'], v.std(), rtol=1e-4)
  np.testing.assert_allclose(s['skewness'], stats.skew(v), rtol=1e-3)
  for q, key in ((0.01, 'q01'), (0.5, 'q50'), (0.99, 'q99')):
    np.testing.assert_allclose(s['quantiles'][key], np.quantile(v, q), rtol=1e-5)
  np.testing.assert_allclose(s['frac_abs_below_tau'], np.mean(np.abs(v) < 1.0))
  assert s['min'] == pytest.approx(v.min()) and s['max'] == pytest.approx(v.max())
  empty = distributions.summarize(np.array([np.nan]), distributions.uniform_edges(0, 1, 2))
  assert empty['n'] == 0 and empty['nan'] == 1 and np.isnan(empty['mean'])


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
  ce = lambda z: np.asarray(losses.cross_entropy(logits_fn(z), y))
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
  d1, pred = decision_boundary.first_order_distance(fn, x)
  np.testing.assert_allclose(d1, exact, rtol=1e-4)  # exact for a linear model
  out = jax.jit(lambda xx, yy: decision_boundary.bisect_boundary_distance(fn, xx, yy, r_max=4.0, rounds=12, steps=10))(
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
  np.testing.assert_allclose(generalization_bound.min_class_weight_distance(jnp.asarray(w), class_axis=-1), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(generalization_bound.min_class_weight_distance(jnp.asarray(w.T), class_axis=0), expected,
                             rtol=1e-5)  # an Equinox / PyTorch (out, in) weight
  with pytest.raises(ValueError, match='class_axis'):
    generalization_bound.min_class_weight_distance(jnp.asarray(w))  # an orientation is never guessed
  log_u = generalization_bound.log_u_min(2.0, [0.5, 4.0], 0.25)
  assert log_u == pytest.approx(np.log(2.0 * 0.5 * 4.0 * 0.25))
  g = generalization_bound.generalization_bound(log_u, gamma=0.5, c_x=1.0, k=2, eps=0.5, eta=0.05, m=100)
  assert g['margin_term'] == pytest.approx(0.0)  # u_min = 1 ≥ γ
  cov = np.sqrt(2 * np.log(2) * 1.0 ** 2 / (0.5 ** 2 * 100) + 2 * np.log(1 / 0.05) / 100)
  assert g['covering_term'] == pytest.approx(cov) and g['bound'] == pytest.approx(cov)
  assert generalization_bound.log_u_min(1.0, [0.0, 1.0], 1.0) == -np.inf
  g = generalization_bound.generalization_bound(-np.inf, gamma=1.0, c_x=10.0, k=5000, eps=0.01, eta=0.05, m=10)
  assert g['margin_term'] == 1.0 and g['covering_term'] == np.inf and np.isfinite(g['log10_covering_term'])


def test_sv_std_comparison_b2():
  a = [1.0, 2.0, 3.0, 0.5]
  b = [0.5, 1.0, 3.5, 0.5]
  c = singular_values.compare_std_json(a, b)
  assert c['decrease_count'] == 2 and c['decrease_sum'] == pytest.approx(1.5) and c['decrease_mean'] == 0.75
  assert c['increase_count'] == 1 and c['increase_sum'] == pytest.approx(0.5) and c['increase_mean'] == 0.5
  assert c['frac_decreased'] == 0.5


# --- batching / sharding


def test_confidence_pads_and_trims_and_takes_a_preprocess(tiny):
  module, variables, images, labels = tiny
  apply_fn = lambda v, x: module.apply(v, x)
  x = jnp.asarray(images, jnp.float32) / 255
  out = margins.confidence(apply_fn, variables, x, labels, batch_size=16)
  direct = losses.margin(module.apply(variables, x), jnp.asarray(labels, jnp.int32))
  assert out['margin'].shape == (37,)
  np.testing.assert_allclose(out['margin'], direct, rtol=1e-4, atol=1e-5)
  # the runner's way: uint8 images turned into inputs inside the compiled program
  to_float = lambda u8: u8.astype(jnp.float32) / 255
  u8 = margins.confidence(apply_fn, variables, images, labels, batch_size=16, preprocess=to_float, limit=20)
  np.testing.assert_allclose(u8['margin'], out['margin'][:20], rtol=1e-6)


_SHARDED = r'''
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from arreg_jax.analysis import margins, smoothness
from arreg_jax.attacks import losses
assert jax.device_count() == 4
class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))
module = Net()
variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
apply_fn = lambda v, x: module.apply(v, x)
rng = np.random.default_rng(0)
x = rng.uniform(size=(30, 28, 28, 1)).astype(np.float32)
y = rng.integers(0, 10, size=30)
out = margins.confidence(apply_fn, variables, x, y, batch_size=8)
np.testing.assert_allclose(out['margin'], losses.margin(module.apply(variables, x), jnp.asarray(y)), rtol=1e-4,
                           atol=1e-5)
lv = smoothness.loss_variation(apply_fn, variables, x, y, eps=(0.05,), steps=3, step_rel=0.4, batch_size=8)
ref = smoothness.max_loss_increase(lambda z: module.apply(variables, z), jnp.asarray(x), jnp.asarray(y), eps=0.05,
                                   step_size=0.02, steps=3)
np.testing.assert_allclose(lv[0.05], ref, rtol=1e-3, atol=1e-5)
print('OK')
'''


def test_kernels_on_a_four_device_mesh():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-c', _SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=180)
  assert r.returncode == 0 and 'OK' in r.stdout, r.stderr[-3000:]


# --- the user-facing analyses: inputs checked at the door, any model


def test_bad_inputs_get_an_error_naming_the_argument(tiny):
  module, variables, images, labels = tiny
  apply_fn = lambda v, x: module.apply(v, x)
  x = jnp.asarray(images, jnp.float32) / 255
  cases = [
      (dict(images=images), TypeError, r'images must be floating point .* images / 255'),
      (dict(images=x * 255), ValueError, r'images must lie in \[0, 1\]'),
      (dict(images=x.at[0, 0, 0, 0].set(jnp.nan)), ValueError, r'images must lie in \[0, 1\]'),
      (dict(images=x[0]), ValueError, 'images must have 4 dimensions'),
      (dict(images=x[:0], labels=labels[:0]), ValueError, 'images holds no examples'),
      (dict(labels=labels.astype(np.float32)), TypeError, 'labels must be integer'),
      (dict(labels=labels[:, None]), ValueError, r'labels must have shape \(batch,\)'),
      (dict(labels=labels[:-1]), ValueError, 'labels has 36 entries but images has 37'),
      (dict(labels=np.where(labels == labels[0], 10, labels)), ValueError, r'labels must lie in \[0, 10\)'),
      (dict(apply_fn=module), TypeError, r'apply_fn is a linen module.*adapters\.linen\(module, variables\)'),
      (dict(apply_fn='f'), TypeError, 'apply_fn must be a callable'),
      (dict(apply_fn=lambda v, xx: module.apply(v, xx)[:, :1]), ValueError, 'at least 2 classes'),
      (dict(apply_fn=lambda v, xx: module.apply(v, xx)[0]), ValueError, r'logits of shape \(batch, classes\)'),
  ]
  for change, error, match in cases:
    kw = dict(apply_fn=apply_fn, params=variables, images=x, labels=labels) | change
    with pytest.raises(error, match=match):
      margins.confidence(kw['apply_fn'], kw['params'], kw['images'], kw['labels'])
  with pytest.raises(ValueError, match='eps must be'):
    smoothness.loss_variation(apply_fn, variables, x, labels, eps=(-0.1,))
  with pytest.raises(ValueError, match='refine must be'):
    decision_boundary.boundary_distances(apply_fn, variables, x, refine=0)
  with pytest.raises(TypeError, match='images must be floating point'):
    generalization_bound.bound_terms(apply_fn, variables, images, labels, eps=0.1)


def test_layer_statistics_and_b2_comparison_of_a_plain_function():
  rng = np.random.default_rng(7)
  params_a = {'w1': jnp.asarray(rng.normal(size=(12, 8)), jnp.float32), 'w2': jnp.asarray(rng.normal(size=(8, 3)),
                                                                                               jnp.float32)}
  params_b = jax.tree.map(lambda w: w * jnp.asarray([[0.5]]), params_a)
  apply_fn = lambda p, x: jnp.tanh(x.reshape(len(x), -1) @ p['w1']) @ p['w2']  # no `train` argument, no module
  rows = singular_values.layer_statistics(apply_fn, params_a, (2, 3, 2))
  assert [(r['name'], r['kind'], r['kernel_shape']) for r in rows] == [('w1', 'dense', [12, 8]),
                                                                       ('w2', 'dense', [8, 3])]
  np.testing.assert_allclose(rows[0]['std'], np.linalg.svd(np.asarray(params_a['w1']), compute_uv=False).std(),
                             rtol=1e-5)
  cmp = singular_values.compare_layers(apply_fn, params_a, params_b, (2, 3, 2))
  assert cmp['layers'] == ['w1', 'w2'] and cmp['decrease_count'] == 2 and cmp['increase_count'] == 0
  np.testing.assert_allclose(cmp['std_b'], [0.5 * s for s in cmp['std_a']], rtol=1e-5)


def test_bound_terms_in_one_call_equal_their_parts(tiny):
  module, variables, images, labels = tiny
  apply_fn = lambda v, x: module.apply(v, x)
  x = jnp.asarray(images, jnp.float32) / 255
  terms = generalization_bound.bound_terms(apply_fn, variables, x, labels, eps=0.2, refine=4, rounds=6, steps=4)
  kernels = [np.asarray(variables['params'][n]['kernel']) for n in ('Dense_0', 'Dense_1')]
  assert terms['layers'] == ['params/Dense_0', 'params/Dense_1']
  np.testing.assert_allclose(terms['sigma_mins'], [np.linalg.svd(kernels[0], compute_uv=False).min()], rtol=1e-5)
  cols = kernels[1].T
  w_dist = min(np.linalg.norm(cols[i] - cols[j]) for i in range(10) for j in range(10) if i != j)
  np.testing.assert_allclose(terms['w_distance'], w_dist, rtol=1e-5)
  v = decision_boundary.boundary_distances(apply_fn, variables, x, refine=4, rounds=6, steps=4)['v_min']
  assert terms['v_min'] == v
  gamma = float(np.median(margins.confidence(apply_fn, variables, x, labels)['margin']))
  np.testing.assert_allclose(terms['gamma'], max(gamma, 1e-6), rtol=1e-6)
  log_u = generalization_bound.log_u_min(w_dist, terms['sigma_mins'], v)
  np.testing.assert_allclose(terms['log_u_min'], log_u, rtol=1e-5)
  assert terms['m'] == 37 and terms['gamma_source'] == 'median margin of images'
