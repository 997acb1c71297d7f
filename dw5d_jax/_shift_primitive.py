"""The `"shift"` lowering as a JAX primitive with its own gradient rules.

Left to itself, JAX differentiates `_shift.shift_conv` op by op: the transpose
of every tap's slice is a full-size padded copy, and the kernel gradient
becomes one reduction per tap over a materialised slice; on CPU that backward
pass was 10-70x slower than the forward (benchmarks/RESULTS.md). So the
convolution is one primitive, `shift_conv_p`, bilinear in `(x, kernel)`, with:

* JVP: `dy = conv(dx, k) + conv(x, dk)` (`ad.defbilinear`), which gives
  forward mode at any order.
* Transposes (reverse mode), each its own bilinear primitive whose
  transposes are again the convolution and the other gradient
  (`<dx(ct, k), g> = <conv(g, k), ct> = <dk(g, ct), k>`), so gradients of
  gradients work:
  - input, `shift_input_grad_p`: a depthwise convolution of the cotangent
    with the flipped kernel, summed over the multiplier. Its portable form
    (`input_grad_xla`) calls `shift_conv_p` on the cotangent padded by
    `e - 1 - pad` (in the spec, with unit strides) or dilated by the stride
    and padded. Worked example, one axis: n=5, k=3, r=1, s=2, SAME: out=3,
    pads (1, 1), tight high pad 0 (the padded size is exactly
    (3 - 1) * 2 + 3 = 7). The cotangent `[c0, c1, c2]` dilates to
    `[c0, 0, c1, 0, c2]`, is padded by `(3 - 1 - 1, 3 - 1 - 0) = (1, 2)` to
    length 8 = n + e - 1, and a VALID convolution with the flipped kernel
    gives the 5 input positions.
  - kernel, `shift_kernel_grad_p`: per tap, the sum of `slice(padded x) *
    ct` over batch and positions; its portable form (`kernel_grad_xla`) is
    written so that XLA's CPU loop fusion does most of it.
* Batching: a batched `x` (or cotangent) is folded into `N`; a batched
  kernel, or a batched kernel gradient, falls back to `vmap` of the plain
  math.

Lowering: on CPU, the native kernels (`_native.py`: one pass over the
unpadded input for the convolution and for its input gradient, a one-pass
kernel gradient) wherever `_native.usable` allows; otherwise, and on every
other platform, `mlir.lower_fun` of the plain math (`_shift.shift_conv`,
`input_grad_xla`, `kernel_grad_xla`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from dw5d_jax import _native
from dw5d_jax._args import ConvSpec
from dw5d_jax._shift import pad_input, repeat_channels, shift_conv, static_dims

shift_conv_p = Primitive("dw5d_shift_conv")
shift_input_grad_p = Primitive("dw5d_shift_input_grad")
shift_kernel_grad_p = Primitive("dw5d_shift_kernel_grad")

# The kernel gradient unrolls sums over at most this many leading rows, and
# only while each row still holds this many elements (see kernel_grad): more
# rows only grow the code, and short rows are cheaper to reduce directly (and
# to trace and compile, e.g. in second-order gradients of small arrays).
_MAX_UNROLL = 256
_MIN_ROW = 4096


def shift_lowering(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """Depthwise convolution of rank-5 `x` with `(kd, kh, kw, C, M)` `kernel`."""
  return shift_conv_p.bind(x, kernel, spec=spec)


def _out_shape(x_shape, spec: ConvSpec) -> tuple:
  cm = spec.channels * spec.multiplier
  if spec.channels_last:
    return (x_shape[0], *spec.out_spatial, cm)
  return (x_shape[0], cm, *spec.out_spatial)


def _abstract_eval(x, kernel, *, spec: ConvSpec):
  del kernel
  return jax.core.ShapedArray(_out_shape(x.shape, spec), spec.out_dtype)


def _fold_batch(bind, plain):
  """A batching rule for `bind(a, kernel, spec)`, which works per sample along N.

  A batch of `a` alone is folded into N (one call); a batched kernel falls
  back to `vmap` of the plain math `plain`.
  """
  def rule(args, dims, *, spec: ConvSpec):
    a, kernel = args
    ba, bk = dims
    if bk is None:
      a = jnp.moveaxis(a, ba, 0)
      b, n = a.shape[0], a.shape[1]
      y = bind(a.reshape(b * n, *a.shape[2:]), kernel, spec)
      return y.reshape(b, n, *y.shape[1:]), 0
    return jax.vmap(functools.partial(plain, spec=spec), in_axes=dims)(a, kernel), 0
  return rule


def _dilate_and_pad_cotangent(ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """The input gradient's input: `ct` dilated by the strides, padded by `e - 1 - pad`."""
  cfg = [(0, 0, 0)] * 5
  for i, ax in enumerate(spec.spatial_axes):
    lo, hi = spec.tight_padding(i)
    e = (spec.window[i] - 1) * spec.dilations[i] + 1
    cfg[ax] = (e - 1 - lo, e - 1 - hi, spec.strides[i] - 1)
  return lax.pad(ct, np.zeros((), ct.dtype), cfg)


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dx`, x's shape in the kernel's dtype."""
  return shift_input_grad_p.bind(ct, kernel, spec=spec)


def input_grad_xla(ct: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """`input_grad` as a stride-1 convolution (`shift_conv_p`) with the flipped kernel."""
  c, m = spec.channels, spec.multiplier
  if ct.dtype == kernel.dtype:
    # One dtype (bfloat16 too): the convolution converts as it reads and
    # accumulates in acc_dtype, and with M = 1 writes the result's dtype, so
    # no pass converts ct or the result.
    in_dtype, out_dtype = kernel.dtype, kernel.dtype if m == 1 else spec.acc_dtype
  else:  # a preferred_element_type made ct wider than the kernel
    in_dtype, out_dtype = spec.acc_dtype, spec.acc_dtype
  ct = ct.astype(in_dtype)
  sp = spec.spatial_axes
  if spec.strides == (1, 1, 1):
    # The padding `e - 1 - pad` goes into the convolution's own spec, so the
    # native kernel reads ct as it is (no padded copy; XLA's lowering pads).
    pads = []
    for i in range(3):
      lo, hi = spec.tight_padding(i)
      e = (spec.window[i] - 1) * spec.dilations[i] + 1
      pads.append((e - 1 - lo, e - 1 - hi))
    ctp, padding = ct, tuple(pads)
  else:
    ctp, padding = _dilate_and_pad_cotangent(ct, spec), ((0, 0),) * 3
  t_spec = spec._replace(
      strides=(1, 1, 1), padding=padding,
      in_spatial=tuple(ctp.shape[a] for a in sp), out_spatial=spec.in_spatial,
      channels=c * m, multiplier=1, out_dtype=out_dtype)
  flipped = kernel[::-1, ::-1, ::-1].reshape(*spec.window, c * m, 1)
  g = shift_lowering(ctp, flipped.astype(in_dtype), t_spec)
  if m > 1:  # sum over the multiplier: channel c*M + m -> c
    # By explicit adds: a reduce here would make XLA hand the whole tap sum
    # to a library reduction, writing every tap's slice to memory first
    # (W3 input gradient: 166 ms instead of a few).
    ch = spec.channel_axis
    g = g.reshape(*g.shape[:ch], c, m, *g.shape[ch + 1:])
    g = sum(lax.index_in_dim(g, i, ch + 1, keepdims=False) for i in range(m))
  return g.astype(kernel.dtype)


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """`d <conv(x, k), ct> / dk`, as `(kd, kh, kw, C, M)` in x's dtype."""
  return shift_kernel_grad_p.bind(x, ct, spec=spec)


def kernel_grad_xla(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """`kernel_grad` in plain JAX ops: per tap, the sum of `slice(padded x) * ct`.

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
  while (u != ch and static_dims(*ct.shape)
         and rows * ct.shape[u] <= _MAX_UNROLL
         and math.prod(ct.shape[u + 1:]) >= _MIN_ROW):
    rows *= ct.shape[u]
    u += 1
  rest = tuple(a - u for a in range(ct.ndim) if a >= u and a != ch)

  def view(tap, row):
    """The slice of padded x that `tap` multiplies with `ct[row]`."""
    start, limit, stride = [0] * 5, list(xp.shape), [1] * 5
    for i, ax in enumerate(sp):
      start[ax] = tap[i] * spec.dilations[i]
      limit[ax] = start[ax] + (spec.out_spatial[i] - 1) * spec.strides[i] + 1
      stride[ax] = spec.strides[i]
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
  return dk.reshape(*spec.window, c, m).astype(x.dtype)


def _row(a: jax.Array, index: tuple[int, ...]) -> jax.Array:
  """`a[index]` for leading static ints, as a plain slice (no gather)."""
  u = len(index)
  start = (*index, *(0,) * (a.ndim - u))
  limit = (*(i + 1 for i in index), *a.shape[u:])
  return lax.slice(a, start, limit).reshape(a.shape[u:])


def _transpose_x(ct, x, kernel, *, spec: ConvSpec):
  del x
  return input_grad(ct, kernel, spec)


def _transpose_kernel(ct, x, kernel, *, spec: ConvSpec):
  del kernel
  return kernel_grad(x, ct, spec)


# The input gradient `dx(ct, k)` and the kernel gradient `dk(x, ct)` are
# bilinear too: <dx(ct, k), g> = <conv(g, k), ct> = <dk(g, ct), k>, so their
# transposes are the convolution and the other gradient.
def _ig_abstract_eval(ct, kernel, *, spec: ConvSpec):
  c, n = spec.channels, ct.shape[0]
  shape = (n, *spec.in_spatial, c) if spec.channels_last else (n, c, *spec.in_spatial)
  return jax.core.ShapedArray(shape, kernel.dtype)


def _ig_transpose_ct(g, ct, kernel, *, spec: ConvSpec):
  del ct
  return shift_lowering(g, kernel, spec)


def _ig_transpose_kernel(g, ct, kernel, *, spec: ConvSpec):
  del kernel
  return kernel_grad(g, ct, spec)


def _kg_abstract_eval(x, ct, *, spec: ConvSpec):
  del ct
  return jax.core.ShapedArray((*spec.window, spec.channels, spec.multiplier), x.dtype)


def _kg_transpose_x(g, x, ct, *, spec: ConvSpec):
  del x
  return input_grad(ct, g, spec)


def _kg_transpose_ct(g, x, ct, *, spec: ConvSpec):
  del ct
  return shift_lowering(x, g, spec)


def _kg_batch(args, dims, *, spec: ConvSpec):
  fn = functools.partial(kernel_grad_xla, spec=spec)
  return jax.vmap(fn, in_axes=dims)(*args), 0


def _define(prim, impl, abstract_eval, batcher, transposes, native_fn, op):
  """Registers a bilinear primitive: `impl` is its plain math (eager and portable lowering).

  On CPU the lowering calls `native_fn` (an FFI call, `_native.py`) where
  `_native.usable` allows for `op`, else lowers `impl` like every other platform.
  """
  prim.def_impl(impl)
  prim.def_abstract_eval(abstract_eval)
  portable = mlir.lower_fun(impl, multiple_results=False)
  native = mlir.lower_fun(native_fn, multiple_results=False)
  mlir.register_lowering(prim, portable)
  batching.primitive_batchers[prim] = batcher
  ad.defbilinear(prim, *transposes)

  def cpu_rule(ctx, a, b, *, spec: ConvSpec):
    return (native if _native.usable(ctx, spec, op) else portable)(ctx, a, b, spec=spec)

  mlir.register_lowering(prim, cpu_rule, platform="cpu")


_define(shift_conv_p, shift_conv, _abstract_eval, _fold_batch(shift_lowering, shift_conv),
        (_transpose_x, _transpose_kernel), _native.forward, "forward")
_define(shift_input_grad_p, input_grad_xla, _ig_abstract_eval,
        _fold_batch(input_grad, input_grad_xla), (_ig_transpose_ct, _ig_transpose_kernel),
        _native.input_grad, "input_grad")
_define(shift_kernel_grad_p, kernel_grad_xla, _kg_abstract_eval, _kg_batch,
        (_kg_transpose_x, _kg_transpose_ct), _native.kernel_grad, "kernel_grad")
