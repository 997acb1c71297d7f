"""ONNX export speed: `interop.export_onnx` against the best hand-written ONNX graph.

For each workload the same convolution runs in onnxruntime (CPU provider,
2 intra-op threads, graph optimisations on) as

* `ours`: `export_onnx` of `dw5d_jax.depthwise_conv2d/3d` (symbolic batch),
* `best`: one ONNX `Conv` node with `group = C` on NCDHW input, written by
  hand with the same weights (for a border mode, `Pad` + `Conv`; with an
  epilogue, `Conv` with its bias input + `Relu`, which onnxruntime fuses).

Both models get the same input, in the model's layout (NDHWC for `ours`
channels-last: its `Transpose`s are part of what is timed). Medians of
`--reps` timed calls after warm-up, rounds interleaved, ratios in one process.

Run: flock /tmp/dw5d-bench.lock .venv/bin/python benchmarks/onnx_export.py
(Not `onnx.py`: run as a script, that name would shadow the `onnx` package.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

# (name, op, layout, x shape, kernel shape, options)
WORKLOADS = [
    ("W1 2d HW NDHWC", "2d", "NDHWC", (4, 16, 64, 64, 32), (3, 3, 32, 1), {}),
    ("W1 2d HW NCDHW", "2d", "NCDHW", (4, 32, 16, 64, 64), (3, 3, 32, 1), {}),
    ("W2 3d NDHWC", "3d", "NDHWC", (2, 32, 64, 64, 32), (3, 3, 3, 32, 1), {}),
    ("W2 3d NCDHW", "3d", "NCDHW", (2, 32, 32, 64, 64), (3, 3, 3, 32, 1), {}),
    ("W2 3d NCDHW reflect", "3d", "NCDHW", (2, 32, 32, 64, 64), (3, 3, 3, 32, 1),
     {"padding_mode": "reflect"}),
    ("W2 3d NCDHW bias+relu", "3d", "NCDHW", (2, 32, 32, 64, 64), (3, 3, 3, 32, 1),
     {"activation": "relu"}),
    ("W2 3d NDHWC M=2 s2", "3d", "NDHWC", (2, 32, 64, 64, 32), (3, 3, 3, 32, 2),
     {"strides": 2}),
]


def ours(tmp, name, op, layout, x_shape, k, bias, options):
  import dw5d_jax as dw
  import interop

  fn = dw.depthwise_conv3d if op == "3d" else dw.depthwise_conv2d
  kw = dict(options, data_format=layout)
  params = {"k": k, "b": bias}
  path = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
  c_axis = layout.index("C") - len(layout)
  interop.export_onnx(lambda p, x: fn(x, p["k"], bias=p["b"], **kw), path, params=params,
                      input_shape=(None, *x_shape[1:]), channel_axis=c_axis)
  return path


def best(tmp, name, op, x_shape, k, bias, options):
  """One Conv (group = C) on NCDHW input, the library's SAME pads; Pad/Relu where needed."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  from dw5d_jax import _geometry

  k5 = k if op == "3d" else k[None]
  window, (c, m) = k5.shape[:3], k5.shape[3:]
  w = np.transpose(k5, (3, 4, 0, 1, 2)).reshape(c * m, 1, *window)
  s = options.get("strides", 1)
  pads = [_geometry.pads(n, kk, s if kk > 1 else 1, 1, "SAME")
          for n, kk in zip(x_shape[2:], window)]
  lo, hi = [p[0] for p in pads], [p[1] for p in pads]
  nodes, inits = [], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
  x_name = "x"
  if options.get("padding_mode"):
    inits.append(numpy_helper.from_array(np.array([0, 0, *lo, 0, 0, *hi], np.int64), "pads"))
    nodes.append(helper.make_node("Pad", ["x", "pads"], ["xp"], mode="reflect"))
    x_name, lo, hi = "xp", [0] * 3, [0] * 3
  strides = [s if kk > 1 else 1 for kk in window]
  conv_out = "z" if options.get("activation") else "y"
  nodes.append(helper.make_node("Conv", [x_name, "w", "b"], [conv_out], group=c,
                                kernel_shape=list(window), strides=strides, pads=lo + hi))
  if options.get("activation"):
    nodes.append(helper.make_node("Relu", ["z"], ["y"]))
  graph = helper.make_graph(
      nodes, "best", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                    ["b", *x_shape[1:]])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
  path = os.path.join(tmp, name.replace(" ", "_") + "-best.onnx")
  onnx.save(model, path)
  return path


def session(path, threads):
  import onnxruntime

  opts = onnxruntime.SessionOptions()
  opts.intra_op_num_threads = threads
  opts.inter_op_num_threads = 1
  return onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--filter", default="")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  tmp = tempfile.mkdtemp()
  print(f"onnxruntime CPU, {args.threads} threads; medians of {args.reps} calls x "
        f"{args.rounds} interleaved rounds (ms)")
  print(f"{'workload':26s} {'ours':>9s} {'best':>9s} {'ratio':>6s}  max|diff|")
  for name, op, layout, x_shape, k_shape, options in WORKLOADS:
    if args.filter not in name:
      continue
    k = rng.standard_normal(k_shape).astype(np.float32)
    bias = (rng.standard_normal(k_shape[-2] * k_shape[-1]).astype(np.float32)
            if options.get("activation") else np.zeros(k_shape[-2] * k_shape[-1], np.float32))
    x = rng.standard_normal(x_shape).astype(np.float32)
    if layout == "NDHWC":
      x_ncdhw = np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))
    else:
      x_ncdhw = x
    a = session(ours(tmp, name, op, layout, x_shape, k, bias, options), args.threads)
    b = session(best(tmp, name, op, x_ncdhw.shape, k, bias, options), args.threads)
    ya, yb = a.run(None, {"x": x})[0], b.run(None, {"x": x_ncdhw})[0]
    if layout == "NDHWC":
      ya = ya.transpose(0, 4, 1, 2, 3)
    diff = float(np.max(np.abs(ya - yb)))
    times = {"ours": [], "best": []}
    for _ in range(args.rounds):
      for key, sess, inp in (("ours", a, x), ("best", b, x_ncdhw)):
        sess.run(None, {"x": inp})  # warm-up
        for _ in range(args.reps):
          t0 = time.perf_counter()
          sess.run(None, {"x": inp})
          times[key].append(time.perf_counter() - t0)
    ta, tb = (statistics.median(times[key]) * 1e3 for key in ("ours", "best"))
    print(f"{name:26s} {ta:9.1f} {tb:9.1f} {ta / tb:6.2f}  {diff:.1e}", flush=True)


if __name__ == "__main__":
  main()
