"""The CPU benchmark suite: workloads W1-W5, our methods and the peers, one process.

Run by `dw5d bench` (interop/_app/bench.py), which starts this file once per
allocator setting (`--allocator default|tuned`, the environment set before
the interpreter starts, so every library in the process sees it) and merges
the JSON results into benchmarks/RESULTS.md and a chart (benchmarks/report.py).

Every cell is one jitted (or `tf.function`, or eager PyTorch) callable. All
cells of a workload are warmed up first, then timed in interleaved rounds
(one call per cell per round, so load from other processes hits all cells
alike), and the median is reported. "backward" is the gradient of
`sum(y * ct)` with respect to x and the kernel.

Peers (a peer that is not installed, or cannot run a workload, is n/a):
* `floor`: the memory floor, bytes(x) + bytes(y) over the bandwidth of a
  multi-threaded elementwise pass: PyTorch `torch.add(a, b, out=c)` on three
  float32 arrays of x's size into a preallocated output, with PyTorch's
  threads (all cores; cell `floor_add`, bandwidth = 3 arrays' bytes / time).
  bfloat16 workloads count 2 bytes per element (half the bytes) at that
  float32 bandwidth. Also timed, as the column `floor_jax`: one fused JAX
  elementwise pass over x (reads x, writes x's size; XLA's CPU elementwise
  passes reach about half PyTorch's bandwidth, and it allocates its output,
  so it includes the page faults of a fresh buffer under glibc's defaults).
  Without PyTorch, the floor is the JAX pass scaled to x's and y's bytes.
* `tf`, `tf_xla`: TensorFlow's reshape path (fold D into batch, which is
  right for axes H, W because D is next to batch, then
  `tf.nn.depthwise_conv2d`) in `tf.function`, and with
  `jit_compile=True`; for 3D workloads `interop.tf_depthwise_conv3d` when
  the installed `interop` has it.
* `torch`: `torch.nn.functional.conv3d(groups=C)` on `channels_last_3d`
  tensors (oneDNN). TF's asymmetric SAME padding for strided W3 is replaced
  by symmetric padding with the same output size (a timing peer only).
* `conv`, `shift`, `auto`: our methods (`conv` is XLA's grouped convolution).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dw5d_jax._args import METHODS as _ALL_METHODS

# Every method of ours ("conv" is XLA's grouped convolution); one that cannot
# lower on CPU (e.g. a GPU-only kernel) shows up as n/a.
METHODS = tuple(sorted(_ALL_METHODS, key=lambda m: (m != "auto", m)))
PEERS = ("floor", "tf", "tf_xla", "torch", *METHODS)


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  title: str
  op: str  # "2d" (per slice, axes HW) or "3d"
  x_shape: tuple[int, ...]  # (N, D, H, W, C)
  window: tuple[int, ...]  # (kh, kw) or (kd, kh, kw)
  multiplier: int = 1
  stride: int = 1
  dilation: int = 1
  dtype: str = "float32"

  @property
  def k_shape(self) -> tuple[int, ...]:
    return (*self.window, self.x_shape[-1], self.multiplier)


WORKLOADS = {
    "W1": Workload("W1", "2D per slice, 3x3", "2d", (4, 16, 64, 64, 32), (3, 3)),
    "W2": Workload("W2", "3D, 3x3x3", "3d", (2, 32, 64, 64, 32), (3, 3, 3)),
    "W3": Workload("W3", "2D 5x5, M=2, stride 2", "2d", (4, 16, 64, 64, 16), (5, 5),
                   multiplier=2, stride=2),
    "W4": Workload("W4", "2D 3x3, dilation 2", "2d", (4, 16, 64, 64, 32), (3, 3), dilation=2),
    "W5": Workload("W5", "3D 3x3x3, bfloat16", "3d", (2, 32, 64, 64, 32), (3, 3, 3),
                   dtype="bfloat16"),
}
QUICK = ("W1", "W2")


def tiny(w: Workload) -> Workload:
  """The same workload on small shapes (for tests of the machinery)."""
  n, d, h, ww, c = w.x_shape
  return dataclasses.replace(w, x_shape=(1, min(d, 4), 12, 12, min(c, 4)))


# ----------------------------------------------------------------------------
# Cells: name -> (forward callable, backward callable), each taking no args.


def jax_cells(w: Workload, x: np.ndarray, k: np.ndarray, ct: np.ndarray,
              peers: tuple[str, ...]) -> dict[str, tuple[Callable, Callable | None]]:
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  dtype = jnp.bfloat16 if w.dtype == "bfloat16" else jnp.float32
  xj, kj, ctj = (jax.device_put(jnp.asarray(a, dtype)) for a in (x, k, ct))
  cells = {}
  if "floor" in peers:
    floor = jax.jit(lambda a: a * 2 + 1)
    cells["floor_jax"] = (lambda: floor(xj), None)
  for method in METHODS:
    if method not in peers:
      continue
    if w.op == "2d":
      def op(a, b, method=method):
        return dw.depthwise_conv2d(a, b, strides=w.stride, dilations=w.dilation,
                                   padding="SAME", method=method)
    else:
      def op(a, b, method=method):
        return dw.depthwise_conv3d(a, b, strides=w.stride, dilations=w.dilation,
                                   padding="SAME", method=method)
    fwd = jax.jit(op)
    bwd = jax.jit(jax.grad(
        lambda a, b, c, op=op: jnp.sum((op(a, b) * c).astype(jnp.float32)), argnums=(0, 1)))
    cells[method] = (lambda fwd=fwd: fwd(xj, kj), lambda bwd=bwd: bwd(xj, kj, ctj))
  return cells


def jax_block(r: Any) -> None:
  import jax
  jax.block_until_ready(r)


def tf_cells(w: Workload, x, k, ct, peers) -> dict[str, tuple[Callable, Callable | None]]:
  wanted = [p for p in ("tf", "tf_xla") if p in peers]
  if not wanted:
    return {}
  try:
    import tensorflow as tf
  except ImportError:
    return {}
  dtype = tf.bfloat16 if w.dtype == "bfloat16" else tf.float32
  xt, kt, ctt = (tf.constant(a.astype(np.float32), dtype) for a in (x, k, ct))
  n, d, h, ww, c = w.x_shape
  if w.op == "2d":
    def op(a, b):  # Fold depth into batch (D is next to batch: no transpose needed).
      y = tf.nn.depthwise_conv2d(tf.reshape(a, (n * d, h, ww, c)), b,
                                 strides=[1, w.stride, w.stride, 1], padding="SAME",
                                 dilations=[w.dilation] * 2)
      return tf.reshape(y, (n, d, *y.shape[1:]))
  else:
    try:
      import interop
      op3 = getattr(interop, "tf_depthwise_conv3d", None)
      if op3 is None:
        from interop import _tf_ops
        op3 = _tf_ops.tf_depthwise_conv3d
    except (ImportError, AttributeError):
      return {}

    def op(a, b):
      return op3(a, b, strides=w.stride, dilations=w.dilation, padding="SAME")

  cells = {}
  for name in wanted:
    jit = name == "tf_xla"
    fwd = tf.function(op, jit_compile=jit)

    def grads(a, b, c):
      with tf.GradientTape() as tape:
        tape.watch([a, b])
        loss = tf.reduce_sum(tf.cast(op(a, b) * c, tf.float32))
      return tape.gradient(loss, [a, b])

    bwd = tf.function(grads, jit_compile=jit)
    cells[name] = (lambda fwd=fwd: fwd(xt, kt), lambda bwd=bwd: bwd(xt, kt, ctt))
  return cells


def tf_block(r: Any) -> None:
  rs = r if isinstance(r, (list, tuple)) else [r]
  for t in rs:
    t.numpy()


def _torch() -> Any:
  """PyTorch with a thread per core, or None when it is not installed."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def floor_cells(w: Workload, peers) -> dict[str, tuple[Callable, Callable | None]]:
  """`floor_add`: PyTorch's multi-threaded `add` of two float32 arrays of x's size into a third."""
  torch = _torch() if "floor" in peers else None
  if torch is None:
    return {}
  size = int(np.prod(w.x_shape))
  gen = torch.Generator().manual_seed(0)
  a, b = (torch.randn(size, generator=gen) for _ in range(2))
  c = torch.empty(size)

  def add():
    torch.add(a, b, out=c)

  return {"floor_add": (add, None)}


def y_shape(w: Workload) -> tuple[int, ...]:
  """The output's shape (SAME padding)."""
  n, d, h, ww, c = w.x_shape
  out = [-(-s // w.stride) for s in ((d, h, ww) if w.op == "3d" else (h, ww))]
  return (n, *out, c * w.multiplier) if w.op == "3d" else (n, d, *out, c * w.multiplier)


def floor_entry(w: Workload, timing: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """The floor (ms) for `w` from the timed `floor_add` (else `floor_jax`) cell.

  bytes(x) + bytes(y) at the bandwidth of PyTorch's add (3 float32 arrays of
  x's size per call); bfloat16 workloads count 2 bytes per element.
  """
  item = 2 if w.dtype == "bfloat16" else 4
  moved = (int(np.prod(w.x_shape)) + int(np.prod(y_shape(w)))) * item
  add = timing.get("floor_add", {}).get("fwd")
  if add:
    gbs = 3 * int(np.prod(w.x_shape)) * 4 / (add * 1e-3) / 1e9
    source = "torch.add"
  else:
    jax_pass = timing.get("floor_jax", {}).get("fwd")
    if not jax_pass:
      return None
    gbs = 2 * int(np.prod(w.x_shape)) * item / (jax_pass * 1e-3) / 1e9
    source = "jax pass"
  return {"fwd": round(moved / (gbs * 1e9) * 1e3, 3), "bandwidth_gbs": round(gbs, 1),
          "bytes": moved, "source": source}


def torch_cells(w: Workload, x, k, ct, peers) -> dict[str, tuple[Callable, Callable | None]]:
  torch = _torch() if "torch" in peers else None
  if torch is None:
    return {}
  dtype = torch.bfloat16 if w.dtype == "bfloat16" else torch.float32
  c, m = w.x_shape[-1], w.multiplier
  fmt = torch.channels_last_3d

  def nc(a):  # (N, D, H, W, C) -> (N, C, D, H, W) channels_last_3d
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).permute(0, 4, 1, 2, 3).contiguous(
        memory_format=fmt)

  xt, ctt = nc(x), nc(ct)
  kk = k if w.op == "3d" else k[None]  # (kd, kh, kw, C, M)
  wt = torch.from_numpy(np.ascontiguousarray(kk)).to(dtype).permute(3, 4, 0, 1, 2).reshape(
      c * m, 1, *kk.shape[:3]).contiguous(memory_format=fmt)
  sd = 1 if w.op == "2d" else w.stride
  rd = 1 if w.op == "2d" else w.dilation
  stride, dil = (sd, w.stride, w.stride), (rd, w.dilation, w.dilation)
  # Symmetric padding with TF's SAME output size (exact for stride 1, odd k).
  pad = tuple((kk.shape[i] - 1) * dil[i] // 2 for i in range(3))

  def fwd():
    with torch.no_grad():
      return torch.nn.functional.conv3d(xt, wt, stride=stride, padding=pad, dilation=dil,
                                        groups=c)

  xg, wg = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)

  def bwd():
    xg.grad = wg.grad = None
    y = torch.nn.functional.conv3d(xg, wg, stride=stride, padding=pad, dilation=dil, groups=c)
    y.backward(ctt)
    return xg.grad, wg.grad

  return {"torch": (fwd, bwd)}


# ----------------------------------------------------------------------------
# Timing.


def measure(cells: dict[str, tuple[Callable, Callable | None]], block: dict[str, Callable],
            rounds: int, budget_s: float, progress) -> dict[str, dict[str, float | None]]:
  """Median wall time (ms) of each cell's forward and backward, interleaved."""
  calls = {}
  for name, (fwd, bwd) in cells.items():
    calls[(name, "fwd")] = fwd
    if bwd is not None:
      calls[(name, "bwd")] = bwd
  samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
  failed: dict[tuple[str, str], str] = {}
  for key, f in calls.items():  # warm-up (compiles), and a first sample
    try:
      block[key[0]](f())
      t = time.perf_counter()
      block[key[0]](f())
      samples[key].append(time.perf_counter() - t)
    except Exception as e:  # a peer that cannot run this workload is n/a
      failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    progress(1)
  for _ in range(rounds - 1):
    for key, f in calls.items():
      # Slow cells stop once they have used their share of the time budget.
      if key in failed or (sum(samples[key]) > budget_s / len(calls) and len(samples[key]) >= 3):
        continue
      t = time.perf_counter()
      block[key[0]](f())
      samples[key].append(time.perf_counter() - t)
    progress(1)
  out: dict[str, dict[str, Any]] = {}
  for (name, kind), s in samples.items():
    cell = out.setdefault(name, {})
    cell[kind] = round(statistics.median(s) * 1e3, 3) if s else None
    cell[kind + "_n"] = len(s)
    if (name, kind) in failed:
      cell[kind + "_error"] = failed[(name, kind)]
  return out


def peak_memory_mb(w: Workload, peer: str) -> float | None:
  """Peak RSS growth (MiB) of a forward + backward of `peer` after warm-up, in a fresh process.

  Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs after
  set-up and warm-up, so only the timed calls' own buffers count. The
  floor's is the JAX pass's (which allocates its output, as the ops do).
  """
  x, k, ct = data(w)
  cells = make_cells(w, x, k, ct, (peer,))
  cell = "floor_jax" if peer == "floor" else peer
  if cell not in cells:
    return None
  fwd, bwd = cells[cell]
  blk = block_for(cell)
  blk(fwd())  # compile outside the measurement
  if bwd is not None:
    blk(bwd())
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    blk(fwd())
    if bwd is not None:
      blk(bwd())
    return round((_status_kib("VmHWM") - base) / 1024, 1)
  except OSError:
    return None


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise OSError(f"no {field} in /proc/self/status")


def data(w: Workload):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(w.x_shape).astype(np.float32)
  k = rng.standard_normal(w.k_shape).astype(np.float32)
  ct = rng.standard_normal(y_shape(w)).astype(np.float32)
  return x, k, ct


# Cells in this order (the floor's first), then by PEERS.
CELL_ORDER = ("floor_add", "floor_jax", *PEERS)


def make_cells(w, x, k, ct, peers):
  cells = {}
  cells.update(floor_cells(w, peers))
  cells.update(jax_cells(w, x, k, ct, peers))
  cells.update(tf_cells(w, x, k, ct, peers))
  cells.update(torch_cells(w, x, k, ct, peers))
  return {p: cells[p] for p in CELL_ORDER if p in cells}


def block_for(peer: str) -> Callable:
  if peer in ("tf", "tf_xla"):
    return tf_block
  if peer in ("torch", "floor_add"):
    return lambda r: None  # eager PyTorch on CPU has finished when it returns
  return jax_block


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "numpy", "tensorflow", "torch"):
    try:
      out[mod] = __import__(mod).__version__
    except ImportError:
      out[mod] = "n/a"
  return out


def native_status() -> dict[str, Any] | None:
  """dw5d_jax's native CPU kernels in this process (`dw5d_jax.native_status()`)."""
  try:
    import dw5d_jax
    return dw5d_jax.native_status()._asdict()
  except (ImportError, AttributeError):
    return None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
  from tqdm import tqdm

  names = args.workloads.split(",") if args.workloads else list(QUICK if args.quick else WORKLOADS)
  peers = tuple(args.peers.split(",")) if args.peers else PEERS
  if args.quick and not args.peers:  # XLA's grouped conv (ours, TF's) takes seconds a call
    peers = tuple(p for p in PEERS if p not in ("conv", "tf_xla"))
  results: dict[str, Any] = {
      "allocator": args.allocator, "quick": args.quick, "tiny": args.tiny,
      "env": {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                         "DW5D_JAX_TUNE_ALLOCATOR") if k in os.environ},
      "at_import": _allocator_at_import(),
      "load_before": os.getloadavg(), "workloads": {},
  }
  bar = tqdm(total=len(names) * 2, desc=f"bench ({args.allocator} allocator)", unit="step",
             file=sys.stderr, disable=args.no_progress)
  for name in names:
    w = tiny(WORKLOADS[name]) if args.tiny else WORKLOADS[name]
    bar.set_postfix_str(f"{name}: set-up")
    x, k, ct = data(w)
    cells = make_cells(w, x, k, ct, peers)
    steps = len(cells) * 2 + args.rounds
    inner = tqdm(total=steps, leave=False, desc=name, file=sys.stderr, disable=args.no_progress)
    timing = measure(cells, {p: block_for(p) for p in cells}, args.rounds, args.budget,
                     inner.update)
    inner.close()
    floor = floor_entry(w, timing)
    if floor is not None:
      timing["floor"] = floor
    results["workloads"][name] = {"workload": dataclasses.asdict(w), "ms": timing}
    bar.update(2)
  bar.close()
  results["load_after"] = os.getloadavg()
  if args.memory:
    results["memory_mb"] = {}
    for peer in peers:
      if peer == "conv" and args.quick:
        continue
      results["memory_mb"][peer] = _memory_subprocess(args, peer)
  results["versions"] = versions()
  results["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
  results["native"] = native_status()
  results["cpu"] = cpu_model()
  results["cores"] = os.cpu_count()
  return results


def _allocator_at_import() -> str | None:
  """What importing dw5d_jax did to glibc's malloc in this process (dw5d_jax/_allocator.py)."""
  try:
    from dw5d_jax import _allocator
  except ImportError:
    return None
  return getattr(_allocator, "AT_IMPORT", None)


def _memory_subprocess(args, peer: str) -> float | None:
  import subprocess
  cmd = [sys.executable, __file__, "--memory-of", peer, "--allocator", args.allocator]
  if args.tiny:
    cmd.append("--tiny")
  r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
  try:
    return json.loads(r.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    return None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--allocator", default="default", choices=("default", "tuned", "glibc"),
                 help="only a label here: the caller sets the environment")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tiny", action="store_true", help="small shapes (tests)")
  p.add_argument("--workloads", default="")
  p.add_argument("--peers", default="")
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--budget", type=float, default=60.0,
                 help="seconds of timed calls per workload, shared by its cells")
  p.add_argument("--memory", action="store_true", help="also measure W2 peak memory")
  p.add_argument("--memory-of", default="", help=argparse.SUPPRESS)
  p.add_argument("--json", default="", help="write the results here (else stdout)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.memory_of:
    w = tiny(WORKLOADS["W2"]) if args.tiny else WORKLOADS["W2"]
    print(json.dumps(peak_memory_mb(w, args.memory_of)))
    return 0
  results = run(args)
  text = json.dumps(results, indent=1)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)
  else:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
