"""LiteRT streaming: one exported step per frame vs the full-clip export, per frame.

Run: `flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/litert_stream.py`
(about a minute on 2 cores). Prints a Markdown table for benchmarks/RESULTS.md
("LiteRT streaming").

A causal 3D depthwise 3x3x3 convolution (C = 32, M = 1) on a clip
(1, T, 64, 64, 32) with T = 16 frames:

* `clip`: `interop.export_litert` of the op with CAUSAL padding on the whole
  clip, one call per clip; its time divided by T;
* `step`: `interop.export_streaming_litert`, one call per frame through the
  signature runner (the frame and the state `(1, 64, 64, 64)` in, the output
  and the new state out, as a deployment would feed them back).

Both in the LiteRT interpreter (XNNPACK, 2 threads), float32 and int8
(calibrated on 2 random clips). Medians of interleaved rounds after a
warm-up; the ratio step / clip-per-frame is the cost of streaming.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np


def _exports(tmp: str, shape: tuple[int, ...], quantize: str | None, rng):
  import dw5d_jax as dw
  import interop

  n, t, h, w, c = shape
  k = rng.standard_normal((3, 3, 3, c, 1)).astype(np.float32) / 9
  clips = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
  pad = ("CAUSAL", "SAME", "SAME")
  full = interop.export_litert(
      lambda k, x: dw.depthwise_conv3d(x, k, padding=pad), f"{tmp}/clip-{quantize}.tflite",
      params=k, input_shape=shape, quantize=quantize,
      representative_data=clips if quantize else None)
  step = interop.export_streaming_litert(
      lambda k, c: dw.stream_init(c, k), lambda k, s, c: dw.stream_step(s, c, k), k,
      f"{tmp}/step-{quantize}.tflite", input_shape=(n, 1, h, w, c), quantize=quantize,
      representative_data=clips if quantize else None)
  return full, step, clips[0]


def measure(shape: tuple[int, ...], quantize: str | None, rounds: int, seed: int = 0):
  from interop import _litert

  rng = np.random.default_rng(seed)
  with tempfile.TemporaryDirectory() as tmp:
    full, step, x = _exports(tmp, shape, quantize, rng)
    it_full = _litert.interpreter(full, num_threads=2)
    runner = _litert.interpreter(step, num_threads=2).get_signature_runner()
    state0 = {n: np.zeros(d["shape"], np.float32)
              for n, d in runner.get_input_details().items() if n != "frame"}

    def run_full():
      _litert.run(it_full, x)

    def run_stream():
      state = state0
      for t in range(x.shape[1]):
        out = runner(frame=x[:, t], **state)
        out.pop("output")
        state = out

    times = {"clip": [], "step": []}
    for _ in range(2):  # warm-up
      run_full(), run_stream()
    for _ in range(rounds):
      for name, fn in (("clip", run_full), ("step", run_stream)):
        t0 = time.perf_counter()
        fn()
        times[name].append((time.perf_counter() - t0) / x.shape[1])
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--shape", default="1,16,64,64,32")
  args = p.parse_args(argv)
  shape = tuple(int(d) for d in args.shape.split(","))
  print("| quantize | clip export, ms per frame | step export, ms per frame | step / clip |")
  print("|---|---|---|---|")
  for quantize in (None, "int8"):
    ms = measure(shape, quantize, args.rounds)
    print(f"| {quantize or 'float32'} | {ms['clip']:.2f} | {ms['step']:.2f} | "
          f"{ms['step'] / ms['clip']:.2f}x |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
