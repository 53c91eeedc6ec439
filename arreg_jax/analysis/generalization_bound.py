"""The terms of the generalization bound of Theorem 3.1 (eq. 4–5), evaluated on a trained network.

Theorem 3.1: for an ε₀-adversarially robust ReLU/max-pool network T with L weight layers, an ε-cover (ε ≤ ε₀) of a
k-dimensional instance space with covering number (C_X/ε)^k, and m training examples, with probability ≥ 1 − η

    GE(l_γ ∘ T) ≤ max{0, 1 − u_min/γ} + sqrt( 2 log(2) C_X^k / (ε^k m) + 2 log(1/η) / m ),          (4)

    u_min = min_{y ≠ ŷ} ‖w_y − w_ŷ‖₂ · ∏_{i=1}^{L−1} σ_min(W_i) · v_min,                              (5)

where w_y are the rows of the last layer's weight matrix W_L (the columns of a Flax ``Dense`` kernel, which is
stored ``(in, out)``; the bias plays no part in eq. 5), σ_min(W_i) the smallest singular value of layer i (for a
convolution: of the operator, :mod:`arreg_jax.spectral`), and v_min the smallest instance-space margin
(:mod:`arreg_jax.analysis.decision_boundary`). :func:`bound_terms` evaluates all of it for a model
``apply_fn(params, x)`` in one call, its layers found in its program (:func:`arreg_jax.spectral.layer_specs`), so
the last layer's rows are read in whatever orientation the model stores them.

Products of many σ's over- or underflow, so everything is also returned in log space (natural log). A layer with a
zero singular value (e.g. a stride-2 1×1 convolution with more outputs than inputs has structural zeros) makes
``u_min = 0`` exactly: then the margin term is 1 whatever γ is. The covering term is astronomically large for any
realistic k (the paper notes the bound is a worst-case guide, not a tight estimate, §3 footnote 3): it is reported
through its log10.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import spectral
from arreg_jax.analysis import decision_boundary, inputs, margins


def min_class_weight_distance(w_last: jax.Array, *, class_axis: int | None = None) -> jax.Array:
  """``min_{y≠ŷ} ‖w_y − w_ŷ‖₂`` over the class vectors ``w_y`` of a last-layer weight (eq. 5).

  Args:
    w_last: the last layer's 2-D weight.
    class_axis: the axis of ``w_last`` that indexes the classes: ``-1`` (or 1) for a Flax ``(in, out)`` kernel,
      ``0`` for an Equinox or PyTorch ``(out, in)`` weight. Required: a weight's shape does not say its orientation.
      :func:`bound_terms` reads it from the model's program instead.

  Returns:
    float32 scalar.
  """
  if class_axis is None:
    raise ValueError('class_axis is required: -1 for a Flax (in, out) kernel (w_y is column y), 0 for an Equinox or '
                     'PyTorch (out, in) weight (w_y is row y); bound_terms reads it from the program itself')
  if jnp.ndim(w_last) != 2 or class_axis not in (-2, -1, 0, 1):
    raise ValueError(f'w_last must be 2-D and class_axis one of 0, 1, -1, got shape {jnp.shape(w_last)} and '
                     f'class_axis={class_axis!r}')
  return _min_class_weight_distance(w_last if class_axis in (-1, 1) else jnp.transpose(w_last))


@jax.jit
def _min_class_weight_distance(w_last: jax.Array) -> jax.Array:
  chex.assert_rank(w_last, 2)
  w = jnp.asarray(w_last, jnp.float32).T  # (classes, in): row y is w_y
  # Row by row (exact differences, no Gram-matrix cancellation; memory classes × in per row).
  d2 = jax.lax.map(lambda wy: jnp.sum(jnp.square(w - wy), axis=-1), w)
  d2 = jnp.where(jnp.eye(w.shape[0], dtype=bool), jnp.inf, d2)
  return jnp.sqrt(jnp.min(d2))


def log_u_min(w_distance: float, sigma_mins: Sequence[float], v_min: float) -> float:
  """``log u_min = log min‖w_y − w_ŷ‖ + Σ_{i<L} log σ_min(W_i) + log v_min`` (eq. 5); −inf if a factor is 0.

  Args:
    w_distance: ``min_{y≠ŷ} ‖w_y − w_ŷ‖₂`` ≥ 0 of the last layer.
    sigma_mins: ``σ_min(W_i)`` ≥ 0 of the layers before the last.
    v_min: the smallest instance-space margin ≥ 0 (+inf when none was found).
  """
  with np.errstate(divide='ignore'):
    terms = [np.log(float(w_distance)), float(np.sum(np.log(np.asarray(sigma_mins, np.float64)))),
             np.log(float(v_min))]
  return float(sum(terms))


def generalization_bound(log_u: float, *, gamma: float, c_x: float, k: float, eps: float, eta: float,
                         m: int) -> dict[str, float]:
  """The right-hand side of eq. (4) for ``u_min = exp(log_u)``.

  Args:
    log_u: ``log u_min`` (natural log; :func:`log_u_min`).
    gamma: the ramp loss's margin γ > 0; c_x: C_X > 0; k: the instance space's covering dimension; eps: the cover's
      radius ε > 0; eta: the confidence 0 < η < 1; m: the number of training examples ≥ 1.

  Returns ``margin_term = max{0, 1 − u_min/γ}``, ``log10_covering_term`` (log10 of the square root),
  ``covering_term`` (inf when it overflows a float) and ``bound`` = their sum.
  """
  if gamma <= 0 or c_x <= 0 or eps <= 0 or not 0 < eta < 1 or m < 1:
    raise ValueError(f'need γ, C_X, ε > 0, 0 < η < 1, m ≥ 1; got γ={gamma}, C_X={c_x}, ε={eps}, η={eta}, m={m}')
  u = math.exp(log_u) if log_u < 700 else math.inf
  margin_term = max(0.0, 1.0 - u / gamma)
  a = math.log(2 * math.log(2)) + k * (math.log(c_x) - math.log(eps)) - math.log(m)
  b = math.log(2 * math.log(1 / eta)) - math.log(m)
  log_sq = float(np.logaddexp(a, b))  # log of the expression under the square root
  log10_cov = 0.5 * log_sq / math.log(10)
  cov = math.exp(0.5 * log_sq) if 0.5 * log_sq < 700 else math.inf
  return {'u_min': u, 'gamma': gamma, 'margin_term': margin_term, 'covering_term': cov,
          'log10_covering_term': log10_cov, 'bound': margin_term + cov, 'c_x': c_x, 'k': k, 'eps': eps,
          'eta': eta, 'm': int(m)}


def assemble(w_distance: float, sigma_mins: Sequence[float], v_min: float, *, gamma: float, gamma_source: str,
             c_x: float, k: float, eps: float, eta: float, m: int) -> dict[str, Any]:
  """The bound's terms and value from its three factors (eq. 4–5), JSON-ready.

  Args:
    w_distance: ``min_{y≠ŷ} ‖w_y − w_ŷ‖₂`` of the last layer.
    sigma_mins: ``σ_min(W_i)`` of the layers ``i < L`` (every layer but the last).
    v_min: the smallest instance-space margin.
    gamma, c_x, k, eps, eta, m: γ, C_X, k, ε, η and m of eq. (4); gamma_source says where γ came from.
  """
  log_u = log_u_min(w_distance, sigma_mins, v_min)
  with np.errstate(divide='ignore'):
    log_prod = float(np.sum(np.log(np.asarray(sigma_mins, np.float64))))
  out = {'w_distance': float(w_distance), 'log_prod_sigma_min': log_prod,
         'layers_with_zero_sigma_min': int(sum(1 for v in sigma_mins if v <= 0)), 'v_min': float(v_min),
         'log_u_min': log_u, 'gamma_source': gamma_source}
  out.update(generalization_bound(log_u, gamma=gamma, c_x=c_x, k=k, eps=eps, eta=eta, m=m))
  return out


def bound_terms(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: Any, labels: Any, *,
                eps: float, gamma: float | None = None, c_x: float = 1.0, k: float = 10.0, eta: float = 0.05,
                m: int | None = None, screen: int | None = None, refine: int = 64, rounds: int = 12,
                steps: int = 20, batch_size: int = 128, mesh: jax.sharding.Mesh | None = None,
                preprocess: Callable[[jax.Array], jax.Array] | None = None,
                specs: Sequence[spectral.LayerSpec] | None = None) -> dict[str, Any]:
  """Every term of Theorem 3.1 and the bound's value for a trained model, in one call.

  The layers W_1 … W_L are the linear layers of ``apply_fn``'s program in forward order
  (:func:`arreg_jax.spectral.layer_specs`; convolutions as the operators they apply at their input size); W_L, the
  last, must be the dense classifier, whose class vectors give ``min ‖w_y − w_ŷ‖``. v_min is estimated on ``images``
  (:func:`arreg_jax.analysis.decision_boundary.boundary_distances`), γ defaults to the median margin of ``images``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, K)``.
    params: the pytree ``apply_fn`` takes.
    images: ``(N, ...)`` float training images in [0, 1] with 4 dimensions, in the model's layout.
    labels: int ``(N,)`` in ``[0, K)``.
    eps: the radius ε of the cover in eq. (4) (ε ≤ the robustness radius ε₀; the runner uses the AR strength's ε).
    gamma: the margin γ of the ramp loss (default: the median margin of ``images``).
    c_x, k, eta: C_X, the instance space's dimension k and the confidence η of eq. (4).
    m: the training-set size (default ``N``).
    screen, refine, rounds, steps: the v_min estimator's settings (``boundary_distances``).
    batch_size, mesh, preprocess: as :func:`arreg_jax.analysis.margins.confidence`.
    specs: precomputed ``spectral.layer_specs`` of the model.

  Returns:
    :func:`assemble`'s dict, plus ``layers`` (the layers' names) and ``sigma_mins``.
  """
  _, labels = inputs.check_model_inputs(apply_fn, params, images, labels, preprocess=preprocess)
  x_shape = jax.eval_shape(preprocess or (lambda x: x), jax.ShapeDtypeStruct((1, *images.shape[1:]),
                                                                             images.dtype)).shape
  specs = tuple(specs or spectral.layer_specs(apply_fn, params, x_shape))
  if specs[-1].kind != 'dense':
    raise ValueError(f'the last layer of the model ({specs[-1].name}, a {specs[-1].kind}) must be the dense '
                     'classifier whose class vectors w_y enter eq. (5)')
  layers = spectral.layer_singular_values(apply_fn, params, x_shape, specs=specs)
  sigma_mins = [float(layer.singular_values.min()) for layer in layers[:-1]]
  w_last = spectral.layer_kernels(params, specs[-1:])[0]  # canonical (in, out): w_y is column y
  w_distance = float(min_class_weight_distance(w_last, class_axis=-1))
  common = dict(batch_size=batch_size, mesh=mesh, preprocess=preprocess)
  v_min = decision_boundary.boundary_distances(apply_fn, params, images, screen=screen, refine=refine,
                                               rounds=rounds, steps=steps, **common)['v_min']
  source = 'given'
  if gamma is None:
    conf = margins.confidence(apply_fn, params, images, labels, **common)
    gamma, source = max(float(np.median(conf['margin'])), 1e-6), 'median margin of images'
  out = assemble(w_distance, sigma_mins, v_min, gamma=gamma, gamma_source=source, c_x=c_x, k=k, eps=eps, eta=eta,
                 m=int(m if m is not None else images.shape[0]))
  return {**out, 'layers': [layer.name for layer in layers], 'sigma_mins': sigma_mins}
