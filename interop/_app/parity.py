"""`dw5d parity`: dw5d_jax against the TensorFlow reference ops, on a grid of cases.

For every caseuration (op, fold axes, layout, strides, dilations, padding,
multiplier) and dtype, the same rounded random `x`, `kernel` and cotangent
`ct` go to both sides, which return `y` and the gradients of `sum(y * ct)`
with respect to `x` and `kernel`:

* JAX: `jax.jit` of the op and `jax.grad`, once per method (auto, conv, shift);
* TF: `interop.tf_depthwise_conv2d`/`tf_depthwise_conv3d` under
  `tf.GradientTape`, in eager mode, as a `tf.function` whose input signature
  leaves batch and every spatial size `None` ("graph"), and the same with
  `jit_compile=True` ("xla").

Each (case, dtype, TF mode, JAX method) is a row. Errors are JAX minus TF over
`y`, `dx` and `dk`: the largest absolute one, and the largest relative to the
largest magnitude of TF's value. A row passes when every element satisfies
`|jax - tf| <= atol * max(1, max|tf|) + rtol * |tf|` with the dtype's
`(rtol, atol)` from `dw5d_jax._reference.TOLERANCES` (the tests' table).

float16 and bfloat16: both sides compute in float32 from the same rounded
inputs and round the result (dw5d_jax accumulates half precision in float32,
and the TF ops do the same, casting rather than using TF's half-precision
depthwise kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dw5d_jax._reference import Case, Comparison, compare

MODES = ("eager", "graph", "xla")
METHODS = ("auto", "conv", "shift")
DTYPES = ("float32", "bfloat16", "float16")

_C = Case
# Every fold axis and layout, rank 4 and 5, each stride/dilation path of the TF
# op (native, gcd stride, subsample-then-dilate, stride-1-then-slice), SAME,
# VALID, CAUSAL, explicit and per-axis padding, multipliers 1-3, sizes smaller
# than the kernel.
GRID = (
    _C("2d", "NHWC", "HW", (2, 7, 6, 3), (3, 3, 3, 1)),
    _C("2d", "NCHW", "HW", (2, 2, 8, 7), (2, 3, 2, 2), (2, 1), 1, "VALID"),
    _C("2d", "NHWC", "HW", (1, 6, 7, 2), (3, 2, 2, 1), 2, 2, ((1, 2), (0, 1))),
    _C("2d", "NDHWC", "HW", (2, 3, 7, 6, 3), (3, 3, 3, 1), 2),
    _C("2d", "NDHWC", "DW", (2, 5, 4, 6, 2), (3, 2, 2, 2), (1, 2), (2, 1)),
    _C("2d", "NCDHW", "DW", (1, 3, 6, 3, 7), (2, 3, 3, 1), 2, (2, 1), ((0, 1), (2, 1))),
    _C("2d", "NDHWC", "WD", (2, 7, 3, 5, 2), (2, 3, 2, 1), (3, 1), 1, "VALID"),
    _C("2d", "NCDHW", "DH", (1, 2, 5, 6, 4), (3, 3, 2, 3), 1, (1, 3)),
    _C("2d", "NDHWC", "HD", (1, 6, 5, 3, 3), (1, 3, 3, 2), (1, 3), 2, ((0, 0), (1, 1))),
    _C("2d", "NCDHW", "WH", (2, 2, 3, 7, 8), (3, 2, 2, 1), 2, 2, "VALID"),
    _C("3d", "NDHWC", "DHW", (2, 4, 5, 6, 2), (3, 3, 3, 2, 1)),
    _C("3d", "NCDHW", "DHW", (1, 3, 5, 6, 5), (2, 3, 2, 3, 2), (2, 1, 2), (1, 2, 1)),
    _C("3d", "NDHWC", "DHW", (1, 6, 5, 7, 2), (3, 2, 3, 2, 1), 2, 2,
       ((1, 1), (0, 2), (2, 0))),
    _C("3d", "NCDHW", "DHW", (2, 2, 4, 7, 6), (3, 3, 2, 2, 2), (1, 3, 2), 1, "VALID"),
    _C("3d", "NDHWC", "DHW", (1, 1, 2, 3, 2), (3, 5, 4, 2, 1), (1, 2, 1), (1, 1, 2)),
    _C("3d", "NCDHW", "DHW", (1, 2, 5, 6, 7), (3, 2, 3, 2, 1), (2, 1, 2), (1, 2, 1),
       ("CAUSAL", "SAME", (1, 0))),
    _C("2d", "NDHWC", "DW", (2, 6, 3, 5, 2), (3, 2, 2, 2), (2, 1), (2, 1), "CAUSAL"),
)
# The test suite's compact grid: these cases, each in float32 and one half dtype.
QUICK = (1, 2, 4, 5, 8, 9, 11, 12, 14, 15)


@dataclasses.dataclass(frozen=True)
class Row:
  case: Case
  dtype: str
  mode: str
  method: str
  errors: dict[str, Comparison]  # "y", "dx", "dk" -> JAX against TF

  @property
  def ok(self) -> bool:
    return all(e.ok for e in self.errors.values())

  @property
  def worst(self) -> str:
    """The quantity closest to (or past) its tolerance."""
    return max(self.errors, key=lambda name: self.errors[name].ratio)

  @property
  def max_abs(self) -> float:
    return max(e.max_abs for e in self.errors.values())

  @property
  def max_rel(self) -> float:
    return max(e.max_rel for e in self.errors.values())


def plan(*, quick: bool = False, dtypes: Sequence[str] = DTYPES) -> list[tuple[Case, str]]:
  """The (case, dtype) pairs to check: the full grid, or the compact one."""
  if not quick:
    return [(c, d) for c in GRID for d in dtypes]
  halves = [d for d in dtypes if d != "float32"]
  pairs = []
  for j, i in enumerate(QUICK):
    pairs += [(GRID[i], d) for d in dtypes if d == "float32"]
    if halves:
      pairs.append((GRID[i], halves[j % len(halves)]))
  return pairs


def check(case: Case, dtype: str, *, modes: Sequence[str] = MODES,
          methods: Sequence[str] = METHODS, seed: int = 0) -> list[Row]:
  """Runs one case in one dtype on both sides; one row per (TF mode, JAX method)."""
  import jax.numpy as jnp
  import tensorflow as tf

  rng = np.random.default_rng(seed)
  np_dtype = jnp.dtype(dtype)
  x = rng.standard_normal(case.x_shape).astype(np_dtype)
  k = rng.standard_normal(case.k_shape).astype(np_dtype)
  ct = rng.standard_normal(out_shape(case)).astype(np_dtype)

  jax_out = {m: [np.asarray(a, np.float64) for a in jax_step(case, m)(x, k, ct)]
             for m in methods}
  rows = []
  for mode in modes:
    tf_out = tf_step(case, mode, tf.as_dtype(np_dtype))(
        tf.constant(x), tf.constant(k), tf.constant(ct))
    tf_out = [np.asarray(t.numpy(), np.float64) for t in tf_out]
    for method in methods:
      errors = {name: compare(a, b, dtype)
                for name, a, b in zip(("y", "dx", "dk"), jax_out[method], tf_out, strict=True)}
      rows.append(Row(case, dtype, mode, method, errors))
  return rows


def out_shape(case: Case) -> tuple[int, ...]:
  """The output shape, from dw5d_jax without computing anything."""
  import jax

  import dw5d_jax as dw

  op = getattr(dw, case.op_name)
  x = jax.ShapeDtypeStruct(case.x_shape, "float32")
  k = jax.ShapeDtypeStruct(case.k_shape, "float32")
  return jax.eval_shape(lambda a, b: op(a, b, **case.kwargs()), x, k).shape


def jax_step(case: Case, method: str) -> Callable[..., tuple[Any, Any, Any]]:
  """`(x, k, ct) -> (y, dx, dk)` in JAX: `jax.grad` of `sum(y * ct)`, under `jit`."""
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  op = getattr(dw, case.op_name)
  kw = case.kwargs()

  def loss(x, k, ct):
    y = op(x, k, method=method, **kw)
    return jnp.sum(y * ct), y

  @jax.jit
  def step(x, k, ct):
    (gx, gk), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, k, ct)
    return y, gx, gk

  return step


def tf_step(case: Case, mode: str, dtype: Any) -> Callable[..., tuple[Any, Any, Any]]:
  """`(x, k, ct) -> (y, dx, dk)` with the TF ops and `tf.GradientTape`, in `mode`."""
  import tensorflow as tf

  op = tf_op(case)

  def step(x, k, ct):
    with tf.GradientTape() as tape:
      tape.watch([x, k])
      y = op(x, k)
      loss = tf.reduce_sum(y * ct)
    gx, gk = tape.gradient(loss, [x, k])
    return y, gx, gk

  c = case.x_shape[case.layout.index("C")]
  y_channels = c * case.k_shape[-1]
  return in_mode(step, mode, [dynamic_spec(case.layout, c, dtype),
                              tf.TensorSpec(case.k_shape, dtype),
                              dynamic_spec(case.layout, y_channels, dtype)])


def tf_op(case: Case) -> Callable[[Any, Any], Any]:
  """`(x, k) -> y` with the TF reference op and the case's arguments."""
  from interop import _tf_ops

  op = getattr(_tf_ops, f"tf_{case.op_name}")
  kw = case.kwargs()
  return lambda x, k: op(x, k, **kw)


def dynamic_spec(layout: str, channels: int, dtype: Any) -> Any:
  """A `tf.TensorSpec` with only the channel size known (batch and spatial `None`)."""
  import tensorflow as tf

  return tf.TensorSpec([channels if a == "C" else None for a in layout], dtype)


def in_mode(fn: Callable, mode: str, signature: list[Any]) -> Callable:
  """`fn` as is ("eager"), or a `tf.function` with `signature` ("graph", "xla")."""
  import tensorflow as tf

  if mode == "eager":
    return fn
  if mode not in ("graph", "xla"):
    raise ValueError(f"parity: mode must be one of {', '.join(map(repr, MODES))}, "
                     f"got {mode!r}.")
  return tf.function(fn, input_signature=signature, jit_compile=mode == "xla")


# ----------------------------------------------------------------------------
# The command.


def configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--quick", action="store_true",
                      help=f"the compact grid of the test suite ({len(QUICK)} of {len(GRID)} "
                      "cases, float32 and one half dtype each)")
  parser.add_argument("--filter", action="append", default=[], metavar="TEXT",
                      help="keep cases whose name and dtype contain TEXT (repeatable: all "
                      "must match), e.g. --filter 3d --filter NCDHW")
  parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
  parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                      help="TF modes")
  parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                      help="dw5d_jax methods")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  parser.add_argument("--failures-only", action="store_true", help="print failing rows only")


def run(args: argparse.Namespace) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ info log (XLA start-up)
  import jax
  import tensorflow as tf

  tf.get_logger().setLevel("ERROR")  # tf.function retracing notes, one per case
  pairs = [(c, d) for c, d in plan(quick=args.quick, dtypes=args.dtypes)
           if all(f in f"{c.name} {d}" for f in args.filter)]
  if not pairs:
    print("no case matches the filters")
    return 2
  print(f"dw5d_jax {jax.__version__} on {jax.default_backend()} vs TensorFlow "
        f"{tf.__version__}; TF modes {', '.join(args.modes)}; JAX methods "
        f"{', '.join(args.methods)}")
  print("errors are JAX - TF over y, dx, dk (gradients of sum(y * ct)); rel = abs / max|TF|; "
        "half dtypes: both sides compute in float32 from the same rounded inputs")
  width = max(len(c.name) for c, _ in pairs)
  header = (f"{'case':{width}}  {'dtype':8}  {'tf':5}  {'jax':5}  {'max abs err':>11}  "
            f"{'max rel err':>11}  {'worst':5}  result")
  print(header)
  print("-" * len(header))
  t0, failed, total = time.perf_counter(), 0, 0
  for i, (case, dtype) in enumerate(pairs):
    for row in check(case, dtype, modes=args.modes, methods=args.methods,
                     seed=args.seed + i):
      total += 1
      failed += not row.ok
      if row.ok and args.failures_only:
        continue
      print(f"{case.name:{width}}  {dtype:8}  {row.mode:5}  {row.method:5}  "
            f"{row.max_abs:11.2e}  {row.max_rel:11.2e}  {row.worst:5}  "
            f"{'ok' if row.ok else 'FAIL'}", flush=True)
  seconds = time.perf_counter() - t0
  print(f"{total - failed}/{total} rows pass ({len(pairs)} case/dtype pairs, {seconds:.0f} s)"
        + ("" if not failed else f"; {failed} FAILED"))
  return 1 if failed else 0
