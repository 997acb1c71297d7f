"""The native CPU kernels as JAX functions, and when a lowering may use them.

`dw5d_jax/_csrc/depthwise.cc` (built by `_native_build.py`) has three XLA
FFI handlers for channels-last rank-5 arrays:

* `dw5d_forward(x, w) -> y`: the depthwise convolution, reading x without a
  padded copy (out-of-range taps are skipped), float32 accumulation.
* `dw5d_input_grad(ct, w) -> dx`: the input gradient; with unit strides and
  no multiplier the forward kernel on ct with the flipped kernel, otherwise
  a transposed convolution in gather form (no dilated copy of ct), summing
  the multiplier as it goes.
* `dw5d_kernel_grad(x, ct) -> dk`: the kernel gradient in one pass over x
  and the cotangent, every tap's sum accumulated together (XLA needs one
  pass per tap).

`usable` is the one place that decides: a lowering uses these kernels only
on CPU, for channels-last float32/bfloat16 problems with static shapes where
they are faster (`worthwhile`), when the library built, and never while
lowering for `jax.export`/jax2tf: an exported artifact must not name a
custom call that only this process knows, so it keeps the portable XLA
computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dw5d_jax import _native_build
from dw5d_jax._args import ConvSpec

DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def worthwhile(spec: ConvSpec) -> bool:
  """Whether the native kernels beat XLA's lowering for `spec` (measured).

  They vectorise over channels in packets of 16, 8 and 4 floats, and any
  channels left over one float at a time. With every channel in a packet
  (`C % 4 == 0`) they were faster in every measured case, forward and
  backward (2-core AVX-512 machine, x (4, 16, 64, 64, C), 3x3: C = 8
  forward 0.8 vs 2.9 ms, C = 4 with M = 2 3.2 vs 3.8 ms); with leftovers
  XLA's lowering, which vectorises along W * C, was faster for C <= 3
  (C = 3: 1.0 vs 0.7 ms) and in the backward pass for C = 5 and 7 (5.3 vs
  2.9 ms, 6.7 vs 4.9 ms).
  """
  return spec.channels % 4 == 0


def usable(ctx, spec: ConvSpec) -> bool:
  """Whether the lowering described by `ctx` may call the native kernels for `spec`."""
  if ctx.module_context.lowering_parameters.for_export:
    return False
  mode = _native_build.mode()
  if mode == "off" or (mode == "on" and not worthwhile(spec)):
    return False
  dims = (*(d for a in ctx.avals_in for d in a.shape), *spec.out_spatial,
          *(p for pair in spec.padding for p in pair))
  if not all(isinstance(d, (int, np.integer)) for d in dims):
    return False
  if not (spec.channels_last and all(np.dtype(a.dtype) in DTYPES for a in ctx.avals_in)
          and np.dtype(spec.acc_dtype) == np.float32 and np.dtype(spec.out_dtype) in DTYPES):
    return False
  return _native_build.status().active  # last: the first call builds the library


def _config(spec: ConvSpec, batch: int) -> np.ndarray:
  """The `config` attribute: the problem as 21 ints (`Geom` in depthwise.cc)."""
  return np.array([batch, *spec.in_spatial, spec.channels, spec.multiplier, *spec.out_spatial,
                   *spec.window, *spec.strides, *spec.dilations,
                   *(lo for lo, _ in spec.padding)], np.int64)


def forward(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`(N, D, H, W, C)` x, `(kd, kh, kw, C, M)` kernel -> `(N, OD, OH, OW, C * M)`."""
  w = jnp.swapaxes(kernel.astype(jnp.float32), 3, 4)  # (kd, kh, kw, M, C)
  out = jax.ShapeDtypeStruct((x.shape[0], *spec.out_spatial, spec.channels * spec.multiplier),
                             spec.out_dtype)
  return jax.ffi.ffi_call("dw5d_forward", out)(x, w, config=_config(spec, x.shape[0]))


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dx` as `(N, D, H, W, C)` in the kernel's dtype."""
  w = jnp.swapaxes(kernel.astype(jnp.float32), 3, 4)  # (kd, kh, kw, M, C)
  out = jax.ShapeDtypeStruct((ct.shape[0], *spec.in_spatial, spec.channels), kernel.dtype)
  return jax.ffi.ffi_call("dw5d_input_grad", out)(ct, w, config=_config(spec, ct.shape[0]))


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dk` as `(kd, kh, kw, C, M)` in x's dtype."""
  out = jax.ShapeDtypeStruct((*spec.window, spec.multiplier, spec.channels), jnp.float32)
  dk = jax.ffi.ffi_call("dw5d_kernel_grad", out)(x, ct, config=_config(spec, x.shape[0]))
  return jnp.swapaxes(dk, 3, 4).astype(x.dtype)
