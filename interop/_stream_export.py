"""Streaming models as TensorFlow SavedModels, and one frame per step as LiteRT.

`export_streaming_savedmodel` is `export_savedmodel` (`_export.py`: jax2tf's
native serialization, lowered for every platform in `platforms`, `params` as
`tf.Variable`s, symbolic sizes) for a stream: a JAX `init_fn(params, chunk)`
that makes the state and a `step_fn(params, state, chunk)` that returns the
new state and the chunk's output, e.g. `dw5d_jax.stream_init` and
`dw5d_jax.stream_step`, or a model's `stream_init`/`stream_step` methods.

The state is a pytree of arrays (a `dw5d_jax.StreamState`, a tuple of them
for a model). In the SavedModel it is a flat dict of tensors named after
their paths in the tree: `state_buffer`, `state_head`, `state_phase`,
`state_emitted` for one `StreamState`; `state_0_buffer`, `state_1_buffer`,
... for a tuple. The
SavedModel serves with TensorFlow alone:

* `initial_state(chunk)`: the state before the first chunk (only the
  chunk's shape matters), also the signature `"initial_state"`;
* `step(state, chunk)` -> `(state, output)`; the signature `"serving_default"`
  takes `chunk` and the state's tensors by name and returns them with
  `"output"`.

With `per_example=True` (a batch of independent streams, as from
`dw5d_jax.stream_init(..., per_example=True)`), `step_fn` also takes `valid`
(int32 `(N,)`, real frames per example) and `reset` (bool `(N,)`, a new
stream in that example's slot), and so do `step(state, chunk, valid, reset)`
and the serving signature (inputs `"valid"` and `"reset"`).

`export_streaming_litert` writes one step of the same kind of stream for one
frame as a LiteRT flatbuffer whose state enters and leaves as named rank-4
tensors (GPU delegates refuse 5D): the step over rank-4 tensors is
`dw5d_jax._stream4d.build`'s, converted with `interop._litert.convert`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from dw5d_jax import _stream4d, _target
from interop import _export

_FN = "export_streaming_savedmodel"


def export_streaming_savedmodel(
    init_fn: Callable[[Any, jax.Array], Any],
    step_fn: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]],
    params: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int | None],
    dtype: Any = "float32",
    platforms: Sequence[str] = ("cpu", "cuda"),
    overwrite: bool = False,
    channel_axis: int = -1,
    constraints: Sequence[str] = (),
    per_example: bool = False,
) -> str:
  """Exports a stream, `init_fn` and `step_fn`, as a TensorFlow SavedModel.

  It needs TensorFlow only to load and run (not JAX, not this project). It
  has no gradient: streaming is inference.

  Args:
    init_fn: a JAX function `(params, chunk) -> state`; `state` a pytree of
      arrays (it may use only the chunk's shape and dtype).
    step_fn: a JAX function `(params, state, chunk) -> (state, y)`: the new
      state with the same structure, shapes and dtypes, and one array `y`.
    params: a pytree of arrays, stored as `tf.Variable`s (`.params`).
    path: the directory to write (see `export_savedmodel`).
    input_shape: the shape of a chunk: an int per fixed dimension, `None`
      per symbolic one (named `b, d, h, w` for rank 5, as in
      `export_savedmodel`; for a clip `(N, T, H, W, C)` the chunk length is
      `d`). The channel dimension must be an int.
    dtype: the dtype of the chunks.
    platforms, overwrite, channel_axis, constraints: as in
      `export_savedmodel`.
    per_example: `step_fn` is `(params, state, chunk, valid, reset)`, with
      `valid` int32 and `reset` bool, both `(N,)` (one per example of the
      batch, the chunk's first dim): per-example streams for a server.

  Returns:
    `path`, as a string.

  Raises:
    TypeError, ValueError: as `export_savedmodel` (bad arguments, a `path`
      in the way, functions that fail on `input_shape` or only with
      symbolic sizes); a `step_fn` whose state changes structure, shape or
      dtype, or whose output is not one array.

  Example:
    >>> import tempfile, numpy as np, tensorflow as tf
    >>> import dw5d_jax as dw
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 1), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_streaming_savedmodel(
    ...     lambda k, c: dw.stream_init(c, k), lambda k, s, c: dw.stream_step(s, c, k), k,
    ...     tmp.name + "/stream", input_shape=(None, None, None, None, 4))
    >>> model = tf.saved_model.load(path)
    >>> frame = tf.ones((1, 1, 8, 8, 4))
    >>> state = model.initial_state(frame)
    >>> sorted(state)
    ['state_buffer', 'state_emitted', 'state_head', 'state_phase']
    >>> state, y = model.step(state, frame)
    >>> y.shape
    TensorShape([1, 1, 8, 8, 4])
  """
  if not isinstance(per_example, bool):
    raise TypeError(f"{_FN}: `per_example` must be a bool, got {type(per_example).__name__} "
                    f"{per_example!r}.")
  shape, names = _export._check_input_shape(input_shape, channel_axis, _FN)
  x_dtype = _export._check_dtype(dtype, _FN)
  platforms = _export._check_platforms(platforms, _FN)
  constraints = _export._check_constraints(constraints, _FN)
  leaves, treedef = _export._param_leaves(params, _FN)
  path = os.fspath(path)
  _export._check_path(path, overwrite, _FN)

  def unflatten(leaves):
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def step(p, state, chunk, *each):
    return step_fn(p, state, chunk, *each)

  def per_example_inputs(chunk):  # no frame real, nothing reset: shapes only
    return ((jnp.zeros(chunk.shape[:1], jnp.int32), jnp.zeros(chunk.shape[:1], bool))
            if per_example else ())

  def first_step(leaves, chunk):
    return step(unflatten(leaves), init_fn(unflatten(leaves), chunk), chunk,
                *per_example_inputs(chunk))

  leaf_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
  x_spec = _export._input_spec(shape, names, x_dtype, constraints, _FN)
  # One step from the initial state, exported as export_savedmodel checks
  # `apply_fn`: failures get the same explanations.
  _export._export_or_explain("`init_fn` then `step_fn`", first_step, leaf_specs, x_spec, shape,
                             names, x_dtype, platforms, constraints, caller=_FN,
                             subject="`init_fn` and `step_fn`")
  state = jax.eval_shape(lambda p, c: init_fn(unflatten(p), c), leaf_specs, x_spec)
  state_leaves, state_tree = jax.tree_util.tree_flatten_with_path(state)
  each = ((jax.ShapeDtypeStruct(x_spec.shape[:1], jnp.int32),
           jax.ShapeDtypeStruct(x_spec.shape[:1], jnp.bool_)) if per_example else ())
  after, y = jax.eval_shape(lambda p, s, c, *e: step(unflatten(p), s, c, *e), leaf_specs, state,
                            x_spec, *each)
  _check_state(state, after, y)
  state_names = [_stream4d.state_name(p) for p, _ in state_leaves]
  specs = [a for _, a in state_leaves]
  _save(init_fn, step, unflatten, leaves, state_tree, state_names, specs, path, shape, names,
        x_dtype, platforms, constraints, per_example)
  return path


def _check_state(before: Any, after: Any, y: Any) -> None:
  """The state keeps its structure, shapes and dtypes; the output is one array."""
  def describe(tree):
    return [(jax.tree_util.keystr(p), tuple(a.shape), str(a.dtype))
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]]

  if (jax.tree_util.tree_structure(before) != jax.tree_util.tree_structure(after)
      or describe(before) != describe(after)):
    raise ValueError(f"{_FN}: `step_fn` must return the state with the structure, shapes and "
                     f"dtypes `init_fn` gives it; `init_fn` gives {describe(before)}, "
                     f"`step_fn` returns {describe(after)}.")
  if not isinstance(y, jax.ShapeDtypeStruct):
    raise ValueError(f"{_FN}: `step_fn` must return `(state, y)` with `y` one array, got "
                     f"{jax.tree_util.tree_structure(y)}.")


def _save(init_fn, step_fn, unflatten, leaves, state_tree, state_names, specs, path, shape,
          names, dtype, platforms, constraints, per_example) -> None:
  import tensorflow as tf
  from jax.experimental import jax2tf

  convert = functools.partial(
      jax2tf.convert, polymorphic_constraints=constraints,
      native_serialization_platforms=platforms, with_gradient=False)
  x_poly = _export.poly_string(shape, names)
  state_polys = [str(tuple(a.shape)).replace(",)", ")") for a in specs]

  def init_flat(leaves, chunk):
    return jax.tree_util.tree_leaves(init_fn(unflatten(leaves), chunk))

  def step_flat(leaves, state, chunk, *each):
    new, y = step_fn(unflatten(leaves), jax.tree_util.tree_unflatten(state_tree, state), chunk,
                     *each)
    return jax.tree_util.tree_leaves(new), y

  each_poly = "(" + x_poly[1:].split(",")[0] + ")"  # the batch: (b) or (2)
  init_tf = convert(init_flat, polymorphic_shapes=[None, x_poly])
  step_tf = convert(step_flat, polymorphic_shapes=[None, state_polys, x_poly,
                                                   *[each_poly] * (2 * per_example)])

  module = tf.Module()
  module.params = [tf.Variable(a, trainable=False, name=f"param_{i}")
                   for i, a in enumerate(leaves)]
  chunk_spec = tf.TensorSpec(shape, tf.as_dtype(dtype), name="chunk")
  state_specs = {n: tf.TensorSpec([d if isinstance(d, int) else None for d in a.shape],
                                  tf.as_dtype(np.dtype(a.dtype)), name=n)
                 for n, a in zip(state_names, specs)}

  def params():
    return [tf.convert_to_tensor(v) for v in module.params]

  def run_step(state, chunk, *each):
    new, y = step_tf(params(), [state[n] for n in state_names], chunk, *each)
    return dict(zip(state_names, new)), y

  @tf.function(autograph=False, input_signature=[chunk_spec])
  def initial_state(chunk):
    return dict(zip(state_names, init_tf(params(), chunk)))

  each_specs = [tf.TensorSpec(shape[:1], tf.int32, name="valid"),
                tf.TensorSpec(shape[:1], tf.bool, name="reset")] if per_example else []

  @tf.function(autograph=False, input_signature=[state_specs, chunk_spec, *each_specs])
  def step(state, chunk, *each):
    return run_step(state, chunk, *each)

  @tf.function(autograph=False,
               input_signature=[chunk_spec, *each_specs, *state_specs.values()])
  def serving_step(chunk, *rest):
    each, state = rest[:len(each_specs)], rest[len(each_specs):]
    new, y = run_step(dict(zip(state_names, state)), chunk, *each)
    return {"output": y, **new}

  module.initial_state = initial_state
  module.step = step
  _export._write(module, path, {"serving_default": serving_step.get_concrete_function(),
                                "initial_state": initial_state.get_concrete_function()})


# ----------------------------------------------------------------------------
# One frame per step as a LiteRT flatbuffer, every tensor of rank <= 4.

_FN_LITERT = "export_streaming_litert"


def export_streaming_litert(
    init_fn: Callable[[Any, jax.Array], Any],
    step_fn: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]],
    params: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    quantize: str | None = None,
    representative_data: Any = None,
    interface: str = "float32",
    overwrite: bool = False,
) -> str:
  """Exports one frame of a stream as a LiteRT (`.tflite`) flatbuffer with rank-4 state.

  The flatbuffer computes one step of the stream `init_fn`/`step_fn` (as for
  `export_streaming_savedmodel`: `dw5d_jax.stream_init`/`stream_step`, a
  model's layers' `stream_init`/`stream_step`, or a Keras model's through
  `interop.keras.stream_functions`) on one frame, with the
  state as named tensors of rank 4 (GPU delegates refuse 5D tensors), and
  LiteRT's builtin ops only. Its signature `"serving_default"` takes

  * `frame`: the next frame `(N, H, W, C)` of a clip `(N, T, H, W, C)`;
  * one tensor per stream that keeps frames (a window reaching `e > 1`
    frames back in time): `state` for a single stream, `state_0`,
    `state_1`, ... for a tuple of streams (named after their place in the
    state's tree), each `(N, H, W, (e - 1) * C)`: the stream's last `e - 1`
    input frames side by side along channels, oldest first; zeros before
    the first frame (the causal padding);

  and returns `output`, the output frame, and the state tensors to feed to
  the next step, under the same names. The graph keeps no state of its own
  (no counters, no variables): a step shifts each state by one frame (a
  slice and a concatenation) and sums one DEPTHWISE_CONV_2D per time tap.
  Frames are the full causal op's output, frame after frame. Every tensor
  of the graph has rank at most 4, unless `step_fn` applies an op outside
  `_litert._RANK_FREE` (elementwise ops, activations, dense layers, ...)
  to a chunk or an output: its tensors then keep their unit time axis
  (`dw5d_jax._stream4d` says how the step is built).

  Args:
    init_fn: a JAX function `(params, chunk) -> state`, the state a pytree of
      `dw5d_jax.StreamState`s.
    step_fn: a JAX function `(params, state, chunk) -> (state, y)`, `y` of
      shape `(N, 1, H', W', C')` for a chunk of one frame.
    params: a pytree of arrays (constants in the flatbuffer).
    path: the `.tflite` file to write.
    input_shape: the chunk of one frame, `(N, 1, H, W, C)`, ints (LiteRT
      needs static shapes).
    quantize: None (float32), `"float16"` (float16 weights) or `"int8"`
      (full-integer: int8 weights and activations, the state tensors
      included; the interface stays float32, as in `export_litert`).
    representative_data: `"int8"` only: clips `(N, T, H, W, C)` (an
      iterable, or a function returning one). Each is streamed through the
      step in JAX, and every frame with the state it meets is a calibration
      sample: real step inputs, states included.
    interface: the dtype of the frame, the state tensors and the output at
      the flatbuffer's interface: `"float32"` (the default; with
      `quantize="int8"` they are quantized and dequantized inside the
      graph) or `"int8"` (`quantize="int8"` only: int8 tensors, each with
      the scale and zero point of its signature's details, for an
      integer-only device or accelerator). Each state's output has the
      scale and zero point of its input (checked), so it feeds straight
      back; the initial state is its zero point, not 0 (see
      `run_litert_stream`).
    overwrite: replace an existing file at `path`.

  Returns:
    `path`, as a string.

  Raises:
    ImportError: the `ai-edge-litert` package is missing.
    TypeError, ValueError: as `export_litert` (shapes, `quantize`, `path`, ops
      outside LiteRT's builtin set); `input_shape` not one frame
      `(N, 1, H, W, C)`; `interface` not `"float32"` or `"int8"`, or
      `"int8"` without `quantize="int8"`; an int8 state whose output's
      scale or zero point differs from its input's; a stream with stride
      along time, channels-first,
      streamed along another axis, or per example; a state holding anything
      but `StreamState`s; `valid` or `reset` in `step_fn`.

  Example:
    >>> import tempfile, numpy as np
    >>> import dw5d_jax as dw
    >>> from interop._litert import interpreter
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 1), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_streaming_litert(
    ...     lambda k, c: dw.stream_init(c, k), lambda k, s, c: dw.stream_step(s, c, k), k,
    ...     tmp.name + "/step.tflite", input_shape=(1, 1, 8, 8, 4))
    >>> step = interpreter(path).get_signature_runner()
    >>> out = step(frame=np.ones((1, 8, 8, 4), np.float32),
    ...            state=np.zeros((1, 8, 8, 8), np.float32))   # 2 frames of 4 channels
    >>> sorted((name, a.shape) for name, a in out.items())
    [('output', (1, 8, 8, 4)), ('state', (1, 8, 8, 8))]
  """
  from interop import _files, _litert

  fn = _FN_LITERT
  shape = _litert._check_input_shape(input_shape, fn)
  _litert._check_quantize(quantize, representative_data, fn,
                          what="clips (N, T, H, W, C) of the frames you stream")
  if interface not in ("float32", "int8"):
    raise ValueError(f"{fn}: `interface` must be 'float32' or 'int8', got {interface!r}.")
  if interface == "int8" and quantize != "int8":
    raise ValueError(f"{fn}: interface='int8' (int8 frame, state and output tensors) needs "
                     f"quantize='int8', got quantize={quantize!r}.")
  _litert._litert_module("schema_py_generated", fn)
  path = os.fspath(path)
  _files.check_path(fn, path, overwrite, ".tflite")
  step = _stream4d.build(init_fn, step_fn, params, shape, np.float32, fn=fn)
  samples = (None if representative_data is None
             else _stream_samples(step, representative_data))
  concrete, owner = _step_concrete_function(step, "litert")
  flatbuffer = _litert.convert(concrete, owner, quantize=quantize, samples=samples,
                               int8_interface=interface == "int8", fn=fn)
  _check_state_quantization(flatbuffer, step.state_names)
  _files.write(path, _rank4(flatbuffer, step), ".tflite")
  return path


def _rank4(flatbuffer: bytes, step: _stream4d.Step4D) -> bytes:
  """The graph with the unit time axis dropped from its rank-5 tensors, where that is safe.

  The step's own arithmetic is rank 4; a model's per-frame ops (a bias, an
  activation, a pointwise layer) run on `(N, 1, H, W, C)` chunks and leave
  rank-5 tensors. `_litert.drop_unit_axis` drops the unit axis where every
  op around them computes the same at any rank; kept only if it gives the
  same outputs on a random clip of 3 frames.
  """
  from interop import _litert

  if _litert.max_rank(flatbuffer) <= 4:
    return flatbuffer
  dropped = _litert.drop_unit_axis(flatbuffer)
  if dropped is None:
    return flatbuffer
  clip = np.random.default_rng(0).standard_normal(
      (step.frame_shape[0], 3, *step.frame_shape[1:])).astype(np.float32)
  try:
    before, after = run_litert_stream(flatbuffer, clip), run_litert_stream(dropped, clip)
  except (RuntimeError, ValueError):  # a graph the interpreter refuses
    return flatbuffer
  scale = max(float(np.max(np.abs(before))), 1e-30)
  return dropped if float(np.max(np.abs(after - before))) <= 1e-6 * scale else flatbuffer


def _check_state_quantization(flatbuffer: bytes, state_names: Sequence[str]) -> None:
  """Each state leaves with its input's type, scale and zero point, so it feeds straight back.

  Read from the flatbuffer's signature (the converter gives a state's SLICE
  and CONCATENATION one scale; a state it rescaled would be read with the
  wrong scale at the next step, so it is refused, never fed back).
  """
  from interop import _litert

  schema = _litert._litert_module("schema_py_generated", _FN_LITERT)
  model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
  types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
  signature = model.signatureDefs[0]
  tensors = model.subgraphs[signature.subgraphIndex].tensors

  def described(maps):
    out = {}
    for m in maps:
      t, q = tensors[m.tensorIndex], tensors[m.tensorIndex].quantization
      scale = () if q is None or q.scale is None else tuple(float(v) for v in q.scale)
      zero = () if q is None or q.zeroPoint is None else tuple(int(v) for v in q.zeroPoint)
      out[m.name.decode() if isinstance(m.name, bytes) else m.name] = (
          types.get(t.type, "?").lower(), scale, zero)
    return out

  ins, outs = described(signature.inputs), described(signature.outputs)
  for name in state_names:
    if ins[name] != outs[name]:
      raise ValueError(
          f"{_FN_LITERT}: the converter gave state `{name}` different types or quantization "
          f"(type, scales, zero points) at input and output: {ins[name]} in, {outs[name]} "
          f"out, so it cannot be fed back as it is; export with interface='float32'.")


def _stream_samples(step: _stream4d.Step4D, data: Any) -> list[dict[str, np.ndarray]]:
  """Every frame of the calibration clips with the states it meets, by input name."""
  n, h, w, c = step.frame_shape
  samples = []
  for i, clip in enumerate(data() if callable(data) else data):
    clip = np.asarray(clip)
    if clip.ndim != 5 or clip.shape[0] != n or clip.shape[2:] != (h, w, c) or (
        clip.dtype.kind != "f"):
      raise ValueError(f"{_FN_LITERT}: `representative_data` item {i} must be a float clip "
                       f"({n}, T, {h}, {w}, {c}), got {clip.dtype} {clip.shape}.")
    _, states = step.run(clip)
    samples += [{"frame": clip[:, t].astype(np.float32), **dict(zip(step.state_names, s))}
                for t, s in enumerate(states)]
  if not samples:
    raise ValueError(f"{_FN_LITERT}: `representative_data` is empty; give clips "
                     f"({n}, T, {h}, {w}, {c}) of typical frames.")
  return samples


def _step_concrete_function(step: _stream4d.Step4D, target: str) -> tuple[Any, Any]:
  """`step.fn` as a TF concrete function with inputs `frame`, the states; dict outputs."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  specs = [jax.ShapeDtypeStruct(s, step.dtype)
           for s in (step.frame_shape, *step.state_shapes)]
  leaf_specs = [jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype))
                for a in step.leaves]
  with _target.export_target(target):
    closed = jax.make_jaxpr(step.fn)(leaf_specs, *specs)

  def jaxpr_fn(leaves, *args):
    return jax.extend.core.jaxpr_as_fun(closed)(*leaves, *args)

  converted = jax2tf.convert(jaxpr_fn, native_serialization_platforms=("cpu",),
                             with_gradient=False)
  constants = [tf.constant(a.astype(s.dtype)) for a, s in zip(step.leaves, leaf_specs)]
  names = ("frame", *step.state_names)
  signature = [tf.TensorSpec(s.shape, tf.as_dtype(step.dtype), name=name)
               for name, s in zip(names, specs)]

  @tf.function(autograph=False, input_signature=signature)
  def serve(*args):
    y, *states = converted(constants, *args)
    return {"output": y, **dict(zip(step.state_names, states))}

  return serve.get_concrete_function(), tf.Module()


def run_litert_stream(model: Any, clip: Any, *, num_threads: int = 2) -> np.ndarray:
  """Streams `clip` `(N, T, H, W, C)` through a flatbuffer of `export_streaming_litert`.

  Frame by frame in the LiteRT interpreter, the states fed back by name.
  Returns the output frames stacked along time, `(N, T, H', W', C')`,
  float32.

  A flatbuffer of `interface="int8"` takes and gives int8 tensors, each
  with `(scale, zero_point)` in the signature runner's
  `get_input_details()[name]["quantization"]` (and the output details).
  This does what a device does with them: each frame is quantized,
  `clip(round(x / scale) + zero_point, -128, 127)`; each state starts as
  its zero point (the int8 of 0.0, the causal padding), not 0, and is fed
  back as it comes out (its output has its input's scale and zero point);
  the output is dequantized, `(q - zero_point) * scale`.
  """
  from interop import _litert

  it = model if hasattr(model, "get_signature_runner") else _litert.interpreter(
      model, num_threads=num_threads)
  runner = it.get_signature_runner()
  ins = runner.get_input_details()
  states = {name: np.full(d["shape"], d["quantization"][1] if d["dtype"] == np.int8 else 0,
                          d["dtype"])
            for name, d in ins.items() if name != "frame"}
  frame, output = ins["frame"], runner.get_output_details()["output"]
  ys = []
  for t in range(np.shape(clip)[1]):
    x = np.asarray(clip[:, t], np.float32)
    if frame["dtype"] == np.int8:
      scale, zero = frame["quantization"]
      x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    out = runner(frame=x, **states)
    y = out.pop("output")
    if output["dtype"] == np.int8:
      scale, zero = output["quantization"]
      y = ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    ys.append(y)
    states = out
  return np.stack(ys, axis=1)
