"""Exported artifacts and prebuilt kernels against `jax.jit` with the compiled kernels.

Run (tuned allocator, as in benchmarks/RESULTS.md):
`MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647
flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/native_export.py export`
and, for the prebuilt kernels, `... native_export.py prebuilt --venv V`, where
V is a venv with the wheel installed (built with every variant; see
tests/test_prebuilt.py for how the test makes one).

W1 and W2 of benchmarks/suite.py (float32, channels-last, SAME,
`method="auto"`), forward and backward (the gradient of `sum(y * ct)` with
respect to x and the kernel).

* `export`: one process, three cells per pass: `jit` (the native kernels),
  `native` (`dw5d_jax.export_native`, serialized, `deserialize_native`,
  `.call` under `jax.jit`) and `portable` (`jax.export.export`, serialized,
  deserialized, `.call`: XLA's lowering). Interleaved rounds; per cell the
  median ms and the median over rounds of its time over `jit`'s in the same
  round. The backward pass also has the portable export of each gradient
  alone (`dx`, `dk`), over the whole backward `jit`, to show where the
  portable time goes.
* `prebuilt`: the native kernels compiled here (`-march=native`, the
  checkout) against each prebuilt variant (the wheel in `--venv`, in a
  process whose PATH has no compiler; the variant forced by what the CPU
  is said to have). Two libraries cannot register the same FFI targets in
  one process, so each runs in its own process: `--repeats` alternations
  of all, and the ratio is of the medians over all their rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channels_first import interleaved  # noqa: E402
from suite import WORKLOADS, Workload  # noqa: E402


def _problem(w: Workload, seed: int = 0):
  import functools

  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(w.x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(w.k_shape), jnp.float32)
  op = functools.partial(dw.depthwise_conv2d if w.op == "2d" else dw.depthwise_conv3d,
                         strides=w.stride, dilations=w.dilation, padding="SAME")
  ct = jnp.asarray(rng.standard_normal(jax.eval_shape(op, x, k).shape), jnp.float32)
  fwd = jax.jit(op)
  def grad(argnums):
    return jax.jit(jax.grad(lambda a, b, c: jnp.sum(op(a, b) * c), argnums=argnums))

  return {"forward": (fwd, (x, k)), "backward": (grad((0, 1)), (x, k, ct)),
          "dx": (grad(0), (x, k, ct)), "dk": (grad(1), (x, k, ct))}


def _export_cells(w: Workload):
  import jax
  from jax import export

  import dw5d_jax as dw

  cells = {}
  for pass_, (fn, args) in _problem(w).items():
    runs = []
    if pass_ in ("forward", "backward"):  # jit and native in turn, before the slow cells
      native = dw.deserialize_native(dw.export_native(fn)(*args).serialize())
      runs += [("jit", fn), ("native", jax.jit(native.call))]
    portable = export.deserialize(export.export(fn)(*args).serialize())
    runs.append(("portable", jax.jit(portable.call)))
    for name, run in runs:
      compiled = run.lower(*args).compile()
      cells[(pass_, name)] = lambda c=compiled, a=args: c(*a)
  return cells


def export_main(args) -> int:
  import warnings

  from dw5d_jax import _native_build
  warnings.simplefilter("ignore", RuntimeWarning)  # the note that an export is portable
  status = _native_build.status()
  print(f"native kernels: {status.detail}; median ms over {args.rounds} interleaved rounds, "
        f"in brackets the median over rounds of the ratio to jit in the same round")
  print("| workload | pass | jit | export_native | jax.export (portable) | portable: dx alone "
        "| portable: dk alone |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name in args.workloads:
    times = interleaved(_export_cells(WORKLOADS[name]), args.rounds)
    for pass_ in ("forward", "backward"):
      base = times[(pass_, "jit")]
      row = [f"{1e3 * statistics.median(base):.2f}"]
      parts = [(pass_, "native"), (pass_, "portable")]
      if pass_ == "backward":  # where the portable backward's time goes
        parts += [("dx", "portable"), ("dk", "portable")]
      for cell in parts:
        v = times[cell]
        ratio = statistics.median(a / b for a, b in zip(v, base))
        row.append(f"{1e3 * statistics.median(v):.2f} ({ratio:.2f}x)")
      row += [""] * (5 - len(row))
      print(f"| {name} | {pass_} | {' | '.join(row)} |", flush=True)
  return 0


def child_main(args) -> int:
  """One process's samples of `jit` for every workload and pass (JSON on stdout)."""
  if args.variant:
    from dw5d_jax import _native_compile
    flags = {v.name: v.cpu_flags for v in _native_compile.VARIANTS}[args.variant]
    _native_compile.cpu_flags = lambda cpuinfo=None: flags
  import dw5d_jax as dw
  status = dw.native_status()
  cells = {}
  for name in args.workloads:
    for pass_, (fn, fargs) in _problem(WORKLOADS[name]).items():
      if pass_ not in ("forward", "backward"):
        continue
      compiled = fn.lower(*fargs).compile()
      cells[f"{name} {pass_}"] = lambda c=compiled, a=fargs: c(*a)
  times = interleaved(cells, args.rounds)
  print(json.dumps(dict(detail=status.detail, speed=status.speed, times=times)))
  return 0


def prebuilt_main(args) -> int:
  here = [sys.executable, os.path.abspath(__file__), "child", "--rounds", str(args.rounds),
          "--workloads", *args.workloads]
  env = {k: v for k, v in os.environ.items() if k not in ("CXX", "DW5D_JAX_NATIVE")}
  runs = {"native": ([*here], dict(env))}
  venv_python = os.path.join(args.venv, "bin", "python")
  no_compiler = dict(env, PATH=os.path.join(args.venv, "bin"))
  no_compiler.pop("PYTHONPATH", None)
  for variant in args.variants:
    runs[variant] = ([venv_python, *here[1:], "--variant", variant], no_compiler)
  samples: dict[str, dict[str, list[float]]] = {r: {} for r in runs}
  details = {}
  for _ in range(args.repeats):
    for run, (cmd, run_env) in runs.items():
      done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, check=True,
                            cwd="/tmp")
      got = json.loads(done.stdout.strip().splitlines()[-1])
      details[run] = f"{got['speed']}: {got['detail']}"
      for cell, v in got["times"].items():
        samples[run].setdefault(cell, []).extend(v)
  for run, d in details.items():
    print(f"{run}: {d}")
  print(f"median ms over {args.repeats} x {args.rounds} rounds; in brackets the ratio of "
        f"medians to the -march=native build")
  print(f"| cell | native | {' | '.join(args.variants)} |")
  print(f"|---|---:|{'---:|' * len(args.variants)}")
  for cell, base in samples["native"].items():
    b = statistics.median(base)
    row = [f"{1e3 * b:.2f}"] + [
        f"{1e3 * statistics.median(samples[v][cell]):.2f} "
        f"({statistics.median(samples[v][cell]) / b:.2f}x)" for v in args.variants]
    print(f"| {cell} | {' | '.join(row)} |", flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("export", "prebuilt", "child"))
  p.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--venv", help="prebuilt: a venv with the wheel installed")
  p.add_argument("--variants", nargs="+", default=["x86-64-v4-bf16", "x86-64-v4", "x86-64-v3"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variant", help=argparse.SUPPRESS)  # child: force this prebuilt variant
  args = p.parse_args(argv)
  return {"export": export_main, "prebuilt": prebuilt_main, "child": child_main}[args.what](args)


if __name__ == "__main__":
  sys.exit(main())
