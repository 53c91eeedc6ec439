"""Spectral toolkit: every linear layer of any JAX model, its singular values, batched clipping, power iteration.

Five modules, one idea each; their public functions are importable from here (``spectral.clip_params``, …):

* :mod:`arreg_jax.spectral.discovery` — :func:`layer_specs`: the linear layers of a model read from its traced
  program (linen, NNX, Equinox or plain JAX; layouts, strides and input sizes taken from the operations themselves).
* :mod:`arreg_jax.spectral.layer` — :class:`LayerSpec`: one layer's operator and where its kernel lives in ``params``.
* :mod:`arreg_jax.spectral.conv` — one convolution's operator (Sedghi, Gupta & Long 2019): all its singular values
  by FFT (strided convolutions exactly, by the polyphase decomposition) and its clipping; dense layers as matrices.
  Its docstring states the conventions (circular padding, half the frequencies, sorting).
* :mod:`arreg_jax.spectral.model` — every layer of a model in one compiled call (layers of equal shape batched):
  :func:`layer_singular_values`, :func:`clip_params` (appendix B.4.2, D.3 of Wen, Li & Jia 2020).
* :mod:`arreg_jax.spectral.power` — Miyato et al.'s (2018) power iteration and spectral normalization, the spectral
  complexity ∏‖W_l‖₂ and a layer spectrum's summary statistics.
"""

from arreg_jax.spectral.conv import clip_conv_kernel, clip_dense_kernel, conv_singular_values, dense_singular_values
from arreg_jax.spectral.discovery import layer_specs
from arreg_jax.spectral.layer import LayerSingularValues, LayerSpec
from arreg_jax.spectral.model import clip_params, layer_kernels, layer_singular_values
from arreg_jax.spectral.power import (circular_conv, conv_power_iteration, log_spectral_complexity, miyato_matrix,
                                      power_iteration, spectral_complexity, spectral_normalize, sv_statistics)

__all__ = [
    'clip_conv_kernel', 'clip_dense_kernel', 'conv_singular_values', 'dense_singular_values',
    'LayerSingularValues', 'LayerSpec', 'clip_params', 'layer_kernels', 'layer_singular_values', 'layer_specs',
    'circular_conv', 'conv_power_iteration', 'log_spectral_complexity', 'miyato_matrix', 'power_iteration',
    'spectral_complexity', 'spectral_normalize', 'sv_statistics',
]
