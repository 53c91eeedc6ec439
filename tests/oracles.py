"""Oracles for the spectral tests that never use the FFT method: the dense Jacobian of a layer's operator."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TOL = 1e-5  # float32 spectra vs the float64 oracle, relative to the largest singular value


def _wrap_pad(x, spatial, kernel_hw, strides):
  pads = [(0, 0)] * x.ndim
  for d, k, s in zip(spatial, kernel_hw, strides):
    n = x.shape[d]
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads[d] = (total // 2, total - total // 2)
  return jnp.pad(x, pads, mode='wrap')


def conv_oracle_matrix(kernel, dn, input_hw, strides=(1, 1), *, transposed_by=1, groups=1) -> np.ndarray:
  """The dense matrix of the wrap-around conv ``x -> conv(x, kernel)`` (``dn``: the layer's own dimension numbers,
  e.g. ``('NCHW', 'OIHW', 'NCHW')``), as the Jacobian of ``lax.conv_general_dilated`` on a wrap-padded input.
  ``transposed_by = s`` > 1: the transposed convolution — the input upsampled by inserting s − 1 zeros after every
  sample, then a stride-1 wrap-around conv."""
  lhs, rhs, _ = dn
  kernel = jnp.asarray(kernel)
  kh, kw = kernel.shape[rhs.index('H')], kernel.shape[rhs.index('W')]
  shape = {'N': 1, 'C': kernel.shape[rhs.index('I')] * groups, 'H': input_hw[0], 'W': input_hw[1]}
  x0 = jnp.zeros([shape[c] for c in lhs], jnp.float32)
  sp = (lhs.index('H'), lhs.index('W'))

  def op(x):
    if transposed_by > 1:
      up = [transposed_by if d in sp else 1 for d in range(x.ndim)]
      z = jnp.zeros([n * u for n, u in zip(x.shape, up)], x.dtype)
      x = z.at[tuple(slice(None, None, u) for u in up)].set(x)
    xp = _wrap_pad(x, sp, (kh, kw), strides)
    return lax.conv_general_dilated(xp, kernel, strides, 'VALID', dimension_numbers=dn, feature_group_count=groups,
                                    precision=lax.Precision.HIGHEST)

  jac = jax.jacfwd(op)(x0)
  return np.asarray(jac, np.float64).reshape(math.prod(op(x0).shape), x0.size)


def conv_oracle_svs(kernel, dn, input_hw, strides=(1, 1), **kw) -> np.ndarray:
  return np.linalg.svd(conv_oracle_matrix(kernel, dn, input_hw, strides, **kw), compute_uv=False)


def assert_spectrum(svs, expected, tol=TOL):
  """``svs`` (descending) equals the multiset ``expected`` within ``tol`` of the largest singular value."""
  svs = np.asarray(svs, np.float64)
  expected = np.sort(np.asarray(expected, np.float64))[::-1]
  assert svs.shape == expected.shape, (svs.shape, expected.shape)
  assert np.all(np.diff(svs) <= 0), 'a spectrum is sorted in descending order'
  err = np.abs(svs - expected).max() / expected.max()
  assert err < tol, err
