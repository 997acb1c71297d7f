"""Channel counts and narrow outputs of real video networks on CPU: which path, how fast.

Run: `flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/channels.py`
(a few minutes on 2 cores; `--rounds`, `--cases c54 mvit` to narrow it).

Cases (float32, 3x3x3 kernels, x as (N, D, H, W, C)):

* `c52`, `c54`, `c56`: x (1, 13, 40, 40, C), SAME. X3D's second stage has
  C = 54, which is not a multiple of 4;
* `mvit`: MViT-v2-S's attention-pooling conv, x (1, 8, 56, 56, 96), stride
  (1, 8, 8), padding 1 on every axis: a 7x7 output frame, strides larger
  than the kernel;
* `narrow7`, `narrow5`: 7x7 and 5x5 frames, x (8, 8, 7, 7, 64) and
  (1, 4, 5, 5, 54), SAME.

For each case, both layouts (NCDHW is x transposed), the forward pass and
forward + backward (the gradient of `sum(y * ct)` with respect to x and the
kernel), one jitted callable per cell, each lowered under its own setting
(benchmarks/channels_first.py: `_setting`):

* `xla`: XLA's shift lowering (`DW5D_JAX_NATIVE=0`);
* `native`: the native kernels wherever they apply (`DW5D_JAX_NATIVE=all`;
  NCDHW: `transposed` or `cfirst` below, as `_policy.transposed` says);
* `transposed` (NCDHW): the channels-last kernels, x transposed around them;
* `cfirst` (NCDHW): the channels-first kernels;
* `auto`: the library's default (`DW5D_JAX_NATIVE=1`, `_policy`).

Tuned allocator, warm-up, then interleaved rounds (channels_first.py:
`interleaved`); medians in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channels_first import _setting, interleaved  # noqa: E402

# name: (x shape (N, D, H, W, C), strides, padding)
CASES = {
    "c52": ((1, 13, 40, 40, 52), (1, 1, 1), "SAME"),
    "c54": ((1, 13, 40, 40, 54), (1, 1, 1), "SAME"),
    "c56": ((1, 13, 40, 40, 56), (1, 1, 1), "SAME"),
    "mvit": ((1, 8, 56, 56, 96), (1, 8, 8), ((1, 1), (1, 1), (1, 1))),
    "narrow7": ((8, 8, 7, 7, 64), (1, 1, 1), "SAME"),
    "narrow5": ((1, 4, 5, 5, 54), (1, 1, 1), "SAME"),
}
CELLS = {"NDHWC": ("xla", "native", "auto"),
         "NCDHW": ("xla", "transposed", "cfirst", "auto")}


def _cells(name: str, seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  shape, strides, padding = CASES[name]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, shape[-1], 1)).astype(np.float32)
  cells = {}
  for fmt, names in CELLS.items():
    xj = jnp.asarray(x if fmt == "NDHWC" else np.moveaxis(x, -1, 1))
    kj = jnp.asarray(k)

    def op(a, b, fmt=fmt):
      return dw.depthwise_conv3d(a, b, strides=strides, padding=padding, data_format=fmt)

    ctj = jnp.asarray(rng.standard_normal(jax.eval_shape(op, xj, kj).shape), jnp.float32)
    for cell in names:
      fwd = jax.jit(op)
      bwd = jax.jit(jax.grad(lambda a, b, c, op=op: jnp.sum(op(a, b) * c), argnums=(0, 1)))
      with _setting("all" if cell == "native" else cell):
        fwd = fwd.lower(xj, kj).compile()
        bwd = bwd.lower(xj, kj, ctj).compile()
      cells[(fmt, cell, "forward")] = lambda f=fwd, a=xj, b=kj: f(a, b)
      cells[(fmt, cell, "fwd+bwd")] = lambda f=bwd, a=xj, b=kj, c=ctj: f(a, b, c)
  return cells


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--rounds", type=int, default=15)
  args = p.parse_args(argv)
  import dw5d_jax as dw
  dw.tune_cpu_allocator()
  print(f"native: {dw.native_status().detail}; medians of {args.rounds} interleaved rounds, ms")
  print("| case | pass | NDHWC xla | native | auto | NCDHW xla | transposed | cfirst | auto |")
  print("|---|---|" + "---:|" * 7)
  for name in args.cases:
    times = interleaved(_cells(name), args.rounds)
    for which in ("forward", "fwd+bwd"):
      row = " | ".join(f"{1e3 * statistics.median(times[(fmt, cell, which)]):.3f}"
                       for fmt, names in CELLS.items() for cell in names)
      print(f"| {name} | {which} | {row} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
