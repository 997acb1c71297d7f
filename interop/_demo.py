"""`dw5d demo`: both ops with every method on a random volume, against the reference."""

from __future__ import annotations

import argparse
import time

HELP = "run both ops with every method on a random volume and check the float64 reference"


def configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
  import jax
  import numpy as np

  import dw5d_jax as dw
  from dw5d_jax._reference import depthwise_reference

  rng = np.random.default_rng(args.seed)
  x = rng.standard_normal((2, 12, 24, 24, 8)).astype(np.float32)  # (N, D, H, W, C)
  k2 = rng.standard_normal((3, 3, 8, 2)).astype(np.float32)  # (kh, kw, C, M)
  k3 = rng.standard_normal((3, 3, 3, 8, 1)).astype(np.float32)  # (kd, kh, kw, C, M)
  jobs = [
      ("per-slice 2D, axes=HW", lambda m: dw.depthwise_conv2d(x, k2, axes="HW", method=m),
       lambda: depthwise_reference(x, k2, axes="HW")),
      ("per-slice 2D, axes=DW, stride 2", lambda m: dw.depthwise_conv2d(
          x, k2, axes="DW", strides=2, method=m),
       lambda: depthwise_reference(x, k2, axes="DW", strides=2)),
      ("3D, 3x3x3", lambda m: dw.depthwise_conv3d(x, k3, method=m),
       lambda: depthwise_reference(x, k3, axes="DHW")),
  ]
  print(f"x {x.shape} float32 on {jax.default_backend()}; reference: float64 NumPy")
  print(f"{'op':34} {'method':7} {'out shape':22} {'max abs err':>12} {'ms':>8}")
  failed = 0
  for name, fn, ref in jobs:
    want = ref()
    for method in ("auto", "conv", "shift"):
      jax.block_until_ready(fn(method))  # compile
      t0 = time.perf_counter()
      y = jax.block_until_ready(fn(method))
      ms = (time.perf_counter() - t0) * 1e3
      err = float(np.max(np.abs(np.asarray(y, np.float64) - want)))
      ok = err <= 1e-4 * max(1.0, float(np.max(np.abs(want))))
      failed += not ok
      print(f"{name:34} {method:7} {str(y.shape):22} {err:12.2e} {ms:8.2f}"
            f"{'' if ok else '  FAIL'}")
  print("all results match the reference" if not failed else f"{failed} result(s) FAILED")
  return 1 if failed else 0
