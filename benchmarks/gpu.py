"""GPU benchmark: every lowering against PyTorch and the memory floor.

One command on a machine with a CUDA GPU, from the repository root (results
under $OUT, else ./out):

    python3 benchmarks/gpu.py            # all workloads, methods conv/shift/pallas + torch
    python3 benchmarks/gpu.py --tune     # also sweep Pallas tiles (prints the best)
    python3 benchmarks/gpu.py --smoke    # CPU check of the script: tiny shapes,
                                         # Pallas in interpret mode, torch if installed

Workloads (float32 channels-last unless noted; backward = gradient of
`sum(y * ct)` with respect to x and kernel):
  W1 per-slice 2D x (4,16,64,64,32), 3x3, M=1, SAME
  W2 3D x (2,32,64,64,32), 3x3x3, M=1, SAME
  W3 per-slice 2D x (4,16,64,64,16), 5x5, M=2, stride 2, SAME
  W4 per-slice 2D x (4,16,64,64,32), 3x3, dilation 2, SAME
  W5 W2 in bfloat16

Method: each framework runs in its own
process (JAX one per workload, so a kernel that fails to compile costs one
row, not the run). Before timing, every result is checked on fresh random
data: forward sample 0 against the float64 NumPy reference
(dw5d_jax._reference), gradients against float64 gradients of the "shift"
lowering on the device (JAX) or of float64 Conv3d (PyTorch), as
||out - ref|| / ||ref||. Timing is device-side throughput: one executable
(JAX) or one CUDA graph (PyTorch) runs the op on R distinct input sets
(larger than L2 together, so nothing is timed from cache), several are
queued back to back, and the median over trials of time / (runs * R) is
reported. The floor is the bytes that must move (forward: read x and kernel,
write y; backward: read x, kernel and ct, write dx and dkernel) over the
measured device-to-device copy bandwidth (bytes read plus written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's dw5d_jax, installed or not

from dw5d_jax._reference import Case  # (after sys.path is set)

METHODS = ("conv", "shift", "pallas")
TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}  # rel. L2 error; 1e-3 admits TF32 convs


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  # NDHWC, SAME; "2d" per slice over H, W. Strides and dilations are ints.
  case: Case
  dtype: str


def _workload(name, op, x_shape, k_shape, strides, dilations, dtype) -> Workload:
  axes = "HW" if op == "2d" else "DHW"
  return Workload(name, Case(op, "NDHWC", axes, x_shape, k_shape, strides, dilations), dtype)


FULL = [
    _workload("W1", "2d", (4, 16, 64, 64, 32), (3, 3, 32, 1), 1, 1, "float32"),
    _workload("W2", "3d", (2, 32, 64, 64, 32), (3, 3, 3, 32, 1), 1, 1, "float32"),
    _workload("W3", "2d", (4, 16, 64, 64, 16), (5, 5, 16, 2), 2, 1, "float32"),
    _workload("W4", "2d", (4, 16, 64, 64, 32), (3, 3, 32, 1), 1, 2, "float32"),
    _workload("W5", "3d", (2, 32, 64, 64, 32), (3, 3, 3, 32, 1), 1, 1, "bfloat16"),
]
SMOKE = [
    _workload("W1", "2d", (2, 2, 6, 7, 3), (3, 3, 3, 1), 1, 1, "float32"),
    _workload("W2", "3d", (1, 3, 5, 6, 3), (3, 3, 3, 3, 1), 1, 1, "float32"),
    _workload("W3", "2d", (2, 2, 7, 8, 2), (5, 5, 2, 2), 2, 1, "float32"),
    _workload("W4", "2d", (2, 2, 6, 7, 3), (3, 3, 3, 1), 1, 2, "float32"),
    _workload("W5", "3d", (1, 3, 5, 6, 3), (3, 3, 3, 3, 1), 1, 1, "bfloat16"),
]


@dataclasses.dataclass(frozen=True)
class Timing:
  sets: int  # R distinct input sets per executable / graph
  runs: int  # executables queued back to back per trial
  trials: int


FULL_TIMING = Timing(sets=16, runs=4, trials=15)
SMOKE_TIMING = Timing(sets=2, runs=1, trials=2)


def out_shape(w: Workload) -> tuple[int, ...]:
  case = w.case
  n, d, h, wd, c = case.x_shape
  m = case.k_shape[-1]
  s = case.strides
  if case.op == "2d":
    return (n, d, -(-h // s), -(-wd // s), c * m)
  return (n, -(-d // s), -(-h // s), -(-wd // s), c * m)


def floor_bytes(w: Workload) -> dict[str, int]:
  item = 2 if w.dtype == "bfloat16" else 4
  x, k, y = (_prod(s) for s in (w.case.x_shape, w.case.k_shape, out_shape(w)))
  return {"fwd": (x + k + y) * item, "bwd": (2 * x + 2 * k + y) * item}


def _prod(shape) -> int:
  out = 1
  for s in shape:
    out *= s
  return out


def random_inputs(w: Workload, seed: int):
  """Fresh normal data (never zeros): x, kernel, cotangent, as float32 NumPy."""
  import numpy as np
  rng = np.random.default_rng(seed)
  x_shape, k_shape = w.case.x_shape, w.case.k_shape
  return (rng.standard_normal(x_shape, dtype=np.float32),
          rng.standard_normal(k_shape, dtype=np.float32) / np.sqrt(_prod(k_shape[:-2])),
          rng.standard_normal(out_shape(w), dtype=np.float32))


def rel_err(out, ref) -> float:
  import numpy as np
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if out.shape != ref.shape:
    return float("inf")
  err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))
  return err if np.isfinite(err) else float("inf")


def reference_forward(w: Workload, x, k, padding="SAME"):
  """Float64 NumPy reference on sample 0 (samples are independent)."""
  return dataclasses.replace(w.case, padding=padding).expected(x[:1], k)


# ----------------------------------------------------------------------------
# JAX worker: one workload, every method.


def jax_worker(w: Workload, args) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import dw5d_jax as dw
  from dw5d_jax import _args, _pallas, _primitive
  from dw5d_jax._pallas import Tiles

  timing = SMOKE_TIMING if args.smoke else FULL_TIMING
  dtype = jnp.dtype(w.dtype)
  case = w.case
  fn = getattr(dw, case.op_name)

  def op(method, tiles=None):
    if method != "pallas" or (tiles is None and not args.smoke):
      return lambda x, k: fn(x, k, method=method, **case.kwargs())

    def pallas(x, k):  # through the lowering: interpret mode (smoke) or explicit tiles
      n = len(case.axes)
      x5, k5, spec = _args.normalize(
          "gpu.py", x, k, conv_axes=case.axes, layout="NDHWC",
          strides=(case.strides,) * n, dilations=(case.dilations,) * n, padding=("SAME",) * n,
          precision=None, preferred=None)
      return _primitive.conv(x5, k5, spec, _pallas.impl(interpret=args.smoke, tiles=tiles))
    return pallas

  def fwd_bwd(f):
    def bwd(x, k, ct):
      return jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * ct),
                      argnums=(0, 1))(x, k)
    return (lambda x, k, ct: f(x, k)), bwd

  # Input sets on the device, distinct so XLA cannot share work between them.
  sets = []
  for i in range(timing.sets):
    x, k, ct = random_inputs(w, seed=1000 + i)
    sets.append((jnp.asarray(x, dtype), jnp.asarray(k, dtype), jnp.asarray(ct)))
  x0, k0, ct0 = (np.asarray(a, np.float64) for a in sets[0])

  # References: forward from NumPy, gradients from float64 "shift" on the device.
  ref_y = reference_forward(w, x0, k0)
  with jax.enable_x64(True):
    xs64, ks64, cts64 = (jnp.asarray(a, jnp.float64) for a in (x0, k0, ct0))
    _, bwd64 = fwd_bwd(op("shift"))
    ref_y64 = np.asarray(op("shift")(xs64, ks64))
    ref_gx, ref_gk = (np.asarray(g) for g in jax.jit(bwd64)(xs64, ks64, cts64))
  result = {"workload": dataclasses.asdict(w), "device": str(jax.devices()[0].device_kind),
            "shift64_vs_numpy": rel_err(ref_y64[:1], ref_y), "rows": []}

  def measure(method, direction, tiles=None):
    fwd, bwd = fwd_bwd(op(method, tiles))
    f = fwd if direction == "fwd" else bwd
    row = {"method": method, "dir": direction, "tiles": _tiles_json(tiles)}
    try:
      out = jax.jit(f)(*sets[0])
      if direction == "fwd":
        row["rel_err"] = rel_err(np.asarray(out)[:1], ref_y)
      else:
        row["rel_err"] = max(rel_err(out[0], ref_gx), rel_err(out[1], ref_gk))
      row["ok"] = row["rel_err"] <= TOLERANCE[w.dtype]
      row["us"] = time_jax(f, sets, timing) * 1e6
    except Exception as e:  # a lowering that does not compile costs one row
      row["error"] = f"{type(e).__name__}: {e}"[:2000]
      traceback.print_exc()
    print(f"  {w.name} {direction} {method} {row.get('tiles') or ''}: "
          f"{row.get('us', float('nan')):.1f} us, rel err {row.get('rel_err', float('nan')):.2e}"
          f"{'' if row.get('ok', False) else '  <-- CHECK'}", flush=True)
    return row

  methods = [m for m in METHODS if m in args.methods]
  for direction in ("fwd", "bwd"):
    for method in methods:
      result["rows"].append(measure(method, direction))
  if args.tune and "pallas" in methods:
    result["tuning"] = tune(w, measure, Tiles)
  return result


def tune(w: Workload, measure, Tiles) -> dict[str, Any]:
  """A small sweep of Pallas tiles per kernel; the best per direction wins."""
  mp = 1 << (w.case.k_shape[-1] - 1).bit_length()
  c = min(max(32 // mp, 1), 1 << (w.case.x_shape[-1] - 1).bit_length())
  fwd = [Tiles(1, 8, 8, c), Tiles(1, 4, 16, c), Tiles(2, 4, 8, c), Tiles(1, 8, 8, c, num_warps=8),
         Tiles(1, 16, 8, c, num_warps=8), Tiles(1, 8, 16, c, num_warps=8),
         Tiles(1, 8, 8, max(c // 2, 1)), Tiles(1, 4, 8, c, num_warps=2)]
  dk = [Tiles(1, 1, 16, c, steps=16), Tiles(1, 1, 8, c, steps=16), Tiles(1, 2, 8, c, steps=8),
        Tiles(1, 1, 16, c, steps=32), Tiles(1, 1, 16, c, steps=16, num_warps=8),
        Tiles(1, 1, 32, c, steps=8, num_warps=8)]
  out: dict[str, Any] = {"fwd": [], "dx": [], "dk": []}
  for t in fwd:
    out["fwd"].append(measure("pallas", "fwd", {"fwd": t}))
  for t in fwd:  # dx tiles input positions like fwd tiles outputs
    out["dx"].append(measure("pallas", "bwd", {"dx": t}))
  best_dx = _best(out["dx"])
  for t in dk:
    out["dk"].append(measure("pallas", "bwd", {"dk": t, **({"dx": best_dx} if best_dx else {})}))
  return out


def _best(rows):
  good = [r for r in rows if r.get("ok") and "us" in r]
  if not good:
    return None
  tiles = min(good, key=lambda r: r["us"])["tiles"]
  from dw5d_jax._pallas import Tiles
  return Tiles(**next(iter(tiles.values())))


def _tiles_json(tiles):
  return None if tiles is None else {k: t._asdict() for k, t in tiles.items()}


def time_jax(f, sets, timing: Timing) -> float:
  """Seconds per call: one executable runs `f` on every set; runs are queued."""
  import jax
  many = jax.jit(lambda sets: [f(*s) for s in sets])
  jax.block_until_ready(many(sets))  # compile and warm up
  jax.block_until_ready(many(sets))
  samples = []
  for _ in range(timing.trials):
    start = time.perf_counter()
    outs = [many(sets) for _ in range(timing.runs)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - start) / (timing.runs * len(sets)))
    del outs
  return statistics.median(samples)


def jax_bandwidth(args) -> dict[str, Any]:
  """Device-to-device streaming bandwidth through XLA, bytes read + written per second."""
  import jax
  import jax.numpy as jnp
  size = (1 << 16) if args.smoke else (1 << 28)  # float32 elements per buffer (1 GiB)
  bufs = [jnp.full((size,), float(i + 1), jnp.float32) for i in range(4)]
  t = time_jax(lambda b: b * 1.5, [(b,) for b in bufs],
               SMOKE_TIMING if args.smoke else Timing(sets=4, runs=3, trials=10))
  return {"jax_stream_Bps": 2 * 4 * size / t, "jax": jax.__version__,
          "jaxlib": __import__("jaxlib").__version__,
          "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


# ----------------------------------------------------------------------------
# PyTorch worker: Conv3d(groups=C), channels_last_3d, every workload.


def torch_worker(workloads, args) -> dict[str, Any]:
  import torch

  dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
  timing = SMOKE_TIMING if args.smoke else FULL_TIMING
  out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version(), "device": dev,
                         "allow_tf32_conv": torch.backends.cudnn.allow_tf32, "rows": []}
  if dev == "cuda":
    out["device_name"] = torch.cuda.get_device_name()
    out["copy_Bps"] = torch_copy_bandwidth(torch)
  try:
    import triton
    out["triton"] = triton.__version__
  except ImportError:
    pass

  for w in workloads:
    out["rows"] += torch_rows(torch, w, dev, timing)
  return out


def torch_rows(torch, w: Workload, dev: str, timing: Timing) -> list[dict[str, Any]]:
  """Forward and backward rows of the PyTorch peer for one workload."""
  import torch.nn.functional as F

  case = w.case
  tdtype = getattr(torch, w.dtype)
  kd = 1 if case.op == "2d" else case.k_shape[0]
  kh, kw, c, m = case.k_shape[-4:]
  stride = (1, case.strides, case.strides) if case.op == "2d" else (case.strides,) * 3
  dil = (1, case.dilations, case.dilations) if case.op == "2d" else (case.dilations,) * 3
  # TF SAME can pad asymmetrically (W3: 1 low, 2 high). Conv3d pads both
  # sides alike, so the peer pads max(lo, hi) both sides: the same output
  # size and work, checked against the reference with that padding.
  pads = []
  for n, k, s, r in zip(case.x_shape[1:4], (kd, kh, kw), stride, dil):
    total = max((-(-n // s) - 1) * s + (k - 1) * r + 1 - n, 0)
    pads.append(max(total // 2, total - total // 2))

  def to_torch(x, k, dtype):
    xt = torch.from_numpy(x).to(dev, dtype).permute(0, 4, 1, 2, 3)  # NDHWC memory
    kt = torch.from_numpy(k).to(dev, dtype).reshape(kd, kh, kw, c, m)
    kt = kt.permute(3, 4, 0, 1, 2).reshape(c * m, 1, kd, kh, kw).contiguous()
    return xt.contiguous(memory_format=torch.channels_last_3d), kt

  def conv(x, k):
    return F.conv3d(x, k, stride=stride, padding=pads, dilation=dil, groups=c)

  def fwd(x, k, ct):
    return conv(x, k)

  def bwd(x, k, ct):
    return torch.autograd.grad(conv(x, k), (x, k), ct)

  sets = []
  for i in range(timing.sets):
    x, k, ct = random_inputs(w, seed=1000 + i)
    xt, kt = to_torch(x, k, tdtype)
    ctt = torch.from_numpy(ct).to(dev, tdtype).permute(0, 4, 1, 2, 3).contiguous(
        memory_format=torch.channels_last_3d)
    sets.append((xt.requires_grad_(), kt.requires_grad_(), ctt))
  x0, k0, ct0 = random_inputs(w, seed=1000)
  # The reference sees the inputs as rounded to the workload's dtype.
  x0, k0 = (torch.from_numpy(a).to(tdtype).double().numpy() for a in (x0, k0))
  explicit = [(p, p) for p in pads]
  ref_y = reference_forward(w, x0, k0, padding=explicit[1:] if case.op == "2d" else explicit)
  x64, k64 = to_torch(x0, k0, torch.float64)
  x64.requires_grad_(), k64.requires_grad_()
  ct64 = torch.from_numpy(ct0).to(dev, torch.float64).permute(0, 4, 1, 2, 3)
  ref_gx, ref_gk = torch.autograd.grad(conv(x64, k64), (x64, k64), ct64)

  rows = []
  for direction, f in (("fwd", fwd), ("bwd", bwd)):
    row = {"workload": w.name, "method": "torch", "dir": direction}
    try:
      res = f(*sets[0])
      if direction == "fwd":
        got = res[:1].detach().permute(0, 2, 3, 4, 1).double().cpu().numpy()
        row["rel_err"] = rel_err(got, ref_y)
      else:
        row["rel_err"] = max(rel_err(res[0].double().cpu(), ref_gx.cpu()),
                             rel_err(res[1].double().cpu(), ref_gk.cpu()))
      row["ok"] = row["rel_err"] <= TOLERANCE[w.dtype]
      row["us"], row["mode"] = time_torch(torch, f, sets, timing, dev)
      row["us"] *= 1e6
    except Exception as e:  # a failing peer costs one row
      row["error"] = f"{type(e).__name__}: {e}"[:2000]
      traceback.print_exc()
    print(f"  {w.name} {direction} torch: {row.get('us', float('nan')):.1f} us, "
          f"rel err {row.get('rel_err', float('nan')):.2e}", flush=True)
    rows.append(row)
  return rows


def time_torch(torch, f, sets, timing: Timing, dev: str):
  """Seconds per call, from a CUDA graph of R calls replayed (events), else eager."""
  if dev != "cuda":
    f(*sets[0])
    samples = []
    for _ in range(timing.trials):
      start = time.perf_counter()
      for _ in range(timing.runs):
        for s in sets:
          f(*s)
      samples.append((time.perf_counter() - start) / (timing.runs * len(sets)))
    return statistics.median(samples), "cpu-wall"
  stream = torch.cuda.Stream()
  stream.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(stream):
    for _ in range(3):  # warm up (cuDNN algorithm choice) off the capture
      for s in sets:
        f(*s)
  torch.cuda.current_stream().wait_stream(stream)
  mode = "cuda-graph"
  try:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
      keep = [f(*s) for s in sets]  # noqa: F841 (outputs stay alive for the graph)
    run = graph.replay
  except Exception:  # capture refused: events around eager calls instead
    mode = "eager-events"

    def run():
      for s in sets:
        f(*s)
  run()
  torch.cuda.synchronize()
  samples = []
  for _ in range(timing.trials):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timing.runs):
      run()
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) / 1e3 / (timing.runs * len(sets)))
  return statistics.median(samples), mode


def torch_copy_bandwidth(torch) -> float:
  src = torch.randn(1 << 28, device="cuda")  # 1 GiB
  dst = torch.empty_like(src)
  for _ in range(3):
    dst.copy_(src)
  samples = []
  for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) / 1e3)
  return 2 * src.numel() * 4 / statistics.median(samples)


# ----------------------------------------------------------------------------
# Driver: workers in subprocesses, then one markdown table.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, interpret mode")
  parser.add_argument("--tune", action="store_true", help="sweep Pallas tiles")
  parser.add_argument("--workloads", default="W1,W2,W3,W4,W5")
  parser.add_argument("--methods", default="conv,shift,pallas,torch")
  parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out"),
                      help="results folder (default $OUT, else ./out)")
  parser.add_argument("--worker", choices=["jax", "bandwidth", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.methods = args.methods.split(",")
  workloads = [w for w in (SMOKE if args.smoke else FULL) if w.name in args.workloads.split(",")]

  if args.worker:
    if args.worker == "jax":
      result = jax_worker(workloads[0], args)
    elif args.worker == "bandwidth":
      result = jax_bandwidth(args)
    else:
      result = torch_worker(workloads, args)
    pathlib.Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  if args.smoke:
    env.setdefault("JAX_PLATFORMS", "cpu")
  command = " ".join(["python3", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)])
  results: dict[str, Any] = {"command": command, "host": platform.node(),
                             "started": time.strftime("%Y-%m-%d %H:%M"), "jax": [],
                             "errors": [], "notes": []}
  with tempfile.TemporaryDirectory() as tmp:
    def worker(kind, names=None):
      path = pathlib.Path(tmp) / f"{kind}-{names or 'all'}.json"
      cmd = [sys.executable, __file__, "--worker", kind, "--result", str(path),
             "--methods", ",".join(args.methods),
             "--workloads", names or ",".join(w.name for w in workloads)]
      cmd += ["--smoke"] * args.smoke + ["--tune"] * args.tune
      print(f"== {kind} {names or ''}", flush=True)
      proc = subprocess.run(cmd, env=env, cwd=ROOT, check=False)
      if proc.returncode or not path.exists():
        results["errors"].append(f"{kind} {names or ''}: worker exited {proc.returncode}")
        return None
      return json.loads(path.read_text())

    results["bandwidth"] = worker("bandwidth")
    if set(args.methods) & set(METHODS):
      for w in workloads:
        results["jax"].append(worker("jax", w.name))
    if "torch" in args.methods:
      try:
        import importlib.util
        has_torch = importlib.util.find_spec("torch") is not None
      except ImportError:
        has_torch = False
      results["torch"] = worker("torch") if has_torch else None
      if not has_torch:
        results["notes"].append("torch is not installed: no peer")

  table = markdown(results, workloads, args)
  (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
  (out / "gpu_results.md").write_text(table)
  print(table)
  return 1 if results["errors"] else 0


def markdown(results, workloads, args) -> str:
  bw = results.get("bandwidth") or {}
  peer = results.get("torch") or {}
  bandwidth = max(bw.get("jax_stream_Bps", 0.0), peer.get("copy_Bps", 0.0)) or float("nan")
  rows = []
  for res in results["jax"]:
    if res:
      rows += [dict(r, workload=res["workload"]["name"]) for r in res["rows"]]
  rows += peer.get("rows", [])
  torch_us = {(r["workload"], r["dir"]): r.get("us") for r in peer.get("rows", [])}
  lines = [
      f"### {'SMOKE (CPU, not a measurement)' if args.smoke else 'GPU'} results, "
      f"{results['started']}",
      "",
      f"- device: {bw.get('device', '?')} ({bw.get('backend', '?')}); "
      f"torch device: {peer.get('device_name', peer.get('device', 'n/a'))}",
      f"- versions: jax {bw.get('jax', '?')}, jaxlib {bw.get('jaxlib', '?')}, "
      f"torch {peer.get('torch', 'n/a')} (CUDA {peer.get('cuda', 'n/a')}, cuDNN "
      f"{peer.get('cudnn', 'n/a')}, TF32 convs {peer.get('allow_tf32_conv', 'n/a')}), "
      f"triton {peer.get('triton', 'n/a')}",
      f"- command: `{results['command']}`",
      f"- copy bandwidth (read + write): XLA stream {bw.get('jax_stream_Bps', 0) / 1e9:.0f} "
      f"GB/s, torch copy_ {peer.get('copy_Bps', 0) / 1e9:.0f} GB/s; the floor uses "
      f"{bandwidth / 1e9:.0f} GB/s",
      "- floor bytes: fwd = x + kernel + y; bwd = x + kernel + ct (read) + dx + dkernel "
      "(write). x floor = time / floor time (1.0 is the floor); vs torch = time / torch time "
      "(< 1 is faster than PyTorch). targets: x floor at most 1.5 forward (W1, W2, W5) and "
      "3.0 backward, and vs torch < 1, met or not.",
      "",
      "| workload | dir | method | time (us) | floor (us) | x floor | vs torch | rel err | "
      "target | note |",
      "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
  ]
  order = {m: i for i, m in enumerate((*METHODS, "torch"))}
  by_name = {w.name: w for w in workloads}
  for r in sorted(rows, key=lambda r: (r["workload"], r["dir"] != "fwd", order[r["method"]])):
    if r.get("tiles"):
      continue  # tuning rows: in the JSON and below
    w = by_name[r["workload"]]
    floor_us = floor_bytes(w)[r["dir"]] / bandwidth * 1e6
    us = r.get("us")
    peer_us = torch_us.get((r["workload"], r["dir"]))
    note = r.get("error", "")[:80] or ("" if r.get("ok") else "WRONG RESULT") or r.get("mode", "")
    lines.append(
        f"| {r['workload']} {w.dtype} | {r['dir']} | {r['method']} | {_f(us, 1)} | "
        f"{_f(floor_us, 1)} | {_f(us / floor_us if us else None, 2)} | "
        f"{_f(us / peer_us if us and peer_us else None, 2)} | "
        f"{_f(r.get('rel_err'), 1, 'e')} | {_target(r, us, floor_us, peer_us)} | {note} |")
  tuned = [res for res in results["jax"] if res and res.get("tuning")]
  if tuned:
    lines += ["", "Pallas tile sweep (best per kernel; all rows in gpu_results.json):", ""]
    for res in tuned:
      for kernel, trials in res["tuning"].items():
        good = [t for t in trials if t.get("ok") and "us" in t]
        if good:
          best = min(good, key=lambda t: t["us"])
          lines.append(f"- {res['workload']['name']} {kernel}: {_f(best['us'], 1)} us with "
                       f"{best['tiles']}")
  lines += [f"- note: {n}" for n in results["notes"]]
  lines += [f"- ERROR {e}" for e in results["errors"]]
  return "\n".join(lines) + "\n"


def _target(row, us, floor_us, peer_us) -> str:
  """The GPU targets for this row: the floor bound where one applies, and PyTorch."""
  if row["method"] == "torch" or not us or not row.get("ok"):
    return "-"
  bound = 3.0 if row["dir"] == "bwd" else 1.5 if row["workload"] in ("W1", "W2", "W5") else None
  met = [] if bound is None else [f"{bound}x floor {'met' if us / floor_us <= bound else 'MISSED'}"]
  if peer_us:
    met.append(f"torch {'beaten' if us < peer_us else 'NOT beaten'}")
  return ", ".join(met) or "-"


def _f(v, digits, kind="f") -> str:
  if v is None or math.isnan(v):
    return "-"
  return f"{v:.{digits}{kind}}"


if __name__ == "__main__":
  sys.exit(main())
