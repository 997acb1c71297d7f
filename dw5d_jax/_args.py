"""Argument checking and normalisation for the public ops.

Everything user-facing is checked here, once, at trace time, and turned into a
`ConvSpec`: one fixed internal form that every lowering consumes.

The internal form is always a 3D depthwise convolution over a rank-5 array:

* `x` is `(N, D, H, W, C)` (layout ``"NDHWC"``) or `(N, C, D, H, W)`
  (``"NCDHW"``). A rank-4 input gets a unit `D` axis.
* `kernel` is `(kd, kh, kw, C, M)`, its spatial dims in `D, H, W` order.
* A spatial axis that is not convolved (the slice axis of a per-slice 2D
  convolution, or the unit `D` of a rank-4 input) has window 1, stride 1,
  dilation 1 and padding `(0, 0)`: it is carried through untouched.

Output sizes follow TensorFlow. With effective window `e = (k - 1) * r + 1`
along an axis of size `n` and stride `s`:

* ``"SAME"``: `out = ceil(n / s)`, and the total padding
  `max((out - 1) * s + e - n, 0)` is split with the smaller half low.
  Worked example: n=6, k=3, r=1, s=2 gives out=3, total=max(2*2+3-6, 0)=1,
  so pads (0, 1): outputs sample padded positions 0, 2, 4 (+ taps 0..2).
* ``"VALID"``: `out = ceil((n - e + 1) / s)`.
* explicit `(lo, hi)`: `out = floor((n + lo + hi - e) / s) + 1`.

Sizes may be symbolic (`jax.export` shape polymorphism): the arithmetic above
uses only `+ - * //` and `max`, which symbolic dimensions support.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax import lax

SPATIAL = "DHW"
METHODS = ("auto", "conv", "shift", "pallas")


def _inconclusive() -> type[Exception]:
  """The error of a comparison of symbolic sizes that the constraints do not decide.

  Public in `jax.errors` since JAX 0.10.1; before, only in `jax.core` (which
  JAX 0.10.0 already marks deprecated).
  """
  if hasattr(jax.errors, "InconclusiveDimensionOperation"):
    return jax.errors.InconclusiveDimensionOperation
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return jax_core.InconclusiveDimensionOperation


_INCONCLUSIVE = _inconclusive()

_LAYOUTS_5D = ("NDHWC", "NCDHW")
_LAYOUTS_4D = ("NHWC", "NCHW")


class ConvSpec(NamedTuple):
  """A checked, normalised depthwise convolution (see the module docstring).

  Per-axis tuples are in `D, H, W` order.
  """

  channels_last: bool
  window: tuple[int, int, int]
  strides: tuple[int, int, int]
  dilations: tuple[int, int, int]
  padding: tuple[tuple[Any, Any], ...]  # ints, or symbolic dims under export
  in_spatial: tuple[Any, Any, Any]
  out_spatial: tuple[Any, Any, Any]
  channels: int
  multiplier: int
  acc_dtype: Any
  out_dtype: Any
  precision: Any

  @property
  def spatial_axes(self) -> tuple[int, int, int]:
    """Positions of `D, H, W` in the rank-5 array."""
    return (1, 2, 3) if self.channels_last else (2, 3, 4)

  @property
  def channel_axis(self) -> int:
    return 4 if self.channels_last else 1

  def tight_padding(self, i: int) -> tuple[Any, Any]:
    """`(lo, hi')` with `hi'` making the padded size exactly `(out - 1) * s + e`.

    Positions past that are never read, so `hi'` (negative: a crop) gives the
    same result as the full padding. With symbolic sizes it also lets JAX
    prove slice bounds and simplify output sizes, which `max(...)` in the SAME
    rule and VALID's `n >= e` otherwise block.
    """
    lo = self.padding[i][0]
    e = (self.window[i] - 1) * self.dilations[i] + 1
    return lo, (self.out_spatial[i] - 1) * self.strides[i] + e - self.in_spatial[i] - lo

  def carried(self, i: int) -> bool:
    """Whether spatial axis `i` is passed through untouched."""
    return (self.window[i] == 1 and self.strides[i] == 1 and self.dilations[i] == 1
            and _is_zero(self.padding[i][0]) and _is_zero(self.padding[i][1]))


# ----------------------------------------------------------------------------
# Checks on arguments that do not depend on shapes (called before `jit`).


def int_tuple(fn: str, name: str, value: Any, n: int, axes: str) -> tuple[int, ...]:
  """A positive int, or one per convolved axis, as a tuple of `n` ints."""
  per_axis = f"one per convolved axis ({', '.join(axes)})"
  if is_int(value):
    values = (value,) * n
  elif isinstance(value, Sequence) and not isinstance(value, str):
    values = tuple(value)
    if len(values) != n:
      raise ValueError(
          f"{fn}: `{name}` must be a positive int or a sequence of {n} positive ints, "
          f"{per_axis}; got {len(values)} values {tuple(values)!r}.")
  else:
    raise TypeError(
        f"{fn}: `{name}` must be a positive int or a sequence of {n} positive ints, "
        f"{per_axis}; got {type(value).__name__} {value!r}.")
  for v in values:
    if not is_int(v):
      raise TypeError(
          f"{fn}: `{name}` must contain only ints, got {type(v).__name__} {v!r} "
          f"in {value!r}.")
    if v < 1:
      raise ValueError(f"{fn}: `{name}` must be positive, got {value!r}.")
  return tuple(int(v) for v in values)


def check_padding(fn: str, padding: Any, axes: str) -> str | tuple[tuple[int, int], ...]:
  """`"SAME"`/`"VALID"` (any case) or one `(lo, hi)` pair per convolved axis."""
  n = len(axes)
  if isinstance(padding, str):
    upper = padding.upper()
    if upper not in ("SAME", "VALID"):
      raise ValueError(
          f"{fn}: `padding` must be 'SAME', 'VALID' or {n} (lo, hi) pairs, "
          f"got {padding!r}.")
    return upper
  expected = (f"{fn}: `padding` must be 'SAME', 'VALID' or a sequence of {n} (lo, hi) "
              f"pairs of non-negative ints, one per convolved axis ({', '.join(axes)})")
  if not isinstance(padding, Sequence):
    raise TypeError(f"{expected}; got {type(padding).__name__} {padding!r}.")
  pairs = tuple(padding)
  if len(pairs) != n:
    raise ValueError(f"{expected}; got {len(pairs)} entries {padding!r}.")
  out = []
  for pair in pairs:
    if (not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2
        or not all(is_int(p) for p in pair)):
      raise TypeError(f"{expected}; got entry {pair!r} in {padding!r}.")
    if pair[0] < 0 or pair[1] < 0:
      raise ValueError(f"{expected}; got negative padding {pair!r} in {padding!r}.")
    out.append((int(pair[0]), int(pair[1])))
  return tuple(out)


def check_method(fn: str, method: Any) -> str:
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(f"{fn}: `method` must be one of {', '.join(map(repr, METHODS))}, "
                     f"got {method!r}.")
  return method


def check_axes(fn: str, axes: Any) -> str:
  """Two distinct letters of `D`, `H`, `W` (case-insensitive)."""
  if not isinstance(axes, str) or len(axes) != 2:
    raise ValueError(f"{fn}: `axes` must be a string of two distinct letters from "
                     f"'D', 'H', 'W' (e.g. 'HW'), got {axes!r}.")
  upper = axes.upper()
  if any(a not in SPATIAL for a in upper) or upper[0] == upper[1]:
    raise ValueError(f"{fn}: `axes` must be two distinct letters from 'D', 'H', 'W' "
                     f"(e.g. 'HW'), got {axes!r}.")
  return upper


def check_precision(fn: str, precision: Any) -> Any:
  """`None`, a `lax.Precision` (or its name), or a pair of them."""
  if precision is None:
    return None
  items = precision if isinstance(precision, tuple) and len(precision) == 2 else (precision,)
  out = []
  for p in items:
    try:
      out.append(p if isinstance(p, lax.Precision) else lax.Precision(p))
    except (ValueError, TypeError, KeyError):
      raise ValueError(f"{fn}: `precision` must be None, a jax.lax.Precision, its name "
                       f"(e.g. 'highest') or a pair of them, got {precision!r}.") from None
  return tuple(out) if len(out) == 2 else out[0]


def check_preferred(fn: str, preferred: Any) -> Any:
  if preferred is None:
    return None
  try:
    dtype = jnp.dtype(preferred)
  except TypeError:
    raise TypeError(f"{fn}: `preferred_element_type` must be None or a floating dtype, "
                    f"got {preferred!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: `preferred_element_type` must be a floating dtype "
                    f"(float16, bfloat16, float32, float64), got {dtype}.")
  return jax.dtypes.canonicalize_dtype(dtype)


def check_array(fn: str, name: str, a: Any) -> None:
  if not isinstance(a, (jax.Array, np.ndarray)):
    raise TypeError(f"{fn}: `{name}` must be a jax.Array or numpy.ndarray, "
                    f"got {type(a).__name__}.")


# ----------------------------------------------------------------------------
# Shape-dependent normalisation (called at trace time).


def normalize(
    fn: str,
    x: jax.Array,
    kernel: jax.Array,
    *,
    conv_axes: str,
    layout: str,
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
    precision: Any,
    preferred: Any,
) -> tuple[jax.Array, jax.Array, ConvSpec]:
  """Checks shapes and dtypes and returns rank-5 `x`, rank-5 `kernel` and the spec.

  Args:
    fn: public function name, for messages.
    x: the input, rank 5 in `layout`, or rank 4 (`"NHWC"`/`"NCHW"`).
    kernel: `(k0, k1, C, M)` for 2D (dim i along `conv_axes[i]`) or
      `(kd, kh, kw, C, M)` for 3D.
    conv_axes: the convolved axes in kernel order, e.g. `"HW"`, `"WD"`, `"DHW"`.
    layout: one of `"NDHWC"`, `"NCDHW"`, `"NHWC"`, `"NCHW"`, matching x's rank.
    strides, dilations: one int per letter of `conv_axes`.
    padding: `"SAME"`, `"VALID"` or one pair per letter of `conv_axes`.
    precision, preferred: already checked.
  """
  nk = len(conv_axes)
  x_dtype = _float_dtype(fn, "x", x)
  k_dtype = _float_dtype(fn, "kernel", kernel)
  if x_dtype != k_dtype:
    raise TypeError(f"{fn}: `x` and `kernel` must have the same dtype, got x {x_dtype} "
                    f"and kernel {k_dtype}; cast one of them.")
  if kernel.ndim != nk + 2:
    names = ", ".join(f"k{a.lower()}" for a in conv_axes)
    raise ValueError(f"{fn}: `kernel` must have rank {nk + 2} ({names}, in_channels, "
                     f"multiplier), got shape {tuple(kernel.shape)}.")
  if any(d == 0 for d in kernel.shape):
    raise ValueError(f"{fn}: `kernel` must not have a zero-size dimension, got shape "
                     f"{tuple(kernel.shape)}.")

  channels_last = layout.endswith("C")
  if x.ndim == 4:  # rank-4 input: a unit D axis makes it rank 5.
    x = lax.expand_dims(x, (1,) if channels_last else (2,))
  channel_axis = 4 if channels_last else 1
  spatial_axes = (1, 2, 3) if channels_last else (2, 3, 4)
  channels = x.shape[channel_axis]
  if not isinstance(channels, (int, np.integer)):
    raise ValueError(f"{fn}: the channel dimension of `x` must be a known int, got the "
                     f"symbolic size {channels} (layout {layout}).")
  if kernel.shape[-2] != channels:
    raise ValueError(f"{fn}: `kernel` in_channels (dim {nk}, size {kernel.shape[-2]}) "
                     f"must equal the channels of `x` ({channels}, layout {layout}); "
                     f"got x shape {tuple(_orig_shape(x, layout))} and kernel shape "
                     f"{tuple(kernel.shape)}.")
  multiplier = int(kernel.shape[-1])

  # Kernel spatial dims into D, H, W order, with unit dims on carried axes.
  order = sorted(range(nk), key=lambda i: SPATIAL.index(conv_axes[i]))
  if order != list(range(nk)):
    kernel = jnp.transpose(kernel, (*order, nk, nk + 1))
  for a in SPATIAL:
    if a not in conv_axes:
      kernel = lax.expand_dims(kernel, (SPATIAL.index(a),))

  window, stride3, dil3, pads, outs, ins = [], [], [], [], [], []
  for a in SPATIAL:
    n = x.shape[spatial_axes[SPATIAL.index(a)]]
    ins.append(n)
    if a not in conv_axes:
      window.append(1), stride3.append(1), dil3.append(1), pads.append((0, 0)), outs.append(n)
      continue
    i = conv_axes.index(a)
    k, s, r = int(kernel.shape[SPATIAL.index(a)]), strides[i], dilations[i]
    e = (k - 1) * r + 1
    if padding == "SAME":
      out = (n + s - 1) // s
      total = _max_dim((out - 1) * s + e - n, 0)
      lo = total // 2
      pad = (lo, total - lo)
    elif padding == "VALID":
      out = (n - e) // s + 1
      pad = (0, 0)
    else:
      pad = padding[i]
      out = (n + pad[0] + pad[1] - e) // s + 1
    if jax.export.is_symbolic_dim(out):
      try:
        fits = out >= 1
      except _INCONCLUSIVE:
        need = max(e - pad[0] - pad[1], 1)
        raise ValueError(
            f"{fn}: along axis {a} the input size is the symbolic dimension {n}; with "
            f"padding {padding!r} the window (kernel {k}, dilation {r}: effective size "
            f"{e}) fits only if {n} >= {need}. Declare it, e.g. jax.export.symbolic_shape("
            f"..., constraints=('{n} >= {need}',)),"
            f" or use 'SAME' padding.") from None
    else:
      fits = out >= 1
    if not fits:
      padded = n + pad[0] + pad[1] if padding != "SAME" else n
      raise ValueError(
          f"{fn}: along axis {a} the window (kernel {k}, dilation {r}: effective size "
          f"{e}) does not fit the padded input (size {padded} = {n} + padding "
          f"{tuple(pad) if padding != 'SAME' else (0, 0)}) with padding {padding!r}; "
          f"the output would be empty. Use a smaller kernel or dilation, or more padding.")
    window.append(k), stride3.append(s), dil3.append(r), pads.append(pad), outs.append(out)

  acc_dtype = jnp.promote_types(x_dtype, jnp.float32)
  if preferred is not None:
    acc_dtype = jnp.promote_types(acc_dtype, preferred)
  spec = ConvSpec(
      channels_last=channels_last,
      window=tuple(window), strides=tuple(stride3), dilations=tuple(dil3),
      padding=tuple(pads), in_spatial=tuple(ins), out_spatial=tuple(outs),
      channels=int(channels), multiplier=multiplier,
      acc_dtype=jax.dtypes.canonicalize_dtype(acc_dtype),
      out_dtype=preferred if preferred is not None else x_dtype,
      precision=precision)
  return x, kernel, spec


def check_layout(fn: str, x: jax.Array, data_format: Any, allowed_5d: bool,
                 allowed_4d: bool) -> str:
  """Resolves `data_format` for x's rank; `None` means channels-last."""
  ranks = [r for r, ok in ((4, allowed_4d), (5, allowed_5d)) if ok]
  if x.ndim not in ranks:
    want = " or ".join(
        f"{r} ({', '.join(_LAYOUTS_4D if r == 4 else _LAYOUTS_5D)})" for r in ranks)
    raise ValueError(f"{fn}: `x` must have rank {want}, got rank {x.ndim} with shape "
                     f"{tuple(x.shape)}.")
  allowed = _LAYOUTS_5D if x.ndim == 5 else _LAYOUTS_4D
  if data_format is None:
    return allowed[0]
  if not isinstance(data_format, str) or data_format.upper() not in allowed:
    raise ValueError(f"{fn}: `data_format` must be None or one of "
                     f"{', '.join(map(repr, allowed))} for rank-{x.ndim} `x`, "
                     f"got {data_format!r}.")
  return data_format.upper()


# ----------------------------------------------------------------------------
# Small helpers.


def is_int(v: Any) -> bool:
  return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_zero(d: Any) -> bool:
  return not jax.export.is_symbolic_dim(d) and d == 0


def _max_dim(a: Any, b: int) -> Any:
  if jax.export.is_symbolic_dim(a):
    return jax_core.max_dim(a, b)
  return max(a, b)


def _float_dtype(fn: str, name: str, a: Any) -> Any:
  dtype = jax.dtypes.canonicalize_dtype(a.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: `{name}` must have a floating dtype (float16, bfloat16, "
                    f"float32, float64), got {dtype}.")
  return dtype


def _orig_shape(x5: jax.Array, layout: str) -> tuple[Any, ...]:
  """The user's shape of x, before a rank-4 input got its unit D axis."""
  if layout in _LAYOUTS_4D:
    return tuple(d for i, d in enumerate(x5.shape) if i != (1 if layout == "NHWC" else 2))
  return tuple(x5.shape)
