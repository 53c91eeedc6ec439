"""The average-margin regularizer of Wu & Yu ("The Trade-off between Minimum and Average Margin", poster 004).

The poster trains a network ``f(x) = W_L Φ(x) (+ b)`` (``Φ`` the penultimate features, ``w_k`` the rows of the last
layer ``W_L``) on

    Σ_i φ(y_i, f(x_i)) − λ · [ min_{k≠y_i} (w_{y_i} − w_k)ᵀ Φ(x_i) ]_0^γ + β Σ_{1≤l≤L} ‖W_l W_lᵀ − I‖²_F,

where ``[t]_0^γ = clip(t, 0, γ)``: the feature-space margin of each example is pushed up until it reaches γ (the
clip stops the network from inflating margins it already has, and ignores misclassified examples, whose margin is
negative), while the orthogonality penalty keeps every layer close to an isometry, so that Lip(Φ) stays bounded
and a feature-space margin is a lower bound (up to that constant) of the input-space margin.

Conventions (every choice the poster leaves open is made here once):

* **Per-example mean.** The CE and margin terms are averaged over the batch (the trainer minimizes the batch mean of
  the CE, as in Madry et al.); the penalty is added once per step. λ therefore weighs the mean clipped margin.
* **No bias in the margin term**, exactly as written: ``(w_y − w_k)ᵀΦ(x)``. The bias-aware feature-space *distance*
  used for tracking (:func:`feature_space_margins`) is a different quantity, see there.
* **Which matrices.** One term per leaf named ``kernel`` with ``ndim ≥ 2`` in the ``params`` tree (every dense and
  conv layer of ``arreg_jax.models``; biases, BatchNorm scales and offsets are never counted, and a layer with a bias
  still contributes exactly one term). Dense kernels ``(in, out)`` are the matrix ``W = kernelᵀ`` ``(out, in)``; conv
  HWIO kernels are reshaped to ``(cout, kh·kw·cin)`` (Miyato et al.'s matrix, :func:`arreg_jax.spectral.miyato_matrix`).
* **Smaller Gram.** For ``W ∈ R^{m×n}`` the penalty is ``‖G − I‖²_F`` with ``G`` the smaller of ``WWᵀ`` (m×m) and
  ``WᵀW`` (n×n). Since ``‖WWᵀ‖_F = ‖WᵀW‖_F`` and ``tr WWᵀ = tr WᵀW``, the two choices differ by the constant
  ``|m − n|``: the gradient — hence training — is exactly the poster's, but the value is 0 at every semi-orthogonal
  ``W`` (the poster's ``WWᵀ − I`` cannot vanish when ``m > n``, e.g. a first conv layer with more output channels
  than ``kh·kw·cin``).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from arreg_jax import spectral
from arreg_jax.analysis.margin_tracking import feature_space_margins  # noqa: F401  (moved there; still public here)
from arreg_jax.attacks import losses

PyTree = Any
HEAD = 'head'  # every model in arreg_jax.models names its last (classification) layer 'head'


def weight_matrix(kernel: jax.Array) -> jax.Array:
  """``W_l`` of a kernel leaf: dense ``(in, out)`` → ``(out, in)``; conv HWIO → ``(cout, kh·kw·cin)``."""
  if kernel.ndim < 2:
    raise ValueError(f'a weight matrix needs ndim >= 2, got shape {kernel.shape}')
  return spectral.miyato_matrix(kernel)


def weight_kernels(params: PyTree) -> list[tuple[str, jax.Array]]:
  """``(path, kernel)`` of every leaf named ``kernel`` with ``ndim ≥ 2``, in tree order: one entry per layer."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', None))
    if name == 'kernel' and getattr(leaf, 'ndim', 0) >= 2:
      out.append(('/'.join(str(getattr(p, 'key', p)) for p in path), leaf))
  return out


def gram_deviation(w: jax.Array) -> jax.Array:
  """``‖G − I‖²_F`` with ``G`` the smaller Gram matrix of ``w`` (see the module docstring); float32 scalar."""
  chex.assert_rank(w, 2)
  w = w.astype(jnp.float32)
  m, n = w.shape
  g = w @ w.T if m <= n else w.T @ w
  return jnp.sum(jnp.square(g - jnp.eye(g.shape[0], dtype=jnp.float32)))


def orthogonality_penalty(params: PyTree) -> jax.Array:
  """``Σ_l ‖W_l W_lᵀ − I‖²_F`` over every weight matrix of ``params`` (one term per kernel, never per bias)."""
  kernels = weight_kernels(params)
  if not kernels:
    raise ValueError('no weight matrices (leaves named "kernel" with ndim >= 2) in params')
  return sum(gram_deviation(weight_matrix(k)) for _, k in kernels)


def head_kernel(params: PyTree) -> jax.Array:
  """The last layer's kernel ``(d, K)`` (column k is ``w_k``)."""
  try:
    return params[HEAD]['kernel']
  except (KeyError, TypeError) as e:
    raise ValueError(f"the model has no params['{HEAD}']['kernel']: the margin regularizer needs the last layer "
                     f"to be a Dense layer named '{HEAD}'") from e


def effective_head(variables: dict) -> tuple[jax.Array, jax.Array | None]:
  """The last layer's ``(kernel, bias)`` as the forward pass applies them: for a spectrally normalized model
  (``batch_stats['head']['sn_u']`` present) the kernel divided by its stored power-iteration estimate σ."""
  params = variables['params']
  w = head_kernel(params)
  b = params[HEAD].get('bias')
  head_stats = (variables.get('batch_stats') or {}).get(HEAD) or {}
  u = head_stats.get('sn_u')
  if u is not None:
    sigma, _ = spectral.power_iteration(spectral.miyato_matrix(w), u, n_iter=0)
    w = w / sigma
  return w, b


def class_margins(features: jax.Array, last_w: jax.Array, labels: jax.Array) -> jax.Array:
  """``min_{k≠y} (w_y − w_k)ᵀ Φ(x)`` per example (no bias); float32 ``(B,)``: the margin of
  :func:`arreg_jax.attacks.losses.margin` on the class scores ``w_kᵀΦ(x)``.

  Args:
    features: ``Φ(x)``, ``(B, d)``.
    last_w: the last layer's kernel ``(d, K)`` (flax Dense layout: ``w_k`` is column k).
    labels: int ``(B,)``.
  """
  chex.assert_rank([features, last_w, labels], [2, 2, 1])
  chex.assert_equal_shape_prefix([features, labels], 1)
  chex.assert_equal(features.shape[1], last_w.shape[0])
  scores = features.astype(jnp.float32) @ last_w.astype(jnp.float32)  # (B, K): w_kᵀΦ
  return losses.margin(scores, labels)  # s_y − max_{k≠y} s_k


def margin_term(features: jax.Array, last_w: jax.Array, labels: jax.Array, gamma: float) -> jax.Array:
  """The batch mean of ``clip_[0,γ]( min_{k≠y} (w_y − w_k)ᵀ Φ(x) )`` (the bracket of the poster's loss)."""
  return jnp.mean(jnp.clip(class_margins(features, last_w, labels), 0.0, gamma))


def regularized_loss(ce: jax.Array, features: jax.Array | None, params: PyTree, labels: jax.Array, *,
                     margin_lambda, margin_gamma: float, ortho_beta, last_w: jax.Array | None = None,
                     margin_on: bool | None = None, ortho_on: bool | None = None) -> tuple[jax.Array, dict]:
  """``mean(CE) − λ · margin_term + β · orthogonality_penalty`` and its parts.

  Args:
    ce: per-example cross-entropy ``(B,)``.
    features: ``Φ(x)`` ``(B, d)``; may be None when ``margin_lambda == 0``.
    params: the model's ``params`` (the last layer read from ``params['head']``).
    labels: int ``(B,)``.
    margin_lambda, margin_gamma, ortho_beta: λ, γ, β (λ and β may be traced scalars when ``margin_on`` /
      ``ortho_on`` are given).
    last_w: the last layer's kernel as applied (default ``params['head']['kernel']``; :func:`effective_head` for a
      spectrally normalized model).
    margin_on, ortho_on: whether the margin / orthogonality terms are computed at all (static; default: whether λ /
      β are nonzero).

  Returns:
    ``(loss, parts)`` with ``parts`` holding ``ce`` (batch mean) and, when on, ``margin_term`` and ``ortho``.
  """
  chex.assert_rank(ce, 1)
  margin_on = bool(margin_lambda) if margin_on is None else margin_on
  ortho_on = bool(ortho_beta) if ortho_on is None else ortho_on
  parts = {'ce': jnp.mean(ce)}
  loss = parts['ce']
  if margin_on:
    if features is None:
      raise ValueError('margin_lambda > 0 needs the penultimate features')
    w = head_kernel(params) if last_w is None else last_w
    parts['margin_term'] = margin_term(features, w, labels, margin_gamma)
    loss = loss - margin_lambda * parts['margin_term']
  if ortho_on:
    parts['ortho'] = orthogonality_penalty(params)
    loss = loss + ortho_beta * parts['ortho']
  return loss, parts
