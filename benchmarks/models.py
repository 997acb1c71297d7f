"""The depthwise layers of real video networks, ours against PyTorch, per layer and per network.

`dw5d bench --models` (or `python benchmarks/models.py`). The layers come
from the networks' own definitions, not from copied configs: each network is
built with random weights (`build_network`), a forward hook on every
depthwise `Conv3d` (`groups == in_channels`) records the input shape, kernel
size, stride, padding, dilation, padding mode and bias of each call
(`depthwise_layers`), and identical layers are timed once and counted as
often as the network runs them (`unique_layers`). Networks:

* X3D-S (13x160x160) and X3D-XS (4x160x160), pytorchvideo's hub settings
  (`x3d_s`, `x3d_xs`: `create_x3d` with their clip length and crop);
* CSN-50 (ir-CSN, `create_csn(model_depth=50)` with the hub's `csn_r101`
  stem pool and head, 32x224x224: the clip its hub model was trained on);
* MViT-v2-S (torchvision's `mvit_v2_s`, 16x224x224: its attention pooling
  is a depthwise Conv3d per head);
* MoViNet-A0 only if `official.projects.movinet` (tf-models-official)
  imports; it is not in the `bench` extra (it pins TensorFlow), so it is
  normally skipped, and said so.

A network whose package is missing is skipped with the reason printed and
written into the report.

Each unique layer is timed (batch 1, float32, x's shape as the network
feeds it) in one process per setting (threads x allocator), cells
interleaved in rounds, medians after warm-up:

* `ndhwc`, `ncdhw`: `dw5d_jax.depthwise_conv3d` (method "auto") in each
  layout, jitted; forward, and forward + backward (y and the vjp of a
  cotangent: dx and dk, as a training step runs the layer);
* `torch`: `F.conv3d(groups=C)` on `channels_last_3d` and on contiguous
  tensors (forward under `no_grad`; forward with autograd + `y.backward(ct)`);
  the better of the two layouts per layer and pass is "PyTorch best".

Settings: 1 thread (the process started pinned to one core by `taskset`,
so before any library starts its threads, plus
`torch.set_num_threads(1)` and XLA's `intra_op_parallelism_threads=1`; the
native kernels split their rows over XLA's intra-op pool, which the pinning
confines to one core whatever its size) and all threads; the library's
default allocator (`dw5d_jax` tunes glibc's malloc on import) and glibc's
own (`DW5D_JAX_TUNE_ALLOCATOR=0`).

Roofline per layer = max(bytes / bandwidth, multiply-adds / FMA peak), both
measured in the same process with the same threads: the bandwidth is
the best of 21 calls of PyTorch's `torch.add(a, b, out=c)` on 32 MiB arrays, counting the
write-allocate read of c (4 arrays of traffic per call); the FMA peak is a
small C program (compiled here at run time with the system compiler,
`-O2 -march=native`) running 12 independent FMA chains per thread, each one
register of the widest vector unit the CPU has (AVX-512, AVX2 or SSE).
A layer's bytes: x + kernel + 2 y forward (y's write-allocate counted);
forward + backward adds ct + x + 2 dx and doubles the multiply-adds (dx and
dk each cost a forward's). "LLC" says whether x + y fits the last-level
cache (there the memory bound is pessimistic and ratios below 1 are
possible).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
BEGIN = "<!-- dw5d bench --models: generated, do not edit by hand -->"
END = "<!-- dw5d bench --models: end of generated part -->"
OPT_OUT = "DW5D_JAX_TUNE_ALLOCATOR"  # dw5d_jax/_allocator.py


@dataclasses.dataclass(frozen=True)
class Layer:
  """One depthwise Conv3d call as a network makes it (PyTorch's NCDHW terms)."""
  x_shape: tuple[int, int, int, int, int]  # (N, C, D, H, W)
  out_channels: int
  kernel: tuple[int, int, int]
  stride: tuple[int, int, int]
  padding: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int, int]
  padding_mode: str
  bias: bool

  @property
  def multiplier(self) -> int:
    return self.out_channels // self.x_shape[1]

  @property
  def y_shape(self) -> tuple[int, ...]:
    n, _, *spatial = self.x_shape
    out = [(s + lo + hi - d * (k - 1) - 1) // st + 1 for s, (lo, hi), k, st, d in
           zip(spatial, self.padding, self.kernel, self.stride, self.dilation)]
    return (n, self.out_channels, *out)

  def macs(self) -> int:
    """Multiply-adds of the forward pass."""
    return math.prod(self.y_shape) * math.prod(self.kernel)

  def label(self) -> str:
    n, c, d, h, w = self.x_shape
    k = "x".join(map(str, self.kernel))
    s = "x".join(map(str, self.stride))
    m = f" M={self.multiplier}" if self.multiplier > 1 else ""
    return f"{f'N={n} ' if n > 1 else ''}C={c}{m} {d}x{h}x{w} k{k} s{s}"


def _torch_padding(module) -> tuple[tuple[int, int], ...]:
  """A Conv3d's padding as (lo, hi) pairs; PyTorch's "same" puts the odd one at the end."""
  pad = module.padding
  if pad == "valid":
    return ((0, 0),) * 3
  if pad == "same":
    total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    return tuple((t // 2, t - t // 2) for t in total)
  return tuple((p, p) for p in pad)


def is_depthwise(module) -> bool:
  import torch
  return (isinstance(module, torch.nn.Conv3d) and module.groups == module.in_channels
          and module.groups > 1)


def depthwise_layers(model, x) -> list[tuple[str, Layer]]:
  """(module name, Layer) for every depthwise Conv3d call of `model(x)`, in call order.

  Forward hooks on the modules record what each call received; the model
  runs once, in eval mode, without gradients.
  """
  import torch

  found: list[tuple[str, Layer]] = []
  handles = []
  for name, module in model.named_modules():
    if not is_depthwise(module):
      continue

    def hook(mod, inputs, output, name=name):
      (inp,) = inputs
      layer = Layer(tuple(inp.shape), mod.out_channels, tuple(mod.kernel_size),
                    tuple(mod.stride), _torch_padding(mod), tuple(mod.dilation),
                    mod.padding_mode, mod.bias is not None)
      if tuple(output.shape) != layer.y_shape:  # our shape arithmetic against PyTorch's
        raise AssertionError(f"{name}: output {tuple(output.shape)}, computed {layer.y_shape}")
      found.append((name, layer))

    handles.append(module.register_forward_hook(hook))
  try:
    model.eval()
    with torch.no_grad():
      model(x)
  finally:
    for h in handles:
      h.remove()
  return found


def unique_layers(found: list[tuple[str, Layer]]) -> list[dict[str, Any]]:
  """Identical layers merged: [{"layer", "names", "count"}], in first-call order."""
  merged: dict[Layer, dict[str, Any]] = {}
  for name, layer in found:
    entry = merged.setdefault(layer, {"layer": layer, "names": [], "count": 0})
    entry["names"].append(name)
    entry["count"] += 1
  return list(merged.values())


# ----------------------------------------------------------------------------
# Networks.


def _torchvision_video():
  """torchvision.models.video, even where torchvision's compiled ops do not load.

  The PyPI wheel's C++ ops are built against another torch (e.g. a CUDA
  build when torch is the CPU wheel); importing torchvision then fails while
  registering their meta kernels. The model code needs none of them, so on
  that failure the registration module is replaced by an empty one.
  """
  try:
    import torchvision.models.video as video
    return video
  except RuntimeError:
    import types
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    import torchvision.models.video as video
    return video


def _x3d(variant: str):
  _torchvision_video()  # pytorchvideo imports torchvision
  from pytorchvideo.models.hub import x3d
  return getattr(x3d, variant)()


def _csn50():
  import torch
  _torchvision_video()
  from pytorchvideo.models.csn import create_csn
  # The hub's CSN (csn_r101) at depth 50: a max-pooled stem, a 4x7x7 head.
  return create_csn(model_depth=50, stem_pool=torch.nn.MaxPool3d,
                    head_pool_kernel_size=(4, 7, 7))


def _mvit():
  return _torchvision_video().mvit_v2_s()


def _movinet():
  from official.projects.movinet.modeling import movinet  # noqa: F401  (tf-models-official)
  raise ImportError("MoViNet is a Keras model: its depthwise layers are not torch Conv3d "
                    "modules, and this benchmark hooks PyTorch modules")


# name -> (builder, input (N, C, T, H, W), package that provides it)
NETWORKS: dict[str, tuple[Callable[[], Any], tuple[int, ...], str]] = {
    "X3D-XS": (lambda: _x3d("x3d_xs"), (1, 3, 4, 160, 160), "pytorchvideo"),
    "X3D-S": (lambda: _x3d("x3d_s"), (1, 3, 13, 160, 160), "pytorchvideo"),
    "CSN-50": (_csn50, (1, 3, 32, 224, 224), "pytorchvideo"),
    "MViT-v2-S": (_mvit, (1, 3, 16, 224, 224), "torchvision"),
    "MoViNet-A0": (_movinet, (1, 3, 8, 172, 172), "tf-models-official"),
}


def build_network(name: str, input_shape: tuple[int, ...] | None = None):
  """(model, input tensor) with random weights, or raises ImportError naming what is missing."""
  import torch
  build, shape, package = NETWORKS[name]
  try:
    model = build()
  except ImportError as e:
    raise ImportError(f"{name} needs `{package}`: {e}") from e
  torch.manual_seed(0)
  return model, torch.randn(input_shape or shape)


def extract(names: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
  """Each network's unique depthwise layers (JSON-ready), and the skipped ones with why."""
  networks, skipped = {}, {}
  for name in names:
    try:
      model, x = build_network(name)
    except ImportError as e:
      skipped[name] = str(e).splitlines()[0]
      print(f"dw5d bench --models: skipping {name}: {skipped[name]}", file=sys.stderr)
      continue
    found = depthwise_layers(model, x)
    networks[name] = [{"layer": dataclasses.asdict(u["layer"]), "names": u["names"],
                       "count": u["count"]} for u in unique_layers(found)]
    del model
  return networks, skipped


def _layer(d: dict[str, Any]) -> Layer:
  return Layer(tuple(d["x_shape"]), d["out_channels"], tuple(d["kernel"]), tuple(d["stride"]),
               tuple(tuple(p) for p in d["padding"]), tuple(d["dilation"]), d["padding_mode"],
               d["bias"])


# ----------------------------------------------------------------------------
# Peaks of the machine.

_FMA_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* One register of the widest vector unit -march=native offers: with more
   lanes than registers hold, the compiler splits each FMA and spills the
   12 chains (AVX2 has 16 registers of 8 floats). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));
static long iters;
static double rate[64];
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECLARE(j) vec c##j = a * (float)(j + 1);
#define STEP(j) c##j = c##j * a + b;
#define ADD(j) s += c##j[0];
static void *run(void *arg) {
  vec a, b;
  for (int i = 0; i < LANES; ++i) { a[i] = 0.999999f; b[i] = 1e-7f; }
  CHAINS(DECLARE)
  struct timespec t0, t1;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (long i = 0; i < iters; ++i) { CHAINS(STEP) __asm__("" ::: "memory"); }
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  float s = 0; CHAINS(ADD)
  double secs = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  rate[(long)arg] = iters * 12.0 * LANES / secs + (s == 12345.f);  /* s keeps the chains live */
  return NULL;
}
int main(int argc, char **argv) {
  int threads = atoi(argv[1]); iters = atol(argv[2]);
  pthread_t t[64]; double total = 0;
  for (long i = 0; i < threads; ++i) pthread_create(&t[i], NULL, run, (void *)i);
  for (int i = 0; i < threads; ++i) pthread_join(t[i], NULL);
  for (int i = 0; i < threads; ++i) total += rate[i];
  printf("%.6f\n", total / 1e9);  /* multiply-adds per second of each thread's CPU time, summed */
  return 0;
}
"""


def build_fma_probe(folder: pathlib.Path) -> pathlib.Path | None:
  """Compiles the FMA loop; None when there is no C compiler."""
  cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
  if cc is None:
    return None
  src, exe = folder / "fma.c", folder / "fma"
  src.write_text(_FMA_C)
  done = subprocess.run([cc, "-O2", "-march=native", "-ffp-contract=fast", "-pthread",
                         str(src), "-o", str(exe)], capture_output=True, text=True)
  return exe if done.returncode == 0 else None


def fma_peak(exe: pathlib.Path | None, threads: int, rounds: int = 5) -> float | None:
  """Multiply-adds per second (float32 lanes), best of `rounds` runs.

  Each thread's rate is over its own CPU time, so other processes' load
  (the benchmark machine is shared) does not lower it: it is the rate of
  `threads` cores, as the layers would get on a quiet machine.
  """
  if exe is None:
    return None
  best = 0.0
  for _ in range(rounds):
    out = subprocess.run([str(exe), str(threads), "20000000"], capture_output=True, text=True)
    best = max(best, float(out.stdout.split()[0]) * 1e9)
  return best


def roofline_s(layer: Layer, bandwidth: float, peak: float | None,
               backward: bool) -> dict[str, float]:
  """The layer's bound (s), its bytes and multiply-adds (module docstring: the traffic model)."""
  x, y = math.prod(layer.x_shape) * 4, math.prod(layer.y_shape) * 4
  k = math.prod(layer.kernel) * layer.out_channels * 4
  moved = x + k + 2 * y + (y + x + 2 * x if backward else 0)
  macs = layer.macs() * (3 if backward else 1)
  return {"s": max(moved / bandwidth, macs / peak if peak else 0.0), "bytes": moved,
          "macs": macs, "memory_bound": moved / bandwidth >= (macs / peak if peak else 0.0)}


def llc_bytes() -> int | None:
  """The last-level cache's size (Linux sysfs), or None."""
  base = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
  sizes = []
  for index in sorted(base.glob("index*")):
    try:
      text = (index / "size").read_text().strip()
      level = int((index / "level").read_text())
    except (OSError, ValueError):
      continue
    scale = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
    sizes.append((level, int(text.rstrip("KM")) * scale))
  return max(sizes)[1] if sizes else None


# ----------------------------------------------------------------------------
# One setting's process: time every unique layer.


def _cells(layer: Layer, rng) -> dict[str, Callable[[], Any]]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  import dw5d_jax as dw

  x = rng.standard_normal(layer.x_shape).astype(np.float32)
  w = rng.standard_normal((layer.out_channels, 1, *layer.kernel)).astype(np.float32)
  b = rng.standard_normal((layer.out_channels,)).astype(np.float32) if layer.bias else None
  ct = rng.standard_normal(layer.y_shape).astype(np.float32)
  modes = {"zeros": "zeros", "reflect": "reflect", "replicate": "edge", "circular": "circular"}
  # PyTorch's weight (C*M, 1, kd, kh, kw), channel c*M + m -> ours (kd, kh, kw, C, M).
  k = np.ascontiguousarray(
      w.reshape(layer.x_shape[1], layer.multiplier, *layer.kernel).transpose(2, 3, 4, 0, 1))
  cells = {}
  for fmt in ("NDHWC", "NCDHW"):
    def op(x, k, b, fmt=fmt):
      return dw.depthwise_conv3d(x, k, strides=layer.stride, padding=layer.padding,
                                 padding_mode=modes[layer.padding_mode],
                                 dilations=layer.dilation, data_format=fmt, bias=b)

    def step(x, k, b, ct, op=op):
      y, pullback = jax.vjp(op, x, k, b)
      return y, pullback(ct)

    to = (lambda a: a) if fmt == "NCDHW" else (lambda a: np.moveaxis(a, 1, -1))
    xj, ctj = (jax.device_put(np.ascontiguousarray(to(a))) for a in (x, ct))
    kj, bj = jnp.asarray(k), None if b is None else jnp.asarray(b)
    fwd, bwd = jax.jit(op), jax.jit(step)
    cells[f"{fmt.lower()} fwd"] = lambda fwd=fwd, xj=xj, bj=bj: fwd(xj, kj, bj)
    cells[f"{fmt.lower()} fwd+bwd"] = lambda bwd=bwd, xj=xj, bj=bj, ctj=ctj: bwd(xj, kj, bj, ctj)
  pad = tuple(lo for lo, _ in layer.padding)
  if any(lo != hi for lo, hi in layer.padding) or layer.padding_mode != "zeros":
    return cells  # PyTorch's functional conv3d takes symmetric zero padding only
  for name, fmt in (("cl", torch.channels_last_3d), ("nc", torch.contiguous_format)):
    xt, ctt = (torch.from_numpy(a).contiguous(memory_format=fmt) for a in (x, ct))
    wt = torch.from_numpy(w).contiguous(memory_format=fmt)
    bt = None if b is None else torch.from_numpy(b)

    def tfwd(xt=xt, wt=wt, bt=bt):
      with torch.no_grad():
        return torch.nn.functional.conv3d(xt, wt, bt, layer.stride, pad, layer.dilation,
                                          groups=layer.x_shape[1])

    xg, wg = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)

    def tstep(xg=xg, wg=wg, bt=bt, ctt=ctt):
      xg.grad = wg.grad = None
      y = torch.nn.functional.conv3d(xg, wg, bt, layer.stride, pad, layer.dilation,
                                     groups=layer.x_shape[1])
      y.backward(ctt)
      return y

    cells[f"torch-{name} fwd"] = tfwd
    cells[f"torch-{name} fwd+bwd"] = tstep
  return cells


def _block(r: Any) -> None:
  import jax
  if not hasattr(r, "grad_fn"):  # eager PyTorch on CPU has finished when it returns
    jax.block_until_ready(r)


def time_cells(cells: dict[str, Callable[[], Any]], rounds: int,
               best: bool = False) -> dict[str, float]:
  """Median (or with `best`, least) ms per cell: two warm-up calls, `rounds` interleaved rounds."""
  for f in cells.values():
    _block(f())
    _block(f())
  samples: dict[str, list[float]] = {name: [] for name in cells}
  for _ in range(rounds):
    for name, f in cells.items():
      t = time.perf_counter()
      _block(f())
      samples[name].append(time.perf_counter() - t)
  pick = min if best else statistics.median
  return {name: round(pick(s) * 1e3, 4) for name, s in samples.items()}


def bandwidth(rounds: int = 21) -> float:
  """Bytes/s of `torch.add(a, b, out=c)` on 32 MiB arrays, counting c's write-allocate.

  The best of `rounds` calls: the closest to the quiet machine's.
  """
  import torch
  n = 8 << 20
  a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
  ms = time_cells({"add": lambda: torch.add(a, b, out=c)}, rounds, best=True)["add"]
  return 4 * n * 4 / (ms * 1e-3)


def worker(args: argparse.Namespace) -> dict[str, Any]:
  """Times every unique layer of the networks in `args.layers` in this process's setting."""
  # dw5d_jax first: it sets glibc's malloc (or not) before PyTorch allocates.
  import dw5d_jax
  from dw5d_jax import _allocator

  threads = len(os.sched_getaffinity(0))
  import numpy as np
  import torch

  torch.set_num_threads(threads)
  data = json.loads(pathlib.Path(args.layers).read_text())
  rng = np.random.default_rng(0)
  bw = bandwidth()
  peak = fma_peak(pathlib.Path(args.fma) if args.fma else None, threads)
  out: dict[str, Any] = {"threads": threads, "allocator": _allocator.AT_IMPORT,
                         "bandwidth_gbs": bw / 1e9, "fma_peak_g": peak and peak / 1e9,
                         "native": dw5d_jax.native_status()._asdict(), "networks": {},
                         "load_before": os.getloadavg()}
  for net, layers in data["networks"].items():
    rows = []
    for entry in layers:
      layer = _layer(entry["layer"])
      cells = _cells(layer, rng)
      ms = time_cells(cells, args.rounds)
      # The roofline ratio divides the least time of the rounds by bounds
      # measured as bests: both as close to a quiet machine as this one allows.
      least = time_cells(cells, 3, best=True)
      rows.append({"ms": ms, "least_ms": least,
                   "roofline_fwd_ms": roofline_s(layer, bw, peak, False)["s"] * 1e3,
                   "roofline_bwd_ms": roofline_s(layer, bw, peak, True)["s"] * 1e3})
      print(f"  {net} {layer.label()}: {ms}", file=sys.stderr, flush=True)
    out["networks"][net] = rows
  out["load_after"] = os.getloadavg()
  return out


# ----------------------------------------------------------------------------
# The driver: extract, one process per setting, report.

SETTINGS = {  # name -> (threads: 1 or None for all, allocator: "default" | "glibc")
    "2 threads, default": (None, "default"),
    "1 thread, default": (1, "default"),
    "2 threads, glibc": (None, "glibc"),
    "1 thread, glibc": (1, "glibc"),
}


def _setting_env(allocator: str, one_thread: bool) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_") and k != OPT_OUT}
  env["OMP_WAIT_POLICY"] = "PASSIVE"  # benchmarks/suite.py: PyTorch's spinning threads
  if allocator == "glibc":
    env[OPT_OUT] = "0"
  if one_thread:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
  repo = str(HERE.parent)
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


def run_settings(networks: dict[str, Any], settings: list[str], rounds: int,
                 tmp: pathlib.Path, lock: str = "") -> dict[str, Any]:
  layers = tmp / "layers.json"
  layers.write_text(json.dumps({"networks": networks}))
  fma = build_fma_probe(tmp)
  runs = {}
  for name in settings:
    threads, allocator = SETTINGS[name]
    out = tmp / f"run-{len(runs)}.json"
    cmd = [sys.executable, str(HERE / "models.py"), "--worker", "--layers", str(layers),
           "--rounds", str(rounds), "--json", str(out)]
    if fma is not None:
      cmd += ["--fma", str(fma)]
    if threads == 1:  # pinned before the interpreter starts any library's threads
      cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] + cmd
    if lock:  # one setting at a time holds the shared benchmark lock
      cmd = ["flock", lock] + cmd
    print(f"dw5d bench --models: {name}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=_setting_env(allocator, threads == 1))
    if done.returncode != 0:
      raise RuntimeError(f"the `{name}` run failed (exit {done.returncode})")
    runs[name] = json.loads(out.read_text())
  return runs


# ----------------------------------------------------------------------------
# Report.


def _best_torch(ms: dict[str, float], kind: str) -> tuple[float | None, str]:
  got = [(ms[f"torch-{f} {kind}"], f) for f in ("cl", "nc") if f"torch-{f} {kind}" in ms]
  return min(got) if got else (None, "")


def _f(v: float | None, digits: int = 2) -> str:
  if v is None:
    return "n/a"
  return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"


def layer_table(net: str, layers: list[dict[str, Any]], runs: dict[str, Any],
                llc: int | None) -> list[str]:
  main = runs.get("2 threads, default") or next(iter(runs.values()))
  one = runs.get("1 thread, default")
  head = ["layer (float32, N=1 unless shown)", "count", "LLC", "fwd NDHWC", "fwd NCDHW",
          "fwd PyTorch best",
          "NDHWC / PyTorch", "NDHWC / PyTorch, 1 thread", "NDHWC / roofline", "NCDHW / NDHWC",
          "fwd+bwd NDHWC", "fwd+bwd NCDHW", "fwd+bwd PyTorch best", "NDHWC / PyTorch, fwd+bwd"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, entry in enumerate(layers):
    layer = _layer(entry["layer"])
    ms = main["networks"][net][i]["ms"]
    roof = main["networks"][net][i]["roofline_fwd_ms"]
    least = main["networks"][net][i]["least_ms"]["ndhwc fwd"]
    tf, tfl = _best_torch(ms, "fwd")
    tb, tbl = _best_torch(ms, "fwd+bwd")
    one_ms = one["networks"][net][i]["ms"] if one else {}
    t1, _ = _best_torch(one_ms, "fwd")
    fits = (math.prod(layer.x_shape) + math.prod(layer.y_shape)) * 4 <= llc if llc else None
    row = [layer.label(), str(entry["count"]), "n/a" if fits is None else ("yes" if fits else "no"),
           _f(ms["ndhwc fwd"], 3), _f(ms["ncdhw fwd"], 3), f"{_f(tf, 3)} ({tfl})",
           _f(ms["ndhwc fwd"] / tf) if tf else "n/a",
           _f(one_ms["ndhwc fwd"] / t1) if t1 else "n/a",
           _f(least / roof), _f(ms["ncdhw fwd"] / ms["ndhwc fwd"]),
           _f(ms["ndhwc fwd+bwd"], 3), _f(ms["ncdhw fwd+bwd"], 3), f"{_f(tb, 3)} ({tbl})",
           _f(ms["ndhwc fwd+bwd"] / tb) if tb else "n/a"]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def sums(net: str, layers: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, float]:
  """Per-network sums (ms, each layer times its count) of every cell and of PyTorch's best."""
  total: dict[str, float] = {}
  for entry, row in zip(layers, run["networks"][net]):
    ms = dict(row["ms"])
    for kind in ("fwd", "fwd+bwd"):
      best, _ = _best_torch(ms, kind)
      if best is not None:
        ms[f"torch-best {kind}"] = best
    for key, v in ms.items():
      total[key] = total.get(key, 0.0) + v * entry["count"]
  return total


def sum_table(networks: dict[str, Any], runs: dict[str, Any]) -> list[str]:
  head = ["network", "setting", "layers", "fwd NDHWC", "fwd NCDHW", "fwd PyTorch best",
          "NDHWC / PyTorch", "NCDHW / PyTorch", "fwd+bwd NDHWC", "fwd+bwd NCDHW",
          "fwd+bwd PyTorch best", "NDHWC / PyTorch, fwd+bwd", "NCDHW / PyTorch, fwd+bwd"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for net, layers in networks.items():
    for setting, run in runs.items():
      s = sums(net, layers, run)
      tf, tb = s.get("torch-best fwd"), s.get("torch-best fwd+bwd")
      row = [net, setting, str(sum(e["count"] for e in layers)), _f(s["ndhwc fwd"]),
             _f(s["ncdhw fwd"]), _f(tf), _f(s["ndhwc fwd"] / tf) if tf else "n/a",
             _f(s["ncdhw fwd"] / tf) if tf else "n/a", _f(s["ndhwc fwd+bwd"]),
             _f(s["ncdhw fwd+bwd"]), _f(tb), _f(s["ndhwc fwd+bwd"] / tb) if tb else "n/a",
             _f(s["ncdhw fwd+bwd"] / tb) if tb else "n/a"]
      lines.append("| " + " | ".join(row) + " |")
  return lines


def targets(networks: dict[str, Any], runs: dict[str, Any]) -> list[str]:
  """Issue 20's targets on the default-allocator runs: met, or the worst case."""
  lines = ["| target | setting | measured | met |", "|---|---|---|---|"]
  for setting, run in runs.items():
    if not setting.endswith("default"):
      continue
    per_layer, roof, layout, fsum, bsum = [], [], [], [], []
    for net, layers in networks.items():
      for entry, row in zip(layers, run["networks"][net]):
        ms, tag = row["ms"], f"{net} {_layer(entry['layer']).label()}"
        tf, _ = _best_torch(ms, "fwd")
        if tf:
          per_layer.append((ms["ndhwc fwd"] / tf, tag))
        roof.append((row["least_ms"]["ndhwc fwd"] / row["roofline_fwd_ms"], tag))
        layout.append((ms["ncdhw fwd"] / ms["ndhwc fwd"], tag))
      s = sums(net, layers, run)
      if s.get("torch-best fwd"):
        fsum.append((s["ndhwc fwd"] / s["torch-best fwd"], net))
        bsum.append((s["ndhwc fwd+bwd"] / s["torch-best fwd+bwd"], net))
    for label, vals, bound in (
        ("every layer, fwd NDHWC / PyTorch best", per_layer, 1.0),
        ("per-network sum, fwd NDHWC / PyTorch best", fsum, 0.7),
        ("per-network sum, fwd+bwd NDHWC / PyTorch best", bsum, 0.25),
        ("every layer, fwd NDHWC / roofline", roof, 1.5),
        ("every layer, fwd NCDHW / NDHWC", layout, 1.25)):
      if not vals:
        continue
      bad = sorted((v for v in vals if v[0] > bound), reverse=True)
      worst = max(vals)
      text = (f"{len(vals) - len(bad)} of {len(vals)} <= {bound}; worst {worst[0]:.2f} "
              f"({worst[1]})")
      lines.append(f"| {label} <= {bound} | {setting} | {text} | "
                   f"{'yes' if not bad else '**no**'} |")
  return lines


def markdown(networks: dict[str, Any], skipped: dict[str, str], runs: dict[str, Any],
             command: str) -> str:
  import datetime
  import platform
  first = next(iter(runs.values()))
  llc = llc_bytes()
  lines = [BEGIN, "",
           f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
           f"- Command: `{command}`",
           f"- Machine: {platform.node()}, {os.cpu_count()} cores, last-level cache "
           f"{llc and llc >> 20} MiB; native kernels: {first['native']['detail']}",
           "- Settings (one process each; ratios are within a process): " + "; ".join(
               f"{name}: allocator {r['allocator']}, bandwidth {r['bandwidth_gbs']:.1f} GB/s, "
               f"FMA peak {_f(r['fma_peak_g'], 0)} G/s, load {r['load_before'][0]:.1f} -> "
               f"{r['load_after'][0]:.1f}" for name, r in runs.items()),
           "- Skipped: " + ("; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"),
           "", "Per-network sums (ms, each layer times the number of times the network runs it):",
           "", *sum_table(networks, runs), "", "Targets (issue 20):", "",
           *targets(networks, runs), ""]
  for net, layers in networks.items():
    shown = "2 threads, default" if "2 threads, default" in runs else next(iter(runs))
    lines += [f"#### {net}: depthwise layers (ms; {shown})", "",
              *layer_table(net, layers, runs, llc), ""]
  lines.append(END)
  return "\n".join(lines)


def write_block(path: pathlib.Path, block: str) -> None:
  """Replaces the generated block in `path`, or appends it; the text around it stays."""
  text = path.read_text() if path.exists() else "# CPU benchmark results\n\n"
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
  else:
    text = text.rstrip() + "\n\n## Real networks\n\n" + block + "\n"
  path.write_text(text)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="X3D-XS and MViT-v2-S, 2 threads, default allocator, 3 rounds")
  p.add_argument("--networks", default="", help="comma-separated subset of " + ", ".join(NETWORKS))
  p.add_argument("--settings", default="", help="semicolon-separated subset of: " + "; ".join(SETTINGS))
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, --quick 3)")
  p.add_argument("--out", default=None, help="the RESULTS.md to update (default: none, print)")
  p.add_argument("--json", default="", help="also write the raw results here")
  p.add_argument("--lock", default="", help="run each setting's process under `flock LOCK`")
  p.add_argument("--from-json", default="", metavar="JSON",
                 help="only write the report, from a --json file of an earlier run")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--layers", default="", help=argparse.SUPPRESS)
  p.add_argument("--fma", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    pathlib.Path(args.json).write_text(json.dumps(worker(args)))
    return 0
  if args.from_json:
    saved = json.loads(pathlib.Path(args.from_json).read_text())
    block = markdown(saved["networks"], saved["skipped"], saved["runs"],
                     saved.get("command", "dw5d bench --models"))
    if args.out:
      write_block(pathlib.Path(args.out), block)
    print(block)
    return 0
  names = (args.networks.split(",") if args.networks
           else ["X3D-XS", "MViT-v2-S"] if args.quick else list(NETWORKS))
  settings = (args.settings.split(";") if args.settings
              else ["2 threads, default"] if args.quick else list(SETTINGS))
  rounds = args.rounds or (3 if args.quick else 7)
  networks, skipped = extract(names)
  if not networks:
    print("dw5d bench --models: no network could be built (install the `bench` extra)",
          file=sys.stderr)
    return 1
  with tempfile.TemporaryDirectory() as tmp:
    runs = run_settings(networks, settings, rounds, pathlib.Path(tmp), args.lock)
  words = ["dw5d", "bench", "--models"] + ["--quick"] * args.quick
  words += [f"--networks {args.networks}"] * bool(args.networks)
  words += [f"--settings '{args.settings}'"] * bool(args.settings)
  words += [f"--rounds {args.rounds}"] * bool(args.rounds)
  block = markdown(networks, skipped, runs, " ".join(words))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"networks": networks, "skipped": skipped, "runs": runs, "command": " ".join(words)},
        indent=1))
  if args.out:
    write_block(pathlib.Path(args.out), block)
  print(block)
  return 0


if __name__ == "__main__":
  sys.exit(main())
