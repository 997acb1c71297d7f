"""What the tests share: cases, random data, tolerances and reference gradients.

A `Case` (from `dw5d_jax._reference`) holds one convolution in user terms;
`run` calls the library on it and `Case.expected` the independent float64
reference. `assert_close` compares with that reference under the dtype's
tolerance (`dw5d_jax._reference.TOLERANCES`). `reference_grads`,
`input_grad` and `kernel_grad` give exact gradients from the reference alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import dw5d_jax as dw
from dw5d_jax._reference import Case, tolerance

__all__ = ["GRAD_CASES", "METHODS", "Case", "assert_close", "cases", "input_grad",
           "kernel_grad", "random_array", "reference_grads", "run"]

METHODS = ("auto", "conv", "shift")


def run(case: Case, x: Any, kernel: Any, **options: Any) -> jax.Array:
  """The library's op on `case`; `options` such as `method=` go to the op."""
  return getattr(dw, case.op_name)(x, kernel, **case.kwargs(), **options)


def random_array(rng: np.random.Generator, shape, dtype="float32") -> np.ndarray:
  """Normal random data (never zeros or ones alone)."""
  return rng.standard_normal(shape).astype(jax.numpy.dtype(dtype))


def assert_close(actual, expected, dtype="float32", err_msg: str = "") -> None:
  """`actual`, computed in `dtype`, against a float64 `expected` of the same shape.

  The tolerance is `TOLERANCES[dtype]`, its absolute part scaled by the largest
  magnitude of `expected`, so the check holds for sums of many taps as well
  as for small outputs. Both may be pytrees of the same structure (e.g. a
  gradient pair); each leaf is scaled by itself.
  """
  chex.assert_trees_all_equal_structs(actual, expected)

  def check(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    rtol, atol = tolerance(e, dtype)
    chex.assert_trees_all_close(a, e, rtol=rtol, atol=atol, strict=True, custom_message=err_msg)

  jax.tree.map(check, actual, expected)


# ----------------------------------------------------------------------------
# Random cases (hypothesis).


# TensorFlow's own CPU depthwise kernel runs unequal H and W strides only
# through oneDNN, which TF turns on by default on some x86 CPUs only (not on
# AMD's); elsewhere Keras's TensorFlow backend raises this.
TF_UNEQUAL_STRIDES = "only supports equal length strides in the row and column dimensions"


def keras_output(layer: Any, x: Any, strides: Any) -> Any:
  """`layer(x)`; None where TensorFlow refuses the layer's unequal `strides` (see above).

  The layer is built either way: its weights exist for the caller.
  """
  try:
    return layer(x)
  except Exception as e:  # noqa: BLE001 - re-raised unless it is exactly TF's refusal
    if TF_UNEQUAL_STRIDES not in str(e) or len(set(np.broadcast_to(strides, 2).tolist())) == 1:
      raise
    return None


def x_shape(layout: str, n: int, sizes: dict[str, int], c: int) -> tuple[int, ...]:
  return tuple(n if a == "N" else c if a == "C" else sizes[a] for a in layout)


def output_nonempty(n: int, k: int, r: int, padding: Any) -> bool:
  e = (k - 1) * r + 1
  if padding in ("SAME", "CAUSAL"):
    return n >= 1
  lo, hi = (0, 0) if padding == "VALID" else padding
  return n + lo + hi - e >= 0


_FEW_CHANNELS, _MULTIPLIERS = st.integers(1, 4), st.integers(1, 3)


@st.composite
def cases(draw, ops=("2d", "3d"), max_size=7, max_kernel=4, channels=_FEW_CHANNELS,
          multipliers=_MULTIPLIERS) -> Case:
  """Any op, layout, fold axes, strides, dilations and padding (per axis too); sizes from 1."""
  op = draw(st.sampled_from(ops))
  if op == "3d":
    layout, axes = draw(st.sampled_from(["NDHWC", "NCDHW"])), "DHW"
  elif draw(st.booleans()):
    layout, axes = draw(st.sampled_from(["NHWC", "NCHW"])), "HW"
  else:
    layout = draw(st.sampled_from(["NDHWC", "NCDHW"]))
    axes = "".join(draw(st.permutations("DHW"))[:2])
  nc = len(axes)
  ks = [draw(st.integers(1, max_kernel)) for _ in range(nc)]
  ss = [draw(st.integers(1, 3)) for _ in range(nc)]
  rs = [draw(st.integers(1, 3)) for _ in range(nc)]
  pair = st.tuples(st.integers(0, 3), st.integers(0, 3))
  pad_kind = draw(st.sampled_from(["SAME", "VALID", "CAUSAL", "explicit", "per-axis"]))
  if pad_kind == "explicit":
    pads = [draw(pair) for _ in range(nc)]
  elif pad_kind == "per-axis":  # a kind or a pair on each axis
    pads = [draw(st.one_of(st.sampled_from(["SAME", "VALID", "CAUSAL"]), pair))
            for _ in range(nc)]
  else:
    pads = [pad_kind] * nc
  sizes = {a: draw(st.integers(1, max_size)) for a in "DHW"}
  for i, a in enumerate(axes):
    assume(output_nonempty(sizes[a], ks[i], rs[i], pads[i]))
  c, m, n = draw(channels), draw(multipliers), draw(st.integers(1, 2))
  scalar = draw(st.booleans())
  return Case(
      op=op, layout=layout, axes=axes,
      x_shape=x_shape(layout, n, sizes, c), k_shape=(*ks, c, m),
      strides=ss[0] if scalar and len(set(ss)) == 1 else tuple(ss),
      dilations=rs[0] if scalar and len(set(rs)) == 1 else tuple(rs),
      padding=pad_kind if pad_kind in ("SAME", "VALID", "CAUSAL") else tuple(pads),
  )


# ----------------------------------------------------------------------------
# Exact gradients from the reference.
#
# The op is linear in x and in the kernel, so the gradient of
# L = sum(op(x, k) * ct) is dL/dx[p] = <op(e_p, k), ct> and
# dL/dk[q] = <op(x, e_q), ct>, with one-hot e: no differentiation involved.


def input_grad(linear: Callable[[np.ndarray], np.ndarray], x_shape, ct) -> np.ndarray:
  """d/dx sum(ct * linear(x)) for a linear map that keeps batch items apart.

  Row p of the map's matrix is `linear(e_p)`; one call on a batch holding every
  basis input of one batch item gives them all.
  """
  item = tuple(x_shape[1:])
  p = int(np.prod(item))
  rows = np.asarray(linear(np.eye(p).reshape(p, *item))).reshape(p, -1)
  return (np.asarray(ct, np.float64).reshape(x_shape[0], -1) @ rows.T).reshape(x_shape)


def kernel_grad(linear_in_k: Callable[[np.ndarray], np.ndarray], k_shape, ct) -> np.ndarray:
  """d/dk sum(ct * linear_in_k(k)), one basis kernel at a time."""
  grad = np.zeros(k_shape)
  for q in np.ndindex(*k_shape):
    e = np.zeros(k_shape)
    e[q] = 1.0
    grad[q] = np.sum(ct * linear_in_k(e))
  return grad


def reference_grads(case: Case, x, k, ct) -> tuple[np.ndarray, np.ndarray]:
  """Exact `(dL/dx, dL/dk)` of `L = sum(op(x, k) * ct)` from the float64 reference."""
  x = np.asarray(x, np.float64)
  k = np.asarray(k, np.float64)
  return (input_grad(lambda v: case.expected(v, k), x.shape, ct),
          kernel_grad(lambda e: case.expected(x, e), k.shape, ct))


# Small configurations for gradient checks (one per op, layout and padding kind).
GRAD_CASES = [
    Case("3d", "NDHWC", "DHW", (1, 4, 5, 3, 2), (2, 3, 2, 2, 2), (1, 2, 1), (2, 1, 1), "SAME"),
    Case("3d", "NCDHW", "DHW", (2, 2, 3, 4, 5), (3, 1, 2, 2, 1), 2, 1, ((1, 0), (0, 2), (1, 1))),
    Case("2d", "NDHWC", "DW", (1, 5, 2, 4, 2), (3, 2, 2, 2), (2, 1), (1, 2), "SAME"),
    Case("2d", "NCHW", "HW", (2, 3, 6, 5), (2, 3, 3, 1), (1, 2), 1, "VALID"),
    Case("3d", "NDHWC", "DHW", (1, 5, 3, 4, 2), (3, 2, 2, 2, 1), (2, 1, 1), (2, 1, 1),
         ("CAUSAL", "SAME", (1, 0))),
]
