"""LiteRT (TFLite): each export route and quantization, against TF and JAX on CPU.

Run: `.venv/bin/python benchmarks/litert.py` (about two minutes on 2 cores;
`--rounds`, `--rows` to narrow it). Prints a Markdown table for
benchmarks/RESULTS.md ("LiteRT").

Three problems at batch 1: W1 and W2 of benchmarks/suite.py (2D 3x3 per depth
slice on (1, 16, 64, 64, 32); 3D 3x3x3 on (1, 32, 64, 64, 32)) and the demo
model (`interop._app.demo_task.ShapeNet` after 150 training steps, on a
(1, 16, 16, 16, 1) volume). Rows:

* `litert f32 depthwise`: `export_litert`'s default route (dw5d_jax ops as
  DEPTHWISE_CONV_2D graphs);
* `litert f32 jax2tf`: the jax2tf lowering, as `export_savedmodel` has it
  (the ops as an elementwise PAD/SLICE/MUL/ADD graph);
* `litert f32 tf ops`: `interop.tf_depthwise_conv2d/3d` in a `tf.function`,
  what an `interop.keras` model on the TensorFlow backend converts to
  (single ops only);
* `litert f16`, `litert int8`: the default route, float16 weights, and
  full-integer int8 calibrated on 16 other inputs of the same kind (random
  normal, or held-out demo volumes);
* `tf savedmodel`: `export_savedmodel` (static shape, CPU), loaded, `serve`;
* `jax cpu`: the function under `jax.jit` (`method="auto"`: the native kernels).

Columns: the error (max |y - ref| / max |ref|) against the float64 reference
(`dw5d_jax._reference` for single ops; the model itself in float64 for the
demo model), and the median time of interleaved rounds after warm-up. LiteRT
runs with its XNNPACK delegate and 2 threads; TF and JAX with their own thread
pools on the machine's cores. The allocator is tuned
(`dw5d_jax.tune_cpu_allocator()`), as in `dw5d bench`.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import WORKLOADS, cpu_model  # noqa: E402

ROWS = ("litert f32 depthwise", "litert f32 jax2tf", "litert f32 tf ops", "litert f16",
        "litert int8", "tf savedmodel", "jax cpu")
PROBLEMS = ("W1", "W2", "demo")
CALIBRATION = 16


def _problem(name: str, rng: np.random.Generator):
  """(apply_fn(params, x), params, x, float64 reference, TF-ops fn or None, calibration)."""
  import jax

  import dw5d_jax as dw
  from dw5d_jax._reference import depthwise_reference

  if name == "demo":
    from flax import nnx

    from interop._app import demo_task as task

    model = _trained_demo_model(rng)
    graphdef, state = nnx.split(model)
    volumes = task.make_volumes(rng, 1 + CALIBRATION, (16, 16, 16), noise=0.25).x
    x, calibration = volumes[:1], [v[None] for v in volumes[1:]]
    with jax.enable_x64(True):
      state64 = jax.tree.map(lambda a: np.asarray(a, np.float64), state)
      ref = np.asarray(nnx.merge(graphdef, state64)(x.astype(np.float64)))

    def apply_fn(s, v):
      return nnx.merge(graphdef, s)(v)

    return apply_fn, state, x, ref, None, calibration
  w = WORKLOADS[name]
  shape = (1, *w.x_shape[1:])
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal(w.k_shape).astype(np.float32)
  calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(CALIBRATION)]
  axes = "HW" if w.op == "2d" else "DHW"
  ref = depthwise_reference(x, k, axes=axes)
  op = dw.depthwise_conv2d if w.op == "2d" else dw.depthwise_conv3d
  import interop
  tf_op = interop.tf_depthwise_conv2d if w.op == "2d" else interop.tf_depthwise_conv3d
  return (lambda k, v: op(v, k)), k, x, ref, functools.partial(tf_op, kernel=k), calibration


def _trained_demo_model(rng: np.random.Generator, steps: int = 150):
  """The demo's model after a short training run (int8 ranges depend on the weights)."""
  import jax.numpy as jnp
  from flax import nnx

  from interop._app import demo_task as task

  model = task.ShapeNet(rngs=nnx.Rngs(0))
  optimizer = task.make_optimizer(model, learning_rate=1e-2, steps=steps)
  data = task.batches(rng, task.make_volumes(rng, 1024, (16, 16, 16), noise=0.25), 32)
  for _ in range(steps):
    batch = next(data)
    task.train_step(model, optimizer, jnp.asarray(batch.x), jnp.asarray(batch.y))
  return model


def _cells(name: str, rows: tuple[str, ...], seed: int = 0):
  """{row: (callable timed with no arguments, output getter, detail)}."""
  import jax
  import tensorflow as tf

  import interop
  from interop import _litert

  rng = np.random.default_rng(seed)
  apply_fn, params, x, ref, tf_op, calibration = _problem(name, rng)
  cells = {}
  for row in rows:
    flatbuffer = None
    if row.startswith("litert"):
      if row == "litert f32 tf ops":
        if tf_op is None:
          continue
        fn = tf.function(lambda v: tf_op(v), input_signature=[tf.TensorSpec(x.shape)])
        flatbuffer = _litert.convert(fn.get_concrete_function(), fn)
      else:
        route = "jax2tf" if row.endswith("jax2tf") else "depthwise"
        quantize = {"litert f16": "float16", "litert int8": "int8"}.get(row)
        concrete, owner = _litert.jax_concrete_function(apply_fn, params, x.shape, route=route)
        flatbuffer = _litert.convert(concrete, owner, quantize=quantize,
                                     samples=calibration if quantize == "int8" else None)
      it = _litert.interpreter(flatbuffer, num_threads=2)
      y = _litert.run(it, x)  # sets the input once; timing calls invoke() only
      ops = sorted(_litert.litert_ops(flatbuffer).ops)
      detail = f"{len(flatbuffer) / 1024:.0f} KiB: {', '.join(ops)}"
      cells[row] = (it.invoke, y, detail)
    elif row == "tf savedmodel":
      path = os.path.join(tempfile.mkdtemp(), "model")
      interop.export_savedmodel(apply_fn, params, path, input_shape=x.shape,
                                platforms=("cpu",), with_gradient=False)
      model = interop.load_savedmodel(path)
      xt = tf.constant(x)
      cells[row] = (lambda m=model, v=xt: m.serve(v), model.serve(xt).numpy(), "jax2tf, XLA")
    elif row == "jax cpu":
      fn = jax.jit(apply_fn)
      xj = jax.device_put(x)
      y = np.asarray(fn(params, xj))
      cells[row] = (lambda f=fn, v=xj: jax.block_until_ready(f(params, v)), y,
                    "jit, method auto")
  errors = {row: float(np.max(np.abs(np.asarray(y, np.float64) - ref)) / np.max(np.abs(ref)))
            for row, (_, y, _) in cells.items()}
  return cells, errors


def measure(name: str, rows: tuple[str, ...], rounds: int, warmup: int = 3):
  cells, errors = _cells(name, rows)
  for fn, _, _ in cells.values():
    for _ in range(warmup):
      fn()
  times = {row: [] for row in cells}
  for _ in range(rounds):
    for row, (fn, _, _) in cells.items():
      t0 = time.perf_counter()
      fn()
      times[row].append(time.perf_counter() - t0)
  return {row: (errors[row], 1e3 * statistics.median(times[row]), cells[row][2])
          for row in cells}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
  p.add_argument("--rounds", type=int, default=15)
  args = p.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import importlib.metadata
  import platform

  import jax
  import tensorflow as tf

  import dw5d_jax as dw

  tf.get_logger().setLevel("ERROR")
  dw.tune_cpu_allocator()
  args_text = " ".join(sys.argv[1:] if argv is None else argv)
  print(f"- Command: `.venv/bin/python benchmarks/litert.py{' ' + args_text if args_text else ''}`")
  print(f"- Machine: {platform.node()}, {os.cpu_count()} cores, CPU: {cpu_model()}; load "
        f"average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
  print(f"- Versions: python {platform.python_version()}, jax {jax.__version__}, tensorflow "
        f"{tf.__version__}, ai-edge-litert {importlib.metadata.version('ai-edge-litert')}, "
        f"numpy {np.__version__}; dw5d_jax native kernels: {dw.native_status().detail}")
  print(f"- Median of {args.rounds} interleaved rounds after 3 warm-up calls; LiteRT: "
        f"XNNPACK, 2 threads; int8 calibrated on {CALIBRATION} other inputs.\n")
  print("| problem | row | error vs float64 | median ms | vs litert f32 depthwise | graph |")
  print("|---|---|---:|---:|---:|---|")
  for name in args.problems:
    got = measure(name, tuple(args.rows), args.rounds)
    base = got.get("litert f32 depthwise", (None, None))[1]
    for row, (err, ms, detail) in got.items():
      ratio = f"{ms / base:.2f}x" if base else "n/a"
      print(f"| {name} | {row} | {err:.1e} | {ms:.2f} | {ratio} | {detail} |", flush=True)
  print(f"\nLoad average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
