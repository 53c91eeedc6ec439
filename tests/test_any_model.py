"""The spectral toolkit on any JAX model: one small CNN written in Flax linen, Flax NNX, Equinox and plain JAX.

Every conv layer's singular values are checked against an oracle that never uses the FFT method: the dense Jacobian
of that layer's wrap-around operator, built from the layer's own kernel in its own layout (NHWC/HWIO for linen and
NNX, NCHW/OIHW for Equinox, NHWC/OIHW for the plain-JAX network) with ``lax.conv_general_dilated`` and
``jax.jacfwd``, decomposed by ``np.linalg.svd`` in float64. Dense layers are checked against ``np.linalg.svd`` of
their weight, whatever its orientation. The four networks hold the same weights, so they must give the same spectra
and clip to the same weights; clipping must hand back the framework's own parameter structure.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from arreg_jax import adapters, analysis, spectral
from arreg_jax.spectral.layer import key_name
from oracles import assert_spectrum, conv_oracle_svs

eqx = pytest.importorskip('equinox')

HW, CIN, C1, C2, CLASSES = 8, 2, 4, 6, 5


def _weights(seed=0):
  """The shared weights in Flax layouts: HWIO conv kernels, (in, out) dense kernel."""
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.standard_normal(s) / 2).astype(np.float32)
  return {'k1': w(3, 3, CIN, C1), 'b1': w(C1), 'k2': w(3, 3, C1, C2), 'b2': w(C2), 'w': w(C2, CLASSES),
          'b': w(CLASSES)}


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(C1, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(C2, (3, 3), strides=2, name='conv2')(x))
    return nn.Dense(CLASSES, name='head')(x.mean(axis=(1, 2)))


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(CIN, C1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(C1, C2, (3, 3), strides=2, rngs=rngs)
    self.head = nnx.Linear(C2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    return self.head(x.mean(axis=(1, 2)))


class EqxNet(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(CIN, C1, 3, padding='SAME', key=k1)
    self.conv2 = eqx.nn.Conv2d(C1, C2, 3, stride=2, padding='SAME', key=k2)
    self.head = eqx.nn.Linear(C2, CLASSES, key=k3)

  def __call__(self, x):  # one example, CHW
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.head(x.mean(axis=(1, 2)))


_PLAIN_DN = ('NHWC', 'OIHW', 'NHWC')


@jax.jit
def plain_apply(p, x):
  """Plain JAX: NHWC input, OIHW kernels, an (out, in) dense weight."""
  h = jax.nn.relu(lax.conv_general_dilated(x, p['c1']['w'], (1, 1), 'SAME', dimension_numbers=_PLAIN_DN)
                  + p['c1']['b'])
  h = jax.nn.relu(lax.conv_general_dilated(h, p['c2']['w'], (2, 2), 'SAME', dimension_numbers=_PLAIN_DN)
                  + p['c2']['b'])
  return jnp.einsum('ni,oi->no', h.mean(axis=(1, 2)), p['fc']['w']) + p['fc']['b']


def make(framework: str, w: dict) -> tuple[adapters.Model, tuple[int, ...], str]:
  """(model, input shape, input layout) of the network in ``framework`` holding the weights ``w``."""
  if framework == 'linen':
    variables = {'params': {'conv1': {'kernel': w['k1'], 'bias': w['b1']}, 'conv2': {'kernel': w['k2'],
                 'bias': w['b2']}, 'head': {'kernel': w['w'], 'bias': w['b']}}}
    return adapters.linen(LinenNet(), jax.tree.map(jnp.asarray, variables)), (1, HW, HW, CIN), 'NHWC'
  if framework == 'nnx':
    net = NNXNet(nnx.Rngs(0))
    for layer, k, b in ((net.conv1, 'k1', 'b1'), (net.conv2, 'k2', 'b2'), (net.head, 'w', 'b')):
      layer.kernel[...], layer.bias[...] = jnp.asarray(w[k]), jnp.asarray(w[b])
    return adapters.nnx(net), (1, HW, HW, CIN), 'NHWC'
  if framework == 'equinox':
    net = EqxNet(jax.random.key(0))
    oihw = lambda k: jnp.asarray(k.transpose(3, 2, 0, 1))
    net = eqx.tree_at(lambda m: (m.conv1.weight, m.conv1.bias, m.conv2.weight, m.conv2.bias, m.head.weight,
                                 m.head.bias), net,
                      (oihw(w['k1']), jnp.asarray(w['b1'])[:, None, None], oihw(w['k2']),
                       jnp.asarray(w['b2'])[:, None, None], jnp.asarray(w['w'].T), jnp.asarray(w['b'])))
    return adapters.equinox(net), (1, CIN, HW, HW), 'NCHW'
  params = {'c1': {'w': w['k1'].transpose(3, 2, 0, 1), 'b': w['b1']},
            'c2': {'w': w['k2'].transpose(3, 2, 0, 1), 'b': w['b2']}, 'fc': {'w': w['w'].T, 'b': w['b']}}
  return adapters.Model(plain_apply, jax.tree.map(jnp.asarray, params)), (1, HW, HW, CIN), 'NHWC'


FRAMEWORKS = ('linen', 'nnx', 'equinox', 'plain')


def _by_path(tree) -> dict:
  return {tuple(key_name(k) for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _get(tree, path):
  """A leaf by its key path (dict keys, attributes, NNX State keys)."""
  return _by_path(tree)[path]


# ------------------------------------------------------------------------------------------------ per framework


_EXPECTED = [('conv', (1, 1), (HW, HW)), ('conv', (2, 2), (HW, HW)), ('dense', None, None)]


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_every_layer_matches_its_oracle(framework):
  w = _weights()
  model, shape, layout = make(framework, w)
  specs = spectral.layer_specs(*model, shape)
  assert [(s.kind, s.stride, s.input_hw) for s in specs] == _EXPECTED
  records = spectral.layer_singular_values(*model, shape, specs=specs)
  conv_dn = {'linen': ('NHWC', 'HWIO', 'NHWC'), 'nnx': ('NHWC', 'HWIO', 'NHWC'),
             'equinox': ('NCHW', 'OIHW', 'NCHW'), 'plain': _PLAIN_DN}[framework]
  for spec, rec in zip(specs, records):
    own = np.asarray(_get(model.params, spec.path))  # the weight in the framework's own layout
    if spec.kind == 'dense':
      assert_spectrum(rec.singular_values, np.linalg.svd(own.reshape(own.shape[0], -1), compute_uv=False))
    else:
      if framework == 'equinox':  # Equinox's vmap gives the conv an NCHW batch of its CHW examples
        assert spec.layout == 'NCHW/OIHW'
      expected = conv_oracle_svs(own, conv_dn, spec.input_hw, spec.stride)
      assert_spectrum(rec.singular_values, expected)


def test_the_same_weights_give_the_same_spectra_and_clipped_weights_in_every_framework():
  w = _weights(1)
  spectra, clipped = {}, {}
  for framework in FRAMEWORKS:
    model, shape, _ = make(framework, w)
    specs = spectral.layer_specs(*model, shape)
    spectra[framework] = [r.singular_values for r in spectral.layer_singular_values(*model, shape, specs=specs)]
    new = spectral.clip_params(model.params, specs, 0.5, rounds=3)
    clipped[framework] = [np.asarray(k) for k in spectral.layer_kernels(new, specs)]  # canonical layouts
  for framework in FRAMEWORKS[1:]:
    for a, b in zip(spectra['linen'], spectra[framework]):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=framework)
    for a, b in zip(clipped['linen'], clipped[framework]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=framework)


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_clipping_hands_back_the_users_own_structure(framework):
  w = _weights(2)
  model, shape, _ = make(framework, w)
  specs = spectral.layer_specs(*model, shape)
  c = 0.5
  clipped = spectral.clip_params(model.params, specs, c, rounds=20)
  assert type(clipped) is type(model.params)
  assert jax.tree.structure(clipped) == jax.tree.structure(model.params)
  own = model.rebuild(clipped)
  if framework == 'nnx':
    assert isinstance(own, NNXNet)
  elif framework == 'equinox':
    assert isinstance(own, EqxNet) and own.conv1.padding == model.rebuild(model.params).conv1.padding
  # the rebuilt object carries the clipped weights: its spectra are under c (convs within the rounds' tolerance)
  again = make_from_own(framework, own, model)
  for rec in spectral.layer_singular_values(*again, shape):
    assert rec.singular_values.max() <= c * (1.0 + (1e-4 if rec.kind == 'dense' else 0.03)), rec.name
  # biases come back untouched
  leaves, originals = _by_path(clipped), _by_path(model.params)
  kernels = {s.path for s in specs}
  for path, leaf in leaves.items():
    if path not in kernels:
      np.testing.assert_array_equal(leaf, originals[path])


def make_from_own(framework, own, model):
  if framework == 'nnx':
    return adapters.nnx(own)
  if framework == 'equinox':
    return adapters.equinox(own)
  if framework == 'linen':
    return adapters.Model(model.apply_fn, own)
  return adapters.Model(plain_apply, own)


def test_nnx_update_writes_clipped_weights_into_the_model():
  net = NNXNet(nnx.Rngs(3))
  model = adapters.nnx(net)
  specs = spectral.layer_specs(*model, (1, HW, HW, CIN))
  nnx.update(net, spectral.clip_params(model.params, specs, 0.1))
  top = np.linalg.svd(np.asarray(net.head.kernel[...]), compute_uv=False)[0]
  assert top <= 0.1 * (1 + 1e-4)


# ------------------------------------------------------------------------------------------------ the analyses


def test_the_same_weights_give_the_same_analyses_in_every_framework():
  rng = np.random.default_rng(5)
  images = rng.uniform(size=(16, HW, HW, CIN)).astype(np.float32)
  labels = rng.integers(0, CLASSES, 16)
  w = _weights(3)
  results = {}
  for framework in FRAMEWORKS:
    model, _, layout = make(framework, w)
    x = images.transpose(0, 3, 1, 2) if layout == 'NCHW' else images
    conf = analysis.confidence(*model, x, labels, batch_size=8)
    lv = analysis.loss_variation(*model, x, labels, eps=(0.05,), steps=3, batch_size=8)[0.05]
    terms = analysis.bound_terms(*model, x, labels, eps=0.1, refine=4, rounds=8, steps=5, batch_size=8)
    results[framework] = (conf, lv, terms)
  conf, lv, terms = results['linen']
  # the class vectors are the columns of the Flax (in, out) kernel, whatever the framework stores
  cols = w['w'].T
  want = min(np.linalg.norm(cols[i] - cols[j]) for i in range(CLASSES) for j in range(CLASSES) if i != j)
  np.testing.assert_allclose(terms['w_distance'], want, rtol=1e-5)
  assert terms['layers'] == ['params/conv1', 'params/conv2', 'params/head'] and len(terms['sigma_mins']) == 2
  assert np.isfinite(terms['v_min']) and terms['v_min'] > 0
  for framework in FRAMEWORKS[1:]:
    c, l, t = results[framework]
    for key in ('margin', 'prob', 'loss'):
      np.testing.assert_allclose(c[key], conf[key], rtol=1e-5, atol=1e-5, err_msg=f'{framework} {key}')
    np.testing.assert_array_equal(c['pred'], conf['pred'])
    np.testing.assert_allclose(l, lv, rtol=1e-4, atol=1e-5, err_msg=framework)
    for key in ('w_distance', 'log_prod_sigma_min', 'v_min', 'log_u_min', 'gamma', 'margin_term', 'bound'):
      np.testing.assert_allclose(t[key], terms[key], rtol=1e-4, err_msg=f'{framework} {key}')
    np.testing.assert_allclose(t['sigma_mins'], terms['sigma_mins'], rtol=1e-5, err_msg=framework)


# ------------------------------------------------------------------------------------------------ the package


def _readme_blocks(section: str) -> list[str]:
  text = (pathlib.Path(__file__).resolve().parent.parent / 'README.md').read_text()
  body = text.split(f'## {section}\n', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```python\n(.*?)```', body, flags=re.S)


def test_the_readme_your_own_model_snippets_run():
  blocks = _readme_blocks('Your own model')
  assert len(blocks) == 3 and 'adapters.linen' in blocks[0] and 'adapters.nnx' in blocks[1]
  assert 'adapters.equinox' in blocks[2]
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert isinstance(namespace['variables'], dict) and 'params' in namespace['variables']
  assert type(namespace['net']).__name__ == 'EqxCNN'
  assert np.isfinite(namespace['terms']['bound'])


_IMPORT = r'''
import sys, time
t = time.perf_counter()
import arreg_jax
took = time.perf_counter() - t
assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'import arreg_jax must load nothing heavy'
assert arreg_jax.__version__ and arreg_jax.__version__ != '0+unknown', arreg_jax.__version__
assert callable(arreg_jax.analysis.margins.per_example) and callable(arreg_jax.analysis.confidence)
assert callable(arreg_jax.attacks.pgd) and callable(arreg_jax.spectral.layer_specs)
assert arreg_jax.adapters.Model._fields == ('apply_fn', 'params')
assert {'adapters', 'analysis', 'attacks', 'spectral', '__version__'} <= set(dir(arreg_jax))
import importlib.resources
assert importlib.resources.files('arreg_jax').joinpath('py.typed').is_file()
print('OK', took)
'''


def test_import_arreg_jax_is_light_and_discoverable():
  r = subprocess.run([sys.executable, '-c', _IMPORT], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.startswith('OK'), r.stderr[-3000:]
  assert float(r.stdout.split()[1]) < 0.05  # seconds


_LIBRARY = r'''
import sys
import arreg_jax.adapters, arreg_jax.attacks, arreg_jax.models, arreg_jax.spectral
from arreg_jax.analysis import (decision_boundary, distributions, generalization_bound, inputs, margin_tracking,
                                margins, robustness, singular_values, smoothness)
runner = ('analyze', 'checkpoint', 'cli', 'config_json', 'configuration', 'data', 'distributed',
          'evaluation', 'host_devices', 'main', 'memory_plan', 'metrics_writer', 'presets', 'programs',
          'regularizers', 'report', 'restore', 'rundir', 'sweep', 'sweep_analysis', 'train', 'trainer', 'training')
print(sorted(m for m in sys.modules if m.startswith('arreg_jax.') and m.split('.')[1] in runner))
'''


def test_the_library_imports_nothing_of_the_experiment_runner():
  r = subprocess.run([sys.executable, '-c', _LIBRARY], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == '[]', r.stdout
