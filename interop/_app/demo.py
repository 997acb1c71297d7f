"""`dw5d demo`: the main job end to end, on embedded defaults (`make demo`).

1. Data: noisy 16^3 volumes holding a sphere or a cube (demo_task.py),
   split into training and held-out sets. Nothing is downloaded.
2. Training: a separable 3D CNN (`dw5d_jax.nn.DepthwiseConv3D` + pointwise
   dense layers, Flax NNX) trained under `jit` with optax, a progress bar
   showing loss and accuracy; held-out accuracy must reach `min_accuracy`
   (chance is 0.5).
3. Export: `interop.export_savedmodel` with symbolic batch, D, H and W; the
   SavedModel is reloaded with TensorFlow and its logits must match JAX's on
   held-out volumes and on volumes of another size. Then `interop.export_litert`
   writes the model for one 16^3 volume as a LiteRT flatbuffer (`<out>.tflite`,
   builtin ops only), which the LiteRT interpreter runs on the held-out
   volumes: its logits must match JAX's too. Last, the stem made causal
   along D streams slice by slice as a LiteRT flatbuffer with its state a
   rank-4 tensor (`<out>.stream.tflite`, `interop.export_streaming_litert`),
   checked against the full causal layer.
4. Timing: per-slice 2D and 3D depthwise ops, `dw5d_jax` (method "auto") vs
   the TF reshape path (`interop.tf_depthwise_conv2d/3d` in a `tf.function`)
   vs XLA's grouped convolution (method "conv"): median of a few runs after a
   warm-up, as ratios. Each output is checked against the float64 reference.
5. Summary: what ran, where the SavedModel is, the parity numbers; the exit
   status is non-zero if any check failed.

`--quick` halves the data, the training steps and the timing work (the test
suite runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

DEFAULT_OUT = os.path.join("out", "demo_savedmodel")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the demo does, in one place; `halved()` is `--quick`."""

  volume: tuple[int, int, int] = (16, 16, 16)
  other_volume: tuple[int, int, int] = (20, 24, 18)  # served too: the model is size-agnostic
  noise: float = 0.25
  train: int = 2048
  held_out: int = 512
  steps: int = 400
  batch: int = 32
  learning_rate: float = 1e-2
  min_accuracy: float = 0.8
  served: int = 64  # volumes per size compared between the SavedModel and JAX
  serve_rtol: float = 1e-4  # |TF - JAX| <= serve_rtol * max(1, max|JAX|)
  timing_x: tuple[int, ...] = (4, 16, 32, 32, 16)  # (N, D, H, W, C)
  timing_runs: int = 7

  def halved(self) -> Settings:
    n, *rest = self.timing_x
    return dataclasses.replace(
        self, train=self.train // 2, held_out=self.held_out // 2, steps=self.steps // 2,
        served=self.served // 2, timing_x=(max(n // 2, 1), *rest),
        timing_runs=max(self.timing_runs // 2, 3))


class Checks:
  """Named pass/fail checks, printed as they are made and listed in the summary."""

  def __init__(self) -> None:
    self.rows: list[tuple[str, bool, str]] = []

  def add(self, name: str, ok: bool, detail: str) -> bool:
    self.rows.append((name, bool(ok), detail))
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return bool(ok)

  @property
  def failed(self) -> list[str]:
    return [name for name, ok, _ in self.rows if not ok]


def configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--quick", action="store_true",
                      help="half the data, training steps and timing work (for CI)")
  parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                      help=f"where to write the SavedModel (default {DEFAULT_OUT}; an existing "
                           f"SavedModel there is replaced) and, as DIR.tflite, the LiteRT "
                           f"flatbuffer")
  parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model")


def run(args: argparse.Namespace) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up log
  import jax

  settings = Settings().halved() if args.quick else Settings()
  t0, cpu0 = time.perf_counter(), time.process_time()
  checks = Checks()
  print(f"dw5d demo{' --quick' if args.quick else ''}: JAX {jax.__version__} on "
        f"{jax.default_backend()} ({jax.device_count()} device(s), {os.cpu_count()} CPU "
        f"cores), seed {args.seed}", flush=True)

  data = _step_data(settings, args.seed)
  model, train_info = _step_train(settings, data, args.seed, checks)
  served = _step_export(settings, model, data, args.out, checks)
  timings = _step_timing(settings, args.seed, checks)
  _summary(settings, data, train_info, served, timings, checks,
           wall=time.perf_counter() - t0, cpu=time.process_time() - cpu0)
  return 1 if checks.failed else 0


# The steps in the order they run; a step's header gives its place ("[2/5]").
STEPS = ("data", "train", "export", "timing", "summary")


def _header(step: str, title: str) -> None:
  print(f"\n[{STEPS.index(step) + 1}/{len(STEPS)}] {title}", flush=True)


# ----------------------------------------------------------------------------
# 1. Data.


def _step_data(s: Settings, seed: int) -> dict[str, Any]:
  import numpy as np

  from interop._app import demo_task as task

  _header("data", "Data: spheres vs cubes in noisy volumes")
  rng = np.random.default_rng(seed)
  t = time.perf_counter()
  train = task.make_volumes(rng, s.train, s.volume, noise=s.noise)
  held_out = task.make_volumes(rng, s.held_out, s.volume, noise=s.noise)
  other = task.make_volumes(rng, s.served, s.other_volume, noise=s.noise)
  dims = "x".join(map(str, s.volume))
  print(f"  {s.train} training + {s.held_out} held-out volumes {dims} (one channel), classes "
        f"{' / '.join(task.CLASSES)} balanced, noise sigma {s.noise}; {s.served} more at "
        f"{'x'.join(map(str, s.other_volume))} for serving ({time.perf_counter() - t:.1f} s)")
  return {"train": train, "held_out": held_out, "other": other}


# ----------------------------------------------------------------------------
# 2. Training.


def _step_train(s: Settings, data: dict[str, Any], seed: int,
                checks: Checks) -> tuple[Any, dict[str, Any]]:
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from tqdm import tqdm

  from interop._app import demo_task as task

  _header("train", "Training a separable 3D CNN (dw5d_jax.nn.DepthwiseConv3D + pointwise) "
             "under jit")
  model = task.ShapeNet(rngs=nnx.Rngs(seed))
  optimizer = task.make_optimizer(model, learning_rate=s.learning_rate, steps=s.steps)
  params = task.count_params(model)
  epochs = s.steps * s.batch / s.train
  print(f"  {params:,} parameters; adam (peak lr {s.learning_rate}, warm-up, cosine decay), "
        f"batch {s.batch}, {s.steps} steps "
        f"({epochs:.1f} epochs); the first step compiles", flush=True)
  stream = task.batches(np.random.default_rng(seed + 1), data["train"], s.batch)
  loss_avg = acc_avg = None
  t = time.perf_counter()
  with tqdm(range(s.steps), desc="  training", unit="step", mininterval=0.5,
            dynamic_ncols=True, file=sys.stdout) as bar:
    for i in bar:
      batch = next(stream)
      loss, acc = task.train_step(model, optimizer, jnp.asarray(batch.x), jnp.asarray(batch.y))
      # Running means over about the last 20 batches.
      loss_avg = float(loss) if loss_avg is None else 0.95 * loss_avg + 0.05 * float(loss)
      acc_avg = float(acc) if acc_avg is None else 0.95 * acc_avg + 0.05 * float(acc)
      bar.set_postfix(epoch=f"{(i + 1) * s.batch / s.train:.1f}", loss=f"{loss_avg:.3f}",
                      acc=f"{acc_avg:.2f}", refresh=False)
  seconds = time.perf_counter() - t
  held_out = data["held_out"]
  acc = task.accuracy(task.predict_all(model, held_out.x), held_out.y)
  chance = 1 / len(task.CLASSES)
  checks.add("held-out accuracy", acc >= s.min_accuracy,
             f"{acc:.3f} on {len(held_out.y)} volumes (chance {chance:.2f}, needed "
             f">= {s.min_accuracy})")
  return model, {"params": params, "seconds": seconds, "accuracy": acc, "chance": chance,
                 "train_accuracy": acc_avg, "epochs": epochs}


# ----------------------------------------------------------------------------
# 3. Export to a SavedModel, serve with TensorFlow.


def _step_export(s: Settings, model: Any, data: dict[str, Any], out: str,
                 checks: Checks) -> dict[str, Any]:
  import numpy as np
  from flax import nnx

  import interop
  from interop._app import demo_task as task

  _header("export", "Export to a TensorFlow SavedModel (symbolic batch, D, H, W) and to LiteRT, "
                     "and serve them")
  graphdef, state = nnx.split(model)
  path = os.path.abspath(out)
  t = time.perf_counter()
  try:
    # Serving a classifier needs no gradient; without it the export is quicker.
    interop.export_savedmodel(lambda state, x: nnx.merge(graphdef, state)(x), state, path,
                              input_shape=(None, None, None, None, 1), with_gradient=False,
                              overwrite=True)
    loaded = interop.load_savedmodel(path)
  except ValueError as err:  # e.g. --out names a directory that is not a SavedModel
    checks.add("SavedModel export", False, str(err))
    return {"path": None, "rows": []}
  print(f"  wrote and reloaded {path} ({time.perf_counter() - t:.1f} s)")
  rows = []
  for name, volumes in (("held-out", data["held_out"]), ("other size", data["other"])):
    x = volumes.x[:s.served]
    want = task.predict_all(model, x)
    got = np.concatenate([loaded.serve(x[i:i + 32]).numpy() for i in range(0, len(x), 32)])
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    same = int(np.sum(np.argmax(got, -1) == np.argmax(want, -1)))
    dims = "x".join(map(str, x.shape[1:4]))
    rows.append({"size": dims, "max_abs": err, "same": same, "n": len(x),
                 "accuracy": task.accuracy(got, volumes.y[:s.served])})
    checks.add(f"TF vs JAX logits, {dims} ({name})", err <= s.serve_rtol * scale,
               f"max |TF - JAX| {err:.1e} (allowed {s.serve_rtol * scale:.1e}); same class "
               f"for {same}/{len(x)}; TF accuracy {rows[-1]['accuracy']:.3f}")
  litert = _export_litert(s, model, graphdef, state, data["held_out"], path + ".tflite", checks)
  stream = _export_litert_stream(s, model, data["held_out"], path + ".stream.tflite", checks)
  return {"path": path, "rows": rows, "litert": litert, "stream": stream}


def _export_litert(s: Settings, model: Any, graphdef: Any, state: Any, volumes: Any, path: str,
                   checks: Checks) -> dict[str, Any] | None:
  """The model for one volume as a LiteRT flatbuffer, run by the LiteRT interpreter."""
  import numpy as np
  from flax import nnx

  import interop
  from interop import _litert
  from interop._app import demo_task as task

  t = time.perf_counter()
  try:
    interop.export_litert(lambda state, x: nnx.merge(graphdef, state)(x), path, params=state,
                          input_shape=(1, *s.volume, 1), overwrite=True)
    interpreter = _litert.interpreter(path, num_threads=2)
  except (ValueError, ImportError) as err:
    checks.add("LiteRT export", False, str(err))
    return None
  print(f"  wrote {path} (LiteRT, builtin ops only, x (1, {', '.join(map(str, s.volume))}, 1)) "
        f"and loaded it in the LiteRT interpreter ({time.perf_counter() - t:.1f} s)")
  x = volumes.x[:s.served]
  want = task.predict_all(model, x)
  got = np.concatenate([_litert.run(interpreter, v[None]) for v in x])
  err = float(np.max(np.abs(got.astype(np.float64) - want)))
  scale = max(1.0, float(np.max(np.abs(want))))
  same = int(np.sum(np.argmax(got, -1) == np.argmax(want, -1)))
  dims = "x".join(map(str, s.volume))
  checks.add(f"LiteRT vs JAX logits, {dims}", err <= s.serve_rtol * scale,
             f"max |LiteRT - JAX| {err:.1e} (allowed {s.serve_rtol * scale:.1e}); same class "
             f"for {same}/{len(x)}")
  return {"path": path, "max_abs": err, "same": same, "n": len(x)}


def _export_litert_stream(s: Settings, model: Any, volumes: Any, path: str,
                          checks: Checks) -> dict[str, Any] | None:
  """The stem made causal along D, one slice per step, as a streaming LiteRT flatbuffer.

  A scanner delivers a volume slice by slice: the trained stem's kernel and
  bias with CAUSAL padding along D (and its GELU) stream through
  `interop.export_streaming_litert`, the state (the last 2 slices) a rank-4
  tensor; the interpreter's slices must match the full causal layer in JAX.
  """
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import interop
  from dw5d_jax.nn import DepthwiseConv3D
  from interop import _litert, _stream_export

  stem = model.stem
  causal = DepthwiseConv3D(1, 3, depth_multiplier=stem.depth_multiplier,
                           padding=("CAUSAL", "SAME", "SAME"), rngs=nnx.Rngs(0))
  causal.kernel[...], causal.bias[...] = stem.kernel[...], stem.bias[...]
  graphdef, params = nnx.split(causal)

  def step(params, state, chunk):
    state, y = nnx.merge(graphdef, params).stream_step(state, chunk)
    return state, nnx.gelu(y)

  t = time.perf_counter()
  try:
    interop.export_streaming_litert(lambda p, c: nnx.merge(graphdef, p).stream_init(c), step,
                                    params, path, input_shape=(1, 1, *s.volume[1:], 1),
                                    overwrite=True)
    found = interop.litert_ops(path)
  except (ValueError, ImportError) as err:
    checks.add("streaming LiteRT export", False, str(err))
    return None
  x = volumes.x[:2]
  got = np.concatenate([_stream_export.run_litert_stream(path, v[None]) for v in x])
  want = np.asarray(nnx.gelu(causal(jnp.asarray(x))), np.float64)
  err = float(np.max(np.abs(got - want)))
  scale = max(1.0, float(np.max(np.abs(want))))
  print(f"  wrote {path} (LiteRT stream: one {s.volume[1]}x{s.volume[2]} slice and a rank-4 "
        f"state per step; ops {', '.join(found.ops)}) ({time.perf_counter() - t:.1f} s)")
  rank = _litert.max_rank(path)
  checks.add("streaming LiteRT vs JAX, slice by slice", err <= s.serve_rtol * scale and rank <= 4,
             f"max |LiteRT - JAX| {err:.1e} over {len(x)} volumes streamed along D (allowed "
             f"{s.serve_rtol * scale:.1e}); largest tensor rank {rank} (GPU delegates: <= 4)")
  return {"path": path, "max_abs": err, "n": len(x)}


# ----------------------------------------------------------------------------
# 4. Timing.


def _step_timing(s: Settings, seed: int, checks: Checks) -> list[dict[str, Any]]:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import tensorflow as tf

  import dw5d_jax as dw
  import interop
  from dw5d_jax._reference import TOLERANCES, Case, compare

  tf.get_logger().setLevel("ERROR")
  c = s.timing_x[-1]
  _header("timing", f"Timing: x {s.timing_x} (N, D, H, W, C) float32, 3x3(x3) kernels, median of "
             f"{s.timing_runs} runs after a warm-up")
  rng = np.random.default_rng(seed + 2)
  x = rng.standard_normal(s.timing_x).astype(np.float32)
  k2 = rng.standard_normal((3, 3, c, 1)).astype(np.float32)
  k3 = rng.standard_normal((3, 3, 3, c, 1)).astype(np.float32)
  ops = [("per-slice 2D, axes HW", Case("2d", "NDHWC", "HW", x.shape, k2.shape), k2),
         ("per-slice 2D, axes DW", Case("2d", "NDHWC", "DW", x.shape, k2.shape), k2),
         ("3D", Case("3d", "NDHWC", "DHW", x.shape, k3.shape), k3)]
  rows = []
  print(f"  {'op':22} {'implementation':34} {'median ms':>10} {'vs ours':>8} "
        f"{'max err vs float64':>19}")
  for name, case, k in ops:
    want = case.expected(x, k)
    jax_op = functools.partial(getattr(dw, case.op_name), **case.kwargs())
    tf_op = functools.partial(getattr(interop, f"tf_{case.op_name}"), **case.kwargs())
    on_jax, on_tf = (jnp.asarray(x), jnp.asarray(k)), (tf.constant(x), tf.constant(k))
    impls = [
        ("ours (dw5d_jax, method auto)", jax.jit(functools.partial(jax_op, method="auto")),
         on_jax),
        ("TF reshape path (tf.function)", tf.function(tf_op), on_tf),
        ("XLA grouped conv (method conv)", jax.jit(functools.partial(jax_op, method="conv")),
         on_jax),
    ]
    ours = None
    for label, fn, fn_args in impls:
      error = compare(_ready(fn(*fn_args)), want, "float32")  # warm-up: compiles or traces
      ms = _median_ms(fn, fn_args, s.timing_runs)
      ours = ms if ours is None else ours
      rows.append({"op": name, "impl": label, "ms": ms, "ratio": ms / ours,
                   "rel_err": error.max_rel, "ok": error.ok})
      print(f"  {name:22} {label:34} {ms:10.2f} {ms / ours:7.2f}x {error.max_rel:19.1e}"
            f"{'' if error.ok else '  FAIL'}", flush=True)
  bad = [f"{r['op']}, {r['impl']}" for r in rows if not r["ok"]]
  worst = max(r["rel_err"] for r in rows)
  rtol, atol = TOLERANCES["float32"]
  checks.add("ops vs float64 reference", not bad,
             f"{len(rows)} outputs, max error {worst:.1e} of max|reference| (float32 "
             f"tolerance: rtol {rtol:.0e}, atol {atol:.0e})"
             + (f"; failed: {'; '.join(bad)}" if bad else ""))
  print("  vs ours: time / ours' time (> 1: slower than ours). Timings on a shared machine "
        "are noisy.")
  return rows


def _ready(y: Any) -> Any:
  """Waits for a JAX result; TF runs eagerly, so its result is ready on return."""
  return y.block_until_ready() if hasattr(y, "block_until_ready") else y


def _median_ms(fn: Any, args: tuple[Any, ...], runs: int) -> float:
  import numpy as np

  times = []
  for _ in range(runs):
    t = time.perf_counter()
    _ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


# ----------------------------------------------------------------------------
# 5. Summary.


def _summary(s: Settings, data: dict[str, Any], train: dict[str, Any], served: dict[str, Any],
             timings: list[dict[str, Any]], checks: Checks, *, wall: float, cpu: float) -> None:
  _header("summary", "Summary")
  dims = "x".join(map(str, s.volume))
  lines = [
      ("data", f"{len(data['train'].y)} training + {len(data['held_out'].y)} held-out "
               f"volumes {dims}: spheres vs cubes, noise sigma {s.noise}"),
      ("model", f"separable 3D CNN, {train['params']:,} parameters, {s.steps} steps "
                f"({train['epochs']:.1f} epochs) in {train['seconds']:.0f} s"),
      ("accuracy", f"held-out {train['accuracy']:.3f} (chance {train['chance']:.2f}, needed "
                   f">= {s.min_accuracy}); training (last batches) {train['train_accuracy']:.2f}"),
      ("SavedModel", served["path"] or "not written"),
  ]
  if served["path"]:
    lines.append(("", "serve(x): x (batch, D, H, W, 1) float32, any sizes; logits (batch, 2) "
                      "for (sphere, cube)"))
  for row in served["rows"]:
    lines.append(("TF vs JAX", f"{row['size']}: max |logit diff| {row['max_abs']:.1e}, same "
                               f"class {row['same']}/{row['n']}"))
  litert = served.get("litert")
  if litert:
    lines.append(("LiteRT", f"{litert['path']} (one {dims} volume per call)"))
    lines.append(("LiteRT/JAX", f"max |logit diff| {litert['max_abs']:.1e}, same class "
                                f"{litert['same']}/{litert['n']}"))
  stream = served.get("stream")
  if stream:
    lines.append(("stream", f"{stream['path']} (one slice per step, state rank 4)"))
    lines.append(("stream/JAX", f"max |diff| {stream['max_abs']:.1e} over {stream['n']} "
                                f"volumes"))
  if timings:
    worst = max(r["rel_err"] for r in timings)
    lines.append(("ops", f"{len(timings)} outputs within {worst:.1e} of the float64 reference"))
    for label in dict.fromkeys(r["impl"] for r in timings):
      ratios = [r["ratio"] for r in timings if r["impl"] == label]
      if label.startswith("ours"):
        continue
      lines.append(("", f"{label}: {min(ratios):.1f}x to {max(ratios):.1f}x ours' time"))
  lines.append(("time", f"wall {wall:.0f} s, CPU {cpu:.0f} s"))
  for key, value in lines:
    print(f"  {key:11} {value}")
  failed = checks.failed
  if failed:
    print(f"\nFAILED: {len(failed)} of {len(checks.rows)} checks: {'; '.join(failed)}",
          flush=True)
  else:
    print(f"\nall {len(checks.rows)} checks passed", flush=True)
