"""NCDHW against NDHWC on the real networks' narrow and strided layers, per pass and path.

Run: `flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/ncdhw.py`
(`--layers mvit8 x3d216`, `--rounds`; a few minutes on 2 cores). One
thread: start the process pinned to one core, with XLA's intra-op pool
(which the native kernels split their tiles over) of one thread:
`XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
taskset -c 0 .venv/bin/python benchmarks/ncdhw.py --cpu-time ...` (CPU time
per call, which other processes on the core do not inflate).

The layers are those of `dw5d bench --models` (benchmarks/models.py, which
hooks the networks' own definitions) whose NCDHW forward was more than
1.25x NDHWC's there (benchmarks/RESULTS.md, "Real networks"), with
their shapes as recorded in its tables, plus a few that were within it, as
controls; and C = 1, 2, 3 on small frames. Every layer is a 3x3x3 kernel,
padding 1, float32; x as (N, C, D, H, W).

For each layer, the forward pass, the input gradient (`dx`: the gradient of
`sum(y * ct)` with respect to x alone) and the kernel gradient (`dk`, with
respect to the kernel alone), each jitted and lowered under its own setting
(benchmarks/channels_first.py: `_setting`):

* `ndhwc`: the same problem channels-last, `method="auto"` (the reference);
* `ndhwc_native`: channels-last on the native kernels wherever they apply
  (`DW5D_JAX_NATIVE=all`; for C <= 3, where `auto` keeps XLA's lowering);
* `xla`: NCDHW, XLA's shift lowering (`DW5D_JAX_NATIVE=0`);
* `transposed`: NCDHW, the channels-last kernels with the arrays transposed
  around them;
* `cfirst`: NCDHW, the channels-first kernels;
* `auto`: NCDHW, the library's default (`_policy`).

Tuned allocator, warm-up, interleaved rounds (channels_first.py:
`interleaved`), medians in ms; the last column is NCDHW `auto` / `ndhwc`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channels_first import _setting, interleaved  # noqa: E402

# name: (x shape (N, C, D, H, W), strides); the network each comes from.
LAYERS = {
    "mvit8": ((1, 96, 8, 56, 56), (1, 8, 8)),        # MViT-v2-S attention pooling
    "mvit4": ((2, 96, 8, 56, 56), (1, 4, 4)),        # MViT-v2-S
    "mvit4s": ((2, 96, 8, 28, 28), (1, 4, 4)),       # MViT-v2-S
    "mvit2": ((2, 96, 8, 56, 56), (1, 2, 2)),        # MViT-v2-S
    "mvit2s": ((4, 96, 8, 14, 14), (1, 2, 2)),       # MViT-v2-S (20 calls)
    "mvit1s": ((4, 96, 8, 14, 14), (1, 1, 1)),       # MViT-v2-S (10 calls)
    "mvit7": ((8, 96, 8, 7, 7), (1, 1, 1)),          # MViT-v2-S (control)
    "mvit8s": ((8, 96, 8, 14, 14), (1, 1, 1)),       # MViT-v2-S
    "mvit8s2": ((8, 96, 8, 14, 14), (1, 2, 2)),      # MViT-v2-S
    "mvit4m2": ((4, 96, 8, 28, 28), (1, 2, 2)),      # MViT-v2-S (3 calls)
    "mvit2m": ((2, 96, 8, 28, 28), (1, 1, 1)),       # MViT-v2-S (control)
    "x3d216": ((1, 216, 13, 20, 20), (1, 2, 2)),     # X3D-S
    "x3d108": ((1, 108, 13, 40, 40), (1, 2, 2)),     # X3D-S
    "x3d432": ((1, 432, 13, 10, 10), (1, 2, 2)),     # X3D-S
    "x3d432s": ((1, 432, 13, 5, 5), (1, 1, 1)),      # X3D-S (control)
    "x3d216s": ((1, 216, 13, 10, 10), (1, 1, 1)),    # X3D-S (10 calls)
    "x3d108s": ((1, 108, 13, 20, 20), (1, 1, 1)),    # X3D-S (4 calls)
    "x3dxs216": ((1, 216, 4, 20, 20), (1, 2, 2)),    # X3D-XS
    "x3dxs108": ((1, 108, 4, 40, 40), (1, 2, 2)),    # X3D-XS
    "csn128": ((1, 128, 32, 56, 56), (2, 2, 2)),     # CSN-50
    "csn256": ((1, 256, 16, 28, 28), (2, 2, 2)),     # CSN-50
    "csn256s": ((1, 256, 8, 14, 14), (1, 1, 1)),     # CSN-50 (5 calls)
    "csn512": ((1, 512, 8, 14, 14), (2, 2, 2)),      # CSN-50
    "csn512s": ((1, 512, 4, 7, 7), (1, 1, 1)),       # CSN-50 (control)
    "csn128s": ((1, 128, 16, 28, 28), (1, 1, 1)),    # CSN-50 (3 calls)
    "c1": ((2, 1, 8, 32, 32), (1, 1, 1)),            # C <= 3
    "c2": ((2, 2, 8, 32, 32), (1, 1, 1)),
    "c3": ((2, 3, 8, 32, 32), (1, 1, 1)),
    "c3s": ((2, 3, 16, 112, 112), (1, 2, 2)),        # a video stem's RGB input
}
CELLS = ("ndhwc", "ndhwc_native", "xla", "transposed", "cfirst", "auto")
PASSES = ("forward", "dx", "dk")


def _cells(name: str, cells_wanted=CELLS, seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  shape, strides = LAYERS[name]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, shape[1], 1)).astype(np.float32)
  cells = {}
  for cell in cells_wanted:
    fmt = "NDHWC" if cell.startswith("ndhwc") else "NCDHW"
    xj = jnp.asarray(np.moveaxis(x, 1, -1) if fmt == "NDHWC" else x)
    kj = jnp.asarray(k)

    def op(a, b, fmt=fmt):
      return dw.depthwise_conv3d(a, b, strides=strides, padding=((1, 1),) * 3, data_format=fmt)

    ctj = jnp.asarray(rng.standard_normal(jax.eval_shape(op, xj, kj).shape), jnp.float32)

    def loss(a, b, c, op=op):
      return jnp.sum(op(a, b) * c)

    fns = {"forward": (jax.jit(op), (xj, kj)),
           "dx": (jax.jit(jax.grad(loss, argnums=0)), (xj, kj, ctj)),
           "dk": (jax.jit(jax.grad(loss, argnums=1)), (xj, kj, ctj))}
    with _setting({"ndhwc": "auto", "ndhwc_native": "all"}.get(cell, cell)):
      for which, (fn, args) in fns.items():
        compiled = fn.lower(*args).compile()
        cells[(cell, which)] = lambda f=compiled, args=args: f(*args)
  return cells


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
  p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
  p.add_argument("--rounds", type=int, default=11)
  p.add_argument("--cpu-time", action="store_true",
                 help="this process's CPU time per call instead of wall time (one thread)")
  args = p.parse_args(argv)
  import dw5d_jax as dw
  dw.tune_cpu_allocator()
  print(f"native: {dw.native_status().detail}; medians of {args.rounds} interleaved rounds, ms"
        f" ({'CPU' if args.cpu_time else 'wall'} time); load {os.getloadavg()[0]:.1f}")
  ratio = "auto" in args.cells and "ndhwc" in args.cells
  print("| layer (N, C, D, H, W) stride | pass | " + " | ".join(args.cells)
        + (" | auto / ndhwc |" if ratio else " |"))
  print("|---|---|" + "---:|" * (len(args.cells) + ratio))
  for name in args.layers:
    times = interleaved(_cells(name, args.cells), args.rounds,
                        clock=time.process_time if args.cpu_time else time.perf_counter)
    med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    shape, strides = LAYERS[name]
    for which in PASSES:
      row = " | ".join(f"{med[(cell, which)]:.3f}" for cell in args.cells)
      tail = f" | {med[('auto', which)] / med[('ndhwc', which)]:.2f}" if ratio else ""
      print(f"| {name} {shape} s{strides} | {which} | {row}{tail} |", flush=True)
  print(f"load {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
