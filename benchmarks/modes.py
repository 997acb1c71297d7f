"""Border modes on CPU: the native kernels with `padding_mode` against `"zeros"`.

Run: `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647
.venv/bin/python benchmarks/modes.py` (about a minute on 2 cores; `--rounds`,
`--workloads`, `--cells` to narrow it: `--cells zeros reflect edge` leaves out
the padded copy, whose large temporaries can slow the other cells down
through the allocator).

For workloads W1 and W2 of benchmarks/suite.py (SAME padding, float32,
channels-last, `method="auto"`, so the native kernels), the forward pass and
the backward pass (the gradient of `sum(y * ct)` with respect to x and the
kernel), one jitted callable per cell:

* `zeros`: the default, the native kernels alone;
* `reflect`, `edge`: the native kernels on the whole problem plus a
  correction on the border (`dw5d_jax/_modes.py`, "borders");
* `reflect-padded`: reflect from a padded copy of x, then the native
  kernels without padding (what every other lowering does), for
  comparison.

All cells are warmed up, then timed in interleaved rounds (one call per
cell per round, so load from other processes hits every cell alike); the
table has the medians in ms and, per mode, the median over rounds of its
time divided by `zeros`'s in the same round (on a shared machine, the
paired ratio is steadier than a ratio of medians).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channels_first import interleaved  # noqa: E402
from suite import WORKLOADS, Workload  # noqa: E402

CELLS = ("zeros", "reflect", "edge", "reflect-padded")


@contextlib.contextmanager
def _setting(cell: str):
  """`reflect-padded` lowers with the padded-copy way forced."""
  from dw5d_jax import _modes
  saved = _modes._BORDERS
  if cell == "reflect-padded":
    _modes._BORDERS = _modes._PADDED
  try:
    yield
  finally:
    _modes._BORDERS = saved


def _cells(w: Workload, names: tuple[str, ...] = CELLS, seed: int = 0):
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(w.x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(w.k_shape), jnp.float32)
  cells = {}
  for cell in names:
    op = functools.partial(dw.depthwise_conv2d if w.op == "2d" else dw.depthwise_conv3d,
                           strides=w.stride, dilations=w.dilation, padding="SAME",
                           padding_mode=cell.split("-")[0])
    ct = jnp.asarray(rng.standard_normal(jax.eval_shape(op, x, k).shape), jnp.float32)
    fwd = jax.jit(op)
    bwd = jax.jit(jax.grad(lambda a, b, c, op=op: jnp.sum(op(a, b) * c), argnums=(0, 1)))
    with _setting(cell):  # lowered (and compiled) now, under this cell's setting
      fwd = fwd.lower(x, k).compile()
      bwd = bwd.lower(x, k, ct).compile()
    cells[(cell, "forward")] = lambda fwd=fwd: fwd(x, k)
    cells[(cell, "backward")] = lambda bwd=bwd, ct=ct: bwd(x, k, ct)
  return cells


def measure(w: Workload, rounds: int, warmup: int = 3,
            names: tuple[str, ...] = CELLS) -> dict[tuple[str, str], tuple]:
  """Per cell: the median ms, and the median over rounds of its ratio to `zeros`.

  Interleaved rounds after `warmup` calls of each cell: one call per cell per
  round, each mode right after the `zeros` call of its pass, so a burst of
  load from other processes hits both sides of a ratio alike.
  """
  times = interleaved(_cells(w, names), rounds, warmup)
  out = {}
  for (cell, pass_), v in times.items():
    base = times[("zeros", pass_)]
    ratio = statistics.median(a / b for a, b in zip(v, base))
    out[(cell, pass_)] = (1e3 * statistics.median(v), ratio)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
  p.add_argument("--rounds", type=int, default=21)
  p.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS,
                 help="which cells (zeros always runs: the ratios divide by it)")
  args = p.parse_args(argv)
  cells = tuple(c for c in CELLS if c in args.cells or c == "zeros")
  from dw5d_jax import _native_build
  status = _native_build.status()
  if not status.active:
    print(f"the native kernels are not active ({status.detail}); nothing to compare")
    return 1
  print(f"median ms over {args.rounds} interleaved rounds; in brackets the median over "
        f"rounds of the ratio to zeros in the same round")
  print(f"| workload | pass | {' | '.join(cells)} |")
  print(f"|---|---|{'---:|' * len(cells)}")
  for name in args.workloads:
    res = measure(WORKLOADS[name], args.rounds, names=cells)
    for pass_ in ("forward", "backward"):
      row = [f"{res[(c, pass_)][0]:.2f}" + ("" if c == "zeros" else f" ({res[(c, pass_)][1]:.2f}x)")
             for c in cells]
      print(f"| {name} | {pass_} | {' | '.join(row)} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
