"""The native CPU kernels as JAX functions (XLA FFI custom calls).

`dw5d_jax/_csrc/` (built by `_native_build.py`) has three XLA FFI handlers
for rank-5 arrays, each with channels-last kernels (vectorised over
channels) and channels-first ones (vectorised along W). They take the
problem as named attributes (`_attrs`) and the kernel in the library's
`(kd, kh, kw, C, M)` layout, float32 or bfloat16. When they run, and in
which layout, is `_policy.py`'s decision:

* `dw5d_forward(x, w) -> y`: the depthwise convolution, reading x without a
  padded copy (out-of-range taps are skipped), float32 accumulation.
* `dw5d_input_grad(ct, w) -> dx`: the input gradient; with unit strides and
  no multiplier the forward kernel on ct with the flipped kernel, otherwise
  a transposed convolution in gather form (no dilated copy of ct), summing
  the multiplier as it goes.
* `dw5d_kernel_grad(x, ct) -> dk`: the kernel gradient in one pass over x
  and the cotangent, every tap's sum accumulated together (XLA needs one
  pass per tap).

With an epilogue `y = act(conv(x, w) + b)` (`_epilogue.py`), in either layout:

* `dw5d_forward_epilogue(x, w, b) -> y`: the forward, the bias and the
  activation applied to each output row before it is stored;
* `dw5d_epilogue_grad(x, w, b, ct) -> (g, dk, db)`: the kernel gradient's
  pass, with `g = ct * act'(z)` (z recomputed from the x windows the pass
  reads) written once and `db` reduced along the way;
* `dw5d_epilogue_grad_y(x, y, ct) -> (g, dk, db)`: the same with `act'(z)`
  from y (relu, relu6, sigmoid, tanh);
* `dw5d_bias_grad(x, ct) -> (dk, db)`: no activation, `g = ct`.

One frame of a stream (`_ring.py`), channels-last:

* `dw5d_stream_step(ring, frame, w, head) -> (ring, y)`: the frame written
  into slot `head` of the ring in place (the ring result aliases the
  argument: no copy when the ring is donated or a loop's carry), and the
  window of the ring's frames, oldest first, convolved where they lie.
"""

from __future__ import annotations

import jax
import numpy as np

from dw5d_jax._spec import ConvSpec


def _attrs(spec: ConvSpec, batch: int) -> dict:
  """The problem as the FFI handlers' named attributes (`_csrc/handlers.cc`)."""
  arrays = dict(in_spatial=spec.in_spatial, out_spatial=spec.out_spatial, window=spec.window,
                strides=spec.strides, dilations=spec.dilations,
                padding_low=[lo for lo, _ in spec.padding])
  return dict(batch=batch, channels=spec.channels, multiplier=spec.multiplier,
              channels_first=not spec.channels_last,
              **{name: np.asarray(v, np.int64) for name, v in arrays.items()})


def _shape(spec: ConvSpec, batch: int, spatial, channels: int) -> tuple[int, ...]:
  """An `(N, *spatial, C)` array's shape in the spec's layout."""
  if spec.channels_last:
    return (batch, *spatial, channels)
  return (batch, channels, *spatial)


def forward(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`(N, D, H, W, C)` x, `(kd, kh, kw, C, M)` kernel -> `(N, OD, OH, OW, C * M)`.

  Or `(N, C, D, H, W)` -> `(N, C * M, OD, OH, OW)` for a channels-first spec.
  """
  out = jax.ShapeDtypeStruct(
      _shape(spec, x.shape[0], spec.out_spatial, spec.channels * spec.multiplier),
      spec.out_dtype)
  return jax.ffi.ffi_call("dw5d_forward", out)(x, kernel, **_attrs(spec, x.shape[0]))


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dx` in x's layout and the kernel's dtype."""
  out = jax.ShapeDtypeStruct(_shape(spec, ct.shape[0], spec.in_spatial, spec.channels),
                             kernel.dtype)
  return jax.ffi.ffi_call("dw5d_input_grad", out)(ct, kernel, **_attrs(spec, ct.shape[0]))


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dk` as `(kd, kh, kw, C, M)` in x's dtype."""
  out = jax.ShapeDtypeStruct((*spec.window, spec.channels, spec.multiplier), x.dtype)
  return jax.ffi.ffi_call("dw5d_kernel_grad", out)(x, ct, **_attrs(spec, x.shape[0]))


def _cotangent_structs(x: jax.Array, kernel_dtype, spec: ConvSpec, with_g: bool):
  cm = spec.channels * spec.multiplier
  g = jax.ShapeDtypeStruct(_shape(spec, x.shape[0], spec.out_spatial, cm), np.float32)
  dk = jax.ShapeDtypeStruct((*spec.window, spec.channels, spec.multiplier), kernel_dtype)
  db = jax.ShapeDtypeStruct((cm,), x.dtype)
  return (g, dk, db) if with_g else (dk, db)


def forward_epilogue(x: jax.Array, kernel: jax.Array, bias: jax.Array, spec: ConvSpec,
                     activation: str | None) -> jax.Array:
  """`act(conv(x, kernel) + bias)` in `spec.out_dtype`, in the spec's layout."""
  out = jax.ShapeDtypeStruct(
      _shape(spec, x.shape[0], spec.out_spatial, spec.channels * spec.multiplier),
      spec.out_dtype)
  return jax.ffi.ffi_call("dw5d_forward_epilogue", out)(
      x, kernel, bias, activation=activation or "none", **_attrs(spec, x.shape[0]))


def epilogue_grad(x: jax.Array, kernel: jax.Array, r: jax.Array, ct: jax.Array,
                  spec: ConvSpec, activation: str | None, from_output: bool):
  """`(g, dk, db)`: `g = ct * act'(z)` (float32), `dk` in the kernel's dtype, `db` in x's.

  `r` is y when `from_output`, else the bias (z recomputed). Without an
  activation `g` is `ct` itself.
  """
  attrs = _attrs(spec, x.shape[0])
  if activation is None:
    dk, db = jax.ffi.ffi_call("dw5d_bias_grad", _cotangent_structs(x, kernel.dtype, spec, False))(
        x, ct, **attrs)
    return ct, dk, db
  structs = _cotangent_structs(x, kernel.dtype, spec, True)
  if from_output:
    return tuple(jax.ffi.ffi_call("dw5d_epilogue_grad_y", structs)(
        x, r, ct, activation=activation, **attrs))
  return tuple(jax.ffi.ffi_call("dw5d_epilogue_grad", structs)(
      x, kernel, r, ct, activation=activation, **attrs))


def stream_step(ring: jax.Array, frame: jax.Array, kernel: jax.Array, head: jax.Array,
                spec: ConvSpec) -> tuple[jax.Array, jax.Array]:
  """`(ring, y)`: `frame` `(N, 1, H, W, C)` into slot `head` of `ring` `(N, E, H, W, C)`.

  `spec` is the convolution of the ring's window (`_ring.py`): channels-last,
  along D `E` frames in, one out, no padding; `y` is `(N, 1, OH, OW, C * M)`.
  """
  n = ring.shape[0]
  y = jax.ShapeDtypeStruct(_shape(spec, n, spec.out_spatial, spec.channels * spec.multiplier),
                           spec.out_dtype)
  call = jax.ffi.ffi_call("dw5d_stream_step", (jax.ShapeDtypeStruct(ring.shape, ring.dtype), y),
                          input_output_aliases={0: 0})
  return tuple(call(ring, frame, kernel, head.astype(np.int32), **_attrs(spec, n)))
