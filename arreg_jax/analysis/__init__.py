"""The paper's analyses of a trained model (Wen, Li & Jia, ICML 2020, §4 and appendix B; SPEC §5), for any JAX model.

Each takes ``(apply_fn, params, images, labels)`` — ``apply_fn(params, x) -> logits``, ``arreg_jax.adapters`` makes
one from a linen, NNX or Equinox model — checks its inputs at the door (:mod:`inputs`: float images in [0, 1],
integer labels in range, shapes agreeing; a ``TypeError``/``ValueError`` naming the argument otherwise) and runs
compiled, in sharded batches (``arreg_jax.sharding.map_batches``):

* :func:`confidence` (:mod:`margins`) — margin f_y − max_{i≠y} f_i (Definition 3), true-class probability and loss
  of every example; :mod:`distributions` summarizes them with fixed histogram bins (Fig. 1b, 4, 5a,b);
* :func:`layer_statistics` / :func:`compare_layers` (:mod:`singular_values`) — per-layer singular-value statistics
  and appendix B.2's two-model comparison, the layers found in the model's program (Fig. 1a, 5c,d);
* :func:`loss_variation` (:mod:`smoothness`) — the largest loss increase inside L∞ balls (appendix B.5, Table 1);
* :func:`boundary_distances` (:mod:`decision_boundary`) — instance-space margins and v_min (Definition 6);
* :func:`bound_terms` (:mod:`generalization_bound`) — every term of Theorem 3.1 (eq. 4–5) and the bound, one call;
* :mod:`margin_tracking` — the per-example logit and feature-space margins of poster 004.

Each module also exposes its pure, jit-able batch kernel (``margins.per_example``, ``smoothness.max_loss_increase``,
…). Nothing here imports the experiment runner; running the analyses over a sweep directory is
``arreg_jax.sweep_analysis``. Importing this package is cheap: the modules load on first use.
"""

import importlib

_MODULES = ('decision_boundary', 'distributions', 'generalization_bound', 'inputs', 'margin_tracking', 'margins',
            'robustness', 'singular_values', 'smoothness')
_FUNCTIONS = {'confidence': 'margins', 'layer_statistics': 'singular_values', 'compare_layers': 'singular_values',
              'loss_variation': 'smoothness', 'boundary_distances': 'decision_boundary',
              'bound_terms': 'generalization_bound'}

__all__ = sorted(_MODULES + tuple(_FUNCTIONS))


def __getattr__(name: str):
  if name in _MODULES:
    return importlib.import_module(f'{__name__}.{name}')
  if name in _FUNCTIONS:
    return getattr(importlib.import_module(f'{__name__}.{_FUNCTIONS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return __all__
