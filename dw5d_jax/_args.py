"""Argument checking and normalisation for the public ops.

Everything user-facing is checked here, once, at trace time, and turned into a
`ConvSpec` (`_geometry.py`): one fixed internal form that every lowering
consumes, with the sizes and pads that `_geometry` derives. Checks that do not
depend on shapes are also used by the layers, the TF ops and the command line.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax import lax

from dw5d_jax import _activations, _geometry
from dw5d_jax._geometry import MODES, PADDING_KINDS, SPATIAL
from dw5d_jax._spec import ConvSpec

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


def check_padding(fn: str, padding: Any, axes: str) -> tuple[Any, ...]:
  """One entry per convolved axis: `"SAME"`, `"VALID"`, `"CAUSAL"` or `(lo, hi)`.

  `padding` is one of those strings (any case) for every axis, or a sequence
  of entries, one per letter of `axes`, each a string or a pair of
  non-negative ints.
  """
  n = len(axes)
  kinds = ", ".join(map(repr, PADDING_KINDS))
  expected = (f"{fn}: `padding` must be one of {kinds}, or a sequence of {n} entries, one "
              f"per convolved axis ({', '.join(axes)}), each one of those or a (lo, hi) pair "
              f"of non-negative ints")
  if isinstance(padding, str):
    if padding.upper() not in PADDING_KINDS:
      raise ValueError(f"{expected}; got {padding!r}.")
    return (padding.upper(),) * n
  if not isinstance(padding, Sequence):
    raise TypeError(f"{expected}; got {type(padding).__name__} {padding!r}.")
  entries = tuple(padding)
  if len(entries) != n:
    raise ValueError(f"{expected}; got {len(entries)} entries {padding!r}.")
  out = []
  for entry in entries:
    if isinstance(entry, str):
      if entry.upper() not in PADDING_KINDS:
        raise ValueError(f"{expected}; got entry {entry!r} in {padding!r}.")
      out.append(entry.upper())
      continue
    if (not isinstance(entry, Sequence) or len(entry) != 2
        or not all(is_int(p) for p in entry)):
      raise TypeError(f"{expected}; got entry {entry!r} in {padding!r}.")
    if entry[0] < 0 or entry[1] < 0:
      raise ValueError(f"{expected}; got negative padding {entry!r} in {padding!r}.")
    out.append((int(entry[0]), int(entry[1])))
  return tuple(out)


def check_padding_mode(fn: str, padding_mode: Any, padding: tuple[Any, ...],
                       axes: str) -> tuple[str, ...]:
  """One mode per convolved axis (`_geometry.MODES`), given the checked `padding`.

  `padding_mode` is one mode for every axis or a sequence of one per letter
  of `axes`. A mode other than `"zeros"` needs padding to fill: `"VALID"`
  along its axis is refused.
  """
  n = len(axes)
  names = ", ".join(map(repr, MODES))
  expected = (f"{fn}: `padding_mode` must be one of {names}, or a sequence of {n} of them, "
              f"one per convolved axis ({', '.join(axes)})")
  if isinstance(padding_mode, str):
    modes = (padding_mode,) * n
  elif isinstance(padding_mode, Sequence):
    modes = tuple(padding_mode)
    if len(modes) != n:
      raise ValueError(f"{expected}; got {len(modes)} entries {padding_mode!r}.")
  else:
    raise TypeError(f"{expected}; got {type(padding_mode).__name__} {padding_mode!r}.")
  for mode in modes:
    if mode not in MODES:
      shown = repr(padding_mode) if isinstance(padding_mode, str) else \
          f"entry {mode!r} in {padding_mode!r}"
      raise ValueError(f"{expected}; got {shown}.")
  for a, mode, pad in zip(axes, modes, padding):
    if mode != "zeros" and pad == "VALID":
      raise ValueError(
          f"{fn}: `padding_mode` {mode!r} along axis {a} fills padding, but `padding` is "
          f"'VALID' there (no padding); use 'SAME', 'CAUSAL' or a (lo, hi) pair along {a}, "
          f"or `padding_mode` 'zeros'.")
  return modes


def empty_output_error(fn: str, axis: str, n: Any, k: int, r: int, padding: Any) -> ValueError:
  """The error for a window that does not fit along `axis` (`n` may be a string)."""
  e = _geometry.effective(k, r)
  shown = (0, 0) if isinstance(padding, str) else tuple(padding)
  padded = n + shown[0] + shown[1] if isinstance(n, int) else "?"
  return ValueError(
      f"{fn}: along axis {axis} the window (kernel {k}, dilation {r}: effective size {e}) "
      f"does not fit the padded input (size {padded} = {n} + padding {shown}) with padding "
      f"{padding!r}; the output would be empty. Use a smaller kernel or dilation, or more "
      f"padding.")


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


def check_activation(fn: str, activation: Any) -> str | None:
  """The canonical name of `activation` (`_activations.ACTIVATIONS`, an alias, any case), or None."""
  if activation is None:
    return None
  names = ", ".join(map(repr, _activations.ACTIVATIONS))
  aliases = ", ".join(map(repr, _activations.ALIASES))
  expected = (f"{fn}: `activation` must be None or one of {names} (or the aliases "
              f"{aliases})")
  if callable(activation):
    name = getattr(activation, "__name__", type(activation).__name__)
    raise TypeError(f"{expected}; got the callable {name}. Pass its name if it is one of "
                    f"these, else apply it to the result.")
  if not isinstance(activation, str):
    raise TypeError(f"{expected}; got {type(activation).__name__} {activation!r}.")
  name = activation.lower()
  if name in _activations.ALIASES:
    return _activations.ALIASES[name]
  if name not in _activations.ACTIVATIONS:
    raise ValueError(f"{expected}; got {activation!r}.")
  return name


def check_split_axes(fn: str, split_axes: Any, letters: str) -> tuple[tuple[str, ...], ...] | None:
  """`None`, or a dict from spatial axis letters to a mesh axis name or a tuple of them.

  Returns one tuple of mesh axis names per letter of `D, H, W` (empty where
  the axis is not split). `letters`: the spatial axes x has (`"HW"` for
  rank-4 x).
  """
  if split_axes is None:
    return None
  expected = (f"{fn}: `split_axes` must be None or a dict mapping spatial axes of x "
              f"({', '.join(map(repr, letters))}) to the mesh axis name (or tuple of names) "
              f"that splits it inside jax.shard_map, e.g. {{'{letters[0]}': 'space'}}")
  if not isinstance(split_axes, dict):
    raise TypeError(f"{expected}; got {type(split_axes).__name__} {split_axes!r}.")
  out: dict[str, tuple[str, ...]] = {}
  seen: list[str] = []
  for key, names in split_axes.items():
    letter = key.upper() if isinstance(key, str) else key
    if letter not in tuple(letters):
      raise ValueError(f"{expected}; got key {key!r}.")
    names = (names,) if isinstance(names, str) else names
    if (not isinstance(names, tuple) or not names
        or not all(isinstance(n, str) for n in names)):
      raise TypeError(f"{expected}; got {split_axes[key]!r} for {key!r}.")
    if set(names) & set(seen) or len(set(names)) != len(names):
      raise ValueError(f"{expected}; a mesh axis may split one axis only, got {split_axes!r}.")
    seen.extend(names)
    out[letter] = names
  return tuple(out.get(a, ()) for a in SPATIAL)


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
    padding_mode: tuple[str, ...] | None = None,
    parts: tuple[int, int, int] = (1, 1, 1),
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
    padding: one entry per letter of `conv_axes` (`check_padding`).
    precision, preferred: already checked.
    padding_mode: one mode per letter of `conv_axes` (`check_padding_mode`);
      None for zeros everywhere.
    parts: x is one of `parts[i]` equal blocks of the whole array along
      spatial axis `i` (D, H, W): the spec describes the whole array.
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

  window, stride3, dil3, pads, outs, ins, modes = [], [], [], [], [], [], []
  for a in SPATIAL:
    n = x.shape[spatial_axes[SPATIAL.index(a)]] * parts[SPATIAL.index(a)]
    ins.append(n)
    if a not in conv_axes:
      window.append(1), stride3.append(1), dil3.append(1), pads.append((0, 0)), outs.append(n)
      modes.append("zeros")
      continue
    i = conv_axes.index(a)
    k, s, r = int(kernel.shape[SPATIAL.index(a)]), strides[i], dilations[i]
    lo, hi, out = _geometry.resolve(n, k, s, r, padding[i])
    _check_fits(fn, a, n, k, r, padding[i], out)
    mode = "zeros" if padding_mode is None else padding_mode[i]
    if _geometry.is_static(lo, hi) and lo == hi == 0:
      mode = "zeros"  # nothing to fill
    check_mode_fits(fn, a, mode, n, k, r, padding[i], lo, hi)
    window.append(k), stride3.append(s), dil3.append(r), pads.append((lo, hi)), outs.append(out)
    modes.append(mode)

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
      precision=precision, modes=tuple(modes))
  return x, kernel, spec


def check_bias(fn: str, bias: Any, x_dtype: Any, spec: ConvSpec) -> None:
  """`bias` must be `(C * M,)` in x's dtype (checked at trace time)."""
  c, m = spec.channels, spec.multiplier
  if tuple(bias.shape) != (c * m,):
    raise ValueError(f"{fn}: `bias` must have shape (C * M,) = ({c * m},) for {c} channels "
                     f"and multiplier {m}, got shape {tuple(bias.shape)}.")
  dtype = jax.dtypes.canonicalize_dtype(bias.dtype)
  if dtype != x_dtype:
    raise TypeError(f"{fn}: `bias` must have x's dtype {np.dtype(x_dtype).name}, got "
                    f"{np.dtype(dtype).name}; cast it.")


def check_layout(fn: str, x: jax.Array, data_format: Any, allowed_5d: bool,
                 allowed_4d: bool, name: str = "x") -> str:
  """Resolves `data_format` for x's rank; `None` means channels-last. `name`: x's, for messages."""
  ranks = [r for r, ok in ((4, allowed_4d), (5, allowed_5d)) if ok]
  if x.ndim not in ranks:
    want = " or ".join(
        f"{r} ({', '.join(_LAYOUTS_4D if r == 4 else _LAYOUTS_5D)})" for r in ranks)
    raise ValueError(f"{fn}: `{name}` must have rank {want}, got rank {x.ndim} with shape "
                     f"{tuple(x.shape)}.")
  allowed = _LAYOUTS_5D if x.ndim == 5 else _LAYOUTS_4D
  if data_format is None:
    return allowed[0]
  if not isinstance(data_format, str) or data_format.upper() not in allowed:
    raise ValueError(f"{fn}: `data_format` must be None or one of "
                     f"{', '.join(map(repr, allowed))} for rank-{x.ndim} `{name}`, "
                     f"got {data_format!r}.")
  return data_format.upper()


# ----------------------------------------------------------------------------
# Small helpers.


def is_int(v: Any) -> bool:
  return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_fits(fn: str, axis: str, n: Any, k: int, r: int, padding: Any, out: Any) -> None:
  """Raises unless the output along `axis` is non-empty (or, symbolic, declared so)."""
  if jax.export.is_symbolic_dim(out):
    try:
      fits = out >= 1
    except _INCONCLUSIVE:
      need = _geometry.min_input_size(k, r, padding)
      raise ValueError(
          f"{fn}: along axis {axis} the input size is the symbolic dimension {n}; with "
          f"padding {padding!r} the window (kernel {k}, dilation {r}: effective size "
          f"{_geometry.effective(k, r)}) fits only if {n} >= {need}. Declare it, e.g. "
          f"jax.export.symbolic_shape(..., constraints=('{n} >= {need}',)), or use 'SAME' "
          f"padding.") from None
  else:
    fits = out >= 1
  if not fits:
    raise empty_output_error(fn, axis, n, k, r, padding)


def mode_width_error(fn: str, axis: str, mode: str, n: Any, padding: Any,
                     pads: tuple[Any, Any] | None) -> ValueError:
  """The error for padding wider than `mode` fills (`n` a string and `pads` None: unknown)."""
  rule = {"reflect": "n - 1", "symmetric": "n", "circular": "n"}[mode]
  if pads is None:
    most, pad = rule, "more"
  else:
    most, pad = f"{rule} = {_geometry.mode_limit(mode, n)}", f"{tuple(pads)}"
  return ValueError(
      f"{fn}: `padding_mode` {mode!r} along axis {axis} fills at most {most} positions per "
      f"side of an input of size {n}, but `padding` {padding!r} pads {pad} there. Use a "
      f"smaller kernel, dilation or padding, or 'edge' or 'zeros'.")


def check_mode_fits(fn: str, axis: str, mode: str, n: Any, k: int, r: int, padding: Any,
                    lo: Any, hi: Any) -> None:
  """Raises unless `mode` can fill the pads `(lo, hi)` along `axis` (`_geometry.mode_limit`).

  `n` is an int or a JAX symbolic dimension. With a symbolic size the pads
  may be symbolic too (SAME with a stride); the check then uses their
  static bounds (`_geometry.pad_bound`), and asks for a declared constraint
  where the size's own bounds do not decide it.
  """
  limit = _geometry.mode_limit(mode, n)
  if limit is None:
    return
  if _geometry.is_static(n, lo, hi):
    if max(lo, hi) > limit:
      raise mode_width_error(fn, axis, mode, n, padding, (lo, hi))
    return
  rule = {"reflect": "n - 1", "symmetric": "n", "circular": "n"}[mode]
  bound = max(_geometry.pad_bound(k, r, padding))
  need = _geometry.min_size_for_mode(mode, bound)
  try:
    fits = n >= need
  except _INCONCLUSIVE:
    fits = None
  if not fits:
    raise ValueError(
        f"{fn}: along axis {axis} the input size is the symbolic dimension {n}; "
        f"`padding_mode` {mode!r} fills at most {rule} positions per side and `padding` "
        f"{padding!r} (kernel {k}, dilation {r}) pads up to {bound}, so it needs "
        f"{n} >= {need}. Declare it, e.g. jax.export.symbolic_shape(..., "
        f"constraints=('{n} >= {need}',)).")


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
