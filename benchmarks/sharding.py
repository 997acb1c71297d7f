"""Sharded depthwise convolution on simulated CPU devices: communication, redundant work, speed-up.

Run: `.venv/bin/python benchmarks/sharding.py` (a few minutes on 2 cores;
`--rounds`, `--workloads W1`, `--parts ab` to narrow it). Prints a markdown
block for benchmarks/RESULTS.md ("Sharding").

For W1 and W2 of benchmarks/suite.py with x split along the batch (N), depth
(D) or height (H) over 2, 4 and 8 devices (where they divide), under `jit`
with a 1D mesh, the forward pass (`y`) and the training step (`y`, `dx`,
`dk` for a given cotangent: the three ops):

* (a) **communication**: bytes each device sends, read from the compiled
  HLO (collective-permute: the halos; all-reduce: the kernel gradient),
  against the analytic halo volume: for each op, the rows its blocks read
  from other blocks (`_geometry.input_span`, from the definition) times the
  rest of a block (`analytic_halo_bytes`);
* (b) **redundant work**: the CPU time of the sharded step (every device's
  program, all on one core) over the single-device step, in the same
  process, interleaved rounds; process CPU time (`time.process_time`);
* (c) **speed-up**: wall time of 2 devices on 2 cores over 1 device on one
  core (each device's program on its own core), in two processes whose
  CPU affinity is set before JAX starts; rounds interleaved between them.
  Simulated devices in one process meet at every collective (a rendezvous
  of 0.6-2.4 ms per call), so (d) measures it as a real deployment runs:
* (d) **2 processes**: 2 processes with 1 CPU device each
  (`jax.distributed.initialize` on 127.0.0.1, gloo collectives), pinned to
  cores 0 and 1 with `taskset`, against 1 process with 1 device (part (c)'s,
  pinned to core 0), alternated `--pairs` times. `--parts d` runs it alone.

Each part runs in a subprocess (`--child`): the device count is fixed when
JAX starts. The machine may be shared: ratios within one run are what to
read; the header records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import WORKLOADS, Workload  # noqa: E402

SPLITS = {"N": 0, "D": 1, "H": 2}  # x axis (N, D, H, W, C) each split runs along
DEVICES = (2, 4, 8)


# ----------------------------------------------------------------------------
# Analytic halo volume, from the definition (also used by tests/sharding_worker.py).


def halo_rows(op: str, n: int, out: int, parts: int, k: int, s: int, r: int, lo: int,
              mode: str = "zeros") -> int:
  """The most rows any block of `op`'s exchanged operand needs from other blocks.

  `fwd` and `dk` split the outputs into blocks of `ceil(out / parts)` and
  read x's rows (blocks of `ceil(n / parts)`); `dx` splits the input rows
  and reads the cotangent's. Rows outside the array are padding, not sent.
  A border `mode` fills the padding with copies of x's rows: each block
  also receives those its outputs read that other blocks own (summed over
  the blocks, each is sent on its own), and the input gradient sends the
  convolution's halos back (the same rows).
  """
  from dw5d_jax import _geometry as g

  b, bo, e = -(-n // parts), -(-out // parts), g.effective(k, r)
  if mode != "zeros":
    copies = 0
    for i in range(parts):
      o0, o1 = i * bo, min((i + 1) * bo, out)
      if o0 < o1:
        first, stop = g.input_span(o0, o1, k, s, r, lo)
        copies += sum(1 for p in range(first, stop)
                      if (p < 0 or p >= n) and g.source(mode, p, n) // b != i)
    return halo_rows("fwd", n, out, parts, k, s, r, lo) + copies
  before = after = 0
  for i in range(parts):
    if op == "dx":  # cotangent rows o with o*s + t*r - lo in the block's input rows
      p0, p1 = i * b, min((i + 1) * b, n)
      if p0 >= p1:
        continue
      first, stop = -((e - 1 - p0 - lo) // s), (p1 - 1 + lo) // s + 1
      own0, own1, total = i * bo, (i + 1) * bo, out
    else:
      o0, o1 = i * bo, min((i + 1) * bo, out)
      if o0 >= o1:
        continue
      first, stop = g.input_span(o0, o1, k, s, r, lo)
      own0, own1, total = i * b, (i + 1) * b, n
    first, stop = max(first, 0), min(stop, total)
    before, after = max(before, own0 - first), max(after, stop - own1)
  return before + after


def analytic_halo_bytes(spec, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
                        parts: list[int], itemsize: int, ops=("fwd", "dx", "dk")) -> int:
  """Bytes each device sends for `ops`: halo rows times the rest of the block.

  `parts`: how many blocks each axis of x (and y) is split into; a later
  spatial axis's halo rows span the earlier axes' extended blocks.
  """
  total = 0
  for op in ops:
    if op == "dx" and any(m != "zeros" and parts[ax] > 1
                          for m, ax in zip(spec.modes, spec.spatial_axes)):
      op = "fwd"  # the transpose of the convolution's exchange: the same rows, sent back
    block = [-(-d // p) for d, p in zip(y_shape if op == "dx" else x_shape, parts)]
    for i, ax in enumerate(spec.spatial_axes):
      if parts[ax] == 1:
        continue
      rows = halo_rows(op, spec.in_spatial[i], spec.out_spatial[i], parts[ax], spec.window[i],
                       spec.strides[i], spec.dilations[i], spec.lo[i], spec.modes[i])
      total += rows * math.prod(block) // block[ax] * itemsize
      block[ax] += rows
  return total


# ----------------------------------------------------------------------------
# Collectives in compiled HLO (also used by tests/sharding_worker.py).

_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) (all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)"
    r"(-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


def collectives(hlo: str) -> list[tuple[str, int, int]]:
  """`(kind, elements, bytes)` of every collective in compiled HLO text.

  `elements`: of the largest array it moves (XLA combines several
  all-reduces into one of a tuple); `bytes`: of all of them, per device.
  """
  out = []
  for m in _COLLECTIVE.finditer(hlo):
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):  # async start: (operand, result[, ...]); count the result
      shapes = shapes[1:2]
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for _, dims in shapes]
    nbytes = sum(n * _BYTES.get(t, 4) for n, (t, _) in zip(sizes, shapes))
    out.append((m.group(2), max(sizes), nbytes))
  return out


# ----------------------------------------------------------------------------
# The measured functions.


def _problem(w: Workload):
  """`(op, x, k, ct, spec)` for a workload (float32)."""
  import jax

  import dw5d_jax as dw
  from dw5d_jax import _args

  rng = np.random.default_rng(0)
  x = rng.standard_normal(w.x_shape).astype(np.float32)
  k = rng.standard_normal(w.k_shape).astype(np.float32)
  if w.op == "2d":
    op = lambda x, k: dw.depthwise_conv2d(x, k, axes="HW")  # noqa: E731
    axes = "HW"
  else:
    op = dw.depthwise_conv3d
    axes = "DHW"
  n = len(axes)
  spec = _args.normalize("bench", x, k, conv_axes=axes, layout="NDHWC", strides=(1,) * n,
                         dilations=(1,) * n, padding=("SAME",) * n, precision=None,
                         preferred=None)[2]
  ct = rng.standard_normal(jax.eval_shape(op, x, k).shape).astype(np.float32)
  return op, x, k, ct, spec


def _functions(op):
  import jax

  def fwd(x, k, ct):
    del ct
    return op(x, k)

  def step(x, k, ct):
    y, vjp = jax.vjp(op, x, k)
    return (y, *vjp(ct))

  return {"fwd": jax.jit(fwd), "step": jax.jit(step)}


def _cases(workloads: list[str], devices=DEVICES):
  for name in workloads:
    w = WORKLOADS[name]
    for split, ax in SPLITS.items():
      for n in devices:
        if w.x_shape[ax] % n == 0:
          yield w, split, n


def _place(mesh, split: str, *arrays):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  spec = P(*([None] * SPLITS[split]), "d")
  x, k, ct = arrays
  return (jax.device_put(x, NamedSharding(mesh, spec)), jax.device_put(k, NamedSharding(mesh, P())),
          jax.device_put(ct, NamedSharding(mesh, spec)))


def _run(fn, args) -> None:
  import jax

  jax.block_until_ready(fn(*args))


def _cpu_times(cells: dict[str, tuple[Any, tuple]], rounds: int) -> dict[str, list[float]]:
  """Process CPU time per call of each cell, in interleaved rounds (after a warm-up)."""
  for fn, a in cells.values():
    _run(fn, a)
    _run(fn, a)
  times: dict[str, list[float]] = {c: [] for c in cells}
  for _ in range(rounds):
    for cell, (fn, a) in cells.items():
      t0 = time.process_time()
      _run(fn, a)
      times[cell].append(time.process_time() - t0)
  return times


def _calibration(x: np.ndarray, n: int, rounds: int) -> dict[str, Any]:
  """What simulated devices cost without any convolution: a one-pass program on x split
  along H over `n` devices, and the same with two one-row halo exchanges (ppermute)."""
  import jax
  from jax import lax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((n,), ("d",), devices=jax.devices()[:n])

  def halo(v):
    up = lax.ppermute(v[:, :, -1:], "d", [(j, j + 1) for j in range(n - 1)])
    down = lax.ppermute(v[:, :, :1], "d", [(j + 1, j) for j in range(n - 1)])
    return v * 2, up, down

  spec = P(None, None, "d")
  exchange = jax.jit(jax.shard_map(halo, mesh=mesh, in_specs=spec, out_specs=(spec,) * 3))
  double = jax.jit(lambda v: v * 2)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  times = _cpu_times({"one": (double, (x,)), "pass": (double, (xs,)),
                      "exchange": (exchange, (xs,))}, rounds)
  return {"devices": n, **{f"{c}_ms": 1e3 * min(t) for c, t in times.items()}}


def child_ab(workloads: list[str], rounds: int) -> None:
  """Parts (a) and (b): 8 devices, one core."""
  import jax

  x = _problem(WORKLOADS[workloads[-1]])[1]
  for n in DEVICES:
    print(json.dumps({"calibration": _calibration(x, n, rounds)}), flush=True)
  results = []
  for name in workloads:
    op, x, k, ct, spec = _problem(WORKLOADS[name])
    one = _functions(op)
    for w, split, n in _cases([name]):
      mesh = jax.make_mesh((n,), ("d",), devices=jax.devices()[:n])
      parts = [1] * 5
      parts[SPLITS[split]] = n
      args = _place(mesh, split, x, k, ct)
      sharded = _functions(op)
      for what in ("fwd", "step"):
        found = collectives(sharded[what].lower(*args).compile().as_text())
        ops = ("fwd",) if what == "fwd" else ("fwd", "dx", "dk")
        y_shape = jax.eval_shape(op, x, k).shape
        halo = analytic_halo_bytes(spec, x.shape, y_shape, parts, 4, ops)
        times = _cpu_times({"sharded": (sharded[what], args), "one": (one[what], (x, k, ct))},
                           rounds)
        results.append({
            "workload": w.name, "split": split, "devices": n, "what": what,
            "permute_bytes": sum(b for kind, _, b in found if kind == "collective-permute"),
            "reduce_bytes": sum(b for kind, _, b in found
                                if kind in ("all-reduce", "reduce-scatter")),
            "gather_bytes": sum(b for kind, _, b in found if kind in ("all-gather", "all-to-all")),
            "halo_bytes": halo, "kernel_bytes": k.size * 4,
            "cpu_sharded_ms": 1e3 * min(times["sharded"]),
            "cpu_one_ms": 1e3 * min(times["one"]),
            "cpu_sharded_median_ms": 1e3 * statistics.median(times["sharded"]),
            "cpu_one_median_ms": 1e3 * statistics.median(times["one"]),
        })
        print(json.dumps(results[-1]), flush=True)


def child_c(workloads: list[str], rounds: int, devices: int) -> None:
  """Part (c): wall time per call on `devices` devices (as many cores)."""
  import jax

  for name in workloads:
    op, x, k, ct, _ = _problem(WORKLOADS[name])
    for w, split, n in _cases([name], devices=(2,)):
      fns = _functions(op)
      if devices == 1:
        args = (x, k, ct)
      else:
        args = _place(jax.make_mesh((n,), ("d",)), split, x, k, ct)
      for what, fn in fns.items():
        _run(fn, args)
        _run(fn, args)
        times = []
        for _ in range(rounds):
          t0 = time.perf_counter()
          _run(fn, args)
          times.append(time.perf_counter() - t0)
        print(json.dumps({"workload": w.name, "split": split, "what": what, "devices": devices,
                          "wall_ms": 1e3 * min(times),
                          "wall_median_ms": 1e3 * statistics.median(times)}), flush=True)


def child_mp(workloads: list[str], rounds: int, process: int, port: int) -> None:
  """Part (d): one of 2 processes with 1 CPU device each (gloo collectives over TCP).

  Each process makes its own half of x and the cotangent (the same random
  arrays, cut by `make_array_from_callback`); both run the same calls,
  which synchronise at their collectives; process 0 prints its wall times.
  """
  import jax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process, initialization_timeout=120)
  assert jax.device_count() == 2 and jax.local_device_count() == 1, jax.devices()
  mesh = jax.make_mesh((2,), ("d",))
  for name in workloads:
    op, x, k, ct, _ = _problem(WORKLOADS[name])
    for w, split, _ in _cases([name], devices=(2,)):
      spec = P(*([None] * SPLITS[split]), "d")
      place = lambda v, s: jax.make_array_from_callback(  # noqa: E731
          v.shape, NamedSharding(mesh, s), lambda index, v=v: v[index])
      args = (place(x, spec), place(k, P()), place(ct, spec))
      for what, fn in _functions(op).items():
        _run(fn, args)
        _run(fn, args)
        multihost_utils.sync_global_devices(f"{w.name} {split} {what}")
        times = []
        for _ in range(rounds):
          t0 = time.perf_counter()
          _run(fn, args)
          times.append(time.perf_counter() - t0)
        if process == 0:
          print(json.dumps({"workload": w.name, "split": split, "what": what, "processes": 2,
                            "wall_ms": 1e3 * min(times),
                            "wall_median_ms": 1e3 * statistics.median(times)}), flush=True)
  jax.distributed.shutdown()


# ----------------------------------------------------------------------------
# The parent: runs the children, prints the tables.


def _spawn(args: list[str], devices: int, cores: list[int]) -> list[dict[str, Any]]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             DW5D_JAX_NATIVE=os.environ.get("DW5D_JAX_NATIVE", "1"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  cmd = [sys.executable, os.path.abspath(__file__), "--child", *args,
         "--cores", ",".join(map(str, cores))]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=3600)
  if out.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _spawn_pair(args: list[str]) -> list[dict[str, Any]]:
  """Part (d): two processes of 1 device each, pinned to cores 0 and 1 (`taskset`)."""
  import socket

  with socket.socket() as sock:  # a free port for the coordinator
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             DW5D_JAX_NATIVE=os.environ.get("DW5D_JAX_NATIVE", "1"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen(["taskset", "-c", str(i), sys.executable, os.path.abspath(__file__),
                             "--child", "mp", *args, "--process", str(i), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=1800))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
  for proc, (_, err) in zip(procs, outs):
    if proc.returncode:
      sys.exit(f"a 2-process child failed ({proc.returncode}):\n{err[-4000:]}")
  return [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]


def _kib(b: float) -> str:
  return f"{b / 1024:.0f}"


def report(ab: list[dict[str, Any]], c: list[dict[str, Any]], header: list[str]) -> str:
  lines = [*header, ""]
  calibration = [r["calibration"] for r in ab if "calibration" in r]
  ab = [r for r in ab if "calibration" not in r]
  if calibration:
    lines += [
        "Simulated devices' own cost (no convolution; CPU ms on one core, best of the "
        "rounds): a one-pass program (`x * 2`) on one device and on x split along H, and the "
        "split one with two one-row halo exchanges.", "",
        "| devices | 1 device | split | split + 2 ppermutes |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['devices']} | {r['one_ms']:.1f} | {r['pass_ms']:.1f} | "
              f"{r['exchange_ms']:.1f} |" for r in calibration]
    lines.append("")
  if ab:
    lines += [
        "(a) bytes each device sends per call (HLO) vs the analytic halo volume; (b) CPU "
        "time of all devices' programs on one core over one device's (same process, "
        "interleaved rounds; best of the rounds, the ratio of medians in brackets).", "",
        "| workload | split | devices | call | halo exchange KiB (HLO) | analytic KiB | "
        "HLO / analytic | all-reduce KiB (kernel KiB) | all-gather KiB | CPU ms sharded | "
        "CPU ms 1 device | CPU ratio |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ab:
      ratio = (f"{r['permute_bytes'] / r['halo_bytes']:.2f}" if r["halo_bytes"]
               else ("0 / 0" if not r["permute_bytes"] else "inf"))
      lines.append(
          f"| {r['workload']} | {r['split']} | {r['devices']} | {r['what']} | "
          f"{_kib(r['permute_bytes'])} | {_kib(r['halo_bytes'])} | {ratio} | "
          f"{_kib(r['reduce_bytes'])} ({_kib(r['kernel_bytes'])}) | {_kib(r['gather_bytes'])} | "
          f"{r['cpu_sharded_ms']:.1f} | {r['cpu_one_ms']:.1f} | "
          f"{r['cpu_sharded_ms'] / r['cpu_one_ms']:.2f} "
          f"({r['cpu_sharded_median_ms'] / r['cpu_one_median_ms']:.2f}) |")
  if any(r.get("devices") == 2 for r in c):
    lines += [
        "", "(c) wall time per call, 2 devices on 2 cores vs 1 device on 1 core (best of the "
        "rounds; median in brackets).", "",
        "| workload | split | call | 1 device, 1 core ms | 2 devices, 2 cores ms | speed-up |",
        "|---|---|---|---:|---:|---:|"]
    keys = sorted({(r["workload"], r["split"], r["what"]) for r in c if "devices" in r})
    for key in keys:
      one = [r for r in c if (r["workload"], r["split"], r["what"]) == key and r["devices"] == 1]
      two = [r for r in c if (r["workload"], r["split"], r["what"]) == key and r["devices"] == 2]
      t1 = min(r["wall_ms"] for r in one)
      t2 = min(r["wall_ms"] for r in two)
      m1 = statistics.median(r["wall_median_ms"] for r in one)
      m2 = statistics.median(r["wall_median_ms"] for r in two)
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {t1:.1f} ({m1:.1f}) | {t2:.1f} "
                   f"({m2:.1f}) | {t1 / t2:.2f} ({m1 / m2:.2f}) |")
  mp = [r for r in c if r.get("processes") == 2]
  if mp:
    lines += [
        "", "(d) wall time per call, 2 processes with 1 CPU device each (gloo collectives "
        "over TCP on 127.0.0.1; pinned to cores 0 and 1 by taskset) vs 1 process with 1 "
        "device (pinned to core 0); best of the rounds, median in brackets.", "",
        "| workload | split | call | 1 process ms | 2 processes ms | speed-up |",
        "|---|---|---|---:|---:|---:|"]
    for key in sorted({(r["workload"], r["split"], r["what"]) for r in mp}):
      one = [r for r in c if (r["workload"], r["split"], r["what"]) == key
             and r.get("devices") == 1]
      two = [r for r in mp if (r["workload"], r["split"], r["what"]) == key]
      t1, t2 = min(r["wall_ms"] for r in one), min(r["wall_ms"] for r in two)
      m1 = statistics.median(r["wall_median_ms"] for r in one)
      m2 = statistics.median(r["wall_median_ms"] for r in two)
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {t1:.1f} ({m1:.1f}) | {t2:.1f} "
                   f"({m2:.1f}) | {t1 / t2:.2f} ({m1 / m2:.2f}) |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
  p.add_argument("--parts", default="abc",
                 help="which parts to run: a, b (together), c, d (2 processes)")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--pairs", type=int, default=2, help="(c): alternations of the two processes")
  p.add_argument("--child", choices=["ab", "c1", "c2", "mp"])
  p.add_argument("--cores", default="")
  p.add_argument("--process", type=int, default=0, help="(d): this child's process id")
  p.add_argument("--port", type=int, default=0, help="(d): the coordinator's port")
  p.add_argument("--json", help="also write the raw results here")
  args = p.parse_args()

  if args.child:
    if args.cores:
      os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    os.environ.setdefault("DW5D_JAX_NATIVE", "1")
    import dw5d_jax as dw

    dw.tune_cpu_allocator()
    if args.child == "ab":
      child_ab(args.workloads, args.rounds)
    elif args.child == "mp":
      child_mp(args.workloads, args.rounds, args.process, args.port)
    else:
      child_c(args.workloads, args.rounds, int(args.child[1]))
    return

  load = os.getloadavg()
  common = ["--workloads", *args.workloads, "--rounds", str(args.rounds)]
  ab = _spawn(["ab", *common], 8, [0]) if {"a", "b"} & set(args.parts) else []
  c: list[dict[str, Any]] = []
  if {"c", "d"} & set(args.parts):
    for _ in range(args.pairs):
      c += _spawn(["c1", *common], 1, [0])
      if "c" in args.parts:
        c += _spawn(["c2", *common], 2, [0, 1])
      if "d" in args.parts:
        c += _spawn_pair(common)
  after = os.getloadavg()
  import jax

  header = [
      f"- Command: `.venv/bin/python benchmarks/sharding.py {' '.join(sys.argv[1:])}`".rstrip(),
      f"- Machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
      f"load average before {', '.join(f'{v:.2f}' for v in load)}, after "
      f"{', '.join(f'{v:.2f}' for v in after)}",
      f"- Versions: python {platform.python_version()}, jax {jax.__version__}; float32, "
      f"`DW5D_JAX_NATIVE={os.environ.get('DW5D_JAX_NATIVE', '1')}`, tuned allocator, "
      f"{args.rounds} rounds",
  ]
  text = report(ab, c, header)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"ab": ab, "c": c, "header": header}, f, indent=1)


if __name__ == "__main__":
  main()
