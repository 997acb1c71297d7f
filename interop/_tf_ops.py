"""TensorFlow reference ops: the dw5d_jax ops written with TF ops only.

`tf_depthwise_conv2d` is the classic recipe (fold the carried spatial axis
into batch, run `tf.nn.depthwise_conv2d` on the 4D result) done right: the
carried axis is transposed next to batch *before* the reshape that folds it
in. Reshaping without that transpose when the carried axis is not next to
batch regroups the data and silently mixes rows of different slices. `tf_depthwise_conv3d` stacks
the depth taps into channels and makes one `tf.nn.depthwise_conv2d` call,
because TF's grouped `conv3d` has no CPU kernel.

Every configuration `dw5d_jax` accepts is accepted here, including those
`tf.nn.depthwise_conv2d` refuses (unequal strides, strides with dilations,
explicit padding with dilations). Padding is always applied explicitly with
`tf.pad` (TF's SAME split computed from `tf.shape` when sizes are unknown
while tracing), then a VALID convolution runs, and strides it cannot take
are applied by strided slicing, before the convolution where that is exact.
Border modes pad with `tf.pad`'s `"REFLECT"` and `"SYMMETRIC"`, and with
slices and concatenation for `"edge"` and `"circular"` (TF has neither),
written independently of `dw5d_jax`'s own padding code.

Like `dw5d_jax`, float16 and bfloat16 inputs are computed in float32 and the
result is rounded back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from dw5d_jax import _args, _geometry

_Ints = int | tuple[int, ...]
_Padding = str | tuple[str | tuple[int, int], ...]
_FLOATS = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def tf_depthwise_conv2d(
    x: Any,
    kernel: Any,
    *,
    strides: _Ints = 1,
    padding: _Padding = "SAME",
    padding_mode: str | tuple[str, ...] = "zeros",
    dilations: _Ints = 1,
    axes: str = "HW",
    data_format: str | None = None,
) -> tf.Tensor:
  """`dw5d_jax.depthwise_conv2d` in TensorFlow: 2D depthwise per slice of a 5D tensor.

  Args:
    x: a `tf.Tensor`, `tf.Variable` or NumPy array of known rank: 5,
      `(N, D, H, W, C)` (`"NDHWC"`) or `(N, C, D, H, W)` (`"NCDHW"`); or 4,
      `(N, H, W, C)` (`"NHWC"`) or `(N, C, H, W)` (`"NCHW"`). Batch and spatial
      sizes may be unknown while tracing (`None` in a `tf.function`
      signature); the channel size must be known.
    kernel: `(k0, k1, C, M)` with a static shape, dim `i` along `axes[i]`;
      x's dtype.
    strides: a positive int, or one per convolved axis (in `axes` order).
    padding: `"SAME"`, `"VALID"` (TF's rules) or `"CAUSAL"`, or one entry
      per convolved axis, each such a string or a `(lo, hi)` pair.
    padding_mode: `"zeros"`, `"reflect"`, `"symmetric"`, `"edge"` or
      `"circular"` (numpy.pad's meanings, as in `dw5d_jax`), or one per
      convolved axis. With sizes unknown while tracing, padding wider than
      the mode fills fails when the graph runs.
    dilations: a positive int, or one per convolved axis; any combination
      with `strides`.
    axes: rank-5 only: two distinct letters of `D`, `H`, `W`, e.g. `"DW"`.
    data_format: `None` (channels-last) or one of the layouts above.

  Returns:
    A `tf.Tensor` in x's layout and dtype with `C * M` channels ordered
    `c * M + m`, sized as `dw5d_jax.depthwise_conv2d`'s output.

  Raises:
    TypeError: non-tensor inputs, non-floating or mismatched dtypes.
    ValueError: unknown rank, wrong ranks or layouts, channel mismatch, bad
      strides, dilations, padding, padding_mode or axes, or an empty output.

  Example:
    >>> import numpy as np
    >>> import interop
    >>> x = np.ones((2, 5, 16, 16, 3), np.float32)   # (N, D, H, W, C)
    >>> k = np.ones((3, 3, 3, 2), np.float32)        # (kd, kw, C, M)
    >>> interop.tf_depthwise_conv2d(x, k, axes="DW", strides=(1, 2)).shape
    TensorShape([2, 5, 16, 8, 6])
  """
  fn = "tf_depthwise_conv2d"
  x = _tensor(fn, "x", x)
  kernel = _tensor(fn, "kernel", kernel)
  layout = _layout(fn, x, data_format, allowed_4d=True)
  axes = _args.check_axes(fn, axes)
  if x.shape.rank == 4 and axes != "HW":
    raise ValueError(f"{fn}: `axes` applies to rank-5 `x` only; rank-4 `x` ({layout}) "
                     f"is always convolved over H and W, got axes={axes!r}.")
  padding = _args.check_padding(fn, padding, axes)
  conv = _Conv2d(
      fn, axes,
      strides=_args.int_tuple(fn, "strides", strides, 2, axes),
      dilations=_args.int_tuple(fn, "dilations", dilations, 2, axes),
      padding=padding, modes=_args.check_padding_mode(fn, padding_mode, padding, axes))
  dtype = _check_operands(fn, x, kernel, axes, layout)

  # One transpose takes x from its layout to (N, [F,] A0, A1, C): F the carried
  # axis, A0 and A1 the convolved axes in kernel order. With F next to N the
  # reshape that folds it into batch keeps every slice intact.
  carried = "DHW".replace(axes[0], "").replace(axes[1], "") if x.shape.rank == 5 else ""
  perm = [layout.index(a) for a in "N" + carried + axes + "C"]
  xt = _cast(_transpose(x, perm), _compute_dtype(dtype))
  k = _cast(kernel, _compute_dtype(dtype))
  if x.shape.rank == 4:
    y = conv(xt, k)
  else:
    n, f = _dim(xt, 0), _dim(xt, 1)
    y = conv(tf.reshape(xt, [n * f, _dim(xt, 2), _dim(xt, 3), _dim(xt, 4)]), k)
    y = tf.reshape(y, [n, f, _dim(y, 1), _dim(y, 2), _dim(y, 3)])
  return tf.cast(_transpose(y, [perm.index(i) for i in range(len(perm))]), dtype)


def tf_depthwise_conv3d(
    x: Any,
    kernel: Any,
    *,
    strides: _Ints = 1,
    padding: _Padding = "SAME",
    padding_mode: str | tuple[str, ...] = "zeros",
    dilations: _Ints = 1,
    data_format: str = "NDHWC",
) -> tf.Tensor:
  """`dw5d_jax.depthwise_conv3d` in TensorFlow: true 3D depthwise, CPU included.

  Depth tap `t` reads the padded input at depths `o * sd + t * rd`: one
  strided depth slice per tap. The `kd` slices are stacked into channels
  (`(N * Od, H, W, kd * C)`), one `tf.nn.depthwise_conv2d` with the kernel
  reshaped to `(kh, kw, kd * C, M)` convolves them over H and W, and the `kd`
  partial results are summed.

  Args:
    x: a `tf.Tensor`, `tf.Variable` or NumPy array, `(N, D, H, W, C)`
      (`"NDHWC"`) or `(N, C, D, H, W)` (`"NCDHW"`). Batch and spatial sizes
      may be unknown while tracing; the channel size must be known.
    kernel: `(kd, kh, kw, C, M)` with a static shape; x's dtype.
    strides: a positive int, or three (D, H, W).
    padding: `"SAME"`, `"VALID"` or `"CAUSAL"`, or three entries, each such a
      string or a `(lo, hi)` pair.
    padding_mode: `"zeros"`, `"reflect"`, `"symmetric"`, `"edge"` or
      `"circular"`, or three of them, as for `tf_depthwise_conv2d`.
    dilations: a positive int, or three; any combination with `strides`.
    data_format: `"NDHWC"` or `"NCDHW"`.

  Returns:
    A `tf.Tensor` in x's layout and dtype with `C * M` channels ordered
    `c * M + m`, sized as `dw5d_jax.depthwise_conv3d`'s output.

  Raises:
    TypeError: non-tensor inputs, non-floating or mismatched dtypes.
    ValueError: unknown rank, wrong rank or layout, channel mismatch, bad
      strides, dilations, padding or padding_mode, or an empty output.

  Example:
    >>> import numpy as np
    >>> import interop
    >>> x = np.ones((1, 8, 8, 8, 4), np.float32)     # (N, D, H, W, C)
    >>> k = np.ones((3, 3, 3, 4, 1), np.float32)     # (kd, kh, kw, C, M)
    >>> interop.tf_depthwise_conv3d(x, k, strides=2).shape
    TensorShape([1, 4, 4, 4, 4])
  """
  fn = "tf_depthwise_conv3d"
  x = _tensor(fn, "x", x)
  kernel = _tensor(fn, "kernel", kernel)
  layout = _layout(fn, x, data_format, allowed_4d=False)
  strides3 = _args.int_tuple(fn, "strides", strides, 3, "DHW")
  dilations3 = _args.int_tuple(fn, "dilations", dilations, 3, "DHW")
  padding3 = _args.check_padding(fn, padding, "DHW")
  modes3 = _args.check_padding_mode(fn, padding_mode, padding3, "DHW")
  dtype = _check_operands(fn, x, kernel, "DHW", layout)
  hw = _Conv2d(fn, "HW", strides=strides3[1:], dilations=dilations3[1:], padding=padding3[1:],
               modes=modes3[1:])

  perm = [layout.index(a) for a in "NDHWC"]
  xt = _cast(_transpose(x, perm), _compute_dtype(dtype))
  k = _cast(kernel, _compute_dtype(dtype))
  kd, kh, kw, c, m = kernel.shape
  sd, rd = strides3[0], dilations3[0]
  n, d = _dim(xt, 0), _dim(xt, 1)
  lo, hi, od = _window(fn, "D", d, kd, sd, rd, padding3[0], modes3[0])
  xt = _pad(xt, [(0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)], [modes3[0]] * 5)
  # Tap t reads padded depths t*rd, t*rd + sd, ..., t*rd + (od - 1)*sd.
  taps = [xt[:, t * rd:t * rd + (od - 1) * sd + 1:sd] for t in range(kd)]
  stacked = tf.stack(taps, axis=4)  # (N, Od, H, W, kd, C)
  h, w = _dim(xt, 2), _dim(xt, 3)
  y = hw(tf.reshape(stacked, [n * od, h, w, kd * c]),
         tf.reshape(tf.transpose(k, [1, 2, 0, 3, 4]), [kh, kw, kd * c, m]))
  # Channel (t*C + c)*M + m of the stacked result is tap t's channel c*M + m.
  y = tf.reshape(y, [n, od, _dim(y, 1), _dim(y, 2), kd, c * m])
  y = tf.reduce_sum(y, axis=4)
  return tf.cast(_transpose(y, [perm.index(i) for i in range(5)]), dtype)


class _Conv2d:
  """Checked settings of a 2D depthwise convolution over `(B, A0, A1, C)` inputs.

  `padding` and `modes` hold one checked entry per axis
  (`_args.check_padding`, `_args.check_padding_mode`).
  """

  def __init__(self, fn: str, axes: str, *, strides: tuple[int, ...],
               dilations: tuple[int, ...], padding: tuple[Any, ...], modes: tuple[str, ...]):
    self.fn, self.axes = fn, axes
    self.strides, self.dilations, self.padding = tuple(strides), tuple(dilations), padding
    self.modes = modes

  def __call__(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """`(B, A0, A1, C)` by `(k0, k1, C, M)` to `(B, O0, O1, C * M)`.

    The padded input is convolved VALID. `tf.nn.depthwise_conv2d` takes one
    stride for both axes and no stride together with dilation, so strides are
    split three ways, each exact:

    * dilation a multiple of the stride (r = q * s): taps only read positions
      `s * (o + t * q)`, so the input is subsampled by `s` first and convolved
      with dilation `q`, stride 1 (no wasted work);
    * no dilation left: TF strides by `g = gcd(s0, s1)` and a strided slice
      keeps every `(s / g)`-th output;
    * otherwise: stride 1 and a strided slice keeps every `s`-th output.

    Worked example, one axis: n=7, k=3, r=2, s=2, SAME: out=4, pads (2, 2),
    padded size 11. Subsampled by 2: size 6, dilation 1, VALID: 6 - 3 + 1 = 4
    outputs, output o reading padded positions 2o, 2o + 2, 2o + 4.
    """
    pads, pre, dil, post = [(0, 0)] * 4, [1, 1], [1, 1], [1, 1]
    for i in sorted(range(2), key=lambda i: "DHW".index(self.axes[i])):  # dw5d_jax's order
      lo, hi, _ = _window(self.fn, self.axes[i], _dim(x, 1 + i), int(kernel.shape[i]),
                          self.strides[i], self.dilations[i], self.padding[i], self.modes[i])
      pads[1 + i] = (lo, hi)
      s, r = self.strides[i], self.dilations[i]
      if s > 1 and r % s == 0:
        pre[i], dil[i] = s, r // s
      else:
        dil[i], post[i] = r, s
    x = _pad(x, pads, ["zeros", *self.modes, "zeros"])
    if pre != [1, 1]:
      x = x[:, ::pre[0], ::pre[1]]
    native = 1
    if dil == [1, 1]:
      native = math.gcd(*post)
      post = [p // native for p in post]
    y = tf.nn.depthwise_conv2d(x, kernel, strides=[1, native, native, 1], padding="VALID",
                               dilations=dil)
    if post != [1, 1]:
      y = y[:, ::post[0], ::post[1]]
    return y


def _window(fn: str, axis: str, n: Any, k: int, s: int, r: int, padding: Any,
            mode: str) -> tuple[Any, Any, Any]:
  """`(lo, hi, out)` along one axis (`dw5d_jax._geometry.resolve`), checked.

  `n` is an int or, for a size unknown while tracing, an int32 scalar tensor;
  the results are then tensors too (TF's SAME split made at run time). An
  empty output, or padding wider than `mode` fills, raises at trace time
  when `n` is known, and at run time (an assertion, which the returned
  sizes depend on; not under XLA) otherwise.
  """
  lo, hi, out = _geometry.resolve(n, k, s, r, padding)
  if isinstance(out, int):
    if out < 1:
      raise _args.empty_output_error(fn, axis, n, k, r, padding)
    _args.check_mode_fits(fn, axis, mode, n, k, r, padding, lo, hi)
    return lo, hi, out
  at_run_time = f"(run-time size of {axis})"
  message = str(_args.empty_output_error(fn, axis, at_run_time, k, r, padding))
  checks = [tf.debugging.assert_positive(out, message=message)]
  limit = _geometry.mode_limit(mode, n)
  if limit is not None:
    message = str(_args.mode_width_error(fn, axis, mode, at_run_time, padding, None))
    checks.append(tf.debugging.assert_less_equal(tf.maximum(lo, hi), limit, message=message))
  checks = [c for c in checks if c is not None]  # eager: raised already
  if not checks:
    return lo, hi, out
  # In a graph, the ops that use the sizes wait for the checks: otherwise a
  # slice of a too-small input may fail first, with TF's own message.
  with tf.control_dependencies(checks):
    return tf.identity(lo), tf.identity(hi), tf.identity(out)


# ----------------------------------------------------------------------------
# Checks on the operands (the configuration checks come from dw5d_jax._args).


def _tensor(fn: str, name: str, a: Any) -> tf.Tensor:
  if isinstance(a, np.ndarray):
    return tf.convert_to_tensor(a)
  if isinstance(a, tf.Variable):
    return tf.convert_to_tensor(a)
  if isinstance(a, tf.Tensor):
    return a
  raise TypeError(f"{fn}: `{name}` must be a tf.Tensor, tf.Variable or numpy.ndarray, "
                  f"got {type(a).__name__}.")


def _layout(fn: str, x: tf.Tensor, data_format: Any, *, allowed_4d: bool) -> str:
  if x.shape.rank is None:
    want = "4 or 5" if allowed_4d else "5"
    raise ValueError(f"{fn}: `x` must have a known rank ({want}), got a tensor of unknown "
                     f"rank; give the tf.function an input_signature with a fixed rank, "
                     f"e.g. tf.TensorSpec([None] * 5).")
  return _args.check_layout(fn, x, data_format, allowed_5d=True, allowed_4d=allowed_4d)


def _check_operands(fn: str, x: tf.Tensor, kernel: tf.Tensor, conv_axes: str,
                    layout: str) -> tf.DType:
  """dtypes, kernel shape and channels, with dw5d_jax's messages; returns x's dtype."""
  for name, a in (("x", x), ("kernel", kernel)):
    if a.dtype not in _FLOATS:
      raise TypeError(f"{fn}: `{name}` must have a floating dtype (float16, bfloat16, "
                      f"float32, float64), got {a.dtype.name}.")
  if x.dtype != kernel.dtype:
    raise TypeError(f"{fn}: `x` and `kernel` must have the same dtype, got x "
                    f"{x.dtype.name} and kernel {kernel.dtype.name}; cast one of them.")
  nk = len(conv_axes)
  kshape = tuple(kernel.shape)
  if kernel.shape.rank != nk + 2:
    names = ", ".join(f"k{a.lower()}" for a in conv_axes)
    raise ValueError(f"{fn}: `kernel` must have rank {nk + 2} ({names}, in_channels, "
                     f"multiplier), got shape {kshape}.")
  if not kernel.shape.is_fully_defined():
    raise ValueError(f"{fn}: `kernel` must have a static shape, got {kshape}; give the "
                     f"tf.function an input_signature with the kernel's full shape.")
  if 0 in kshape:
    raise ValueError(f"{fn}: `kernel` must not have a zero-size dimension, got shape "
                     f"{kshape}.")
  channels = x.shape[layout.index("C")]
  if channels is None:
    raise ValueError(f"{fn}: the channel dimension of `x` must be a known int, got None "
                     f"(layout {layout}); give the tf.function an input_signature with a "
                     f"fixed channel size.")
  if kshape[-2] != channels:
    raise ValueError(f"{fn}: `kernel` in_channels (dim {nk}, size {kshape[-2]}) must equal "
                     f"the channels of `x` ({channels}, layout {layout}); got x shape "
                     f"{tuple(x.shape)} and kernel shape {kshape}.")
  return x.dtype


# ----------------------------------------------------------------------------
# Small helpers: static sizes where known, tensors where not.


def _dim(x: tf.Tensor, i: int) -> Any:
  """x's size along axis `i`: an int when known while tracing, else a scalar tensor."""
  size = x.shape[i]
  return size if size is not None else tf.shape(x)[i]


def _pad(x: tf.Tensor, pads: list[tuple[Any, Any]], modes: list[str]) -> tf.Tensor:
  """x padded by `pads[i]` along axis `i`, filled by `modes[i]` (numpy.pad's meanings).

  Zeros, reflect and symmetric are one `tf.pad` each; edge and circular
  (which TF's pad lacks) concatenate slices, with pad widths that may be
  tensors (sizes unknown while tracing). Each mode maps an index along its
  own axis, so the order of the axes does not change the corners.
  """
  def zero(pair):
    return all(isinstance(p, int) and p == 0 for p in pair)

  for mode in ("zeros", "reflect", "symmetric"):
    group = [pair if m == mode else (0, 0) for pair, m in zip(pads, modes)]
    if not all(zero(pair) for pair in group):
      x = tf.pad(x, [list(pair) for pair in group],
                 mode="CONSTANT" if mode == "zeros" else mode.upper())
  for axis, ((lo, hi), mode) in enumerate(zip(pads, modes)):
    if mode in ("edge", "circular") and not zero((lo, hi)):
      n = _dim(x, axis)
      if mode == "edge":
        before = tf.repeat(_rows(x, axis, 0, 1), lo, axis=axis)
        after = tf.repeat(_rows(x, axis, n - 1, n), hi, axis=axis)
      else:  # the last `lo` rows before, the first `hi` after
        before, after = _rows(x, axis, n - lo, n), _rows(x, axis, 0, hi)
      x = tf.concat([before, x, after], axis=axis)
  return x


def _rows(x: tf.Tensor, axis: int, start: Any, stop: Any) -> tf.Tensor:
  """`x[..., start:stop, ...]` along `axis` (bounds may be tensors)."""
  begin = [0] * x.shape.rank
  size = [-1] * x.shape.rank
  begin[axis], size[axis] = start, stop - start
  return tf.slice(x, tf.stack(begin), tf.stack(size))


def _transpose(x: tf.Tensor, perm: list[int]) -> tf.Tensor:
  return x if perm == sorted(perm) else tf.transpose(x, perm)


def _compute_dtype(dtype: tf.DType) -> tf.DType:
  """float16/bfloat16 compute in float32, as dw5d_jax accumulates them."""
  return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def _cast(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  return x if x.dtype == dtype else tf.cast(x, dtype)
