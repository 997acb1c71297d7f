"""Random convolution configurations for property tests, and how to run them.

A `Case` holds everything for one call, in user terms; `run` calls the
library, `expected` calls the independent float64 reference.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import dw5d_jax as dw
from dw5d_jax._reference import depthwise_reference

METHODS = ("auto", "conv", "shift")


@dataclasses.dataclass(frozen=True)
class Case:
  op: str  # "2d" or "3d"
  layout: str
  conv_axes: str  # "HW", "DW", ..., or "DHW"
  x_shape: tuple[int, ...]
  k_shape: tuple[int, ...]
  strides: Any
  dilations: Any
  padding: Any

  def kwargs(self) -> dict[str, Any]:
    kw = dict(strides=self.strides, dilations=self.dilations, padding=self.padding,
              data_format=self.layout)
    if self.op == "2d" and len(self.x_shape) == 5:
      kw["axes"] = self.conv_axes
    return kw

  def run(self, x, k, **extra):
    fn = dw.depthwise_conv2d if self.op == "2d" else dw.depthwise_conv3d
    return fn(x, k, **self.kwargs(), **extra)

  def expected(self, x, k) -> np.ndarray:
    return depthwise_reference(x, k, axes=self.conv_axes, strides=self.strides,
                               dilations=self.dilations, padding=self.padding,
                               data_format=self.layout)


def x_shape(layout: str, n: int, sizes: dict[str, int], c: int) -> tuple[int, ...]:
  return tuple(n if a == "N" else c if a == "C" else sizes[a] for a in layout)


def output_nonempty(n: int, k: int, s: int, r: int, padding: Any) -> bool:
  e = (k - 1) * r + 1
  if padding in ("SAME", "CAUSAL"):
    return n >= 1
  lo, hi = (0, 0) if padding == "VALID" else padding
  return n + lo + hi - e >= 0


@st.composite
def cases(draw, ops=("2d", "3d"), max_size=7, max_kernel=4):
  op = draw(st.sampled_from(ops))
  if op == "3d":
    layout, conv_axes = draw(st.sampled_from(["NDHWC", "NCDHW"])), "DHW"
  elif draw(st.booleans()):
    layout, conv_axes = draw(st.sampled_from(["NHWC", "NCHW"])), "HW"
  else:
    layout = draw(st.sampled_from(["NDHWC", "NCDHW"]))
    conv_axes = draw(st.permutations("DHW"))[:2]
    conv_axes = "".join(conv_axes)
  nc = len(conv_axes)
  ks = [draw(st.integers(1, max_kernel)) for _ in range(nc)]
  ss = [draw(st.integers(1, 3)) for _ in range(nc)]
  rs = [draw(st.integers(1, 3)) for _ in range(nc)]
  # "mixed": one entry per axis, each a kind or a pair (e.g. ("CAUSAL", (1, 0), "SAME")).
  pad_kind = draw(st.sampled_from(["SAME", "VALID", "CAUSAL", "explicit", "mixed"]))
  pads = [(draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(nc)]
  if pad_kind == "mixed":
    pads = [draw(st.sampled_from(["SAME", "VALID", "CAUSAL", "causal", p])) for p in pads]
  sizes = {a: draw(st.integers(1, max_size)) for a in "DHW"}
  for i, a in enumerate(conv_axes):
    p = pads[i] if pad_kind in ("explicit", "mixed") else pad_kind
    assume(output_nonempty(sizes[a], ks[i], ss[i], rs[i], p.upper() if isinstance(p, str) else p))
  c, m, n = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
  scalar = draw(st.booleans())
  return Case(
      op=op, layout=layout, conv_axes=conv_axes,
      x_shape=x_shape(layout, n, sizes, c), k_shape=(*ks, c, m),
      strides=ss[0] if scalar and len(set(ss)) == 1 else tuple(ss),
      dilations=rs[0] if scalar and len(set(rs)) == 1 else tuple(rs),
      padding=tuple(pads) if pad_kind in ("explicit", "mixed") else pad_kind,
  )


def reference_grads(case: Case, x, k, ct) -> tuple[np.ndarray, np.ndarray]:
  """Exact gradients of `sum(op(x, k) * ct)` from the float64 reference alone.

  The op is linear in x and in k: `dL/dx[p] = <ref(e_p, k), ct>` and
  `dL/dk[q] = <ref(x, e_q), ct>` with one-hot `e`.
  """
  gx = np.zeros(case.x_shape)
  for p in itertools.product(*(range(s) for s in case.x_shape)):
    e = np.zeros(case.x_shape)
    e[p] = 1.0
    gx[p] = np.sum(case.expected(e, k) * ct)
  gk = np.zeros(case.k_shape)
  for q in itertools.product(*(range(s) for s in case.k_shape)):
    e = np.zeros(case.k_shape)
    e[q] = 1.0
    gk[q] = np.sum(case.expected(x, e) * ct)
  return gx, gk


# Small configurations for gradient checks (one per op, layout and padding kind).
GRAD_CASES = [
    Case("3d", "NDHWC", "DHW", (1, 4, 5, 3, 2), (2, 3, 2, 2, 2), (1, 2, 1), (2, 1, 1), "SAME"),
    Case("3d", "NCDHW", "DHW", (2, 2, 3, 4, 5), (3, 1, 2, 2, 1), 2, 1, ((1, 0), (0, 2), (1, 1))),
    Case("2d", "NDHWC", "DW", (1, 5, 2, 4, 2), (3, 2, 2, 2), (2, 1), (1, 2), "SAME"),
    Case("2d", "NCHW", "HW", (2, 3, 6, 5), (2, 3, 3, 1), (1, 2), 1, "VALID"),
    Case("3d", "NDHWC", "DHW", (1, 5, 3, 4, 2), (3, 2, 2, 2, 1), (2, 1, 1), (2, 1, 1),
         ("CAUSAL", "SAME", (1, 0))),
]
