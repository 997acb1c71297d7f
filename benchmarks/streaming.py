"""Streaming on CPU: a 1-frame step against the full causal op, per frame.

Run: `.venv/bin/python benchmarks/streaming.py` (about a minute on 2 cores;
`--rounds`, `--frames`).

The clip is `(1, T, 64, 64, 32)` (N, T, H, W, C), T = 16, the kernel
3x3x3 with multiplier 1, padding `("CAUSAL", "SAME", "SAME")`. Cells, each
one jitted callable, timed in interleaved rounds (one call of every cell per
round, so load from other processes hits them alike), medians in ms:

* `full`: `depthwise_conv3d` on the whole clip; per frame: that / T.
* `step`: `dw5d_jax.stream_step` on one frame (a chunk `(1, 1, 64, 64, 32)`,
  already an array of its own, as a frame from a camera is), the state
  donated, as a serving loop would call it. The state update copies the
  `e - 1 = 2` history frames.
* `ring`: the same step with a ring buffer instead: the new frame written in
  place with `lax.dynamic_update_slice`, the history read back in order
  (rolled) for the convolution. Not in the library; here to show that the
  2-frame copy is not what a step costs.
* `scan`: all T frames through `lax.scan` over 1-frame steps in one jitted
  call; per frame: that / T.
* `scan-conv`: no streaming, the T 3-frame convolutions a stream computes,
  from precomputed windows, in one `lax.scan`: what XLA's CPU while loop
  costs around the same work (compare with `scan`).
* `dispatch`: a jitted function of the same arguments that returns them
  (the fixed cost of one call from Python, which a step pays and the full op
  pays once for T frames).

Every output is checked against the full op (bitwise) first. The target
(issue 11): `step <= 2 * full / T`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dw5d_jax as dw

PADDING = ("CAUSAL", "SAME", "SAME")


def cells(x: jax.Array, k: jax.Array):
  """`{name: (callable, frames it computes)}`; a step callable keeps its own state."""
  frames = x.shape[1]
  chunks = [x[:, t:t + 1] for t in range(frames)]
  full = jax.jit(lambda x, k: dw.depthwise_conv3d(x, k, padding=PADDING))
  step = jax.jit(lambda s, c, k: dw.stream_step(s, c, k), donate_argnums=0)

  def ring_step(ring, pos, chunk, k):
    history = jnp.roll(ring, -pos, axis=1)  # oldest first
    window = jnp.concatenate([history, chunk], axis=1)
    y = dw.depthwise_conv3d(window, k, padding=((0, 0), "SAME", "SAME"))
    ring = lax.dynamic_update_slice_in_dim(ring, chunk, pos, axis=1)
    return ring, (pos + 1) % ring.shape[1], y

  ring = jax.jit(ring_step, donate_argnums=0)

  @jax.jit
  def scan(x, k):
    def body(state, frame):
      state, y = dw.stream_step(state, frame[:, None], k)
      return state, y[:, 0]

    _, ys = lax.scan(body, dw.stream_init(x[:, :1], k), jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1)

  padded = jnp.pad(x, ((0, 0), (2, 0), (0, 0), (0, 0), (0, 0)))
  windows = jnp.stack([padded[:, t:t + 3] for t in range(frames)])
  scan_conv = jax.jit(lambda w, k: lax.scan(
      lambda c, v: (c, dw.depthwise_conv3d(v, k, padding=((0, 0), "SAME", "SAME"))), 0, w)[1])
  dispatch = jax.jit(lambda s, c, k: (s, c, k))
  live = {"step": dw.stream_init(chunks[0], k),
          "ring": (jnp.zeros((1, 2, *x.shape[2:]), x.dtype), jnp.int32(0)), "t": 0}

  def call_step():
    t = live["t"] = (live["t"] + 1) % frames
    live["step"], y = step(live["step"], chunks[t], k)
    return y

  def call_ring():
    t = live["t"]
    r, pos, y = ring(*live["ring"], chunks[t], k)
    live["ring"] = (r, pos)
    return y

  state = dw.stream_init(chunks[0], k)
  return {
      "full": (lambda: full(x, k), frames),
      "step": (call_step, 1),
      "ring": (call_ring, 1),
      "scan": (lambda: scan(x, k), frames),
      "scan-conv": (lambda: scan_conv(windows, k), frames),
      "dispatch": (lambda: dispatch(state, chunks[0], k), 1),
  }, (full, step, ring, scan, chunks)


def check(x, k, fns) -> None:
  """Step, ring and scan outputs equal the full op, bitwise."""
  full, step, ring, scan, chunks = fns
  want = np.asarray(full(x, k))
  state = dw.stream_init(chunks[0], k)
  r = (jnp.zeros((1, 2, *x.shape[2:]), x.dtype), jnp.int32(0))
  got_step, got_ring = [], []
  for c in chunks:
    state, y = step(state, c, k)
    got_step.append(y)
    *r, y = ring(*r, c, k)
    got_ring.append(y)
  for name, got in (("step", np.concatenate(got_step, 1)), ("ring", np.concatenate(got_ring, 1)),
                    ("scan", np.asarray(scan(x, k)))):
    np.testing.assert_array_equal(got, want, err_msg=name)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=200)
  parser.add_argument("--frames", type=int, default=16)
  args = parser.parse_args(argv)
  dw.tune_cpu_allocator()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, args.frames, 64, 64, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 32, 1)), jnp.float32)
  table, fns = cells(x, k)
  check(x, k, fns)
  times = {name: [] for name in table}
  for fn, _ in table.values():  # warm-up
    for _ in range(3):
      jax.block_until_ready(fn())
  for _ in range(args.rounds):
    for name, (fn, _) in table.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  per_frame = {name: statistics.median(times[name]) / table[name][1] * 1e3 for name in table}
  budget = per_frame["full"]
  print(f"x {tuple(x.shape)}, kernel {tuple(k.shape)}, padding {PADDING}, "
        f"{args.rounds} rounds, native: {dw.native_status().active}")
  print(f"{'cell':10s} {'ms/call':>9s} {'ms/frame':>9s} {'/ (full/T)':>11s}")
  for name in table:
    ms = statistics.median(times[name]) * 1e3
    print(f"{name:10s} {ms:9.3f} {per_frame[name]:9.3f} {per_frame[name] / budget:10.2f}x")
  ratio = per_frame["step"] / budget
  print(f"target step <= 2x full/T: {'met' if ratio <= 2 else 'MISSED'} ({ratio:.2f}x)")


if __name__ == "__main__":
  main()
