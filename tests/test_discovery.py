"""Layer discovery from the traced program: the layers frameworks write in unusual ways, and every case that used to
give a silently wrong answer now gives the right one (checked against the dense-Jacobian oracle) or a clear error."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from arreg_jax import adapters, models, spectral
from oracles import assert_spectrum, conv_oracle_matrix, conv_oracle_svs

HWIO = ('NHWC', 'HWIO', 'NHWC')


def _rand(shape, seed=0, scale=0.5):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _linen(module, x_shape, seed=0):
  abstract = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(x_shape, jnp.float32))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) / 2), abstract)
  return adapters.linen(module, variables)


class _Transposed(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.ConvTranspose(3, (3, 3), strides=(2, 2), name='up')(x).mean(axis=(1, 2))


def test_a_transposed_conv_is_analyzed_exactly_not_as_a_forward_conv():
  model = _linen(_Transposed(), (1, 4, 4, 5))
  (spec,) = spectral.layer_specs(*model, (1, 4, 4, 5))
  assert spec.kind == 'conv_transpose' and spec.stride == (2, 2) and spec.input_hw == (4, 4)
  kernel = np.asarray(model.params['params']['up']['kernel'])
  (rec,) = spectral.layer_singular_values(*model, (1, 4, 4, 5), specs=(spec,))
  expected = conv_oracle_svs(kernel, HWIO, (4, 4), transposed_by=2)
  assert_spectrum(rec.singular_values, expected)
  # the forward-conv reading of the same kernel (the old answer) is a different operator
  forward = conv_oracle_svs(kernel, HWIO, (4, 4))
  assert abs(forward.max() - expected.max()) > 0.05 * expected.max()


def test_lax_conv_transpose_with_a_flipped_kernel_and_its_clipping():
  def apply_fn(p, x):
    return lax.conv_transpose(x, p['k'], (2, 2), 'SAME', transpose_kernel=True).mean(axis=(1, 2))

  k = _rand((3, 3, 4, 2), 1, 1.0)  # transpose_kernel: applied flipped and with in/out swapped
  params = {'k': jnp.asarray(k)}
  (spec,) = spectral.layer_specs(jax.jit(apply_fn), params, (1, 4, 4, 2))
  assert spec.kind == 'conv_transpose'
  applied = k[::-1, ::-1].transpose(0, 1, 3, 2)
  (rec,) = spectral.layer_singular_values(apply_fn, params, (1, 4, 4, 2), specs=(spec,))
  assert_spectrum(rec.singular_values, conv_oracle_svs(applied, HWIO, (4, 4), transposed_by=2))
  clipped = np.asarray(spectral.clip_params(params, (spec,), 1.0, rounds=30)['k'])
  top = conv_oracle_svs(clipped[::-1, ::-1].transpose(0, 1, 3, 2), HWIO, (4, 4), transposed_by=2).max()
  assert rec.singular_values.max() > 2 and top <= 1.03


class _DenseGeneral(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.DenseGeneral((3, 4), name='expand')(x.reshape(x.shape[0], -1))      # kernel (in, 3, 4)
    return nn.DenseGeneral(5, axis=(-2, -1), name='reduce')(jnp.tanh(x))      # kernel (3, 4, 5)


def test_dense_general_kernels_are_matrices_of_contracted_by_other_axes():
  model = _linen(_DenseGeneral(), (1, 2, 3, 1))
  specs = spectral.layer_specs(*model, (1, 2, 3, 1))
  assert [(s.name, s.kind, s.kernel_shape) for s in specs] == [('params/expand', 'dense', (6, 12)),
                                                               ('params/reduce', 'dense', (12, 5))]
  p = model.params['params']
  for rec, matrix in zip(spectral.layer_singular_values(*model, (1, 2, 3, 1), specs=specs),
                         (np.asarray(p['expand']['kernel']).reshape(6, 12),
                          np.asarray(p['reduce']['kernel']).reshape(12, 5))):
    assert_spectrum(rec.singular_values, np.linalg.svd(matrix, compute_uv=False))


@pytest.mark.parametrize('groups', [2, 4])
def test_grouped_and_depthwise_convs_are_direct_sums(groups):
  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(8, (3, 3), strides=2, feature_group_count=groups, name='g')(x).mean(axis=(1, 2))

  model = _linen(Grouped(), (1, 6, 6, 4))
  (spec,) = spectral.layer_specs(*model, (1, 6, 6, 4))
  assert spec.groups == groups and spec.kernel_shape == (3, 3, 4 // groups, 8)
  kernel = np.asarray(model.params['params']['g']['kernel'])
  (rec,) = spectral.layer_singular_values(*model, (1, 6, 6, 4), specs=(spec,))
  assert_spectrum(rec.singular_values, conv_oracle_svs(kernel, HWIO, (6, 6), (2, 2), groups=groups))
  clipped = spectral.clip_params(model.params, (spec,), 0.5, rounds=30)['params']['g']['kernel']
  assert conv_oracle_svs(clipped, HWIO, (6, 6), (2, 2), groups=groups).max() <= 0.5 * 1.03


def test_a_one_dimensional_conv_is_a_conv_of_height_one():
  class Conv1D(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,), strides=2, name='c')(x).mean(axis=1)

  model = _linen(Conv1D(), (1, 8, 2))
  (spec,) = spectral.layer_specs(*model, (1, 8, 2))
  assert spec.input_hw == (1, 8) and spec.stride == (1, 2)
  kernel = np.asarray(model.params['params']['c']['kernel'])[None]  # (1, 3, 2, 4): height 1
  (rec,) = spectral.layer_singular_values(*model, (1, 8, 2), specs=(spec,))
  assert_spectrum(rec.singular_values, conv_oracle_svs(kernel, HWIO, (1, 8), (1, 2)))


def test_a_dilated_conv_is_refused_by_name():
  class Dilated(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(2, (3, 3), kernel_dilation=2, name='d')(x).mean(axis=(1, 2))

  model = _linen(Dilated(), (1, 8, 8, 2))
  with pytest.raises(NotImplementedError, match='dilated'):
    spectral.layer_specs(*model, (1, 8, 8, 2))


def test_spectral_normalization_is_analyzed_as_applied_and_not_clipped():
  module = models.get_module('small_cnn_sn', num_classes=10)
  abstract = jax.eval_shape(lambda k, x: module.init(k, x, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) / 4), abstract)
  variables['batch_stats'] = jax.tree.map(lambda u: u / jnp.linalg.norm(u), variables['batch_stats'])
  specs = spectral.layer_specs(module, variables, (1, 28, 28, 1), train=False)
  assert all(s.recipe is not None and s.recipe.via == 'div' for s in specs)
  records = spectral.layer_singular_values(module, variables, (1, 28, 28, 1), specs=specs)
  folded = models.fold_spectral_norm(variables)['params']  # the kernels the forward pass applies: W / σ
  for spec, rec in zip(specs, records):
    kernel = folded[spec.path[0]]['kernel']
    if spec.kind == 'dense':
      expected = np.asarray(spectral.dense_singular_values(kernel))
    else:
      expected = np.asarray(spectral.conv_singular_values(kernel, spec.input_hw, layout='HWIO'))
    np.testing.assert_allclose(rec.singular_values, expected, rtol=2e-6, atol=1e-7, err_msg=spec.name)
  raw = np.asarray(spectral.dense_singular_values(variables['params']['head']['kernel']))
  assert not np.allclose(records[-1].singular_values, raw, rtol=1e-3)  # the raw kernel is not what is applied
  with pytest.raises(ValueError, match=r'conv1 .*`div`'):
    spectral.clip_params(variables['params'], specs, 1.0)


def test_a_weight_made_of_two_parameters_is_analyzed_as_their_product():
  def apply_fn(p, x):
    return x.reshape(x.shape[0], -1) @ (p['a'] @ p['b'])

  params = {'a': jnp.asarray(_rand((6, 2), 1)), 'b': jnp.asarray(_rand((2, 4), 2))}
  (spec,) = spectral.layer_specs(apply_fn, params, (1, 6))
  (rec,) = spectral.layer_singular_values(apply_fn, params, (1, 6), specs=(spec,))
  assert_spectrum(rec.singular_values, np.linalg.svd(np.asarray(params['a'] @ params['b']), compute_uv=False))
  with pytest.raises(ValueError, match='dot_general'):
    spectral.clip_params(params, (spec,), 1.0)


def test_scanned_layers_are_one_layer_per_slice_and_clip_slice_by_slice():
  def apply_fn(p, x):
    h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p['ws'])
    return h @ p['head']

  params = {'ws': jnp.asarray(_rand((3, 4, 4), 1, 1.0)), 'head': jnp.asarray(_rand((4, 2), 2))}
  specs = spectral.layer_specs(apply_fn, params, (1, 4))
  assert [s.name for s in specs] == ['ws', 'ws', 'ws', 'head'] and len(set(specs)) == 4
  records = spectral.layer_singular_values(apply_fn, params, (1, 4), specs=specs)
  for i in range(3):
    assert_spectrum(records[i].singular_values, np.linalg.svd(np.asarray(params['ws'][i]), compute_uv=False))
  clipped = spectral.clip_params(params, specs, 0.7)
  for i in range(3):
    assert np.linalg.svd(np.asarray(clipped['ws'][i]), compute_uv=False).max() <= 0.7 * (1 + 1e-5)


def test_loops_with_a_traced_trip_count():
  def shared(p, x):  # one weight applied n times: one layer
    return lax.fori_loop(0, x.shape[0] * 0 + p['n'], lambda i, h: jnp.tanh(h @ p['w']), x)

  def indexed(p, x):  # W[i]: a different weight each iteration, which the analysis cannot see
    return lax.fori_loop(0, p['n'], lambda i, h: jnp.tanh(h @ p['w'][i]), x)

  params = {'w': jnp.asarray(_rand((4, 4))), 'n': jnp.int32(3)}
  (spec,) = spectral.layer_specs(shared, params, (1, 4))
  assert spec.path == ('w',) and spec.kind == 'dense'
  with pytest.raises(NotImplementedError, match='loop variable'):
    spectral.layer_specs(indexed, {'w': jnp.asarray(_rand((3, 4, 4))), 'n': jnp.int32(3)}, (1, 4))


def test_layers_inside_cond_branches_are_refused():
  def apply_fn(p, x):
    return lax.cond(x.sum() > 0, lambda h: h @ p['w'], lambda h: h @ (2 * p['w']), x)

  with pytest.raises(NotImplementedError, match='lax.cond'):
    spectral.layer_specs(apply_fn, {'w': jnp.asarray(_rand((4, 4)))}, (1, 4))


def test_constant_weights_and_activation_products_are_not_layers_of_params():
  fixed = jnp.asarray(_rand((4, 4), 3))

  def apply_fn(p, x):
    scores = x @ x.T                      # both operands depend on the input: not a weight layer
    return (scores @ x) @ fixed @ p['w']  # a closed-over constant: reported, not listed

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    (spec,) = spectral.layer_specs(apply_fn, {'w': jnp.asarray(_rand((4, 2)))}, (3, 4))
  assert spec.path == ('w',)
  assert any('constant weight' in str(w.message) for w in caught)
  with pytest.warns(UserWarning, match='constant weight'), pytest.raises(ValueError, match='no convolution'):
    spectral.layer_specs(lambda p, x: x @ fixed, {'w': jnp.zeros(3)}, (1, 4))


def test_per_head_einsum_weights_are_refused():
  def apply_fn(p, x):
    return jnp.einsum('bhd,hde->bhe', x, p['w'])

  with pytest.raises(NotImplementedError, match='batch axes'):
    spectral.layer_specs(apply_fn, {'w': jnp.asarray(_rand((2, 3, 4)))}, (1, 2, 3))


def test_models_and_params_of_the_wrong_kind_get_the_fix():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  eqx = pytest.importorskip('equinox')
  with pytest.raises(TypeError, match=r'adapters\.nnx'):
    spectral.layer_singular_values(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), None, (1, 3))
  mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
  with pytest.raises(TypeError, match=r'adapters\.equinox'):
    spectral.layer_specs(mlp, None, (1, 3))
  with pytest.raises(TypeError, match='not an array at activation'):
    spectral.layer_specs(lambda p, x: jax.vmap(p)(x), mlp, (1, 3))
  model = adapters.equinox(mlp)
  with pytest.raises(TypeError, match='unpack it'):
    spectral.layer_specs(model, model.params, (1, 3))
  assert [s.kernel_shape for s in spectral.layer_specs(*model, (1, 3))] == [(3, 4), (4, 2)]
  with pytest.raises(ValueError, match='input_shape'):
    spectral.layer_specs(*model, (1, 0))


def test_single_kernel_functions_need_the_layout():
  hwio = _rand((3, 3, 3, 3), 4)  # square in every axis: its shape cannot tell HWIO from OIHW
  oihw = hwio.transpose(3, 2, 0, 1)
  want = conv_oracle_svs(hwio, HWIO, (5, 5))
  assert_spectrum(spectral.conv_singular_values(oihw, 5, layout='OIHW'), want)
  assert_spectrum(spectral.conv_singular_values(hwio, 5, layout='HWIO'), want)
  with pytest.raises(TypeError, match='layout'):
    spectral.conv_singular_values(oihw, 5)  # pylint: disable=missing-kwoa
  with pytest.raises(ValueError, match='H, W, I, O'):
    spectral.conv_singular_values(oihw, 5, layout='OIHH')
  clipped = np.asarray(spectral.clip_conv_kernel(oihw, 5, 1.0, layout='OIHW', rounds=30))
  assert conv_oracle_matrix(clipped.transpose(2, 3, 1, 0), HWIO, (5, 5)).shape == (75, 75)
  assert conv_oracle_svs(clipped.transpose(2, 3, 1, 0), HWIO, (5, 5)).max() <= 1.03


def test_an_nnx_module_wrapped_as_linen_is_read_like_any_linen_module():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.c = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
      self.d = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
      return self.d(nnx.relu(self.c(x)).reshape(len(x), -1))

  module = nnx.bridge.ToLinen(Net, skip_rng=False)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
  specs = spectral.layer_specs(module, variables, (1, 8, 8, 2))
  assert [(s.name, s.kind, s.stride, s.input_hw) for s in specs] == [('c', 'conv', (2, 2), (8, 8)),
                                                                     ('d', 'dense', None, None)]
  kernel = np.asarray(variables['params']['c']['kernel'])
  (conv, _) = spectral.layer_singular_values(module, variables, (1, 8, 8, 2), specs=specs)
  assert_spectrum(conv.singular_values, conv_oracle_svs(kernel, HWIO, (8, 8), (2, 2)))
  clipped = spectral.clip_params(variables['params'], specs, 0.5)
  assert np.linalg.svd(np.asarray(clipped['d']['kernel']), compute_uv=False).max() <= 0.5 * (1 + 1e-5)


def test_a_layer_that_pads_its_input_itself_applies_to_the_unpadded_size():
  class Circular(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(3, (3, 3), padding='CIRCULAR', name='c')(x).mean(axis=(1, 2))

  model = _linen(Circular(), (1, 6, 6, 2))
  (spec,) = spectral.layer_specs(*model, (1, 6, 6, 2))
  assert spec.input_hw == (6, 6) and spec.layout.endswith('padded before')
  # with circular padding the layer IS the wrap-around operator: its own Jacobian is the oracle
  kernel = model.params['params']['c']['kernel']
  layer = lambda x: nn.Conv(3, (3, 3), padding='CIRCULAR').apply({'params': {'kernel': kernel,
                                                                  'bias': jnp.zeros(3)}}, x)
  jac = np.asarray(jax.jacfwd(layer)(jnp.zeros((1, 6, 6, 2))), np.float64).reshape(6 * 6 * 3, 6 * 6 * 2)
  (rec,) = spectral.layer_singular_values(*model, (1, 6, 6, 2), specs=(spec,))
  assert_spectrum(rec.singular_values, np.linalg.svd(jac, compute_uv=False))
  eqx = pytest.importorskip('equinox')
  conv = eqx.nn.Conv2d(2, 3, 3, padding=1, padding_mode='REFLECT', key=jax.random.key(0))
  (spec,) = spectral.layer_specs(*adapters.equinox(conv), (1, 2, 6, 6))
  assert spec.input_hw == (6, 6)


def test_layers_inside_nested_programs_are_found():
  @jax.custom_jvp
  def scaled(w):  # a weight through a custom_jvp function: a recipe (analyzed as applied)
    return 2.0 * w

  scaled.defjvp(lambda primals, tangents: (scaled(primals[0]), 2.0 * tangents[0]))

  def apply_fn(p, x):
    h = jax.checkpoint(lambda z: jnp.tanh(z @ p['w1']))(x)      # remat
    h = jax.jit(lambda z, w: z @ w.T)(h, p['w2'])                # jit, an (out, in) weight
    return h @ scaled(p['w3'])

  params = {'w1': jnp.asarray(_rand((4, 5), 1)), 'w2': jnp.asarray(_rand((6, 5), 2)),
            'w3': jnp.asarray(_rand((6, 3), 3))}
  specs = spectral.layer_specs(apply_fn, params, (2, 4))
  assert [(s.name, s.kernel_shape, s.recipe is None) for s in specs] == [('w1', (4, 5), True),
                                                                         ('w2', (5, 6), True),
                                                                         ('w3', (6, 3), False)]
  records = spectral.layer_singular_values(apply_fn, params, (2, 4), specs=specs)
  for rec, matrix in zip(records, (params['w1'], params['w2'], 2 * params['w3'])):
    assert_spectrum(rec.singular_values, np.linalg.svd(np.asarray(matrix), compute_uv=False))
