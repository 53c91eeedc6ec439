"""The average-margin regularizer (poster 004), margin tracking, Miyato SN layers, draft-003 pieces."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arreg_jax import configuration, models, regularizers, sharding
from arreg_jax.analysis import margin_tracking, smoothness
from arreg_jax.data import get_dataset
from arreg_jax.training import checkpoints, loop, setup, state as state_lib, step as step_lib


def _train_step(cfg, module, *, adversarial):
  """``(spec, jitted step(state, images, labels, batch_index, hyper))`` of the training step (state donated)."""
  spec = step_lib.step_spec(cfg, module=module, adversarial=adversarial, augment='none', steps_per_epoch=4,
                            batch_sharding=sharding.batch_sharding(sharding.make_mesh()))
  return spec, jax.jit(lambda *a: step_lib.train_step(spec, *a), donate_argnums=(0,))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_mlp():
  """An MLP 4 → 3 → 3 (ReLU) on 2×2×1 images, with biases, and a batch of 5 examples."""
  module = models.mlp.MLP(3, hidden=(3,))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (5, 2, 2, 1)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 1, 0], jnp.int32)
  params = module.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 1, p.shape), jnp.float32), params)
  return module, params, x, y


def _numpy_loss(p, x, y, lam, gamma, beta):
  """The poster's loss written out in float64 numpy: mean CE − λ mean clip(min_k (w_y − w_k)ᵀΦ) + β Σ ‖G − I‖²."""
  x = np.asarray(x, np.float64).reshape(len(y), -1)
  w1, b1 = np.asarray(p['fc1']['kernel'], np.float64), np.asarray(p['fc1']['bias'], np.float64)
  w2, b2 = np.asarray(p['head']['kernel'], np.float64), np.asarray(p['head']['bias'], np.float64)
  phi = np.maximum(x @ w1 + b1, 0.0)
  logits = phi @ w2 + b2
  z = logits - logits.max(1, keepdims=True)
  ce = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
  margins = []
  for i, yi in enumerate(y):
    margins.append(min((w2[:, yi] - w2[:, k]) @ phi[i] for k in range(w2.shape[1]) if k != yi))
  term = np.mean(np.clip(margins, 0.0, gamma))
  ortho = 0.0
  for w in (w1.T, w2.T):  # W_l = kernelᵀ, (out, in); the smaller Gram
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    ortho += np.sum((g - np.eye(len(g))) ** 2)
  return ce.mean() - lam * term + beta * ortho, term, ortho, np.asarray(margins), phi


def _jax_loss(module, params, x, y, lam, gamma, beta):
  logits, feats, _ = models.apply_with_features(module, {'params': params}, x, train=True)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return regularizers.regularized_loss(ce, feats, params, y, margin_lambda=lam, margin_gamma=gamma,
                                       ortho_beta=beta)


def test_regularizer_value_and_gradient_match_hand_computation():
  module, params, x, y = _tiny_mlp()
  lam, gamma, beta = 0.7, 1.5, 0.05
  loss, parts = _jax_loss(module, params, x, y, lam, gamma, beta)
  ref, term, ortho, margins, phi = _numpy_loss(params, np.asarray(x), np.asarray(y), lam, gamma, beta)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(parts['margin_term']), term, rtol=1e-5)
  np.testing.assert_allclose(float(parts['ortho']), ortho, rtol=1e-5)
  assert 0 < np.sum((margins > 0) & (margins < gamma)) < len(y)  # some examples inside the clip window, some not

  grads = jax.grad(lambda p: _jax_loss(module, p, x, y, lam, gamma, beta)[0])(params)
  # Analytic gradient of the two regularizer terms w.r.t. the head kernel (Φ held fixed), plus the CE gradient
  # from jax, against jax's gradient of the whole loss: d/dw_y = −λ/B Φ, d/dw_k* = +λ/B Φ inside (0, γ);
  # d‖WWᵀ − I‖²/dW = 4 (WWᵀ − I) W with W = kernelᵀ (here 3×3, both Grams coincide).
  w2 = np.asarray(params['head']['kernel'], np.float64)
  g_margin = np.zeros_like(w2)
  for i, yi in enumerate(np.asarray(y)):
    scores = phi[i] @ w2
    others = [k for k in range(3) if k != yi]
    k_star = others[int(np.argmax(scores[others]))]
    if 0 < margins[i] < gamma:
      g_margin[:, yi] -= lam * phi[i] / len(y)
      g_margin[:, k_star] += lam * phi[i] / len(y)
  wt = w2.T
  g_ortho = beta * (4 * (wt @ wt.T - np.eye(3)) @ wt).T
  ce_only = jax.grad(lambda p: _jax_loss(module, p, x, y, 0.0, gamma, 0.0)[0])(params)
  np.testing.assert_allclose(np.asarray(grads['head']['kernel']),
                             np.asarray(ce_only['head']['kernel']) + g_margin + g_ortho, rtol=1e-4, atol=1e-5)
  # Every parameter (first layer included, through Φ): central differences of the float64 numpy loss.
  leaves, treedef = jax.tree.flatten(jax.tree.map(lambda a: np.asarray(a, np.float64), params))
  h = 1e-6
  for li, leaf in enumerate(leaves):
    num = np.zeros_like(leaf)
    for j in np.ndindex(leaf.shape):
      vals = []
      for sign in (1, -1):
        bumped = [a.copy() for a in leaves]
        bumped[li][j] += sign * h
        vals.append(_numpy_loss(jax.tree.unflatten(treedef, bumped), x, np.asarray(y), lam, gamma, beta)[0])
      num[j] = (vals[0] - vals[1]) / (2 * h)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(grads)[li]), num, rtol=2e-3, atol=2e-4)


def test_margin_term_is_clipped_and_ignores_bias():
  feats = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
  w = jnp.asarray([[1.0, -1.0, 0.0], [0.0, 1.0, 0.5]])  # (d=2, K=3)
  y = jnp.asarray([0, 1, 2])
  m = np.asarray(regularizers.class_margins(feats, w, y))
  scores = np.asarray(feats @ w)
  expect = [scores[i, yi] - max(scores[i, k] for k in range(3) if k != yi) for i, yi in enumerate([0, 1, 2])]
  np.testing.assert_allclose(m, expect, rtol=1e-6)
  np.testing.assert_allclose(float(regularizers.margin_term(feats, w, y, 1.5)), np.mean(np.clip(expect, 0, 1.5)))


def _orthonormal(rng, rows, cols):
  q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), max(rows, cols))))
  return q[:rows, :cols]


def test_orthogonality_penalty_zero_for_orthogonal_weights_and_counts_each_kernel_once():
  rng = np.random.default_rng(1)
  params = {
      'dense_wide': {'kernel': jnp.asarray(_orthonormal(rng, 8, 5)), 'bias': jnp.ones(5)},   # W (5, 8)
      'dense_tall': {'kernel': jnp.asarray(_orthonormal(rng, 3, 6)), 'bias': jnp.ones(6)},   # W (6, 3)
      'conv': {'kernel': jnp.asarray(_orthonormal(rng, 18, 4).reshape(3, 3, 2, 4)), 'bias': jnp.ones(4)},
      'bn': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
  }
  assert float(regularizers.orthogonality_penalty(params)) < 1e-10
  assert len(regularizers.weight_kernels(params)) == 3
  # Perturb: the penalty is exactly the sum of one term per kernel, biases never count.
  noisy = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  expect = 0.0
  for name in ('dense_wide', 'dense_tall', 'conv'):
    k = np.asarray(noisy[name]['kernel'], np.float64)
    w = k.reshape(-1, k.shape[-1]).T
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    expect += np.sum((g - np.eye(len(g))) ** 2)
  np.testing.assert_allclose(float(regularizers.orthogonality_penalty(noisy)), expect, rtol=1e-5)
  changed_bias = jax.tree_util.tree_map_with_path(
      lambda path, p: p * 10 if path[-1].key == 'bias' else p, noisy)
  np.testing.assert_allclose(float(regularizers.orthogonality_penalty(changed_bias)), expect, rtol=1e-5)
  # A real model with biases: one term per layer (LeNet-like small_cnn: 2 convs + 2 dense).
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0))
  names = [p for p, _ in regularizers.weight_kernels(variables['params'])]
  assert names == ['conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'head/kernel']


def test_smaller_gram_has_the_posters_gradient():
  """‖WWᵀ − I_m‖² and ‖WᵀW − I_n‖² differ by the constant m − n: same gradient."""
  w = jnp.asarray(np.random.default_rng(2).normal(size=(7, 3)), jnp.float32)
  poster = lambda w: jnp.sum((w @ w.T - jnp.eye(7)) ** 2)
  np.testing.assert_allclose(float(poster(w) - regularizers.gram_deviation(w)), 7 - 3, rtol=1e-4)
  np.testing.assert_allclose(jax.grad(poster)(w), jax.grad(regularizers.gram_deviation)(w), rtol=1e-4, atol=1e-4)


def test_feature_space_margin_is_distance_to_the_hyperplane_for_logistic_regression():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  w = rng.normal(size=(5, 2)).astype(np.float32)
  b = rng.normal(size=(2,)).astype(np.float32)
  y = np.array([0, 1, 0, 1, 1, 0], np.int32)
  got = np.asarray(regularizers.feature_space_margins(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.asarray(y)))
  u = w[:, 1] - w[:, 0]
  signed = (x @ u + b[1] - b[0]) / np.linalg.norm(u)  # signed distance, positive on the class-1 side
  np.testing.assert_allclose(got, np.where(y == 1, signed, -signed), rtol=1e-5)


def test_regularized_train_step_runs_and_reports_margin_term():
  cfg = configuration.base_config()
  cfg.attack.kind = 'none'
  cfg.regularizer.margin_lambda, cfg.regularizer.margin_gamma, cfg.regularizer.ortho_beta = 0.5, 2.0, 1e-3
  module = models.get_module('mlp', num_classes=10)
  _, variables = models.create('mlp', num_classes=10, key=jax.random.key(0))
  spec, step = _train_step(cfg, module, adversarial=False)
  state = state_lib.init_state(variables, spec.optimizer)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8))
  labels = jnp.asarray(np.arange(16) % 10, jnp.int32)
  state, m = step(state, images, labels, jnp.arange(8, dtype=jnp.int32),
                  step_lib.step_hyper(cfg, 0.0, jax.random.key(1)))
  assert 'margin_term_sum' in m and np.isfinite(float(m['margin_term_sum']))
  assert 0.0 <= float(m['margin_term_sum']) <= 2.0 * 8


def test_spectral_norm_u_updated_by_the_train_step_only():
  module = models.get_module('small_cnn_sn', num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)), jnp.float32)
  variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.key(0))
  u0 = variables['batch_stats']
  assert set(u0) == {'conv1', 'conv2', 'fc1', 'head'}
  # Inference, and train mode without a mutable collection (how an attack may call it), leave u alone.
  jax.jit(lambda v: (module.apply(v, x, train=False), module.apply(v, x, train=True)))(variables)
  update = jax.jit(lambda v: module.apply(v, x, train=True, mutable=['batch_stats'])[1]['batch_stats'])
  once = update(variables)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(once)))
  # The PGD training step: state.batch_stats (u) moves by exactly one power-iteration round per step, not one
  # per attack step (u does not depend on the input, so "once" above is what one round gives).
  cfg = configuration.base_config()
  cfg.attack.steps = 2
  cfg.attack.strength_unit = 1.0
  cfg.attack.step_size = 0.05
  spec, step = _train_step(cfg, module, adversarial=True)
  state = state_lib.init_state(variables, spec.optimizer)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8))
  labels = jnp.arange(8, dtype=jnp.int32) % 10
  new, _ = step(jax.tree.map(jnp.copy, state), images, labels, jnp.arange(8, dtype=jnp.int32),
                step_lib.step_hyper(cfg, 0.1, jax.random.key(1)))
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(once)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_spectral_norm_normalizes_to_one():
  module = models.get_module('mlp_sn', num_classes=10)
  x = jnp.zeros((1, 28, 28, 1))
  variables = module.init(jax.random.key(0), x)
  update = jax.jit(lambda v: module.apply(v, x, train=True, mutable=['batch_stats'])[1]['batch_stats'])
  for _ in range(30):  # power iteration converges on fixed weights
    variables = {'params': variables['params'], 'batch_stats': update(variables)}
  w, _ = regularizers.effective_head(variables)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w), compute_uv=False)[0], 1.0, rtol=1e-3)


def test_keep_classes_filters_and_relabels():
  cfg = configuration.base_config()
  cfg.data.keep_classes = (7, 3)
  ds = get_dataset(cfg.data)
  full = get_dataset(configuration.base_config().data)
  assert ds.num_classes == 2 and set(np.unique(ds.train_labels)) == {0, 1}
  assert ds.num_train == int(np.sum(np.isin(full.train_labels, [7, 3])))
  first7 = full.train_images[full.train_labels == 7][0]
  np.testing.assert_array_equal(ds.train_images[ds.train_labels == 0][0], first7)


def test_loss_variation_correct_only_is_at_most_the_unrestricted_one():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x = jnp.asarray(rng.uniform(0, 1, (32, 4, 4, 1)), jnp.float32)
  y = jnp.argmax(fn(x), -1)  # every example correct when clean
  kw = dict(eps=0.2, step_size=0.05, steps=6)
  full = np.asarray(smoothness.max_loss_increase(fn, x, y, **kw))
  corr = np.asarray(smoothness.max_loss_increase(fn, x, y, max_correct_only=True, **kw))
  assert np.all(corr >= 0) and np.all(corr <= full + 1e-6) and np.any(corr < full - 1e-4)


def _track_config(workdir):
  cfg = configuration.base_config()
  cfg.model.name = 'mlp'
  cfg.data.train_size, cfg.data.test_size = 256, 128
  cfg.train.epochs, cfg.train.batch_size = 2, 64
  cfg.attack.kind = 'none'
  cfg.sweep = (0.0,)
  cfg.regularizer.margin_lambda, cfg.regularizer.ortho_beta = 0.1, 1e-3
  cfg.margins.track = True
  cfg.margins.hist_epochs = (1,)
  cfg.eval.batch_size = 64
  cfg.eval.pgd_examples_per_epoch = 64
  cfg.analysis.enabled = False
  return cfg


def test_margin_tracking_matches_direct_computation_from_the_final_checkpoint(tmp_path):
  cfg = _track_config(tmp_path)
  loop.train_sweep(setup.setup_sweep(cfg, str(tmp_path)))
  run = tmp_path / 'ar0'
  rows = [json.loads(line) for line in open(run / 'metrics.jsonl')]
  assert sorted(os.listdir(run / 'margins')) == ['epoch1.npz', 'epoch2.npz']
  assert 'train_margin_term' in rows[-1] and 'ortho_penalty' in rows[-1]
  config, module, variables, ds, _ = checkpoints.restore_run(str(run))
  for split in ('train', 'test'):
    images = jnp.asarray(getattr(ds, f'{split}_images'), jnp.float32) / 255.0
    labels = np.asarray(getattr(ds, f'{split}_labels'))
    p = variables['params']
    x = np.asarray(images, np.float64).reshape(len(labels), -1)
    h = x
    for name in ('fc1', 'fc2'):
      h = np.maximum(h @ np.asarray(p[name]['kernel'], np.float64) + np.asarray(p[name]['bias'], np.float64), 0)
    w, b = np.asarray(p['head']['kernel'], np.float64), np.asarray(p['head']['bias'], np.float64)
    logits = h @ w + b
    margin, fmargin = [], []
    for i, yi in enumerate(labels):
      others = [k for k in range(10) if k != yi]
      margin.append(logits[i, yi] - max(logits[i, k] for k in others))
      fmargin.append(min((logits[i, yi] - logits[i, k]) / np.linalg.norm(w[:, yi] - w[:, k]) for k in others))
    last = rows[-1]
    np.testing.assert_allclose(last[f'{split}_margin_min'], min(margin), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last[f'{split}_margin_mean'], np.mean(margin), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last[f'{split}_fmargin_min'], min(fmargin), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last[f'{split}_fmargin_mean'], np.mean(fmargin), rtol=1e-4, atol=1e-5)
    saved = np.load(run / 'margins' / 'epoch2.npz')
    np.testing.assert_allclose(saved[f'{split}_fmargin'], fmargin, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rows[-1]['ortho_penalty'], float(regularizers.orthogonality_penalty(variables['params'])),
                             rtol=1e-5)
  del config


def test_margin_config_smoke_end_to_end(tmp_path):
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--workdir', str(tmp_path), '--config',
         'configs/margin_mnist_mlp.py:smoke']
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  runs = sorted(d for d in os.listdir(tmp_path) if d.startswith('ar'))
  assert runs == ['ar0_ml0.1_ob0.001', 'ar0_ml0_ob0']
  for name in runs:
    rows = [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
    for key in ('train_margin_min', 'train_margin_mean', 'test_fmargin_min', 'test_fmargin_mean', 'pgd_acc'):
      assert key in rows[-1]
    assert ('train_margin_term' in rows[-1]) == (name != 'ar0_ml0_ob0')
  report = open(tmp_path / 'report.md').read()
  assert 'Minimum vs average margin' in report
  for f in ('poster004_margins_vs_epoch.png', 'poster004_margin_histograms.png', 'poster004_robustness.png'):
    assert os.path.getsize(tmp_path / 'figures' / f) > 10_000


def test_draft003_table_layout():
  from arreg_jax.report import spectral_norm_table as draft003  # pylint: disable=g-import-not-at-top
  assert draft003.paper_key('draft003_cifar10_vgg16', 'vgg19_sn') == 'draft003_cifar10_vgg19'
  assert draft003.paper_key('draft003_mnist_lenet', 'small_cnn_sn') == 'draft003_mnist_lenet'
  assert draft003.paper_key('cifar10_resnet56', 'resnet56') is None
  rows = [{'strength': s, 'test_acc': 99.0, 'loss_gap': 0.01, 'pgd_acc': p} for s, p in ((51.0, 90.0), (0.0, 40.0))]
  md = draft003.table(rows, 'draft003_mnist_lenet')
  lines = md.strip().splitlines()
  assert lines[0].split('|')[3:5] == [' 0 ', ' 51 ']
  assert '| ours | PGD | 40.00 | 90.00 |' in md and '| draft | PGD | 45.93 | 91.88 |' in md
  assert '| draft | GE | 0.0154 | 0.0126 |' in md


def test_fold_spectral_norm_keeps_outputs_and_exposes_normalized_kernels():
  module = models.get_module('small_cnn_sn', num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 28, 28, 1)), jnp.float32)
  variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.key(0))
  update = jax.jit(lambda v: module.apply(v, x, train=True, mutable=['batch_stats'])[1]['batch_stats'])
  for _ in range(20):
    variables = {'params': variables['params'], 'batch_stats': update(variables)}
  folded = models.fold_spectral_norm(variables)
  apply = jax.jit(lambda v: module.apply(v, x, train=False))
  np.testing.assert_allclose(apply(folded), apply(variables), rtol=1e-4, atol=1e-5)
  for name in ('conv1', 'fc1', 'head'):
    k = np.asarray(folded['params'][name]['kernel'])
    top = np.linalg.svd(k.reshape(-1, k.shape[-1]), compute_uv=False)[0]
    assert 1 - 1e-4 <= top < 1.05, (name, top)  # power iteration underestimates σ: folded top ≥ 1, close to 1
  _, plain = models.create('small_cnn', num_classes=10, key=jax.random.key(0))
  assert models.fold_spectral_norm(plain) is plain
