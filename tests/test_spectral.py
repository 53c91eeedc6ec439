"""Tests of arreg_jax.spectral against a dense-matrix oracle of the wrap-around convolution operator.

The oracle materializes the circular convolution (Flax cross-correlation, HWIO kernel, any stride) as an explicit
``(Ho·Wo·cout) × (H·W·cin)`` matrix by index arithmetic in float64 and takes ``np.linalg.svd`` (Sedghi, Gupta &
Long 2019 give the FFT shortcut that ``spectral`` implements; the oracle does not use it).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from arreg_jax import spectral
from arreg_jax.spectral import model as spectral_model
from arreg_jax.models.layers import Conv

_TOL = 1e-5  # float32 results vs the float64 oracle, relative to the largest singular value


def _out_size(n: int, s: int) -> int:
  return -(-n // s)


def oracle_matrix(kernel, input_hw, stride=(1, 1)) -> np.ndarray:
  """The circular convolution y[i, j, o] = Σ x[(s·i + a - p) mod H, (s·j + b - p) mod W, c]·K[a, b, c, o]."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw, cin, cout = kernel.shape
  (h, w), (sh, sw) = input_hw, stride
  ho, wo = _out_size(h, sh), _out_size(w, sw)
  ph = max((ho - 1) * sh + kh - h, 0) // 2  # 'SAME' offsets; any offset gives the same singular values
  pw = max((wo - 1) * sw + kw - w, 0) // 2
  t = np.zeros((ho, wo, cout, h, w, cin))
  for i in range(ho):
    for j in range(wo):
      for a in range(kh):
        for b in range(kw):
          t[i, j, :, (i * sh + a - ph) % h, (j * sw + b - pw) % w, :] += kernel[a, b].T
  return t.reshape(ho * wo * cout, h * w * cin)


def oracle_svs(kernel, input_hw, stride=(1, 1)) -> np.ndarray:
  return np.linalg.svd(oracle_matrix(kernel, input_hw, stride), compute_uv=False)


def _assert_spectrum_close(svs, expected):
  svs, expected = np.asarray(svs, np.float64), np.sort(np.asarray(expected, np.float64))[::-1]
  assert svs.shape == expected.shape
  assert np.all(np.diff(svs) <= 0), 'spectrum must be sorted in descending order'
  err = np.abs(svs - expected).max() / expected.max()
  assert err < _TOL, err


def _wrap_conv(x, kernel, stride):
  """Independent circular conv for the oracle check: wrap padding + lax 'VALID' convolution."""
  pads = [(0, 0)]
  for i in range(2):
    n, k, s = x.shape[1 + i], kernel.shape[i], stride[i]
    total = (_out_size(n, s) - 1) * s + k - n
    pads.append((max(total, 0) // 2, total - max(total, 0) // 2))
  xp = jnp.pad(x, pads + [(0, 0)], mode='wrap')
  return lax.conv_general_dilated(xp, kernel, stride, 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


# (kernel shape, input size, stride): cin ≠ cout both ways, 1×1, strided, kernel bigger than the input, odd and
# non-square inputs, a kernel that does not divide by the stride, stride 3.
CASES = [
    ((3, 3, 4, 5), (8, 8), 1),
    ((3, 3, 5, 3), (6, 8), 1),
    ((3, 3, 3, 4), (7, 5), 1),
    ((1, 1, 4, 6), (4, 4), 1),
    ((1, 1, 6, 4), (4, 4), 1),
    ((3, 3, 4, 6), (8, 8), 2),
    ((3, 3, 6, 3), (8, 6), 2),
    ((1, 1, 3, 8), (4, 4), 2),
    ((4, 4, 2, 3), (8, 8), 2),
    ((3, 3, 3, 2), (2, 2), 1),
    ((5, 5, 2, 3), (3, 3), 1),
    ((3, 3, 2, 3), (2, 2), 2),
    ((3, 3, 2, 2), (6, 6), 3),
]


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('kernel_shape,input_hw', [((3, 3, 2, 3), (6, 4)), ((3, 3, 2, 2), (2, 2))])
def test_oracle_is_the_wrap_around_convolution(kernel_shape, input_hw, stride):
  kernel, x = _rand(kernel_shape, 1), _rand((1, *input_hw, kernel_shape[2]), 2)
  y = np.asarray(_wrap_conv(jnp.asarray(x), jnp.asarray(kernel), (stride, stride)))
  y_oracle = oracle_matrix(kernel, input_hw, (stride, stride)) @ x.reshape(-1)
  np.testing.assert_allclose(y.reshape(-1), y_oracle, atol=1e-5)
  np.testing.assert_allclose(np.asarray(spectral.circular_conv(x, kernel, stride)).reshape(-1), y_oracle,
                             atol=1e-5)


@pytest.mark.parametrize('kernel_shape,input_hw,stride', CASES)
def test_conv_singular_values_match_oracle(kernel_shape, input_hw, stride):
  kernel = _rand(kernel_shape)
  svs = spectral.conv_singular_values(kernel, input_hw, layout='HWIO', stride=stride)
  kh, kw, cin, cout = kernel_shape
  assert svs.shape == ((input_hw[0] // stride) * (input_hw[1] // stride) * min(stride * stride * cin, cout),)
  _assert_spectrum_close(svs, oracle_svs(kernel, input_hw, (stride, stride)))


def test_pointwise_conv_repeats_the_matrix_spectrum():
  kernel = _rand((1, 1, 4, 6))
  svs = np.asarray(spectral.conv_singular_values(kernel, (3, 5), layout='HWIO'))
  matrix_svs = np.linalg.svd(kernel[0, 0], compute_uv=False)
  np.testing.assert_allclose(np.sort(svs), np.sort(np.tile(matrix_svs, 15)), rtol=1e-5)


def test_dense_singular_values():
  w = _rand((7, 4))
  np.testing.assert_allclose(spectral.dense_singular_values(w), np.linalg.svd(w, compute_uv=False), rtol=1e-5)


def test_stride_must_divide_input():
  with pytest.raises(ValueError, match='multiple of the stride'):
    spectral.conv_singular_values(_rand((3, 3, 2, 2)), (7, 7), layout='HWIO', stride=2)


# ------------------------------------------------------------------------------------------------- clipping


def _oracle_norm(kernel, input_hw, stride=1):
  return oracle_svs(np.asarray(kernel), input_hw, (stride, stride)).max()


def test_one_and_ten_rounds_on_random_3x3x4x5():
  """The documented sanity numbers: ≈ 1.36 after one round, ≈ 1.03 after ten (8×8 inputs, clip to 1)."""
  kernel = _rand((3, 3, 4, 5))
  norms = {r: _oracle_norm(spectral.clip_conv_kernel(kernel, 8, 1.0, layout='HWIO', rounds=r), (8, 8)) for r in (1, 10)}
  assert _oracle_norm(kernel, (8, 8)) > 10
  assert 1.2 < norms[1] < 1.5, norms
  assert 1.0 < norms[10] < 1.06, norms


@pytest.mark.parametrize('kernel_shape,input_hw,stride,rounds,tol', [
    ((3, 3, 4, 5), (8, 8), 1, 50, 0.01),
    ((3, 3, 4, 6), (8, 8), 2, 50, 0.01),
    ((3, 3, 3, 2), (2, 2), 1, 50, 0.01),
    ((3, 3, 2, 3), (2, 2), 2, 1, 1e-5),  # aliasing kernel on the 1×1 polyphase grid: exact in one round
    ((1, 1, 4, 6), (4, 4), 1, 1, 1e-5),   # 1×1 conv: exact in one round
    ((1, 1, 3, 8), (4, 4), 2, 1, 1e-5),
])
def test_clip_reaches_max_sv(kernel_shape, input_hw, stride, rounds, tol):
  kernel = 3 * _rand(kernel_shape)
  c = 1.0
  clipped = spectral.clip_conv_kernel(kernel, input_hw, c, layout='HWIO', rounds=rounds, stride=stride)
  assert clipped.shape == kernel.shape and clipped.dtype == kernel.dtype
  assert _oracle_norm(kernel, input_hw, stride) > 2 * c
  assert _oracle_norm(clipped, input_hw, stride) <= c * (1 + tol)


def test_clip_first_round_is_sedghi_projection():
  """For k ≤ n and stride 1 one round is: fft2, clip, ifft2, real part, cut to the k×k support."""
  kernel, c = _rand((3, 3, 4, 5)), 1.5
  f = np.fft.fft2(np.asarray(kernel, np.float64), s=(8, 8), axes=(0, 1))
  u, s, vh = np.linalg.svd(f, full_matrices=False)
  f_clipped = np.einsum('...ik,...k,...kj->...ij', u, np.minimum(s, c), vh)
  expected = np.real(np.fft.ifft2(f_clipped, axes=(0, 1)))[:3, :3]
  np.testing.assert_allclose(spectral.clip_conv_kernel(kernel, 8, c, layout='HWIO'), expected, atol=1e-5)


@pytest.mark.parametrize('kernel_shape,input_hw,stride', [((3, 3, 4, 5), (8, 8), 1), ((3, 3, 4, 6), (8, 8), 2),
                                                         ((3, 3, 3, 2), (2, 2), 1), ((1, 1, 4, 6), (4, 4), 1)])
def test_clip_leaves_kernel_under_max_sv_unchanged(kernel_shape, input_hw, stride):
  kernel = _rand(kernel_shape)
  kernel = (kernel / _oracle_norm(kernel, input_hw, stride) * 0.9).astype(np.float32)
  clipped = spectral.clip_conv_kernel(kernel, input_hw, 1.0, layout='HWIO', rounds=3, stride=stride)
  np.testing.assert_array_equal(np.asarray(clipped), kernel)


@pytest.mark.parametrize('kernel_shape', [(3, 3, 2, 3), (1, 1, 2, 3)])
def test_zero_rounds_is_identity(kernel_shape):
  kernel = 5 * _rand(kernel_shape)
  np.testing.assert_array_equal(np.asarray(spectral.clip_conv_kernel(kernel, 4, 0.1, layout='HWIO', rounds=0)), kernel)


def test_clip_dense_kernel():
  w = 3 * _rand((6, 4))
  clipped = np.asarray(spectral.clip_dense_kernel(w, 1.0))
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(clipped, (u * np.minimum(s, 1.0)) @ vh, atol=1e-5)
  small = (w / np.linalg.norm(w, 2) * 0.5).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(spectral.clip_dense_kernel(small, 1.0)), small)


# ------------------------------------------------------------------------------------------------- models


class TinyNet(nn.Module):
  """The models' conventions (arreg_jax.models.layers.Conv, flax Dense) plus a plain flax Conv and a shared conv."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(Conv(4, (3, 3), name='stem')(x))                       # 3→4 at 8×8
    shared = Conv(4, (3, 3), name='shared')
    x = nn.relu(shared(x))                                             # 4→4 at 8×8
    x = nn.relu(shared(x))                                             # same module, same size: listed once
    x = nn.relu(Conv(6, (3, 3), (2, 2), name='down')(x))               # 4→6 stride 2 at 8×8
    x = nn.relu(Conv(5, (1, 1), name='pointwise')(x))                  # 6→5 at 4×4
    x = nn.relu(nn.Conv(7, (3, 3), strides=2, padding='SAME', name='flax_down')(x))  # 5→7 stride 2 at 4×4
    x = nn.relu(Conv(7, (3, 3), name='tiny')(x))                       # 7→7, 3×3 on 2×2
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3, name='head')(x)


_EXPECTED_LAYERS = [  # name, kind, stride, input_hw
    ('stem', 'conv', (1, 1), (8, 8)), ('shared', 'conv', (1, 1), (8, 8)), ('down', 'conv', (2, 2), (8, 8)),
    ('pointwise', 'conv', (1, 1), (4, 4)), ('flax_down', 'conv', (2, 2), (4, 4)), ('tiny', 'conv', (1, 1), (2, 2)),
    ('head', 'dense', None, None),
]


def _random_variables(module, input_shape, seed=0):
  """Variables with the model's structure and random normal values (cheaper than compiling its init)."""
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) / 3), abstract)


@pytest.fixture(scope='module')
def tiny():
  model = TinyNet()
  return model, _random_variables(model, (1, 8, 8, 3))


def test_layer_specs_of_tiny_model(tiny):
  model, variables = tiny
  specs = spectral.layer_specs(model, variables, (1, 8, 8, 3))
  assert [(s.name, s.kind, s.stride, s.input_hw) for s in specs] == _EXPECTED_LAYERS
  assert all(s.exact for s in specs)
  assert [s.path for s in specs] == [(name, 'kernel') for name, *_ in _EXPECTED_LAYERS]  # in variables['params']
  # an apply function (as arreg_jax.models.create returns) gives the same specs, jitted or not; its params are the
  # whole variables dict, so the paths start with the 'params' collection
  apply_fn = lambda v, x, *, train=False: model.apply(v, x, train=train)
  in_params = lambda found: tuple(dataclasses.replace(s, path=s.path[1:]) for s in found)
  found = spectral.layer_specs(apply_fn, variables, (2, 8, 8, 3), train=False)
  assert all(s.path[0] == 'params' for s in found) and in_params(found) == specs
  jitted = jax.jit(apply_fn)
  jitted(variables, jnp.zeros((1, 8, 8, 3)))  # a cached trace must not hide the layers
  assert in_params(spectral.layer_specs(jitted, variables, (1, 8, 8, 3))) == specs


def test_layer_singular_values_match_oracle(tiny):
  model, variables = tiny
  records = spectral.layer_singular_values(model, variables, (1, 8, 8, 3))
  assert [r.name for r in records] == [name for name, *_ in _EXPECTED_LAYERS]
  for r in records:
    kernel = np.asarray(variables['params'][r.name]['kernel'])
    if r.kind == 'dense':
      expected = np.linalg.svd(kernel, compute_uv=False)
    else:
      expected = oracle_svs(kernel, r.input_hw, r.stride)
    assert r.exact
    _assert_spectrum_close(r.singular_values, expected)
    stats = spectral.sv_statistics(r)
    np.testing.assert_allclose([stats['mean'], stats['std']], [expected.mean(), expected.std()], rtol=1e-4)
    assert stats['count'] == expected.size


def test_non_divisible_input_is_flagged_inexact():
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Conv(2, (3, 3), (2, 2))(x)
  variables = _random_variables(Odd(), (1, 7, 7, 2))
  (record,) = spectral.layer_singular_values(Odd(), variables, (1, 7, 7, 2))
  assert not record.exact and record.input_hw == (7, 7)
  assert record.singular_values.size == 4 * 4 * 2  # analyzed on 8×8


def test_clip_params_batched_equals_per_layer(tiny):
  model, variables = tiny
  params = variables['params']
  specs = spectral.layer_specs(model, variables, (1, 8, 8, 3))
  # add a second layer of the stem's shape so that a group really has several members
  params = dict(params, stem2={'kernel': 2 * params['stem']['kernel'] + 0.1})
  specs = specs + (spectral.LayerSpec(('stem2', 'kernel'), 'conv', specs[0].kernel_shape, (1, 1), (8, 8)),)
  params = jax.tree.map(lambda p: 3 * p + 0.05, params)  # make every layer exceed c (Dense init is not zero)
  c, rounds = 0.8, 2
  clipped = spectral.clip_params(params, specs, c, rounds=rounds)
  assert jax.tree.structure(clipped) == jax.tree.structure(params)
  for spec in specs:
    got = np.asarray(clipped[spec.path[0]]['kernel'])
    kernel = params[spec.path[0]]['kernel']
    if spec.kind == 'dense':
      want = spectral.clip_dense_kernel(kernel, c)
    else:
      want = spectral.clip_conv_kernel(kernel, spec.input_hw, c, layout='HWIO', rounds=rounds, stride=spec.stride)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, err_msg=spec.name)
    assert not np.allclose(got, np.asarray(kernel))
  # untouched leaves come back as they were
  np.testing.assert_array_equal(clipped['head']['bias'], params['head']['bias'])
  np.testing.assert_array_equal(clipped['flax_down']['bias'], params['flax_down']['bias'])
  # one compiled function per (specs, rounds): a new c is a new argument, not a new program
  before = spectral_model._compiled_clip.cache_info().misses
  spectral.clip_params(params, specs, 2.0, rounds=rounds)
  assert spectral_model._compiled_clip.cache_info().misses == before


def test_chunked_groups_match_vmapped_groups(tiny, monkeypatch):
  """Groups too big for one vmapped chunk go through lax.map(batch_size=...): same results."""
  model, variables = tiny
  params = jax.tree.map(lambda p: 3 * p, variables['params'])
  specs = {s.name: s for s in spectral.layer_specs(model, variables, (1, 8, 8, 3))}
  params = dict(params, stem2={'kernel': params['stem']['kernel'] + 0.1})
  specs = (specs['stem'], spectral.LayerSpec(('stem2', 'kernel'), 'conv', specs['stem'].kernel_shape, (1, 1), (8, 8)),
           specs['down'], specs['head'])
  want_clip = spectral.clip_params(params, specs, 0.8, rounds=2)
  want_svs = spectral_model._compiled_svs(specs)(params)
  monkeypatch.setattr(spectral_model, '_CHUNK_BYTES', 1)
  spectral_model._compiled_clip.cache_clear()
  spectral_model._compiled_svs.cache_clear()
  try:
    got_clip = spectral.clip_params(params, specs, 0.8, rounds=2)
    got_svs = spectral_model._compiled_svs(specs)(params)
  finally:
    spectral_model._compiled_clip.cache_clear()
    spectral_model._compiled_svs.cache_clear()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_clip, want_clip)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_svs, want_svs)


def test_clip_params_refuses_one_kernel_at_two_sizes():
  specs = (spectral.LayerSpec(('a', 'kernel'), 'conv', (3, 3, 2, 2), (1, 1), (8, 8)),
           spectral.LayerSpec(('a', 'kernel'), 'conv', (3, 3, 2, 2), (1, 1), (4, 4)))
  with pytest.raises(ValueError, match='two input sizes'):
    spectral.clip_params({'a': {'kernel': jnp.zeros((3, 3, 2, 2))}}, specs, 1.0)


def test_real_resnet_layer_specs():
  models = pytest.importorskip('arreg_jax.models')
  module = models.get_module('resnet20', num_classes=10)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  specs = spectral.layer_specs(module, abstract, (1, 32, 32, 3), train=False)
  convs = [s for s in specs if s.kind == 'conv']
  assert len(convs) == 19 and len(specs) == 20 and specs[-1].kind == 'dense'
  assert [s.input_hw[0] for s in convs] == [32] * 7 + [32] + [16] * 5 + [16] + [8] * 5
  assert [s.stride[0] for s in convs].count(2) == 2


_RESNET56_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from arreg_jax import models, spectral
module = models.get_module('resnet56', num_classes=10)
abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
specs = spectral.layer_specs(module, abstract, (1, 32, 32, 3))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32) / 10, abstract['params'])
records = spectral.layer_singular_values(module, {'params': params}, (1, 32, 32, 3), specs=specs)
print('OK', len(records))
"""


def test_resnet56_in_one_program_does_not_hang():
  """Regression: several batched LAPACK SVDs in flight at once deadlocked XLA:CPU's 2-thread pool (see _after).

  Runs in a subprocess so that a hang fails the test instead of stalling the suite.
  """
  pytest.importorskip('arreg_jax.models')
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1')
  try:
    proc = subprocess.run([sys.executable, '-c', _RESNET56_SCRIPT], capture_output=True, text=True, timeout=240,
                          env=env)
  except subprocess.TimeoutExpired:
    pytest.fail('all ResNet-56 spectra in one program did not finish in 240 s (XLA:CPU pool deadlock?)')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'OK 56' in proc.stdout


# ------------------------------------------------------------------------------------------- power iteration


def test_power_iteration_and_spectral_normalize():
  w = jnp.asarray(_rand((6, 9)))
  sigma, u = spectral.power_iteration(w, jnp.ones(6), n_iter=100)
  np.testing.assert_allclose(sigma, np.linalg.norm(np.asarray(w), 2), rtol=1e-5)
  kernel = jnp.asarray(_rand((3, 3, 4, 5)))
  normalized, u_new, sigma = spectral.spectral_normalize(kernel, jnp.ones(5), n_iter=100)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(spectral.miyato_matrix(normalized)), 2), 1.0, rtol=1e-5)
  assert u_new.shape == (5,)
  small, _, _ = spectral.spectral_normalize(kernel / 100, u_new, n_iter=5, only_shrink=True)
  np.testing.assert_allclose(small, kernel / 100, rtol=1e-6)
  # Miyato's reshaped matrix R bounds the operator norm: ‖R‖ ≤ ‖conv‖ ≤ √(kh·kw)·‖R‖
  op_norm = _oracle_norm(kernel, (8, 8))
  r_norm = np.linalg.norm(np.asarray(spectral.miyato_matrix(kernel)), 2)
  assert r_norm <= op_norm * (1 + 1e-6) and op_norm <= 3 * r_norm


@pytest.mark.parametrize('stride', [1, 2])
def test_conv_power_iteration_finds_operator_norm(stride):
  kernel = _rand((3, 3, 4, 5))
  x0 = jnp.asarray(_rand((8, 8, 4), 3))
  sigma, x = spectral.conv_power_iteration(kernel, x0, n_iter=300, stride=stride)
  assert x.shape == x0.shape
  np.testing.assert_allclose(sigma, _oracle_norm(kernel, (8, 8), stride), rtol=1e-3)


def test_spectral_complexity_and_statistics():
  layers = [np.array([2.0, 1.0]), np.array([3.0, 0.5, 0.1]), jnp.array([0.5])]
  assert spectral.spectral_complexity(layers) == pytest.approx(3.0)
  assert spectral.log_spectral_complexity(layers) == pytest.approx(np.log(3.0))
  assert spectral.log_spectral_complexity([np.zeros(3)]) == -np.inf
  stats = spectral.sv_statistics(np.array([1.0, 2.0, 3.0, 4.0]))
  assert stats == pytest.approx({'std': np.std([1, 2, 3, 4]), 'mean': 2.5, 'min': 1.0, 'max': 4.0, 'count': 4})
