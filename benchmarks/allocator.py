"""What glibc's malloc setting does to W1 and W2: page faults per call and time, per setting.

`python benchmarks/allocator.py` runs itself once per setting in a fresh
process: `glibc` (`DW5D_JAX_TUNE_ALLOCATOR=0`: glibc's own behaviour),
`default` (the library's: `dw5d_jax` tunes malloc on import) and `tuned`
(`MALLOC_*_` variables set before start, what `tune_cpu_allocator`'s
documentation recommends for PyTorch and TF in the same process). In each:
W1 and W2 forward and W2 forward + backward (`jax.vjp`), jitted, warmed up
with 20 calls (the heap grows to the buffers XLA holds at once), then the
minor page faults per call (`getrusage`, exact whatever the machine's load)
and the median time of `--rounds` calls, with PyTorch's `torch.add` on
preallocated 32 MiB arrays timed in the same rounds as a yardstick that no
allocator setting touches: `op / add` is the ratio to compare across
processes on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "glibc": {"DW5D_JAX_TUNE_ALLOCATOR": "0"},
    "default": {},
    "tuned": {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483647",
              "MALLOC_ARENA_MAX": "1"},
}


def measure(rounds: int) -> dict:
  # dw5d_jax first: its import sets glibc's malloc (or not) before PyTorch allocates.
  import dw5d_jax as dw
  from dw5d_jax import _allocator

  torch_threads = os.cpu_count() or 1
  import jax
  import numpy as np
  import torch

  torch.set_num_threads(torch_threads)
  rng = np.random.default_rng(0)
  w1 = rng.standard_normal((4, 16, 64, 64, 32), np.float32)
  w2 = rng.standard_normal((2, 32, 64, 64, 32), np.float32)
  k = rng.standard_normal((3, 3, 3, 32, 1), np.float32)
  f1 = jax.jit(lambda x, k: dw.depthwise_conv2d(x, k[0]))
  f2 = jax.jit(dw.depthwise_conv3d)
  b2 = jax.jit(lambda x, k, ct: jax.vjp(dw.depthwise_conv3d, x, k)[1](ct))
  x1, x2, kj, ct = (jax.device_put(a) for a in (w1, w2, k, w2))
  a, b, c = (torch.randn(8 << 20) for _ in range(3))
  cells = {"W1 fwd": lambda: f1(x1, kj), "W2 fwd": lambda: f2(x2, kj),
           "W2 fwd+bwd": lambda: b2(x2, kj, ct), "add": lambda: torch.add(a, b, out=c)}
  out = {"at_import": _allocator.AT_IMPORT, "faults_per_call": {}, "ms": {}}
  for name, f in cells.items():
    for _ in range(20):
      jax.block_until_ready(f())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      jax.block_until_ready(f())
    out["faults_per_call"][name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                    - before) / 10
  samples = {name: [] for name in cells}
  for _ in range(rounds):
    for name, f in cells.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      samples[name].append(time.perf_counter() - t)
  out["ms"] = {name: round(statistics.median(s) * 1e3, 3) for name, s in samples.items()}
  out["load"] = os.getloadavg()[0]
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=21)
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.rounds)))
    return 0
  runs = {}
  for name, extra in SETTINGS.items():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "DW5D_JAX_TUNE_ALLOCATOR"}
    env.update(extra, OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, __file__, "--child", name, "--rounds",
                           str(args.rounds)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
      print(done.stderr, file=sys.stderr)
      return 1
    runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
  print("| setting | on import | page faults per call: W1 fwd / W2 fwd / W2 fwd+bwd | "
        "ms: W1 fwd / W2 fwd / W2 fwd+bwd / add | W1 fwd / add | W2 fwd / add | "
        "W2 fwd+bwd / add | load |")
  print("|---|---|---|---|---|---|---|---|")
  for name, r in runs.items():
    f, ms = r["faults_per_call"], r["ms"]
    print(f"| {name} | {r['at_import']} | {f['W1 fwd']:.0f} / {f['W2 fwd']:.0f} / "
          f"{f['W2 fwd+bwd']:.0f} | {ms['W1 fwd']} / {ms['W2 fwd']} / {ms['W2 fwd+bwd']} / "
          f"{ms['add']} | {ms['W1 fwd'] / ms['add']:.2f} | {ms['W2 fwd'] / ms['add']:.2f} | "
          f"{ms['W2 fwd+bwd'] / ms['add']:.2f} | {r['load']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
