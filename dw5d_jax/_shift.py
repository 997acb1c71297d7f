"""The `"shift"` lowering: a sum over kernel taps of strided, shifted views.

For tap `(a, b, e)` the output is accumulated from the padded input sampled at
`(o * s + tap * r)` along each spatial axis, i.e. one strided slice of the
padded input per tap, multiplied by that tap's `(C, M)` weights. XLA fuses the
pad, the slices, the products and the sum into one loop over the output,
which on CPU is far faster than its grouped convolution.

Worked example of the slice bounds, one axis: n=7, k=3, r=2, s=2, SAME.
e = 5, out = 4, total pad = max(3*2 + 5 - 7, 0) = 4 -> (2, 2), padded size 11.
Tap t reads padded positions t*r + o*s for o = 0..3: start t*r, limit
t*r + (out - 1)*s + 1, stride s; tap 2 reads 4, 6, 8, 10 (the last is padding).
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax import lax

from dw5d_jax._args import ConvSpec


def pad_input(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """Pads rank-5 `x` to exactly the extent the taps read (`ConvSpec.tight_padding`)."""
  cfg = [(0, 0, 0)] * 5
  for i, ax in enumerate(spec.spatial_axes):
    cfg[ax] = (*spec.tight_padding(i), 0)
  if all(not jax.export.is_symbolic_dim(p) and p == 0 for c in cfg for p in c):
    return x
  return lax.pad(x, np.zeros((), x.dtype), cfg)


def shift_lowering(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """Depthwise convolution of rank-5 `x` with `(kd, kh, kw, C, M)` `kernel`."""
  x = pad_input(x.astype(spec.acc_dtype), spec)
  kernel = kernel.astype(spec.acc_dtype)
  c, m = spec.channels, spec.multiplier
  sp = spec.spatial_axes
  y = None
  for tap in itertools.product(*(range(k) for k in spec.window)):
    start, limit, stride = [0] * 5, list(x.shape), [1] * 5
    for i, ax in enumerate(sp):
      start[ax] = tap[i] * spec.dilations[i]
      limit[ax] = start[ax] + (spec.out_spatial[i] - 1) * spec.strides[i] + 1
      stride[ax] = spec.strides[i]
    view = lax.slice(x, start, limit, stride)
    w = kernel[tap]  # (C, M); shapes below are explicit (no rank promotion).
    if m == 1:
      term = view * w.reshape((1, 1, 1, 1, c) if spec.channels_last else (1, c, 1, 1, 1))
    elif spec.channels_last:
      term = view[..., None] * w.reshape(1, 1, 1, 1, c, m)  # (N, D, H, W, C, M)
    else:
      term = view[:, :, None] * w.reshape(1, c, m, 1, 1, 1)  # (N, C, M, D, H, W)
    y = term if y is None else y + term
  if m > 1:
    shape = y.shape
    y = y.reshape(*shape[:4], c * m) if spec.channels_last else y.reshape(
        shape[0], c * m, *shape[3:])
  return y.astype(spec.out_dtype)
