"""Channels-first (NCDHW) on CPU: the native channels-first kernels vs the alternatives.

Run: `.venv/bin/python benchmarks/channels_first.py` (about a minute on 2 cores;
`--rounds`, `--workloads W1 W3` to narrow it).

For each workload of benchmarks/suite.py (x given there as (N, D, H, W, C);
here transposed to (N, C, D, H, W)) and for the forward pass and forward +
backward (the gradient of `sum(y * ct)` with respect to x and the kernel),
one jitted callable per cell, every cell lowered under its own setting:

* `xla`: XLA's shift lowering (`DW5D_JAX_NATIVE=0`);
* `transposed`: the channels-last native kernels with the channels-first
  arrays transposed around them (`_policy.transposed` forced true);
* `cfirst`: the channels-first native kernels (`_policy.transposed` false);
* `auto`: what the library picks by default (`DW5D_JAX_NATIVE=1`,
  `_policy.worthwhile` and `_policy.transposed`);
* `ndhwc`: the same problem channels-last, native (the reference point).

The allocator is tuned (`dw.tune_cpu_allocator()`); all cells are warmed up,
then timed in interleaved rounds (one call per cell per round, so load from
other processes hits every cell alike); the table has the medians in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import WORKLOADS, Workload  # noqa: E402

CELLS = ("xla", "transposed", "cfirst", "auto", "ndhwc")


@contextlib.contextmanager
def _setting(cell: str):
  """The environment and policy under which `cell` is lowered."""
  from dw5d_jax import _policy
  saved_env, saved_policy = os.environ.get("DW5D_JAX_NATIVE"), _policy.transposed
  os.environ["DW5D_JAX_NATIVE"] = {"xla": "0", "auto": "1"}.get(cell, "all")
  if cell == "transposed":
    _policy.transposed = lambda spec, op: not spec.channels_last
  elif cell == "cfirst":
    _policy.transposed = lambda spec, op: False
  try:
    yield
  finally:
    _policy.transposed = saved_policy
    if saved_env is None:
      os.environ.pop("DW5D_JAX_NATIVE", None)
    else:
      os.environ["DW5D_JAX_NATIVE"] = saved_env


def _cells(w: Workload, seed: int = 0):
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  dtype = jnp.bfloat16 if w.dtype == "bfloat16" else jnp.float32
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(w.x_shape).astype(np.float32)
  k = rng.standard_normal(w.k_shape).astype(np.float32)
  cells = {}
  for cell in CELLS:
    last = cell == "ndhwc"
    fmt = "NDHWC" if last else "NCDHW"
    xs = x if last else np.moveaxis(x, -1, 1)
    if w.op == "2d":
      def op(a, b, fmt=fmt):
        return dw.depthwise_conv2d(a, b, strides=w.stride, dilations=w.dilation, padding="SAME",
                                   data_format=fmt)
    else:
      def op(a, b, fmt=fmt):
        return dw.depthwise_conv3d(a, b, strides=w.stride, dilations=w.dilation, padding="SAME",
                                   data_format=fmt)
    xj, kj = jnp.asarray(xs, dtype), jnp.asarray(k, dtype)
    ctj = jnp.asarray(rng.standard_normal(jax.eval_shape(op, xj, kj).shape), dtype)
    fwd = jax.jit(op)
    bwd = jax.jit(jax.grad(
        lambda a, b, c, op=op: jnp.sum((op(a, b) * c).astype(jnp.float32)), argnums=(0, 1)))
    with _setting(cell):  # lowered (and compiled) now, under this cell's setting
      fwd = fwd.lower(xj, kj).compile()
      bwd = bwd.lower(xj, kj, ctj).compile()
    cells[(cell, "forward")] = lambda fwd=fwd, a=xj, b=kj: fwd(a, b)
    cells[(cell, "fwd+bwd")] = lambda bwd=bwd, a=xj, b=kj, c=ctj: bwd(a, b, c)
  return cells


def interleaved(cells: dict, rounds: int, warmup: int = 3, clock=time.perf_counter) -> dict:
  """Seconds per call of each jitted cell: `rounds` samples, one call per cell per round.

  Every cell is called `warmup` times first; in a round the cells run in
  order, so load from other processes hits all cells alike. `clock`:
  wall time, or `time.process_time` (this process's CPU time: on one
  thread, what a call costs whatever else shares the core).
  """
  import jax
  for fn in cells.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {key: [] for key in cells}
  for _ in range(rounds):
    for key, fn in cells.items():
      t0 = clock()
      jax.block_until_ready(fn())
      times[key].append(clock() - t0)
  return times


def measure(w: Workload, rounds: int, warmup: int = 3) -> dict[tuple[str, str], float]:
  """Median ms per cell, interleaved rounds after `warmup` calls of each."""
  times = interleaved(_cells(w), rounds, warmup)
  return {key: 1e3 * statistics.median(v) for key, v in times.items()}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4"],
                 choices=sorted(WORKLOADS))
  p.add_argument("--rounds", type=int, default=21)
  args = p.parse_args(argv)
  import dw5d_jax as dw
  dw.tune_cpu_allocator()
  print(f"native: {dw.native_status().detail}; medians of {args.rounds} interleaved rounds, ms")
  print("| workload | pass | " + " | ".join(CELLS) + " |")
  print("|---|---|" + "---:|" * len(CELLS))
  for name in args.workloads:
    w = WORKLOADS[name]
    got = measure(w, args.rounds)
    for which in ("forward", "fwd+bwd"):
      row = " | ".join(f"{got[(cell, which)]:.2f}" for cell in CELLS)
      print(f"| {name} {w.title} | {which} | {row} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
