"""An independent float64 NumPy reference, written from the definition.

It shares no code with the lowerings or with the argument normalisation: it
re-derives padding and output sizes from TensorFlow's rules (and CAUSAL:
all of the window's reach before the output position) and computes, for
every kernel tap, the input position each output reads:

    y[n, o, c*M + m] = sum_t xpad[n, o*s + t*r, c] * k[t, c, m]

with `xpad` the zero-padded input (so `xpad[p] = x[p - lo]` inside the input
and 0 outside), summed over the taps `t` of every convolved axis. Inputs are
assumed valid (the library's checks are tested separately). It is slow and
meant for small tests, the parity suite and export verification.

Beside it, what every comparison with it shares: `Case` (one convolution in
user terms, with its expected value), `TOLERANCES` (by dtype) and `compare`.
None of it imports the library: callers run the op themselves.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

# (rtol, atol) by the dtype of the result under test. An element passes when
#   |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|,
# the absolute part scaled by the largest expected magnitude, so the same
# numbers hold for sums of many taps and for outputs near zero. Half precision
# is accumulated in float32 and rounded once: bfloat16 keeps 8 significant
# bits (2**-8 = 3.9e-3 relative), float16 11 bits (4.9e-4); the rest is room
# for gradients, whose inputs are rounded too.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


class Comparison(NamedTuple):
  """How far a result is from the reference (see `compare`)."""

  max_abs: float  # the largest |actual - expected|
  max_rel: float  # max_abs / max|expected| (max_abs when expected is all zero)
  ratio: float  # the largest error over the error allowed there: passes when <= 1

  @property
  def ok(self) -> bool:
    return self.ratio <= 1.0


def depthwise_reference(
    x: np.ndarray,
    kernel: np.ndarray,
    *,
    axes: str,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[str | tuple[int, int]] = "SAME",
    dilations: int | Sequence[int] = 1,
    data_format: str | None = None,
) -> np.ndarray:
  """Depthwise convolution in float64 by a direct sum over kernel taps.

  Args:
    x: rank 5 (`"NDHWC"`/`"NCDHW"`) or rank 4 (`"NHWC"`/`"NCHW"`).
    kernel: `(k_0, ..., k_{len(axes)-1}, C, M)`, dim i along `axes[i]`.
    axes: the convolved spatial axes as letters of x's layout, e.g. `"HW"`,
      `"DW"` or `"DHW"`.
    strides, dilations: an int or one per convolved axis.
    padding: `"SAME"`, `"VALID"` or `"CAUSAL"`, or one entry per convolved
      axis, each such a string or a `(lo, hi)` pair.
    data_format: x's layout; `None` means channels-last.

  Returns:
    A float64 array in x's layout with `C * M` channels ordered `c * M + m`.
  """
  x = np.asarray(x, dtype=np.float64)
  k = np.asarray(kernel, dtype=np.float64)
  layout = data_format or ("NDHWC" if x.ndim == 5 else "NHWC")
  channels_first = layout[1] == "C"
  if channels_first:
    x = np.moveaxis(x, 1, -1)
  letters = layout.replace("N", "").replace("C", "")  # spatial letters in x order
  nconv = len(axes)
  strides = _per_axis(strides, nconv)
  dilations = _per_axis(dilations, nconv)
  c, m = k.shape[-2], k.shape[-1]

  entries = [padding] * nconv if isinstance(padding, str) else list(padding)
  index, valid, out_sizes = [], [], []
  for i, a in enumerate(axes):
    n = x.shape[1 + letters.index(a)]
    size, s, r = k.shape[i], strides[i], dilations[i]
    eff = (size - 1) * r + 1
    kind = entries[i].upper() if isinstance(entries[i], str) else None
    if kind == "SAME":
      out = -(-n // s)
      lo = max((out - 1) * s + eff - n, 0) // 2
    elif kind == "CAUSAL":  # all of the reach before: output o sees inputs <= o * s
      out, lo = -(-n // s), eff - 1
    elif kind == "VALID":
      out, lo = -(-(n - eff + 1) // s), 0
    else:
      lo, hi = entries[i]
      out = (n + lo + hi - eff) // s + 1
    # pos[o, t]: the input position that output o reads at tap t.
    pos = np.arange(out)[:, None] * s + np.arange(size)[None, :] * r - lo
    index.append(np.clip(pos, 0, n - 1))
    valid.append((pos >= 0) & (pos < n))
    out_sizes.append(out)

  out_shape = list(x.shape[:-1]) + [c, m]
  for i, a in enumerate(axes):
    out_shape[1 + letters.index(a)] = out_sizes[i]
  y = np.zeros(out_shape, dtype=np.float64)
  for tap in itertools.product(*(range(s) for s in k.shape[:nconv])):
    xs = x
    mask = np.ones((1,) * x.ndim, dtype=bool)
    for i, a in enumerate(axes):
      ax = 1 + letters.index(a)
      xs = np.take(xs, index[i][:, tap[i]], axis=ax)
      shape = [1] * x.ndim
      shape[ax] = out_sizes[i]
      mask = mask & valid[i][:, tap[i]].reshape(shape)
    xs = np.where(mask, xs, 0.0)  # the zero padding
    y += xs[..., None] * k[tap]
  y = y.reshape(*y.shape[:-2], c * m)
  if channels_first:
    y = np.moveaxis(y, -1, 1)
  return y


def _per_axis(v: int | Sequence[int], n: int) -> tuple[int, ...]:
  return (v,) * n if isinstance(v, (int, np.integer)) else tuple(v)


def tolerance(expected: Any, dtype: Any) -> tuple[float, float]:
  """`(rtol, atol)` for a result in `dtype` against `expected`, atol already scaled.

  Pass them to `numpy.testing.assert_allclose` or `chex.assert_trees_all_close`:
  the rule is `TOLERANCES`' (atol times `max(1, max|expected|)`).

  Example:
    >>> tolerance(np.array([0.5, -4.0]), "float32")
    (1e-05, 4e-05)
  """
  rtol, atol = TOLERANCES[_dtype_name(dtype)]
  expected = np.asarray(expected, np.float64)
  peak = float(np.max(np.abs(expected))) if expected.size else 0.0
  return rtol, atol * max(1.0, peak)


def compare(actual: Any, expected: Any, dtype: Any) -> Comparison:
  """`actual` (computed in `dtype`) against `expected` with `TOLERANCES[dtype]`.

  A shape mismatch is an infinite error.

  Example:
    >>> want = np.array([1.0, -4.0])
    >>> compare(want + 1e-6, want, "float32").ok, compare(want + 1e-3, want, "float32").ok
    (True, False)
  """
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    return Comparison(float("inf"), float("inf"), float("inf"))
  if not expected.size:
    return Comparison(0.0, 0.0, 0.0)
  rtol, atol = tolerance(expected, dtype)
  diff = np.abs(actual - expected)
  peak = float(np.max(np.abs(expected)))
  max_abs = float(np.max(diff))
  ratio = float(np.max(diff / (atol + rtol * np.abs(expected))))
  return Comparison(max_abs, max_abs / peak if peak else max_abs, ratio)


def _dtype_name(dtype: Any) -> str:
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in TOLERANCES:
    raise ValueError(f"compare: `dtype` must be one of {', '.join(TOLERANCES)}, got {dtype!r}.")
  return name


@dataclasses.dataclass(frozen=True)
class Case:
  """One depthwise convolution in user terms: the arguments the ops and the reference share.

  `op_name` names the op (`dw5d_jax.depthwise_conv2d` or `depthwise_conv3d`,
  and the `interop.tf_` ops of the same name), `kwargs()` its keyword
  arguments, `expected(x, kernel)` the reference's answer. The tests,
  `dw5d parity` and the GPU benchmark describe their convolutions with it.

  Example:
    >>> case = Case("2d", "NDHWC", "DW", (1, 4, 2, 5, 3), (3, 3, 3, 1), strides=(1, 2))
    >>> case.op_name, case.kwargs()["axes"], case.name
    ('depthwise_conv2d', 'DW', '2d DW NDHWC k3x3 s1,2 r1 SAME M1')
    >>> x, k = np.ones(case.x_shape), np.ones(case.k_shape)
    >>> case.expected(x, k).shape
    (1, 4, 2, 3, 3)
  """

  op: str  # "2d" (per-slice or rank-4 depthwise_conv2d) or "3d"
  layout: str  # data_format: "NDHWC", "NCDHW", "NHWC" or "NCHW"
  axes: str  # the convolved axes: two of "DHW" ("HW" for rank 4), or "DHW" for 3d
  x_shape: tuple[int, ...]
  k_shape: tuple[int, ...]  # (k_0, ..., C, M), dim i along axes[i]
  strides: int | tuple[int, ...] = 1
  dilations: int | tuple[int, ...] = 1
  padding: str | tuple[str | tuple[int, int], ...] = "SAME"

  @property
  def op_name(self) -> str:
    return f"depthwise_conv{self.op}"

  @property
  def name(self) -> str:
    """A short description, e.g. `"3d DHW NCDHW k2x3x2 s2,1,2 r1 VALID M2"`."""
    def ints(v):
      return str(v) if isinstance(v, int) else ",".join(map(str, v))
    pad = self.padding if isinstance(self.padding, str) else "pad" + "".join(
        f"({p})" if isinstance(p, str) else f"({p[0]},{p[1]})" for p in self.padding)
    k = "x".join(map(str, self.k_shape[:-2]))
    return (f"{self.op} {self.axes} {self.layout} k{k} s{ints(self.strides)} "
            f"r{ints(self.dilations)} {pad} M{self.k_shape[-1]}")

  def kwargs(self) -> dict[str, Any]:
    """The op's keyword arguments (`axes` only where the op takes it)."""
    kw = {"strides": self.strides, "dilations": self.dilations, "padding": self.padding,
          "data_format": self.layout}
    if self.op == "2d" and len(self.layout) == 5:
      kw["axes"] = self.axes
    return kw

  def expected(self, x: Any, kernel: Any) -> np.ndarray:
    """The reference's output in float64 (x may have another shape than `x_shape`)."""
    return depthwise_reference(x, kernel, axes=self.axes, strides=self.strides,
                               dilations=self.dilations, padding=self.padding,
                               data_format=self.layout)
