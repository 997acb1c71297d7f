"""The public ops: per-slice 2D and true 3D depthwise convolution."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from dw5d_jax import _args, _epilogue, _lowering, _primitive, _sharding, _target
from dw5d_jax._spec import Impl

_Ints = int | tuple[int, ...]
_Padding = str | tuple[str | tuple[int, int], ...]
_Modes = str | tuple[str, ...]


def depthwise_conv2d(
    x: ArrayLike,
    kernel: ArrayLike,
    *,
    strides: _Ints = 1,
    padding: _Padding = "SAME",
    padding_mode: _Modes = "zeros",
    dilations: _Ints = 1,
    axes: str = "HW",
    data_format: str | None = None,
    method: str = "auto",
    precision: lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    split_axes: dict[str, str | tuple[str, ...]] | None = None,
    bias: ArrayLike | None = None,
    activation: str | None = None,
) -> jax.Array:
  """2D depthwise convolution, per slice of a 5D tensor or on a 4D one.

  With rank-5 `x`, the two spatial axes named by `axes` are convolved and the
  third is carried through: every slice along it is convolved independently
  (the "fold it into batch" pattern, without ever mixing data). With rank-4
  `x` this is a drop-in for `tf.nn.depthwise_conv2d`.

  Names follow TensorFlow; in `lax.conv_general_dilated` terms `strides` is
  `window_strides`, `dilations` is `rhs_dilation`, `data_format` sets
  `dimension_numbers`, and the op is a convolution with
  `feature_group_count=C`.

  Args:
    x: `(N, D, H, W, C)` (`"NDHWC"`) or `(N, C, D, H, W)` (`"NCDHW"`); or rank
      4, `(N, H, W, C)` (`"NHWC"`) or `(N, C, H, W)` (`"NCHW"`). A floating
      dtype.
    kernel: `(k0, k1, C, M)`, TF's depthwise filter layout: dim `i` runs along
      `axes[i]`, `M` is the depth multiplier. Same dtype as `x`.
    strides: a positive int, or one per convolved axis (in `axes` order).
    padding: `"SAME"` or `"VALID"` (any case), TF's rules, or `"CAUSAL"`
      (pads `(e - 1, 0)`: output `o` reads inputs at or before `o * s`;
      `ceil(n / s)` outputs); or one entry per convolved axis (in `axes`
      order), each one of those strings or a `(lo, hi)` pair of
      non-negative ints.
    padding_mode: what fills the padding, with `numpy.pad`'s meanings:
      `"zeros"` (numpy's `"constant"`), `"reflect"` (`c b | a b c d | c b`),
      `"symmetric"` (`b a | a b c d | d c`), `"edge"` (`a a | ... | d d`) or
      `"circular"` (numpy's `"wrap"`: `c d | a b c d | a b`); one for every
      convolved axis or one per convolved axis. Reflect fills at most
      `n - 1` positions per side, symmetric and circular at most `n`; a
      mode other than `"zeros"` needs padding (not `"VALID"`) on its axis.
    dilations: a positive int, or one per convolved axis. Any combination
      with `strides` is allowed.
    axes: rank-5 only: two distinct letters of `D`, `H`, `W` naming the
      convolved axes, e.g. `"HW"` (slices along depth) or `"DW"`.
    data_format: `None` (channels-last for x's rank) or one of the layouts
      above.
    method: `"auto"` (fastest per platform), `"conv"` (fold into batch, XLA
      grouped convolution), `"shift"` (fused sum over shifted views) or
      `"pallas"` (Pallas Triton kernels, CUDA GPUs only, static shapes).
    precision: passed to `lax.conv_general_dilated` by the `"conv"` method;
      the other methods compute in `preferred_element_type` or float32.
    preferred_element_type: output dtype; by default x's dtype. float16 and
      bfloat16 inputs always accumulate in at least float32.
    split_axes: inside `jax.shard_map` only: x is one block of an array split
      along spatial axes, e.g. `{"D": "space"}` (axis letter -> mesh axis
      name, or a tuple of names). The op exchanges the halos its windows
      need with the neighbouring blocks and returns this block of the
      whole array's result (gradients too). Not needed under `jit` with
      sharded arrays, which partitions the op by itself.
    bias: None, or `(C * M,)` in x's dtype, added to output channel
      `c * M + m`.
    activation: None, or one of `"relu"`, `"relu6"`, `"gelu"` (exact, with
      erf, as Keras's and PyTorch's default), `"gelu_tanh"` (the tanh
      approximation, `jax.nn.gelu`'s default), `"silu"`, `"sigmoid"`,
      `"tanh"`, `"hard_swish"`; Keras's names `"swish"`, `"hard_silu"` and
      `"linear"` (none) work too. The result is
      `activation(conv(x, kernel) + bias)`, computed in the accumulator
      dtype before the cast to the output dtype. The native CPU kernels fuse
      the epilogue into the convolution (forward and backward); every other
      path computes it with the same formula.

  Returns:
    An array in x's layout with `C * M` channels ordered `c * M + m` (TF's
    order) and, per convolved axis, `ceil(n / s)` (SAME, CAUSAL),
    `ceil((n - e + 1) / s)` (VALID) or `floor((n + lo + hi - e) / s) + 1`
    positions, `e = (k - 1) * dilation + 1`.

  Raises:
    TypeError: non-array inputs, non-floating or mismatched dtypes (bias
      too), a non-string activation.
    ValueError: wrong ranks or layouts, channel mismatch, bad strides,
      dilations, padding, padding_mode, axes, method, bias shape or
      activation, or an empty output.

  Example:
    >>> import jax.numpy as jnp
    >>> import dw5d_jax as dw
    >>> x = jnp.ones((2, 5, 16, 16, 3))   # (N, D, H, W, C)
    >>> k = jnp.ones((3, 3, 3, 2))        # (kh, kw, C, M)
    >>> dw.depthwise_conv2d(x, k, axes="HW").shape
    (2, 5, 16, 16, 6)
    >>> dw.depthwise_conv2d(x, k, axes="DW", strides=2, padding="VALID").shape
    (2, 2, 16, 7, 6)
    >>> b = jnp.zeros((6,))               # (C * M,)
    >>> y = dw.depthwise_conv2d(x, k, bias=b, activation="gelu")
    >>> bool(jnp.allclose(y, jax.nn.gelu(dw.depthwise_conv2d(x, k), approximate=False)))
    True
  """
  fn = "depthwise_conv2d"
  _args.check_array(fn, "x", x)
  _args.check_array(fn, "kernel", kernel)
  layout = _args.check_layout(fn, x, data_format, allowed_5d=True, allowed_4d=True)
  axes = _args.check_axes(fn, axes)
  if x.ndim == 4 and axes != "HW":
    raise ValueError(f"{fn}: `axes` applies to rank-5 `x` only; rank-4 `x` ({layout}) "
                     f"is always convolved over H and W, got axes={axes!r}.")
  padding = _args.check_padding(fn, padding, axes)
  return _apply(
      x, kernel, fn=fn, conv_axes=axes, layout=layout,
      strides=_args.int_tuple(fn, "strides", strides, 2, axes),
      dilations=_args.int_tuple(fn, "dilations", dilations, 2, axes),
      padding=padding,
      padding_mode=_args.check_padding_mode(fn, padding_mode, padding, axes),
      method=_args.check_method(fn, method),
      precision=_args.check_precision(fn, precision),
      preferred=_args.check_preferred(fn, preferred_element_type),
      bias=_bias_arg(fn, bias), activation=_args.check_activation(fn, activation),
      split=_args.check_split_axes(fn, split_axes, "HW" if x.ndim == 4 else "DHW"))


def depthwise_conv3d(
    x: ArrayLike,
    kernel: ArrayLike,
    *,
    strides: _Ints = 1,
    padding: _Padding = "SAME",
    padding_mode: _Modes = "zeros",
    dilations: _Ints = 1,
    data_format: str = "NDHWC",
    method: str = "auto",
    precision: lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    split_axes: dict[str, str | tuple[str, ...]] | None = None,
    bias: ArrayLike | None = None,
    activation: str | None = None,
) -> jax.Array:
  """True 3D depthwise convolution of a 5D tensor.

  Each channel is convolved with its own `M` filters of size `(kd, kh, kw)`,
  like `tf.nn.depthwise_conv2d` one dimension up (Keras has no
  DepthwiseConv3D; this is `Conv3d(groups=C)` in PyTorch terms).

  Names follow TensorFlow; in `lax.conv_general_dilated` terms `strides` is
  `window_strides`, `dilations` is `rhs_dilation`, `data_format` sets
  `dimension_numbers`, with `feature_group_count=C`.

  Args:
    x: `(N, D, H, W, C)` (`"NDHWC"`) or `(N, C, D, H, W)` (`"NCDHW"`), a
      floating dtype.
    kernel: `(kd, kh, kw, C, M)`, `M` the depth multiplier; x's dtype.
    strides: a positive int, or three (D, H, W).
    padding: `"SAME"`, `"VALID"` or `"CAUSAL"`, as for `depthwise_conv2d`;
      or three entries (D, H, W), each such a string or a `(lo, hi)` pair of
      non-negative ints, e.g. `("CAUSAL", "SAME", "SAME")` for a clip
      `(N, T, H, W, C)` whose outputs see no future frame.
    padding_mode: `"zeros"`, `"reflect"`, `"symmetric"`, `"edge"` or
      `"circular"` (what fills the padding, as for `depthwise_conv2d`), or
      three of them (D, H, W).
    dilations: a positive int, or three. Any combination with `strides`.
    data_format: `"NDHWC"` or `"NCDHW"`.
    method: `"auto"`, `"conv"`, `"shift"` or `"pallas"`, as for
      `depthwise_conv2d`.
    precision: passed to `lax.conv_general_dilated` by the `"conv"` method.
    preferred_element_type: output dtype; by default x's dtype. float16 and
      bfloat16 inputs always accumulate in at least float32.
    split_axes: inside `jax.shard_map`: the spatial axes along which x is
      one block of a split array, as for `depthwise_conv2d`.
    bias: None, or `(C * M,)` in x's dtype.
    activation: None or a name, as for `depthwise_conv2d`: the result is
      `activation(conv(x, kernel) + bias)`, fused on CPU.

  Returns:
    An array in x's layout with `C * M` channels ordered `c * M + m`; spatial
    sizes as for `depthwise_conv2d`.

  Raises:
    TypeError: non-array inputs, non-floating or mismatched dtypes (bias
      too), a non-string activation.
    ValueError: wrong ranks or layouts, channel mismatch, bad strides,
      dilations, padding, padding_mode, method, bias shape or activation,
      or an empty output.

  Example:
    >>> import jax.numpy as jnp
    >>> import dw5d_jax as dw
    >>> x = jnp.ones((1, 8, 8, 8, 4))     # (N, D, H, W, C)
    >>> k = jnp.ones((3, 3, 3, 4, 1))     # (kd, kh, kw, C, M)
    >>> dw.depthwise_conv3d(x, k, strides=2).shape
    (1, 4, 4, 4, 4)
    >>> b = jnp.full((4,), -30.0)          # (C * M,)
    >>> dw.depthwise_conv3d(x, k, bias=b, activation="relu").max()  # relu(27 - 30)
    Array(0., dtype=float32)
    >>> y = dw.depthwise_conv3d(x, k, padding_mode="reflect")  # no dark border
    >>> float(y.min()), float(y.max())
    (27.0, 27.0)
  """
  fn = "depthwise_conv3d"
  _args.check_array(fn, "x", x)
  _args.check_array(fn, "kernel", kernel)
  layout = _args.check_layout(fn, x, data_format, allowed_5d=True, allowed_4d=False)
  padding = _args.check_padding(fn, padding, "DHW")
  return _apply(
      x, kernel, fn=fn, conv_axes="DHW", layout=layout,
      strides=_args.int_tuple(fn, "strides", strides, 3, "DHW"),
      dilations=_args.int_tuple(fn, "dilations", dilations, 3, "DHW"),
      padding=padding,
      padding_mode=_args.check_padding_mode(fn, padding_mode, padding, "DHW"),
      method=_args.check_method(fn, method),
      precision=_args.check_precision(fn, precision),
      preferred=_args.check_preferred(fn, preferred_element_type),
      bias=_bias_arg(fn, bias), activation=_args.check_activation(fn, activation),
      split=_args.check_split_axes(fn, split_axes, "DHW"))


@functools.partial(jax.jit, static_argnames=(
    "fn", "conv_axes", "layout", "strides", "dilations", "padding", "method",
    "precision", "preferred", "split", "padding_mode", "activation"))
def _apply(x: jax.Array, kernel: jax.Array, *, fn: str, conv_axes: str, layout: str,
           strides: tuple[int, ...], dilations: tuple[int, ...], padding: Any,
           method: str, precision: Any, preferred: Any, split: Any = None,
           padding_mode: tuple[str, ...] | None = None, bias: jax.Array | None = None,
           activation: str | None = None) -> jax.Array:
  """Shape checks (at trace time), normalisation, the primitive, restoring the rank.

  Without an epilogue the primitive is `dw5d_p` alone, as if the epilogue
  did not exist; with one, `_epilogue.apply`.
  """
  rank4 = x.ndim == 4
  blocks = None if split is None else _sharding.split_layout(fn, split)
  x5, k5, spec = _args.normalize(
      fn, x, kernel, conv_axes=conv_axes, layout=layout, strides=strides,
      dilations=dilations, padding=padding, precision=precision, preferred=preferred,
      parts=(1, 1, 1) if blocks is None else tuple(map(blocks.parts, blocks.spatial)),
      padding_mode=padding_mode)
  if blocks is not None:
    _sharding.check_split(fn, spec, blocks)
  else:  # explicit mesh axes: the result's split, checked with this function's name
    _sharding.out_sharding("fwd", jax.typeof(x5), jax.typeof(k5), spec,
                           _primitive.out_shape("fwd", x5.shape, spec), fn)
  # The export target is read here, at trace time (the jit cache is keyed on it).
  impl = Impl(method, target=_target.current())
  _lowering.prepare(spec, impl, x5.shape[0])
  if bias is None and activation is None:
    y = _primitive.conv(x5, k5, spec, impl, split=blocks)
  else:
    if bias is None:
      bias = jnp.zeros((spec.channels * spec.multiplier,), x5.dtype)
    _args.check_bias(fn, bias, x5.dtype, spec)
    y = _epilogue.apply(x5, k5, bias, spec, impl, activation, split=blocks)
  if rank4:
    y = y.squeeze(1 if spec.channels_last else 2)
  return y


def _bias_arg(fn: str, bias: Any) -> Any:
  if bias is not None:
    _args.check_array(fn, "bias", bias)
  return bias
