"""The native CPU kernels as JAX functions (XLA FFI custom calls).

`dw5d_jax/_csrc/depthwise.cc` (built by `_native_build.py`) has three XLA
FFI handlers for rank-5 arrays, each with channels-last kernels
(vectorised over channels) and channels-first ones (vectorised along W;
the layout is the last int of the `config` attribute, see `_config`).
When they run, and in which layout, is `_policy.py`'s decision:

* `dw5d_forward(x, w) -> y`: the depthwise convolution, reading x without a
  padded copy (out-of-range taps are skipped), float32 accumulation.
* `dw5d_input_grad(ct, w) -> dx`: the input gradient; with unit strides and
  no multiplier the forward kernel on ct with the flipped kernel, otherwise
  a transposed convolution in gather form (no dilated copy of ct), summing
  the multiplier as it goes.
* `dw5d_kernel_grad(x, ct) -> dk`: the kernel gradient in one pass over x
  and the cotangent, every tap's sum accumulated together (XLA needs one
  pass per tap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dw5d_jax._geometry import ConvSpec


def _config(spec: ConvSpec, batch: int) -> np.ndarray:
  """The `config` attribute: the problem as 22 ints (`Geom` in depthwise.cc).

  The last is the layout: 1 for channels-first arrays.
  """
  cf = not spec.channels_last
  return np.array([batch, *spec.in_spatial, spec.channels, spec.multiplier, *spec.out_spatial,
                   *spec.window, *spec.strides, *spec.dilations,
                   *(lo for lo, _ in spec.padding), int(cf)], np.int64)


def _shape(spec: ConvSpec, batch: int, spatial, channels: int) -> tuple[int, ...]:
  """An `(N, *spatial, C)` array's shape in the spec's layout."""
  if spec.channels_last:
    return (batch, *spatial, channels)
  return (batch, channels, *spatial)


def forward(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`(N, D, H, W, C)` x, `(kd, kh, kw, C, M)` kernel -> `(N, OD, OH, OW, C * M)`.

  Or `(N, C, D, H, W)` -> `(N, C * M, OD, OH, OW)` for a channels-first spec.
  """
  w = jnp.swapaxes(kernel.astype(jnp.float32), 3, 4)  # (kd, kh, kw, M, C)
  out = jax.ShapeDtypeStruct(
      _shape(spec, x.shape[0], spec.out_spatial, spec.channels * spec.multiplier),
      spec.out_dtype)
  return jax.ffi.ffi_call("dw5d_forward", out)(x, w, config=_config(spec, x.shape[0]))


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dx` in x's layout and the kernel's dtype."""
  w = jnp.swapaxes(kernel.astype(jnp.float32), 3, 4)  # (kd, kh, kw, M, C)
  out = jax.ShapeDtypeStruct(_shape(spec, ct.shape[0], spec.in_spatial, spec.channels),
                             kernel.dtype)
  return jax.ffi.ffi_call("dw5d_input_grad", out)(ct, w, config=_config(spec, ct.shape[0]))


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dk` as `(kd, kh, kw, C, M)` in x's dtype."""
  out = jax.ShapeDtypeStruct((*spec.window, spec.multiplier, spec.channels), jnp.float32)
  dk = jax.ffi.ffi_call("dw5d_kernel_grad", out)(x, ct, config=_config(spec, x.shape[0]))
  return jnp.swapaxes(dk, 3, 4).astype(x.dtype)
