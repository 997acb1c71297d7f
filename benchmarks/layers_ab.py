"""The NDHWC forward of the real networks' layers against PyTorch, per layer, for A/B runs.

Run (one setting per process; run it on two branches back to back to compare):

    flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/layers_ab.py --threads 1
    flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/layers_ab.py --threads 2
    flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/layers_ab.py --call-cost

The layers are `dw5d bench --models`' (benchmarks/models.py: `extract` hooks
the networks' own definitions; its `_cells` builds the jitted forward and
PyTorch's `F.conv3d(groups=C)` in both memory layouts). The extracted list
is kept in `--layers-json` (built on first use). `--filter` keeps the
layers whose label contains one of its comma-separated words, e.g.
`5x5,7x7,s1x4x4`.

* `--threads 1`: the process re-runs itself pinned to one core (`taskset`,
  `torch.set_num_threads(1)`, XLA's intra-op pool of 1: the environment of
  models.py's settings, `_setting_env`), and each cell's cost is its CPU
  time per call (`time.process_time()` over back-to-back calls for about
  `--window` seconds), so other processes' load does not count. Rounds
  interleave the cells; the table has medians and the median of the
  per-round ratios.
* `--threads 2`: (re-run in the same environment, unpinned) wall time per
  call, cells interleaved one call at a time in rounds; the ratio is the
  median over rounds of ours / PyTorch's better layout in that round, so
  load drifts cancel.
* `--call-cost`: microseconds per call of a jitted function on a tiny
  problem, x `(1, 1, 1, 1, 16)` with a 3x3x3 kernel: an empty jitted
  function (returns x), one `jnp` multiply, and ours (with and without a
  bias + relu epilogue); wall and CPU time per call.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

CELLS = ("ndhwc fwd", "torch-cl fwd", "torch-nc fwd")


def layer_list(path: pathlib.Path) -> list[tuple[str, dict]]:
  """(network, entry) for every unique layer, extracted once into `path`."""
  if not path.exists():
    networks, _ = models.extract([n for n in models.NETWORKS if n != "MoViNet-A0"])
    path.write_text(json.dumps(networks))
  networks = json.loads(path.read_text())
  return [(net, entry) for net, entries in networks.items() for entry in entries]


def _cells(layer: models.Layer, rng) -> dict:
  cells = models._cells(layer, rng)
  return {name: cells[name] for name in CELLS if name in cells}


def _cpu_per_call(fn, window: float) -> float:
  """CPU seconds per call of `fn` over about `window` seconds of back-to-back calls."""
  calls, t0, w0 = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - w0 < window or calls < 3:
    models._block(fn())
    calls += 1
  return (time.process_time() - t0) / calls


def time_layer(cells: dict, rounds: int, window: float, cpu: bool) -> dict:
  """Per cell the median seconds per call, and the median per-round ratio ours / PyTorch best."""
  for fn in cells.values():
    models._block(fn())
    models._block(fn())
  samples = {name: [] for name in cells}
  ratios = []
  for _ in range(rounds):
    got = {}
    for name, fn in cells.items():
      if cpu:
        got[name] = _cpu_per_call(fn, window)
      else:
        t = time.perf_counter()
        models._block(fn())
        got[name] = time.perf_counter() - t
      samples[name].append(got[name])
    torch = [got[n] for n in ("torch-cl fwd", "torch-nc fwd") if n in got]
    if torch:
      ratios.append(got["ndhwc fwd"] / min(torch))
  out = {name: statistics.median(s) for name, s in samples.items()}
  out["ratio"] = statistics.median(ratios) if ratios else None
  return out


def call_cost(seconds: float) -> None:
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw

  x = jnp.asarray(jax.random.normal(jax.random.key(0), (1, 1, 1, 1, 16)))
  k = jnp.ones((3, 3, 3, 16, 1))
  b = jnp.zeros((16,))
  fns = {
      "empty jit (returns x)": jax.jit(lambda x, k: x),
      "jnp multiply": jax.jit(lambda x, k: x * 2.0),
      "ours": jax.jit(lambda x, k: dw.depthwise_conv3d(x, k)),
      "ours + bias + relu": jax.jit(
          lambda x, k: dw.depthwise_conv3d(x, k, bias=b, activation="relu")),
  }
  print(f"per call, us (wall / CPU), {seconds:.1f} s each, 5 interleaved rounds; "
        f"load {os.getloadavg()[0]:.1f}")
  samples = {name: ([], []) for name in fns}
  for fn in fns.values():
    for _ in range(100):
      fn(x, k).block_until_ready()
  for _ in range(5):
    for name, fn in fns.items():
      n, w0, c0 = 0, time.perf_counter(), time.process_time()
      while time.perf_counter() - w0 < seconds:
        for _ in range(100):
          fn(x, k).block_until_ready()
        n += 100
      samples[name][0].append((time.perf_counter() - w0) / n * 1e6)
      samples[name][1].append((time.process_time() - c0) / n * 1e6)
  for name, (wall, cpu) in samples.items():
    print(f"| {name} | {statistics.median(wall):.2f} | {statistics.median(cpu):.2f} |")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", type=int, choices=(1, 2), default=2)
  p.add_argument("--filter", default="",
                 help="comma-separated words; a layer's label must contain one")
  p.add_argument("--rounds", type=int, default=None, help="default 7 (1 thread), 25 (2 threads)")
  p.add_argument("--window", type=float, default=0.15, help="CPU-time window per cell (s)")
  p.add_argument("--layers-json", default="/tmp/dw5d-layers.json")
  p.add_argument("--call-cost", action="store_true")
  p.add_argument("--seconds", type=float, default=0.5, help="--call-cost: time per cell")
  p.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)  # the re-run
  args = p.parse_args(argv)
  if args.call_cost:
    call_cost(args.seconds)
    return 0
  layers = layer_list(pathlib.Path(args.layers_json))  # extracted before any pinning
  if not args.pinned:  # models.py's setting: its environment, pinned for one thread
    cmd = [sys.executable, os.path.abspath(__file__), "--pinned",
           *(argv if argv is not None else sys.argv[1:])]
    if args.threads == 1:
      cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] + cmd
    env = models._setting_env("default", args.threads == 1)
    return subprocess.run(cmd, env=env).returncode
  import numpy as np
  import torch

  import dw5d_jax as dw
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  rounds = args.rounds or (7 if args.threads == 1 else 25)
  words = [w for w in args.filter.split(",") if w]
  rng = np.random.default_rng(0)
  what = "CPU ms per call" if args.threads == 1 else "wall ms per call"
  print(f"{args.threads} thread(s), {what}, medians of {rounds} interleaved rounds; "
        f"native: {dw.native_status().detail}; load {os.getloadavg()[0]:.1f}", flush=True)
  print("| network | layer | count | ours NDHWC | PyTorch cl | PyTorch nc | ours / PyTorch best |")
  print("|---|---|---|---|---|---|---|")
  for net, entry in layers:
    layer = models._layer(entry["layer"])
    if words and not any(w in layer.label() for w in words):
      continue
    got = time_layer(_cells(layer, rng), rounds, args.window, args.threads == 1)
    cols = [f"{1e3 * got[c]:.3f}" if c in got else "n/a" for c in CELLS]
    ratio = "n/a" if got["ratio"] is None else f"{got['ratio']:.2f}"
    print(f"| {net} | {layer.label()} | {entry['count']} | {' | '.join(cols)} | {ratio} |",
          flush=True)
  print(f"load {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
