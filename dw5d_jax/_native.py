"""The native CPU kernels as JAX functions, and when a lowering may use them.

`dw5d_jax/_csrc/` (built by `_native_build.py`) has three XLA FFI handlers
for rank-5 arrays, each with channels-last kernels (vectorised over
channels) and channels-first ones (vectorised along W). They take the
problem as named attributes (`_attrs`) and the kernel in the library's
`(kd, kh, kw, C, M)` layout, float32 or bfloat16. Narrow channels-first
problems may instead be transposed to channels-last around the kernels
(`transposed`):

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
on CPU, for float32/bfloat16 problems with static shapes where they are
faster (`worthwhile`), when the library built, and never while
lowering for `jax.export`/jax2tf: an exported artifact must not name a
custom call that only this process knows, so it keeps the portable XLA
computation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dw5d_jax import _native_build
from dw5d_jax._args import ConvSpec

DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


# Channels-first problems use the channels-first kernels (vectorised along
# the output width) from this output width on, for each op; narrower ones
# are transposed to channels-last where C % 4 == 0 (see `worthwhile`).
_CF_MIN_WIDTH = {"forward": 12, "input_grad": 6, "kernel_grad": 6}


def worthwhile(spec: ConvSpec, op: str) -> bool:
  """Whether the native kernels beat XLA's lowering for `op` on `spec` (measured).

  `op` is `"forward"`, `"input_grad"` or `"kernel_grad"`. Measured on a
  2-core AVX-512 machine (medians, ms, jit, tuned allocator).

  Channels-last: the kernels vectorise over channels in packets of 16, 8
  and 4 floats, and any channels left over one float at a time. With every
  channel in a packet (`C % 4 == 0`) they were faster in every measured
  case, forward and backward (x (4, 16, 64, 64, C), 3x3: C = 8 forward
  0.8 vs 2.9 ms, C = 4 with M = 2 3.2 vs 3.8 ms); with leftovers XLA's
  lowering, which vectorises along W * C, was faster for C <= 3 (C = 3:
  1.0 vs 0.7 ms) and in the backward pass for C = 5 and 7 (5.3 vs 2.9 ms,
  6.7 vs 4.9 ms).

  Channels-first: the channels-first kernels vectorise along the output
  width, whatever C is; they replaced the channels-last kernels with
  transposes around them, which cost more than the kernels (XLA's lowering
  / transposed / channels-first kernels / the same problem channels-last,
  ms, under load, `benchmarks/channels_first.py`): W1 forward 7.7 / 16.5 /
  3.2 / 3.2, forward + backward 69 / 19.3 / 6.7 / 6.4; W2 11.2 / 24.9 /
  4.3 / 4.2 and 362 / 22.5 / 9.3 / 9.3; W3 8.6 / 6.7 / 2.3 / 2.4 and
  58 / 9.5 / 4.6 / 6.1; W4 7.5 / 15.3 / 3.1 / 3.2 and 67 / 19.7 / 6.2 /
  6.7. Narrow outputs waste vector lanes (x (4, C, 16, 64, W), 3x3; below,
  "a vs b" is channels-first kernels vs the alternative named): for the
  forward pass they tie with XLA at OW = 8 (C = 32: 1.30 vs 1.43 ms;
  3x3x3 with C = 16: 0.99 vs 0.74) and lose below (OW = 6: 0.41 vs 0.35;
  OW = 4 with C = 64: 4.2 vs 1.1), so from OW = 12 on they are used,
  below that the old rule (transposed where C % 4 == 0 and strided or
  more than 27 taps, else XLA). For the gradients (forward + backward)
  they beat XLA at every measured width but one near-tie (OW = 4 with
  C = 6, 3x3x3: 0.45 vs 0.83 ms; C = 3, 3x3: 0.33 vs 0.29) and the
  transposed kernels from OW = 6 on (C = 8: 0.73 vs 0.91 ms), not below
  (OW = 5, stride 2, C = 8: 0.86 vs 0.73; OW = 4 with C = 64: 4.6 vs
  2.8): `transposed`.
  """
  if spec.channels_last:
    return spec.channels % 4 == 0
  if op != "forward" or spec.out_spatial[2] >= _CF_MIN_WIDTH[op]:
    return True
  return spec.channels % 4 == 0 and (
      any(s > 1 for s in spec.strides) or math.prod(spec.window) > 27)


def usable(ctx, spec: ConvSpec, op: str) -> bool:
  """Whether the lowering described by `ctx` may call the native kernels for `op` on `spec`."""
  if ctx.module_context.lowering_parameters.for_export:
    return False
  mode = _native_build.mode()
  if mode == "off" or (mode == "on" and not worthwhile(spec, op)):
    return False
  dims = (*(d for a in ctx.avals_in for d in a.shape), *spec.out_spatial,
          *(p for pair in spec.padding for p in pair))
  if not all(isinstance(d, (int, np.integer)) for d in dims):
    return False
  if not (all(np.dtype(a.dtype) in DTYPES for a in ctx.avals_in)
          and np.dtype(spec.acc_dtype) == np.float32 and np.dtype(spec.out_dtype) in DTYPES):
    return False
  return _native_build.status().active  # last: the first call builds the library


def transposed(spec: ConvSpec, op: str) -> bool:
  """Whether a channels-first `op` transposes to channels-last around the kernels.

  Only for outputs narrower than `_CF_MIN_WIDTH[op]` with `C % 4 == 0`,
  where that was measured faster (see `worthwhile`); otherwise the
  channels-first kernels run on the arrays as they are.
  """
  return (not spec.channels_last and spec.channels % 4 == 0
          and spec.out_spatial[2] < _CF_MIN_WIDTH[op])


def _last(a: jax.Array, spec: ConvSpec, op: str) -> jax.Array:
  """`a` channels-last: `(N, C, D, H, W)` -> `(N, D, H, W, C)` where `op` is `transposed`."""
  return jnp.moveaxis(a, 1, -1) if transposed(spec, op) else a


def _back(a: jax.Array, spec: ConvSpec, op: str) -> jax.Array:
  """A channels-last result in `spec`'s layout where `op` is `transposed`."""
  return jnp.moveaxis(a, -1, 1) if transposed(spec, op) else a


def _attrs(spec: ConvSpec, batch: int, op: str) -> dict:
  """The problem as the FFI handlers' named attributes (`_csrc/handlers.cc`).

  `channels_first` is the layout the kernels see: false where `op` is `transposed`.
  """
  arrays = dict(in_spatial=spec.in_spatial, out_spatial=spec.out_spatial, window=spec.window,
                strides=spec.strides, dilations=spec.dilations,
                padding_low=[lo for lo, _ in spec.padding])
  return dict(batch=batch, channels=spec.channels, multiplier=spec.multiplier,
              channels_first=not spec.channels_last and not transposed(spec, op),
              **{name: np.asarray(v, np.int64) for name, v in arrays.items()})


def _shape(spec: ConvSpec, batch: int, spatial, channels: int, op: str) -> tuple[int, ...]:
  """An `(N, *spatial, C)` array's shape as the kernels see it (channels-first or last)."""
  if spec.channels_last or transposed(spec, op):
    return (batch, *spatial, channels)
  return (batch, channels, *spatial)


def forward(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`(N, D, H, W, C)` x, `(kd, kh, kw, C, M)` kernel -> `(N, OD, OH, OW, C * M)`.

  Or `(N, C, D, H, W)` -> `(N, C * M, OD, OH, OW)` for a channels-first spec.
  """
  op = "forward"
  out = jax.ShapeDtypeStruct(
      _shape(spec, x.shape[0], spec.out_spatial, spec.channels * spec.multiplier, op),
      spec.out_dtype)
  y = jax.ffi.ffi_call("dw5d_forward", out)(_last(x, spec, op), kernel,
                                            **_attrs(spec, x.shape[0], op))
  return _back(y, spec, op)


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dx` in x's layout and the kernel's dtype."""
  op = "input_grad"
  out = jax.ShapeDtypeStruct(_shape(spec, ct.shape[0], spec.in_spatial, spec.channels, op),
                             kernel.dtype)
  dx = jax.ffi.ffi_call("dw5d_input_grad", out)(_last(ct, spec, op), kernel,
                                                **_attrs(spec, ct.shape[0], op))
  return _back(dx, spec, op)


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dk` as `(kd, kh, kw, C, M)` in x's dtype."""
  op = "kernel_grad"
  out = jax.ShapeDtypeStruct((*spec.window, spec.channels, spec.multiplier), x.dtype)
  return jax.ffi.ffi_call("dw5d_kernel_grad", out)(_last(x, spec, op), _last(ct, spec, op),
                                                   **_attrs(spec, x.shape[0], op))
