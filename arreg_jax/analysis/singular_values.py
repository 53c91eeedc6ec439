"""Per-layer singular-value statistics (Fig. 1a, 5c,d) and the two-model comparison of appendix B.2.

§4.2.2 argues that the singular values of every weight layer ``W_i`` govern how an input perturbation is amplified
on its way to the margin (Lemma 3.1), and shows that AR shrinks their **standard deviation** layer by layer.
The spectra come from :mod:`arreg_jax.spectral` (convolutions as the circular operators they apply at the input
size they really see, Sedghi et al. 2019; dense layers as matrices), for the layers found in the model's program
(:func:`arreg_jax.spectral.layer_specs`: any JAX model), in forward order.

Appendix B.2 quantifies the shrinkage between a weaker (``a``, AR 4) and a stronger (``b``, AR 16) model: split the
layers into those whose STD decreased (``σ_i^a > σ_i^b``) and those where it increased, and compare
``Σ (σ_i^a − σ_i^b)`` (and its mean) over the first group with ``Σ (σ_i^b − σ_i^a)`` over the second
(paper, CIFAR-10 ResNet-56: 4.7465 / 0.1158 vs 0.4372 / 0.0312).
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import spectral


def _rows(layers: Sequence[spectral.LayerSingularValues]) -> list[dict]:
  out = []
  for index, layer in enumerate(layers):
    stats = spectral.sv_statistics(layer)
    out.append({
        'index': index, 'name': layer.name, 'kind': layer.kind, 'kernel_shape': list(layer.kernel_shape),
        'stride': list(layer.stride) if layer.stride else None,
        'input_hw': list(layer.input_hw) if layer.input_hw else None, 'exact': bool(layer.exact), **stats,
        'log_max': float(np.log(stats['max'])) if stats['max'] > 0 else float('-inf'),
        'log_min': float(np.log(stats['min'])) if stats['min'] > 0 else float('-inf'),
    })
  return out


def layer_statistics(model: Any, params: Any, input_shape: Sequence[int], *,
                     specs: Sequence[spectral.LayerSpec] | None = None, **apply_kwargs: Any) -> list[dict]:
  """One dict per linear layer, forward order: name, kind, shapes, and std/mean/min/max/count of its spectrum.

  Args:
    model: ``apply_fn(params, x) -> logits`` or a linen ``Module`` (see :func:`arreg_jax.spectral.layer_specs`).
    params: what ``model`` takes (a linen ``Module``'s variables).
    input_shape: the shape of ONE input, without the batch axis, in the model's layout (e.g. ``(28, 28, 1)``).
    specs: precomputed layer specs of the model.
    **apply_kwargs: forwarded to the model (e.g. ``train=False``).

  Returns:
    ``[{'index', 'name', 'kind', 'kernel_shape', 'stride', 'input_hw', 'exact', 'std', 'mean', 'min', 'max',
    'count', 'log_max', 'log_min'}, …]`` (JSON-ready; statistics of the operator's full spectrum).
  """
  shape = (1, *input_shape)
  return _rows(spectral.layer_singular_values(model, params, shape, specs=specs, **apply_kwargs))


def compare_layers(model: Any, params_a: Any, params_b: Any, input_shape: Sequence[int], **apply_kwargs: Any) -> dict:
  """Appendix B.2 for two trainings of one architecture (``a`` the weaker AR, ``b`` the stronger): the layers are
  found once in ``a``'s program, both spectra computed for them, and their STDs compared (:func:`compare_std`).

  Returns:
    ``{'layers': [name, …], 'std_a': [...], 'std_b': [...], **compare_std_json(std_a, std_b)}``.
  """
  specs = spectral.layer_specs(model, params_a, (1, *input_shape), **apply_kwargs)
  a = layer_statistics(model, params_a, input_shape, specs=specs, **apply_kwargs)
  b = layer_statistics(model, params_b, input_shape, specs=specs, **apply_kwargs)
  std_a, std_b = [r['std'] for r in a], [r['std'] for r in b]
  return {'layers': [r['name'] for r in a], 'std_a': std_a, 'std_b': std_b, **compare_std_json(std_a, std_b)}


def compare_std(std_a: jax.Array, std_b: jax.Array) -> dict[str, jax.Array]:
  """Appendix B.2: per-layer STD change from model ``a`` (weaker AR) to model ``b`` (stronger AR).

  Args:
    std_a, std_b: ``(L,)`` per-layer singular-value STDs of the two models (same architecture, same order).

  Returns:
    ``decrease_sum``/``decrease_mean``/``decrease_count``: ``Σ (σ^a − σ^b)``, its mean and count over layers with
    ``σ^a > σ^b``; ``increase_sum``/``increase_mean``/``increase_count`` likewise over ``σ^b > σ^a``;
    ``frac_decreased`` = decrease_count / L. Means are 0 for an empty group. Pure and jit-able.
  """
  chex.assert_rank([std_a, std_b], [1, 1])
  chex.assert_equal_shape([std_a, std_b])
  diff = jnp.asarray(std_a, jnp.float32) - jnp.asarray(std_b, jnp.float32)
  dec, inc = diff > 0, diff < 0
  n_dec, n_inc = jnp.sum(dec), jnp.sum(inc)
  dec_sum = jnp.sum(jnp.where(dec, diff, 0.0))
  inc_sum = jnp.sum(jnp.where(inc, -diff, 0.0))
  return {
      'decrease_sum': dec_sum, 'decrease_mean': jnp.where(n_dec > 0, dec_sum / jnp.maximum(n_dec, 1), 0.0),
      'decrease_count': n_dec,
      'increase_sum': inc_sum, 'increase_mean': jnp.where(n_inc > 0, inc_sum / jnp.maximum(n_inc, 1), 0.0),
      'increase_count': n_inc,
      'frac_decreased': n_dec / diff.shape[0],
  }


def compare_std_json(std_a: Sequence[float], std_b: Sequence[float]) -> dict:
  """:func:`compare_std` as plain Python numbers."""
  out = jax.device_get(compare_std(jnp.asarray(std_a), jnp.asarray(std_b)))
  return {k: (int(v) if k.endswith('count') else float(v)) for k, v in out.items()}
