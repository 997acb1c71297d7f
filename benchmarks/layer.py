"""A layer as users run it: 3x3x3 depthwise + bias + activation, ours against PyTorch.

The "Layer" targets of `benchmarks/RESULTS.md`, on `(2, 32, 64, 64, 32)` float32 (N, D, H, W, C):

* `floor`: the bytes of x plus y over the bandwidth of a multi-threaded
  elementwise pass, measured with PyTorch `torch.add(a, b, out=c)` into a
  preallocated output, with as many threads as the machine has (3 arrays of
  x's size per pass). Not a JAX pass: XLA's CPU elementwise passes reach
  about half that bandwidth.
* `fused`: `dw5d_jax.depthwise_conv3d(x, k, bias=b, activation=...)`, the
  native kernels with the epilogue fused (forward and backward).
* `unfused`: the same formula written as a user would without the keywords,
  `jax.nn.gelu(depthwise_conv3d(x, k) + b)`: the native convolution, then
  XLA's bias and activation passes.
* `conv`: the convolution alone (no epilogue), for scale; `bias`: the
  convolution with the bias fused and no activation (fused minus bias is
  what the activation costs).
* `torch`: `conv3d(groups=C, bias)` on `channels_last_3d` tensors + the
  activation (`F.gelu`, exact), and `torch_conv` the convolution alone.

`roofline` (issue 20's definition, as `benchmarks/models.py` computes it):
max(bytes / bandwidth, multiply-adds / FMA peak), the bytes x + kernel +
2 y (y's write-allocate read counted) over the bandwidth of the `floor add`
cell counting 4 arrays of traffic (a, b, c and c's write-allocate read), the
multiply-adds 27 per output value over the FMA peak of `models.py`'s
probe (12 independent vector FMA chains per thread, per thread CPU time,
as many threads as the machine has).

"forward" is one call. "backward" is what a training step runs for the
layer: y, and the gradients with respect to x, the kernel and the bias for
a cotangent ct (`jax.vjp`; PyTorch: the forward with autograd, then
`y.backward(ct)`). "grad" is `jax.grad` of `sum(y * ct)` alone (the
suite's "backward", benchmarks/suite.py), which for an activation whose
derivative needs z (gelu) never runs the forward.

Everything runs in one process, under the tuned allocator
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) and
`OMP_WAIT_POLICY=PASSIVE` (the script re-executes itself with them set);
cells are warmed up, then timed in interleaved rounds, and medians of wall
time and of CPU time (all threads) are reported with the load average,
since the machine may be shared: the ratios are the result.

Usage: `python benchmarks/layer.py [--rounds 15] [--activation gelu]
[--data-format NCDHW] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # models.py's FMA probe

SHAPE = (2, 32, 64, 64, 32)  # (N, D, H, W, C)
WINDOW = (3, 3, 3)
ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483647",
       "OMP_WAIT_POLICY": "PASSIVE"}


def _reexec_with_env() -> None:
  """Starts this script again with ENV set (the allocator reads it at start-up)."""
  if all(os.environ.get(k) == v for k, v in ENV.items()):
    return
  os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENV})


def jax_cells(x, k, b, ct, activation: str, data_format: str) -> dict[str, Callable[[], Any]]:
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw
  from dw5d_jax._epilogue import ACTIVATIONS

  act = ACTIVATIONS[activation].fn
  first = data_format == "NCDHW"
  if first:
    x, ct = (np.ascontiguousarray(np.moveaxis(a, -1, 1)) for a in (x, ct))
  xj, kj, bj, ctj = (jnp.asarray(a) for a in (x, k, b, ct))
  bias_shape = (1, -1, 1, 1, 1) if first else (1, 1, 1, 1, -1)

  def fused(x, k, b):
    return dw.depthwise_conv3d(x, k, bias=b, activation=activation, data_format=data_format)

  def unfused(x, k, b):
    return act(dw.depthwise_conv3d(x, k, data_format=data_format) + b.reshape(bias_shape))

  def conv(x, k, b):
    del b
    return dw.depthwise_conv3d(x, k, data_format=data_format)

  def step(f):  # y and its pullback of ct, as a training step runs a layer
    def fn(x, k, b, ct):
      y, pullback = jax.vjp(f, x, k, b)
      return y, pullback(ct)

    return jax.jit(fn)

  cells = {}
  def bias(x, k, b):
    return dw.depthwise_conv3d(x, k, bias=b, data_format=data_format)

  bias_fwd = jax.jit(bias)
  cells = {"bias forward": lambda: bias_fwd(xj, kj, bj)}
  for name, f in (("fused", fused), ("unfused", unfused), ("conv", conv)):
    fwd, bwd = jax.jit(f), step(f)
    cells[f"{name} forward"] = lambda fwd=fwd: fwd(xj, kj, bj)
    cells[f"{name} backward"] = lambda bwd=bwd: bwd(xj, kj, bj, ctj)
    if name == "fused":
      loss = lambda x, k, b, f=f: jnp.sum(f(x, k, b) * ctj)  # noqa: E731
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      cells["fused grad"] = lambda grad=grad: grad(xj, kj, bj)
  return cells


def torch_cells(x, k, b, ct, activation: str) -> dict[str, Callable[[], Any]]:
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  fmt = torch.channels_last_3d
  c = x.shape[-1]

  def nc(a):  # (N, D, H, W, C) -> (N, C, D, H, W), channels_last_3d
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 4, 1, 2, 3).contiguous(
        memory_format=fmt)

  xt, ctt = nc(x), nc(ct)
  wt = torch.from_numpy(np.ascontiguousarray(k)).permute(3, 4, 0, 1, 2).reshape(
      c, 1, *WINDOW).contiguous(memory_format=fmt)
  bt = torch.from_numpy(b.copy())
  act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu,
         "sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation]
  pad = tuple(n // 2 for n in WINDOW)

  def layer(x, w, b):
    return act(torch.nn.functional.conv3d(x, w, b, padding=pad, groups=c))

  def forward():
    with torch.no_grad():
      return layer(xt, wt, bt)

  def conv():
    with torch.no_grad():
      return torch.nn.functional.conv3d(xt, wt, padding=pad, groups=c)

  xg, wg, bg = (t.clone().requires_grad_(True) for t in (xt, wt, bt))

  def backward():
    xg.grad = wg.grad = bg.grad = None
    y = layer(xg, wg, bg)
    y.backward(ctt)
    return xg.grad, wg.grad, bg.grad

  a, bb = (torch.from_numpy(np.ascontiguousarray(v)) for v in (x, ct))
  out = torch.empty_like(a)
  return {"torch forward": forward, "torch backward": backward, "torch_conv forward": conv,
          "floor add": lambda: torch.add(a, bb, out=out)}


def _block(r: Any) -> None:
  for v in r if isinstance(r, (list, tuple)) else [r]:
    if isinstance(v, (list, tuple)):
      _block(v)
    elif hasattr(v, "block_until_ready"):
      v.block_until_ready()


def measure(cells: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict, dict]:
  """Median wall and CPU ms per cell: warmed up twice, then `rounds` interleaved rounds.

  CPU time (`time.process_time`: every thread of the process) is the work
  done, which other processes' load disturbs much less than wall time.
  """
  for f in cells.values():
    _block(f())
    _block(f())
  wall: dict[str, list[float]] = {name: [] for name in cells}
  cpu: dict[str, list[float]] = {name: [] for name in cells}
  for _ in range(rounds):
    for name, f in cells.items():
      t, c = time.perf_counter(), time.process_time()
      _block(f())
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  return ({name: statistics.median(s) * 1e3 for name, s in wall.items()},
          {name: statistics.median(s) * 1e3 for name, s in cpu.items()})


def fma_peak() -> float | None:
  """Multiply-adds per second of all cores (`models.py`'s probe), None without a compiler."""
  import tempfile

  import models

  with tempfile.TemporaryDirectory() as tmp:
    exe = models.build_fma_probe(models.pathlib.Path(tmp))
    return models.fma_peak(exe, os.cpu_count() or 1)


def ratios(ms: dict[str, float], shape, peak: float | None) -> dict[str, Any]:
  nbytes = int(np.prod(shape)) * 4
  bandwidth = 3 * nbytes / (ms["floor add"] * 1e-3)  # bytes/s: a, b read, c written
  floor = 2 * nbytes / bandwidth * 1e3  # x read, y written
  # The roofline's traffic model (models.py): 4 arrays per add, x + k + 2 y per layer.
  bandwidth4 = 4 * nbytes / (ms["floor add"] * 1e-3)
  kernel_bytes = int(np.prod(WINDOW)) * shape[-1] * 4
  macs = int(np.prod(shape)) * int(np.prod(WINDOW))
  roof = max((3 * nbytes + kernel_bytes) / bandwidth4, macs / peak if peak else 0.0) * 1e3
  fwd, bwd, grad = ms["fused forward"], ms["fused backward"], ms["fused grad"]
  return {
      "ms": {k: round(v, 3) for k, v in ms.items()},
      "bandwidth_gb_s": round(bandwidth / 1e9, 1),
      "floor_ms": round(floor, 3),
      "roofline_ms": round(roof, 3),
      "forward_over_roofline": round(fwd / roof, 2),
      "conv_forward_over_roofline": round(ms["conv forward"] / roof, 2),
      "activation_ms": round(fwd - ms["bias forward"], 3),
      "forward_over_floor": round(fwd / floor, 2),
      "forward_over_torch": round(fwd / ms["torch forward"], 3),
      "grad_over_forward": round(grad / fwd, 2),
      "backward_over_forward": round(bwd / fwd, 2),
      "grad_over_torch_backward": round(grad / ms["torch backward"], 3),
      "backward_over_torch_backward": round(bwd / ms["torch backward"], 3),
      "unfused_forward_over_fused": round(ms["unfused forward"] / fwd, 2),
      "unfused_backward_over_fused": round(ms["unfused backward"] / bwd, 2),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--activation", default="gelu")
  parser.add_argument("--shape", type=int, nargs=5, default=SHAPE, help="(N, D, H, W, C)")
  parser.add_argument("--data-format", default="NDHWC", choices=("NDHWC", "NCDHW"),
                      help="our layout (PyTorch's stays channels_last_3d)")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  _reexec_with_env()
  rng = np.random.default_rng(0)
  shape = tuple(args.shape)
  x = rng.standard_normal(shape, np.float32)
  k = rng.standard_normal((*WINDOW, shape[-1], 1), np.float32)
  b = rng.standard_normal((shape[-1],), np.float32)
  ct = rng.standard_normal(shape, np.float32)
  cells = {**torch_cells(x, k, b, ct, args.activation),
           **jax_cells(x, k, b, ct, args.activation, args.data_format)}
  peak = fma_peak()
  before = os.getloadavg()[0]
  wall, cpu = measure(cells, args.rounds)
  result = {"wall": ratios(wall, shape, peak), "cpu": ratios(cpu, shape, peak),
            "fma_peak_g": peak and round(peak / 1e9, 1),
            "load_before_after": (round(before, 2), round(os.getloadavg()[0], 2)),
            "shape": list(shape), "activation": args.activation, "rounds": args.rounds,
            "data_format": args.data_format,
            "cpus": os.cpu_count()}
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
