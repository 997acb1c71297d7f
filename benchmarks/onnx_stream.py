"""ONNX streaming: one exported step per frame vs the full-clip export, per frame.

Run: `flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/onnx_stream.py`
(about a minute on 2 cores). Prints a Markdown table for benchmarks/RESULTS.md
("ONNX streaming").

A causal 3D depthwise 3x3x3 convolution (C = 32, M = 1) on a clip
(1, T, 64, 64, 32) with T = 16 frames, in onnxruntime (CPU provider, 2
intra-op threads, graph optimisations on):

* `clip`: `interop.export_onnx` of the op with CAUSAL padding on the whole
  clip (one grouped 3D `Conv`), one call per clip; its time divided by T;
* `step`: `interop.export_streaming_onnx`, one call per frame (the frame and
  the state `(1, 64, 64, 64)` in, the output and `state_next` out, fed back
  as a deployment would): one 2D-shaped `Conv` per time tap, summed.

Medians of interleaved rounds after a warm-up, in one process; the ratio
step / clip-per-frame is the cost of streaming.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from onnx_export import session as _session  # this folder: run as a script


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
  args = p.parse_args()

  import dw5d_jax as dw
  import interop
  from interop import _onnx

  rng = np.random.default_rng(0)
  t, s, c = args.frames, args.size, args.channels
  k = (rng.standard_normal((3, 3, 3, c, 1)) / 9).astype(args.dtype)
  x = rng.standard_normal((1, t, s, s, c)).astype(args.dtype)
  pad = ("CAUSAL", "SAME", "SAME")
  tmp = tempfile.mkdtemp()
  clip = _session(interop.export_onnx(lambda k, x: dw.depthwise_conv3d(x, k, padding=pad),
                                      f"{tmp}/clip.onnx", params=k, input_shape=x.shape,
                                      dtype=args.dtype), args.threads)
  step = _session(interop.export_streaming_onnx(
      lambda k, ch: dw.stream_init(ch, k), lambda k, st, ch: dw.stream_step(st, ch, k), k,
      f"{tmp}/step.onnx", input_shape=(1, 1, s, s, c), dtype=args.dtype), args.threads)

  full = clip.run(None, {"x": x})[0]
  streamed = _onnx.run_stream(step, x)
  err = float(np.max(np.abs(streamed.astype(np.float64) - full)) / np.max(np.abs(full)))

  state0 = np.zeros((1, s, s, 2 * c), args.dtype)
  times = {"clip": [], "step": []}
  for _ in range(args.rounds):
    clip.run(None, {"x": x})  # warm-up
    t0 = time.perf_counter()
    clip.run(None, {"x": x})
    times["clip"].append((time.perf_counter() - t0) / t)
    state = state0
    step.run(None, {"frame": x[:, 0], "state": state})  # warm-up
    for i in range(t):
      t0 = time.perf_counter()
      _, state = step.run(None, {"frame": x[:, i], "state": state})
      times["step"].append(time.perf_counter() - t0)
  a, b = (statistics.median(times[key]) * 1e3 for key in ("clip", "step"))
  print(f"onnxruntime CPU, {args.threads} threads, {args.dtype}, clip (1, {t}, {s}, {s}, {c}), "
        f"causal 3x3x3; medians of {args.rounds} rounds")
  print("| clip per frame (ms) | step per frame (ms) | step / clip | max error step vs clip |")
  print("|---|---|---|---|")
  print(f"| {a:.2f} | {b:.2f} | {b / a:.2f}x | {err:.1e} |")


if __name__ == "__main__":
  main()
