"""The `"conv"` lowering: fold carried axes into batch, one grouped XLA convolution.

XLA's own convolution (cuDNN on GPU): spatial axes that are carried through
untouched (window 1, stride 1, dilation 1, no padding) are folded into the
batch dimension (transposed next to it first when they are not adjacent, so
no data is mixed), and the remaining axes go to `lax.conv_general_dilated`
with `feature_group_count=C`. The gradients are XLA's too: the transposes
of that convolution, which JAX derives (`jax.linear_transpose`).

TF-name to lax-name mapping: `strides` -> `window_strides`, `dilations` ->
`rhs_dilation`, the layout -> `dimension_numbers`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax import lax

from dw5d_jax._spec import ConvSpec


def conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec, out_dtype: Any) -> jax.Array:
  """`fwd`: rank-5 `x` by `(kd, kh, kw, C, M)` `kernel`."""
  fold = [i for i in range(3) if spec.carried(i)]
  keep = [i for i in range(3) if i not in fold]
  if not keep:  # a 1x1x1 kernel with stride 1: convolve along W anyway.
    fold, keep = fold[:-1], fold[-1:]
  sp, ch = spec.spatial_axes, spec.channel_axis
  n = x.shape[0]
  c, m = spec.channels, spec.multiplier

  # (N, [C,] fold..., keep..., [C]) then merge N with the folded axes.
  if spec.channels_last:
    perm = (0, *(sp[i] for i in fold), *(sp[i] for i in keep), ch)
  else:
    perm = (0, *(sp[i] for i in fold), ch, *(sp[i] for i in keep))
  xt = x if perm == tuple(range(5)) else x.transpose(perm)
  folded_sizes = [x.shape[sp[i]] for i in fold]
  batch = n * math.prod(folded_sizes) if folded_sizes else n
  xt = xt.reshape((batch, *xt.shape[1 + len(fold):]))

  # Kernel (kd, kh, kw, C, M) -> (k_keep..., 1, C*M); output feature c*M + m is
  # in group c because lax splits the O dimension into C contiguous groups of M.
  rhs = kernel.reshape(*(spec.window[i] for i in keep), 1, c * m)
  nd = len(keep)
  lhs_spec = (0, nd + 1, *range(1, nd + 1)) if spec.channels_last else (0, 1, *range(2, nd + 2))
  dn = lax.ConvDimensionNumbers(lhs_spec=lhs_spec, rhs_spec=(nd + 1, nd, *range(nd)),
                                out_spec=lhs_spec)

  pads = [spec.padding[i] for i in keep]
  if any(jax.export.is_symbolic_dim(spec.in_spatial[i]) for i in keep):
    # With symbolic sizes, conv_general_dilated's padding (and the padding its
    # transpose rules derive from the sizes) would be symbolic, which it
    # rejects. Pad explicitly with the tight high pad instead: the padded size
    # is exactly (out - 1) * s + e, so the output size simplifies to `out` and
    # the transpose rules' paddings simplify to constants.
    first = 1 if spec.channels_last else 2
    cfg = [(0, 0, 0)] * xt.ndim
    for j, i in enumerate(keep):
      cfg[first + j] = (*spec.tight_padding(i), 0)
    xt = lax.pad(xt, np.zeros((), xt.dtype), cfg)
    pads = [(0, 0)] * nd

  y = lax.conv_general_dilated(
      xt, rhs,
      window_strides=tuple(spec.strides[i] for i in keep),
      padding=tuple(pads),
      rhs_dilation=tuple(spec.dilations[i] for i in keep),
      dimension_numbers=dn,
      feature_group_count=c,
      precision=spec.precision,
      preferred_element_type=spec.acc_dtype,
  )
  # Unfold: (N*F, ...) -> (N, fold..., ...) and undo the transpose.
  y = y.reshape((n, *folded_sizes, *y.shape[1:]))
  inv = tuple(perm.index(i) for i in range(5))
  y = y if inv == tuple(range(5)) else y.transpose(inv)
  return y.astype(out_dtype)


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec, out_dtype: Any) -> jax.Array:
  """`dx`: the transpose of `conv` in x (XLA's transposed convolution)."""
  n = ct.shape[0]
  x_shape = ((n, *spec.in_spatial, spec.channels) if spec.channels_last
             else (n, spec.channels, *spec.in_spatial))
  fwd = lambda x: conv(x, kernel.astype(out_dtype), spec, ct.dtype)  # noqa: E731
  (dx,) = jax.linear_transpose(fwd, jax.ShapeDtypeStruct(x_shape, out_dtype))(ct)
  return dx


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec, out_dtype: Any) -> jax.Array:
  """`dk`: the transpose of `conv` in the kernel."""
  k_shape = (*spec.window, spec.channels, spec.multiplier)
  fwd = lambda k: conv(x.astype(out_dtype), k, spec, ct.dtype)  # noqa: E731
  (dk,) = jax.linear_transpose(fwd, jax.ShapeDtypeStruct(k_shape, out_dtype))(ct)
  return dk
