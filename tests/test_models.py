"""Models: parameter counts against hand-computed values, output shapes, Fixup's identity-at-init, the conv VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from arreg_jax import models
from arreg_jax.errors import ConfigError
from arreg_jax.models import layers, resnet


def _count(variables):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))


def _cifar_resnet_params(depth, num_classes, bn=False):
  """He et al.'s CIFAR ResNet, option-A shortcuts, bias-free convs; BN adds (γ, β) per channel."""
  n = (depth - 2) // 6
  conv = 3 * 3 * 3 * 16
  bn_params = 2 * 16 if bn else 0
  cin = 16
  for c in (16, 32, 64):
    for _ in range(n):
      conv += 9 * cin * c + 9 * c * c
      bn_params += 4 * c if bn else 0
      cin = c
  return conv + bn_params + 64 * num_classes + num_classes


def _wrn50_2_params(num_classes):
  """Bottlenecks [3,4,6,3], 3×3 width 2·planes, output 4·planes, 1×1 projection shortcut + BN on shape change."""
  total = 3 * 3 * 3 * 64 + 2 * 64  # stem conv + BN
  cin = 64
  for g, units in enumerate((3, 4, 6, 3)):
    planes = 64 * 2 ** g
    width, out = 2 * planes, 4 * planes
    for u in range(units):
      total += cin * width + 2 * width + 9 * width * width + 2 * width + width * out + 2 * out
      if u == 0:
        total += cin * out + 2 * out
      cin = out
  return total + 2048 * num_classes + num_classes


def _vgg_params(convs, num_classes, hidden=512):
  """VGG without BN: 3×3 convs with bias on 3 input channels, 32 → 1 pixel after five pools, FC-512 ×2 + head."""
  total, cin = 0, 3
  for c in convs:
    total += 9 * cin * c + c
    cin = c
  return total + cin * hidden + hidden + hidden * hidden + hidden + hidden * num_classes + num_classes


VGG16 = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG19 = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)


@pytest.mark.parametrize('name,num_classes,expected', [
    ('vgg16', 10, _vgg_params(VGG16, 10)),
    ('vgg16_sn', 10, _vgg_params(VGG16, 10)),
    ('vgg19', 100, _vgg_params(VGG19, 100)),
    ('vgg19_sn', 100, _vgg_params(VGG19, 100)),
    ('mlp', 10, 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10),
    ('logreg', 2, 784 * 2 + 2),
    ('cifar_cnn', 10, 9 * 3 * 32 + 32 + 9 * 32 * 64 + 64 + 9 * 64 * 128 + 128 + 4 * 4 * 128 * 256 + 256
     + 256 * 10 + 10),
    ('lenet_sn', 10, 5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 7 * 7 * 64 * 1024 + 1024 + 1024 * 10 + 10),
    ('resnet20', 10, _cifar_resnet_params(20, 10)),
    ('resnet56', 10, _cifar_resnet_params(56, 10)),
    ('resnet56', 100, _cifar_resnet_params(56, 100)),
    ('resnet110', 10, _cifar_resnet_params(110, 10)),
    ('resnet56_bn', 10, _cifar_resnet_params(56, 10, bn=True)),
    ('lenet', 10, 5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 7 * 7 * 64 * 1024 + 1024 + 1024 * 10 + 10),
    ('small_cnn', 10, 9 * 16 + 16 + 9 * 16 * 32 + 32 + 7 * 7 * 32 * 128 + 128 + 128 * 10 + 10),
])
def test_parameter_counts(name, num_classes, expected):
  params = jax.eval_shape(lambda: models.create(name, num_classes=num_classes, key=jax.random.key(0))[1])
  assert _count(params) == expected


def test_vgg_known_totals():
  # VGG-16 (13 convs) has 14,714,688 conv parameters (torchvision's vgg16 .features); 13 + 3 and 16 + 3 layers.
  assert _vgg_params(VGG16, 10) - (512 * 512 + 512) * 2 - 512 * 10 - 10 == 14_714_688
  assert len(VGG16) + 3 == 16 and len(VGG19) + 3 == 19


def test_spectral_norm_models_keep_u_in_batch_stats():
  shapes = jax.eval_shape(lambda: models.create('vgg16_sn', num_classes=10, key=jax.random.key(0))[1])
  u = shapes['batch_stats']
  assert len(u) == 16 and all(set(v) == {'sn_u'} for v in u.values())
  assert u['conv1']['sn_u'].shape == (64,) and u['head']['sn_u'].shape == (10,)


def test_known_totals():
  # Published sizes: ResNet-56 ≈ 0.85 M, ResNet-110 ≈ 1.7 M parameters (He et al. 2016, Table 6).
  assert _cifar_resnet_params(56, 10) == 848_954
  assert _cifar_resnet_params(110, 10) == 1_719_866
  # torchvision's wide_resnet50_2 has 68,883,240 parameters with a 7×7 stem and 1000 classes.
  assert _wrn50_2_params(1000) - 2048 * 1000 - 1000 + 7 * 7 * 3 * 64 - 3 * 3 * 3 * 64 + 2048 * 1000 + 1000 \
      == 68_883_240


def test_wrn50_2_parameter_count():
  shapes = jax.eval_shape(lambda: models.create('wrn50_2', num_classes=200, key=jax.random.key(0))[1])
  assert _count(shapes) == _wrn50_2_params(200) == 67_236_360
  assert 'batch_stats' in shapes


@pytest.mark.parametrize('name,shape,classes', [
    ('small_cnn', (28, 28, 1), 10), ('lenet', (28, 28, 1), 10), ('resnet20', (32, 32, 3), 100),
    ('resnet20_bn', (32, 32, 3), 10), ('vgg_smoke', (32, 32, 3), 10), ('vgg_smoke_sn', (32, 32, 3), 100),
    ('mlp', (28, 28, 1), 10), ('logreg', (28, 28, 1), 2), ('small_cnn_sn', (28, 28, 1), 10),
])
def test_output_shapes_and_dtype(name, shape, classes):
  apply_fn, variables = models.create(name, num_classes=classes, key=jax.random.key(1))
  x = jax.random.uniform(jax.random.key(2), (3, *shape))
  for train in (False, True):
    logits = apply_fn(variables, x, train=train)
    assert logits.shape == (3, classes) and logits.dtype == jnp.float32


def test_wrn_output_shape():
  module = models.get_module('wrn50_2', num_classes=200)
  out = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), jnp.zeros((2, 56, 56, 3)))[0])
  assert out.shape == (2, 200)


def test_fixup_blocks_are_identity_at_init():
  """Fixup zero-initializes each branch's last conv: an untrained block maps x ≥ 0 to relu(x + 0) = x."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))
  block = resnet.BasicBlock(features=16, strides=1, num_branches=9, use_bn=False)
  v = block.init(jax.random.key(1), x, train=False)
  np.testing.assert_array_equal(block.apply(v, x, train=False), x)
  assert not np.any(v['params']['conv2']['kernel'])
  assert np.any(v['params']['conv1']['kernel'])
  # A downsampling block passes the option-A shortcut through: subsample, zero channels appended.
  down = resnet.BasicBlock(features=32, strides=2, num_branches=9, use_bn=False)
  v = down.init(jax.random.key(1), x, train=False)
  y = down.apply(v, x, train=False)
  np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., 16:], 0)


def test_fixup_resnet_starts_with_zero_logits_and_scaled_branches():
  apply_fn, variables = models.create('resnet56', num_classes=10, key=jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  np.testing.assert_array_equal(apply_fn(variables, x), 0)  # zero classification layer
  k = variables['params']['stage2_block3']['conv1']['kernel']
  # He fan-out std sqrt(2 / (9·32)) scaled by L^(-1/2) with L = 27 branches.
  expected = np.sqrt(2 / (9 * 32)) * 27 ** -0.5
  assert abs(float(jnp.std(k)) / expected - 1) < 0.1


def test_unknown_model_is_a_config_error():
  with pytest.raises(ConfigError, match='unknown model'):
    models.create('resnet57', num_classes=10, key=jax.random.key(0))


@pytest.mark.parametrize('size,k,s,cin,cout', [(8, 3, 1, 3, 4), (8, 3, 2, 3, 4), (7, 3, 2, 2, 5), (8, 1, 2, 4, 8),
                                               (9, 5, 1, 2, 3), (4, 3, 2, 3, 3)])
def test_conv2d_matches_lax_conv_and_its_gradients(size, k, s, cin, cout):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)

  def ref(x, w):
    return lax.conv_general_dilated(x, w, (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  f = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w))))
  np.testing.assert_allclose(layers.conv2d(x, w, (s, s)), ref(x, w), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(f(lambda x, w: layers.conv2d(x, w, (s, s))), (0, 1))(x, w)
  g_ref = jax.grad(f(ref), (0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_max_pool_matches_reduce_window():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8, 3))
  ref = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  np.testing.assert_array_equal(layers.max_pool_2x2(x), ref)
