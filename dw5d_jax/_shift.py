"""The `"shift"` lowering: a sum over kernel taps of strided, shifted views.

For tap `(a, b, e)` the output is accumulated from the padded input sampled at
`(o * s + tap * r)` along each spatial axis, i.e. one strided slice of the
padded input per tap, multiplied by that tap's `(C, M)` weights. On CPU, XLA
turns this into two loops: one that writes the padded input, and one fused,
vectorised loop over the output that reads each tap's slice from cache and
multiplies-and-adds; far faster than its grouped convolution.

Worked example of the slice bounds, one axis: n=7, k=3, r=2, s=2, SAME.
e = 5, out = 4, total pad = max(3*2 + 5 - 7, 0) = 4 -> (2, 2), padded size 11.
Tap t reads padded positions t*r + o*s for o = 0..3: start t*r, limit
t*r + (out - 1)*s + 1, stride s; tap 2 reads 4, 6, 8, 10 (the last is padding).

How the taps are sliced matters as much as what they compute (measured on
the 2-core CPU, benchmarks/RESULTS.md):

* The padding is written once, in x's dtype, and any channel
  multiplier `M > 1` is applied in that same pass (each channel repeated `M`
  times), so the tap loop is always the `M = 1` case: one multiply-add per
  tap on `C * M` contiguous channels, with no broadcast inside the loop.
* Channels-last with a unit stride along W: W and the channels are merged
  into one minor axis (`W * C` floats), a tap's W offset becomes an offset of
  `tap * r * C` along it and its weights are tiled along W. The fused loop's
  innermost dimension is then thousands of contiguous floats instead of `C`.

This module is the math only; `_shift_primitive.py` wraps it in a primitive
with its own gradient and batching rules.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dw5d_jax._args import ConvSpec


def static_dims(*dims) -> bool:
  return not any(jax.export.is_symbolic_dim(d) for d in dims)


def pad_input(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """Pads rank-5 `x` to exactly the extent the taps read (`ConvSpec.tight_padding`)."""
  cfg = [(0, 0, 0)] * 5
  for i, ax in enumerate(spec.spatial_axes):
    cfg[ax] = (*spec.tight_padding(i), 0)
  if all(static_dims(*c) and c == (0, 0, 0) for c in cfg):
    return x
  return lax.pad(x, np.zeros((), x.dtype), cfg)


def repeat_channels(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """`(..., C)` -> `(..., C * M)` with channel `c` at `c * M + m` (channels-first alike)."""
  m = spec.multiplier
  if m == 1:
    return x
  ch = spec.channel_axis
  x = lax.broadcast_in_dim(x, (*x.shape[:ch + 1], m, *x.shape[ch + 1:]),
                           (*range(ch + 1), *range(ch + 2, 6)))
  return x.reshape(*x.shape[:ch], spec.channels * m, *x.shape[ch + 2:])


def shift_conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """Depthwise convolution of rank-5 `x` with `(kd, kh, kw, C, M)` `kernel`."""
  # The padded copy keeps x's dtype (bfloat16 input: half the bytes written
  # and read again); each tap's slice is converted inside the fused loop.
  xp = pad_input(repeat_channels(x, spec), spec)
  cm = spec.channels * spec.multiplier
  kernel = kernel.astype(spec.acc_dtype).reshape(*spec.window, cm)
  sp = spec.spatial_axes
  out = spec.out_spatial
  merge_w = spec.channels_last and spec.strides[2] == 1 and static_dims(out[2], xp.shape[3])
  if merge_w:  # (N, D, H, W, CM) -> (N, D, H, W * CM): see the module docstring.
    xp = xp.reshape(*xp.shape[:3], xp.shape[3] * cm)
  y = None
  for tap in itertools.product(*(range(k) for k in spec.window)):
    start, limit, stride = [0] * xp.ndim, list(xp.shape), [1] * xp.ndim
    for i, ax in enumerate(sp):
      start[ax] = tap[i] * spec.dilations[i]
      limit[ax] = start[ax] + (out[i] - 1) * spec.strides[i] + 1
      stride[ax] = spec.strides[i]
    w = kernel[tap]  # (CM,); shapes below are explicit (no rank promotion).
    if merge_w:
      start[3], limit[3] = start[3] * cm, (start[3] + out[2]) * cm
      w = jnp.tile(w, out[2]).reshape(1, 1, 1, out[2] * cm)
    else:
      w = w.reshape((1, 1, 1, 1, cm) if spec.channels_last else (1, cm, 1, 1, 1))
    term = lax.slice(xp, start, limit, stride).astype(spec.acc_dtype) * w
    y = term if y is None else y + term
  if merge_w:
    y = y.reshape(*y.shape[:3], out[2], cm)
  return y.astype(spec.out_dtype)
