"""An independent float64 NumPy reference, written from the definition.

It shares no code with the lowerings or with the argument normalisation: it
re-derives padding and output sizes from TensorFlow's rules (and CAUSAL:
all of the window's reach before the output position) and computes, for
every kernel tap, the input position each output reads:

    y[n, o, c*M + m] = sum_t xpad[n, o*s + t*r, c] * k[t, c, m]

with `xpad` the padded input (so `xpad[p] = x[p - lo]` inside the input
and 0 outside, or, with a border mode, what `numpy.pad` puts there),
summed over the taps `t` of every convolved axis. Inputs are
assumed valid (the library's checks are tested separately). It is slow and
meant for small tests, the parity suite and export verification.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def depthwise_reference(
    x: np.ndarray,
    kernel: np.ndarray,
    *,
    axes: str,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[str | tuple[int, int]] = "SAME",
    dilations: int | Sequence[int] = 1,
    data_format: str | None = None,
    padding_mode: str | Sequence[str] = "zeros",
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
    padding_mode: `"zeros"`, `"reflect"`, `"symmetric"`, `"edge"` or
      `"circular"` (`numpy.pad`'s `"constant"`, `"reflect"`, `"symmetric"`,
      `"edge"`, `"wrap"`), or one per convolved axis.

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
  modes = [padding_mode] * nconv if isinstance(padding_mode, str) else list(padding_mode)
  index, valid, out_sizes, widths = [], [], [], [(0, 0)] * x.ndim
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
    if modes[i] == "zeros":
      index.append(np.clip(pos, 0, n - 1))
      valid.append((pos >= 0) & (pos < n))
    else:  # x is padded by numpy.pad below: position p is at p + lo there
      hi_read = max(int(pos.max()) - (n - 1), 0)
      widths[1 + letters.index(a)] = (lo, hi_read)
      index.append(pos + lo)
      valid.append(np.ones(pos.shape, dtype=bool))
    out_sizes.append(out)

  for i, a in enumerate(axes):  # one axis at a time: each mode fills its own axis
    if modes[i] != "zeros":
      ax = 1 + letters.index(a)
      x = np.pad(x, [w if j == ax else (0, 0) for j, w in enumerate(widths)],
                 mode=_NUMPY_MODES[modes[i]])

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


_NUMPY_MODES = {"reflect": "reflect", "symmetric": "symmetric", "edge": "edge",
                "circular": "wrap"}


def _per_axis(v: int | Sequence[int], n: int) -> tuple[int, ...]:
  return (v,) * n if isinstance(v, (int, np.integer)) else tuple(v)
