"""The portable `"shift"` lowering: the three ops as sums over kernel taps of shifted views.

For tap `(a, b, e)` the output accumulates the padded input sampled at
`o * s + tap * r` along each spatial axis (`_geometry.tap_slice`), i.e. one
strided slice of the padded input per tap, times that tap's `(C, M)`
weights. On CPU, XLA turns this into two loops: one that writes the padded
input, and one fused, vectorised loop over the output that reads each tap's
slice from cache and multiplies-and-adds; far faster than its grouped
convolution. The native CPU kernels (`_native.py`) do the same without the
padded copy; this is what runs wherever they do not (other platforms,
`jax.export`, symbolic shapes, float16/float64).

How the taps are sliced matters as much as what they compute:

* The padding is written once, in x's dtype, and any channel multiplier
  `M > 1` is applied in that same pass (each channel repeated `M` times), so
  the tap loop is always the `M = 1` case: one multiply-add per tap on
  `C * M` contiguous channels, with no broadcast inside the loop.
* Channels-last with a unit stride along W: W and the channels are merged
  into one minor axis (`W * C` floats), a tap's W offset becomes an offset of
  `tap * r * C` along it and its weights are tiled along W. The fused loop's
  innermost dimension is then thousands of contiguous floats instead of `C`.

The gradients:

* input, `input_grad`: a depthwise convolution of the cotangent with the
  flipped kernel, summed over the multiplier: the cotangent padded by
  `e - 1 - pad` (`_geometry.transpose_pads`), dilated by the stride when
  it is not 1, convolved with stride 1 by the primitive (so on CPU the
  native forward kernel may run it);
* kernel, `kernel_grad`: per tap, the sum of `slice(padded x) * ct`,
  written so that XLA's CPU loop fusion does most of it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dw5d_jax import _primitive
from dw5d_jax._geometry import is_static
from dw5d_jax._spec import ConvSpec, Impl

# The kernel gradient unrolls sums over at most this many leading rows, and
# only while each row still holds this many elements (see kernel_grad): more
# rows only grow the code, and short rows are cheaper to reduce directly (and
# to trace and compile, e.g. in second-order gradients of small arrays).
_MAX_UNROLL = 256
_MIN_ROW = 4096


def pad_input(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """Pads rank-5 `x` to exactly the extent the taps read (`ConvSpec.tight_padding`)."""
  cfg = [(0, 0, 0)] * 5
  for i, ax in enumerate(spec.spatial_axes):
    cfg[ax] = (*spec.tight_padding(i), 0)
  if all(is_static(*c) and c == (0, 0, 0) for c in cfg):
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


def _tap_view(xp: jax.Array, spec: ConvSpec, tap: tuple[int, ...]):
  """`(start, limit, stride)` of tap `tap`'s slice of padded `xp`."""
  start, limit, stride = [0] * xp.ndim, list(xp.shape), [1] * xp.ndim
  for i, ax in enumerate(spec.spatial_axes):
    start[ax], limit[ax], stride[ax] = spec.tap_slice(i, tap[i])
  return start, limit, stride


def conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec, out_dtype: Any) -> jax.Array:
  """`fwd`: rank-5 `x` by `(kd, kh, kw, C, M)` `kernel`."""
  # The padded copy keeps x's dtype (bfloat16 input: half the bytes written
  # and read again); each tap's slice is converted inside the fused loop.
  xp = pad_input(repeat_channels(x, spec), spec)
  cm = spec.channels * spec.multiplier
  kernel = kernel.astype(spec.acc_dtype).reshape(*spec.window, cm)
  out = spec.out_spatial
  merge_w = spec.channels_last and spec.strides[2] == 1 and is_static(out[2], xp.shape[3])
  if merge_w:  # (N, D, H, W, CM) -> (N, D, H, W * CM): see the module docstring.
    xp = xp.reshape(*xp.shape[:3], xp.shape[3] * cm)
  y = None
  for tap in itertools.product(*(range(k) for k in spec.window)):
    start, limit, stride = _tap_view(xp, spec, tap)
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
  return y.astype(out_dtype)


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec, out_dtype: Any) -> jax.Array:
  """`dx`: a stride-1 convolution (the primitive) of `ct` with the flipped kernel."""
  c, m = spec.channels, spec.multiplier
  if ct.dtype == kernel.dtype:
    # One dtype (bfloat16 too): the convolution converts as it reads and
    # accumulates in acc_dtype, and with M = 1 writes the result's dtype, so
    # no pass converts ct or the result.
    in_dtype, conv_dtype = kernel.dtype, out_dtype if m == 1 else spec.acc_dtype
  else:  # a preferred_element_type made ct wider than the kernel
    in_dtype, conv_dtype = spec.acc_dtype, spec.acc_dtype
  ct = ct.astype(in_dtype)
  pads = tuple(spec.transpose_padding(i) for i in range(3))
  if spec.strides == (1, 1, 1):
    # The padding goes into the convolution's own spec, so the native kernel
    # reads ct as it is (no padded copy; XLA's lowering pads).
    ctp, padding = ct, pads
  else:  # dilated by the strides and padded
    cfg = [(0, 0, 0)] * 5
    for i, ax in enumerate(spec.spatial_axes):
      cfg[ax] = (*pads[i], spec.strides[i] - 1)
    ctp, padding = lax.pad(ct, np.zeros((), ct.dtype), cfg), ((0, 0),) * 3
  t_spec = spec._replace(
      strides=(1, 1, 1), padding=padding,
      in_spatial=tuple(ctp.shape[a] for a in spec.spatial_axes), out_spatial=spec.in_spatial,
      channels=c * m, multiplier=1, out_dtype=conv_dtype)
  flipped = kernel[::-1, ::-1, ::-1].reshape(*spec.window, c * m, 1)
  g = _primitive.conv(ctp, flipped.astype(in_dtype), t_spec, Impl("shift"))
  if m > 1:  # sum over the multiplier: channel c*M + m -> c
    # By explicit adds: a reduce here would make XLA hand the whole tap sum
    # to a library reduction, writing every tap's slice to memory first
    # (W3 input gradient: 166 ms instead of a few).
    ch = spec.channel_axis
    g = g.reshape(*g.shape[:ch], c, m, *g.shape[ch + 1:])
    g = sum(lax.index_in_dim(g, i, ch + 1, keepdims=False) for i in range(m))
  return g.astype(out_dtype)


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec, out_dtype: Any) -> jax.Array:
  """`dk`: per tap, the sum of `slice(padded x) * ct`.

  XLA on CPU hands a reduction to its library kernels only after writing
  each tap's slice to memory (one full copy per tap). Instead, the leading
  rows of the output grid (`N`, then the outer spatial axes while static, up
  to `_MAX_UNROLL` rows) are summed by unrolled adds, which XLA fuses with
  the slices and products into one vectorised loop per tap that writes a
  small partial sum; only that partial sum goes through `jnp.sum`.
  """
  c, m = spec.channels, spec.multiplier
  # x's channels repeated M times (in the padding pass) line up with ct's C*M.
  xp = pad_input(repeat_channels(x, spec), spec)
  ct = ct.astype(spec.acc_dtype)
  ch, sp = spec.channel_axis, spec.spatial_axes

  u, rows = 0, 1  # the number of unrolled leading axes, and their rows
  while (u != ch and is_static(*ct.shape)
         and rows * ct.shape[u] <= _MAX_UNROLL
         and math.prod(ct.shape[u + 1:]) >= _MIN_ROW):
    rows *= ct.shape[u]
    u += 1
  rest = tuple(a - u for a in range(ct.ndim) if a >= u and a != ch)

  def view(tap, row):
    """The slice of padded x that `tap` multiplies with `ct[row]`."""
    start, limit, stride = _tap_view(xp, spec, tap)
    for ax, r in enumerate(row):  # one position along each unrolled axis
      start[ax] = r if ax == 0 else start[ax] + r * spec.strides[sp.index(ax)]
      limit[ax], stride[ax] = start[ax] + 1, 1
    v = lax.slice(xp, start, limit, stride)
    return v.reshape(v.shape[len(row):]).astype(spec.acc_dtype)

  # Every tap's partial sum is one fused loop, but only when the partial sums
  # are stacked and reduced together: a `jnp.sum` per tap makes XLA split
  # the unrolled adds into hundreds of loops (W1: 228 fusions instead of 11).
  taps = []
  for tap in np.ndindex(*spec.window):
    part = None
    for row in np.ndindex(*ct.shape[:u]):
      term = view(tap, row) * _row(ct, row)
      part = term if part is None else part + term
    taps.append(part)
  dk = jnp.sum(jnp.stack(taps), axis=tuple(a + 1 for a in rest))
  return dk.reshape(*spec.window, c, m).astype(out_dtype)


def _row(a: jax.Array, index: tuple[int, ...]) -> jax.Array:
  """`a[index]` for leading static ints, as a plain slice (no gather)."""
  u = len(index)
  start = (*index, *(0,) * (a.ndim - u))
  limit = (*(i + 1 for i in index), *a.shape[u:])
  return lax.slice(a, start, limit).reshape(a.shape[u:])
