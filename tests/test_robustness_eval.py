"""The robustness evaluation of a run (analysis.robustness) and its report section, on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import models, sharding
from arreg_jax.analysis import robustness
from arreg_jax.report import robustness_section

SETTINGS = {'attacks': ['fgsm', 'pgd10', 'apgd_ce', 'apgd_t', 'square'], 'eps': 0.3, 'examples': 32,
            'n_targets': 1, 'square_queries': 20, 'eps_grid': [0.15, 0.3, 1.0], 'check_examples': 16,
            'batch_size': 16}


class Rounded(nn.Module):
  """A linear model on rounded pixels: its input gradient is zero everywhere (masked gradients)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10)(jnp.round(x).reshape(x.shape[0], -1))


def _data(n=32):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def test_a_plain_model_is_evaluated_and_judged_real():
  module = models.get_module('small_cnn', num_classes=10)
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0), input_shape=(28, 28, 1))
  images, labels = _data()
  r = robustness.evaluate(module, variables, images, labels, settings=SETTINGS, augment_kind='none',
                          key=jax.random.key(1), mesh=sharding.make_mesh())
  acc = r['accuracy']
  assert set(acc) == {'clean', 'fgsm', 'pgd10', 'apgd_ce', 'apgd_t', 'square', 'autoattack'}
  assert all(acc[k] <= acc['clean'] for k in acc)
  assert acc['autoattack'] <= min(acc['apgd_ce'], acc['apgd_t'], acc['square'])
  assert r['examples'] == 32 and [e for e, _ in r['accuracy_vs_eps']] == [0.15, 0.3, 1.0]
  assert set(r['checks']) == {'deterministic', 'zero_gradients', 'attack_ordering', 'square_vs_whitebox',
                              'eps_monotone'}
  md = robustness_section.section([{'strength': 0.0, 'robustness': r}, {'strength': 0.3, 'robustness': r}])
  assert '| AR | clean | FGSM | PGD-10 | APGD-CE | APGD-T | Square | AutoAttack |' in md
  assert '## Is the robustness real?' in md and 'Claim 2 under the strongest attack' in md


def test_masked_gradients_are_flagged():
  module = Rounded()
  images, labels = _data()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  r = robustness.evaluate(module, variables, images, labels, settings=SETTINGS, augment_kind='none',
                          key=jax.random.key(1), mesh=sharding.make_mesh())
  assert not r['real'] and not r['checks']['zero_gradients']['passed']
  assert r['verdict'].startswith('suspicious') and 'zero_gradients' in r['verdict']
  md = robustness_section.section([{'strength': 0.0, 'robustness': r}])
  assert '**check**' in md and 'zero input gradient' in md
