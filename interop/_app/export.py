"""`dw5d export`: a depthwise op with given weights as a SavedModel, verified.

Exports `depthwise_conv2d` or `depthwise_conv3d` with a kernel from a `.npy`
file through `export_savedmodel` (every batch and spatial size symbolic unless
`--input-shape` fixes it), reloads the SavedModel with TensorFlow and checks it
at two input sizes against the float64 reference: the output directly, the
input gradient (through `tf.GradientTape`) by the adjoint identity
`<dL/dx, v> = <ct, conv(v)>` for a random `v`, which holds because the op is
linear in x; both within the dtype's `dw5d_jax._reference.TOLERANCES`. Exits
non-zero unless every check passes.

With `--litert` the op is written instead as a LiteRT (`.tflite`) flatbuffer
of builtin ops through `export_litert` (a static `--input-shape`, optional
`--quantize`), reloaded with the LiteRT interpreter and checked on two inputs
against the float64 reference, within `interop._litert.TOLERANCE` (by
quantization).

With `--litert --stream` it is written as one frame per step of a stream
causal along D (`export_streaming_litert`, the state a rank-4 tensor),
`--input-shape` the clip `(N, T, H, W, C)` that is streamed frame by frame
through the interpreter and checked against the float64 reference of the
full causal op.

With `--onnx` it is written as an ONNX model through `export_onnx` (symbolic
sizes as for the SavedModel), run in onnxruntime and checked at the same two
input sizes against the float64 reference, within `interop._onnx.TOLERANCE`
(float32, float16 or bfloat16); `--onnx --stream` writes one frame per step
(`export_streaming_onnx`, symbolic batch) and checks it as `--litert --stream`
does, on clips of `--input-shape` and one more example.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np

from dw5d_jax._reference import TOLERANCES, Case, compare

# The two checked shapes: (batch size, offsets per symbolic spatial axis added
# to the smallest size the window allows: odd and even sizes for the strides,
# 0 for the bound itself).
_CHECKS = ((1, (2, 4, 3)), (2, (5, 0, 6)))


def configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--op", required=True, choices=("depthwise_conv2d", "depthwise_conv3d"))
  parser.add_argument("--kernel", required=True, metavar="FILE.npy",
                      help="the kernel, (k0, k1, C, M) for 2D or (kd, kh, kw, C, M) for 3D")
  parser.add_argument("--out", required=True, metavar="DIR", help="the SavedModel directory")
  parser.add_argument("--strides", type=_ints, default=1, help="an int or one per axis: 1,2,2")
  parser.add_argument("--dilations", type=_ints, default=1, help="an int or one per axis")
  parser.add_argument("--padding", type=_padding, default="SAME",
                      help="SAME, VALID, CAUSAL, or one of those or lo:hi per axis, e.g. "
                           "CAUSAL,1:1,0:2")
  parser.add_argument("--axes", default="HW", help="depthwise_conv2d on rank 5: the two axes")
  parser.add_argument("--data-format", default=None,
                      help="NDHWC (default), NCDHW; NHWC or NCHW for a rank-4 depthwise_conv2d")
  parser.add_argument("--input-shape", type=_shape, default=None,
                      help="x's shape, None for a symbolic size, e.g. None,None,None,None,8 "
                           "(the default: every size symbolic but the kernel's channels)")
  parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES))
  parser.add_argument("--platforms", type=lambda s: tuple(s.split(",")), default=("cpu", "cuda"),
                      help="platforms to lower for (default cpu,cuda)")
  parser.add_argument("--no-gradient", action="store_true",
                      help="save no gradient (and skip its check)")
  parser.add_argument("--overwrite", action="store_true", help="replace a SavedModel at DIR")
  parser.add_argument("--seed", type=int, default=0, help="seed of the check data")
  parser.add_argument("--litert", action="store_true",
                      help="write a LiteRT (.tflite) flatbuffer of builtin ops to --out instead "
                           "(needs --input-shape with every size an int), checked with the "
                           "LiteRT interpreter")
  parser.add_argument("--onnx", action="store_true",
                      help="write an ONNX model to --out instead (symbolic sizes allowed, as "
                           "for the SavedModel), checked with onnxruntime")
  parser.add_argument("--quantize", choices=("float16", "int8"), default=None,
                      help="--litert: float16 weights, or int8 (needs --calibration)")
  parser.add_argument("--stream", action="store_true",
                      help="--litert or --onnx: one frame per step of a stream causal along D (e.g. "
                           "--padding CAUSAL,SAME,SAME), the state a rank-4 tensor; "
                           "--input-shape is the checked clip (N, T, H, W, C)")
  parser.add_argument("--calibration", metavar="FILE.npy", default=None,
                      help="--litert --quantize int8: typical inputs, an array "
                           "(n, *input_shape); the check runs on the first two")


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  import dw5d_jax as dw
  from dw5d_jax import _args, _geometry
  from interop._export import dim_names, export_savedmodel, load_savedmodel, poly_string

  kernel = _load_npy("--kernel", args.kernel)
  if isinstance(kernel, str):
    return _fail(kernel)
  dtype = jnp.dtype(args.dtype)
  kernel = kernel.astype(dtype)
  op3 = args.op == "depthwise_conv3d"
  try:  # the library's own checks, before the sizes below are derived from them
    conv_axes = "DHW" if op3 else _args.check_axes(args.op, args.axes)
    dilations = _args.int_tuple(args.op, "dilations", args.dilations, len(conv_axes), conv_axes)
    _args.int_tuple(args.op, "strides", args.strides, len(conv_axes), conv_axes)
    padding = _args.check_padding(args.op, args.padding, conv_axes)
  except (ValueError, TypeError) as err:
    return _fail(str(err))
  if kernel.ndim != len(conv_axes) + 2:
    return _fail(f"`--kernel` for {args.op} must have rank {len(conv_axes) + 2}, got shape "
                 f"{kernel.shape}.")
  layout = (args.data_format or ("NHWC" if args.input_shape and len(args.input_shape) == 4
                                 else "NDHWC")).upper()
  rank = len(args.input_shape) if args.input_shape else len(layout)
  layouts = ("NDHWC", "NCDHW") if op3 else ("NDHWC", "NCDHW", "NHWC", "NCHW")
  if layout not in layouts or len(layout) != rank:
    return _fail(f"`--data-format` for {args.op} must be one of {', '.join(layouts)}, "
                 f"matching the rank of `--input-shape`; got {layout} for rank {rank}.")
  if rank == 4 and conv_axes != "HW":
    return _fail(f"`--axes` applies to rank-5 inputs only; a rank-4 input ({layout}) is "
                 f"convolved over H and W, got {conv_axes}.")
  channel_axis = layout.index("C") - rank  # -1 or 1 - rank: counted from the end
  shape = args.input_shape or tuple(
      int(kernel.shape[-2]) if a == "C" else None for a in layout)
  names = dim_names(rank, channel_axis)
  # x_shape: None for each symbolic size.
  case = Case("3d" if op3 else "2d", layout, conv_axes, shape, kernel.shape, args.strides,
              args.dilations, args.padding)
  fn, op_kwargs = getattr(dw, case.op_name), case.kwargs()
  if args.onnx and (args.litert or args.quantize or args.calibration):
    return _fail("`--onnx` and `--litert` are two exports; choose one.")
  if args.stream and not (args.litert or args.onnx):
    return _fail("`--stream` applies to `--litert` and `--onnx` exports only (a SavedModel "
                 "stream: interop.export_streaming_savedmodel).")
  if args.litert or args.quantize or args.calibration:
    return _run_litert(args, fn=fn, kernel=kernel, shape=args.input_shape, case=case)

  # The smallest size along each convolved axis that the window fits in.
  need = {}
  for i, a in enumerate(conv_axes):
    need[layout.index(a)] = _geometry.min_input_size(kernel.shape[i], dilations[i], padding[i])
  constraints = tuple(f"{names[j]} >= {n}" for j, n in need.items()
                      if shape[j] is None and n > 1)
  if args.onnx and args.stream:
    return _run_onnx_stream(args, kernel=kernel, shape=args.input_shape, case=case)
  if args.onnx:
    return _run_onnx(args, fn=fn, kernel=kernel, shape=shape, case=case, need=need,
                     channel_axis=channel_axis, constraints=constraints)

  try:
    with jax.enable_x64(dtype == np.float64):
      export_savedmodel(lambda k, x: fn(x, k, **op_kwargs), kernel, args.out,
                        input_shape=shape, dtype=dtype, platforms=args.platforms,
                        overwrite=args.overwrite, with_gradient=not args.no_gradient,
                        channel_axis=channel_axis, constraints=constraints)
  except (ValueError, TypeError) as err:
    return _fail(str(err))
  print(f"exported {args.op} (kernel {kernel.shape} {dtype}, {_describe(op_kwargs)}) to "
        f"{args.out}")
  print(f"  x {poly_string(shape, names)}"
        f"{', ' + ', '.join(constraints) if constraints else ''}; lowered for "
        f"{', '.join(args.platforms)}")

  model = load_savedmodel(args.out)
  rng = np.random.default_rng(args.seed)
  rtol, atol = TOLERANCES[args.dtype]
  failed = 0
  for size in _check_sizes(shape, need):
    y_err, g_err = _check(model.serve, size, kernel, dtype, case, rng,
                          gradient=not args.no_gradient)
    ok = y_err.ok and (g_err is None or g_err <= atol)
    failed += not ok
    grad = "skipped" if g_err is None else f"{g_err:.1e}"
    tolerance = f"{args.dtype} tolerance: rtol {rtol:.0e}, atol {atol:.0e}"
    print(f"  x {size}: output error {y_err.max_rel:.1e}, input-gradient error {grad}"
          f"{'' if ok else f'  FAIL ({tolerance})'}")
  return _verdict(failed, f"the SavedModel at {args.out}",
                  "the reloaded SavedModel matches the float64 reference at 2 input sizes")


def _load_npy(flag: str, path: str) -> np.ndarray | str:
  """The array in the .npy file `path`, or the error message for `flag`.

  NumPy reads any file without its magic string as a pickle, and then
  reports "pickled (object) data" even for a text file: the magic string is
  checked here first.
  """
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except OSError as err:
    return f"`{flag}` {path!r} could not be read as a .npy array: {err}"
  if magic != b"\x93NUMPY":
    return (f"`{flag}` {path!r} is not a .npy file (it does not start with NumPy's magic "
            f"string \\x93NUMPY, got {magic!r}); write the array with numpy.save.")
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as err:
    return (f"`{flag}` {path!r} could not be read as a .npy array of numbers (object arrays "
            f"are not loaded): {err}")


def _run_litert(args, *, fn, kernel, shape, case) -> int:
  """`--litert`: export with `export_litert`, reload with LiteRT, check two inputs."""
  from interop import _litert

  op_kwargs = case.kwargs()
  if not args.litert:
    return _fail("`--quantize` and `--calibration` apply to `--litert` exports only.")
  if shape is None or any(d is None for d in shape):
    return _fail(f"`--litert` needs `--input-shape` with every size an int (LiteRT needs "
                 f"static shapes), e.g. 1,16,32,32,{kernel.shape[-2]}; got "
                 f"{'none' if shape is None else shape}.")
  if args.dtype != "float32":
    return _fail(f"`--litert` exports float32 models (use --quantize for float16 or int8 "
                 f"weights), got --dtype {args.dtype}.")
  if args.quantize == "int8" and not args.calibration:
    return _fail("`--quantize int8` needs `--calibration FILE.npy`: typical inputs, an array "
                 "(n, *input_shape), from which the converter calibrates the int8 ranges.")
  calibration = None
  if args.calibration:
    calibration = _load_npy("--calibration", args.calibration)
    if isinstance(calibration, str):
      return _fail(calibration)
    calibration = list(calibration)
  if args.stream:
    return _run_litert_stream(args, kernel=kernel, shape=shape, case=case,
                              calibration=calibration)
  try:
    _litert.export_litert(lambda k, x: fn(x, k, **op_kwargs), args.out, params=kernel,
                          input_shape=shape, quantize=args.quantize,
                          representative_data=calibration, overwrite=args.overwrite)
  except (ValueError, TypeError, ImportError) as err:
    return _fail(str(err))
  found = _litert.litert_ops(args.out)
  print(f"exported {args.op} (kernel {kernel.shape} float32, {_describe(op_kwargs)}) to "
        f"{args.out} as LiteRT ({args.quantize or 'float32'})")
  verdict = "all builtin" if found.all_builtin else f"NOT builtin: {found.not_builtin}"
  print(f"  x {tuple(shape)}; ops: {', '.join(found.ops)} ({verdict})")
  it = _litert.interpreter(args.out)
  rng = np.random.default_rng(args.seed)
  # int8 is checked on data it was calibrated for; inputs outside that range clip.
  inputs = calibration[:2] if calibration else [
      rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
  tol = _litert.TOLERANCE[args.quantize]
  failed = 0
  for i, x in enumerate(inputs):
    want = case.expected(x, kernel)
    y = np.asarray(_litert.run(it, x), np.float64)
    failed += not _check_output(
        f"  input {i + 1}{' (calibration)' if calibration else ''}:", y, want, tol)
  return _verdict(failed, f"the LiteRT model at {args.out}",
                  f"the reloaded flatbuffer matches the float64 reference on {len(inputs)} "
                  f"inputs (LiteRT interpreter, XNNPACK)")


def _run_litert_stream(args, *, kernel, shape, case, calibration) -> int:
  """`--litert --stream`: one frame per step, checked frame by frame on two clips."""
  import dw5d_jax as dw
  from interop import _litert, _stream_export

  op_kwargs = case.kwargs()
  if len(shape) != 5:
    return _fail(f"`--stream` needs `--input-shape` of a clip (N, T, H, W, C), got {shape}.")
  try:
    _stream_export.export_streaming_litert(
        lambda k, c: dw.stream_init(c, k, **op_kwargs),
        lambda k, s, c: dw.stream_step(s, c, k, **op_kwargs), kernel, args.out,
        input_shape=(shape[0], 1, *shape[2:]), quantize=args.quantize,
        representative_data=calibration, overwrite=args.overwrite)
  except (ValueError, TypeError, ImportError) as err:
    return _fail(str(err))
  found = _litert.litert_ops(args.out)
  it = _litert.interpreter(args.out)
  state = {n: tuple(map(int, d["shape"]))
           for n, d in it.get_signature_runner().get_input_details().items() if n != "frame"}
  print(f"exported one frame of a stream of {args.op} (kernel {kernel.shape} float32, "
        f"{_describe(op_kwargs)}) to {args.out} as LiteRT ({args.quantize or 'float32'})")
  verdict = "all builtin" if found.all_builtin else f"NOT builtin: {found.not_builtin}"
  print(f"  frame {(shape[0], *shape[2:])}, state {state or 'none'}; ops: "
        f"{', '.join(found.ops)} ({verdict})")
  rng = np.random.default_rng(args.seed)
  clips = calibration[:2] if calibration else [
      rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
  tol = _litert.TOLERANCE[args.quantize]
  failed = 0
  for i, x in enumerate(clips):
    want = case.expected(x, kernel)
    y = np.asarray(_stream_export.run_litert_stream(it, x), np.float64)
    failed += not _check_output(
        f"  clip {i + 1}{' (calibration)' if calibration else ''}, {x.shape[1]} frames:",
        y, want, tol)
  return _verdict(failed, f"the LiteRT stream at {args.out}",
                  f"the flatbuffer, frame by frame, matches the float64 reference of the "
                  f"full causal op on {len(clips)} clips (LiteRT interpreter, XNNPACK)")


def _check_output(label: str, y: np.ndarray, want: np.ndarray, tol: float) -> bool:
  """Prints `label` with y's error as a fraction of max|want|; whether it is within `tol`."""
  err = (float("inf") if y.shape != want.shape
         else float(np.max(np.abs(y - want))) / max(float(np.max(np.abs(want))), 1e-30))
  ok = err <= tol
  print(f"{label} output error {err:.1e} of max|reference|"
        f"{'' if ok else f'  FAIL (tolerance {tol:.0e})'}")
  return ok


def _check_sizes(shape, need):
  """The two concrete input shapes `_CHECKS` gives a shape with symbolic sizes."""
  for batch, offsets in _CHECKS:
    spatial = iter(offsets)
    yield tuple(d if d is not None else batch if j == 0 else need.get(j, 1) + next(spatial)
                for j, d in enumerate(shape))


def _run_onnx(args, *, fn, kernel, shape, case, need, channel_axis, constraints) -> int:
  """`--onnx`: export with `export_onnx`, run in onnxruntime, check two input sizes."""
  from interop import _onnx

  op_kwargs = case.kwargs()
  if args.dtype not in _onnx.TOLERANCE:
    return _fail(f"`--onnx` exports {', '.join(_onnx.TOLERANCE)} models (onnxruntime's CPU "
                 f"provider has no {args.dtype} Conv), got --dtype {args.dtype}.")
  try:
    _onnx.export_onnx(lambda k, x: fn(x, k, **op_kwargs), args.out, params=kernel,
                      input_shape=shape, dtype=kernel.dtype, channel_axis=channel_axis,
                      constraints=constraints, overwrite=args.overwrite)
    import onnxruntime
  except (ValueError, TypeError, ImportError) as err:
    return _fail(str(err))
  print(f"exported {args.op} (kernel {kernel.shape} {args.dtype}, {_describe(op_kwargs)}) to "
        f"{args.out} as ONNX")
  print(f"  ops: {', '.join(_onnx.onnx_ops(args.out))}")
  session = onnxruntime.InferenceSession(args.out, providers=["CPUExecutionProvider"])
  rng = np.random.default_rng(args.seed)
  tolerance = _onnx.TOLERANCE[args.dtype]
  failed = 0
  for size in _check_sizes(shape, need):
    x = rng.standard_normal(size).astype(kernel.dtype)
    want = case.expected(x, kernel)
    y = np.asarray(_onnx.run(session, {"x": x})[0], np.float64)
    failed += not _check_output(f"  x {size}:", y, want, tolerance)
  return _verdict(failed, f"the ONNX model at {args.out}",
                  "the ONNX model matches the float64 reference at 2 input sizes "
                  "(onnxruntime, CPU)")


def _run_onnx_stream(args, *, kernel, shape, case) -> int:
  """`--onnx --stream`: one frame per step (symbolic batch), checked frame by frame."""
  import dw5d_jax as dw
  from interop import _onnx

  op_kwargs = case.kwargs()
  if not shape or len(shape) != 5 or None in shape:
    return _fail(f"`--stream` needs `--input-shape` of a clip (N, T, H, W, C), got {shape}.")
  if args.dtype not in _onnx.TOLERANCE:
    return _fail(f"`--onnx` exports {', '.join(_onnx.TOLERANCE)} models (onnxruntime's CPU "
                 f"provider has no {args.dtype} Conv), got --dtype {args.dtype}.")
  try:
    _onnx.export_streaming_onnx(
        lambda k, c: dw.stream_init(c, k, **op_kwargs),
        lambda k, s, c: dw.stream_step(s, c, k, **op_kwargs), kernel, args.out,
        input_shape=(None, 1, *shape[2:]), dtype=kernel.dtype, overwrite=args.overwrite)
    import onnxruntime
  except (ValueError, TypeError, ImportError) as err:
    return _fail(str(err))
  session = onnxruntime.InferenceSession(args.out, providers=["CPUExecutionProvider"])
  state = {i.name: tuple(i.shape) for i in session.get_inputs() if i.name != "frame"}
  print(f"exported one frame of a stream of {args.op} (kernel {kernel.shape} {args.dtype}, "
        f"{_describe(op_kwargs)}) to {args.out} as ONNX")
  print(f"  frame (b, {', '.join(map(str, shape[2:]))}), state {state or 'none'}; ops: "
        f"{', '.join(_onnx.onnx_ops(args.out))}")
  rng = np.random.default_rng(args.seed)
  tolerance = _onnx.TOLERANCE[args.dtype]
  failed = 0
  for batch in (shape[0], shape[0] + 1):
    x = rng.standard_normal((batch, *shape[1:])).astype(kernel.dtype)
    want = case.expected(x, kernel)
    y = np.asarray(_onnx.run_stream(session, x), np.float64)
    failed += not _check_output(f"  clip {x.shape}, frame by frame:", y, want, tolerance)
  return _verdict(failed, f"the ONNX stream at {args.out}",
                  "the model, frame by frame, matches the float64 reference of the full "
                  "causal op on 2 clips (onnxruntime, CPU)")


def _verdict(failed: int, what: str, verified: str) -> int:
  """Exit status 1 (and why, on stderr) if any check failed, else 0."""
  if failed:
    print(f"dw5d export: {what} FAILED {failed} check(s) against the float64 reference",
          file=sys.stderr)
    return 1
  print(f"verified: {verified}")
  return 0


def _check(serve, shape, kernel, dtype, case, rng, *, gradient):
  """`serve`'s output against the reference at one shape, and its input gradient's error.

  The output's `Comparison` uses `TOLERANCES`' rule; the gradient's error is
  that of the adjoint identity relative to `sum|ct * conv(v)|`, to be held to
  the dtype's atol (the error allowed relative to the scale).
  """
  import tensorflow as tf

  def ref(v):
    return case.expected(v, kernel)

  x = rng.standard_normal(shape).astype(dtype)
  want = ref(x)
  ct = rng.standard_normal(want.shape).astype(dtype)
  xt = tf.constant(x)
  acc = np.float64 if dtype == np.float64 else np.float32  # holds `ct` exactly
  # (Without a saved gradient, TF refuses a tape already at the call.)
  with tf.GradientTape() if gradient else contextlib.nullcontext() as tape:
    if gradient:
      tape.watch(xt)
    y = serve(xt)
    loss = tf.reduce_sum(tf.cast(y, acc) * ct.astype(acc))
  y_err = compare(y, want, dtype)
  if not gradient or not np.isfinite(y_err.ratio):
    return y_err, None
  g = np.asarray(tape.gradient(loss, xt), np.float64)
  v = rng.standard_normal(shape)
  lhs, terms = np.sum(g * v), ct.astype(np.float64) * ref(v)  # <dL/dx, v> = <ct, conv(v)>
  g_err = abs(lhs - terms.sum()) / max(1.0, float(np.abs(terms).sum()))
  return y_err, g_err


def _describe(kw) -> str:
  return ", ".join(f"{k} {v}" for k, v in kw.items())


def _fail(message: str) -> int:
  print(f"dw5d export: error: {message}", file=sys.stderr)
  return 2


def _ints(text: str) -> int | tuple[int, ...]:
  try:
    values = tuple(int(t) for t in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected an int or ints like 1,2,2, got {text!r}") from None
  return values[0] if len(values) == 1 else values


_KINDS = ("SAME", "VALID", "CAUSAL")


def _padding(text: str):
  if text.upper() in _KINDS:
    return text.upper()
  try:
    return tuple(entry.upper() if entry.upper() in _KINDS else
                 tuple(int(p) for p in entry.split(":", 1)) for entry in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected SAME, VALID, CAUSAL, or one of those or lo:hi per axis like "
        f"CAUSAL,1:1,0:2, got {text!r}") from None


def _shape(text: str) -> tuple[int | None, ...]:
  try:
    return tuple(None if t.strip().lower() == "none" else int(t) for t in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected ints and None like None,None,None,None,8, got {text!r}") from None
