"""ONNX export: JAX functions, Flax models and Keras (JAX backend) models.

`export_onnx` converts with jax2onnx, which turns a jaxpr into ONNX one
primitive at a time. `dw5d_jax`'s primitives have their plugins in
interop/_onnx_lowering.py: each op becomes one grouped ONNX `Conv`
(`group = C`), with `Transpose`s for channels-last layouts, `Pad`/`Slice`/
`Concat` for border modes and the activation after it. Everything else in
the function (Flax layers, `jax.nn` activations, reshapes, ...) converts by
jax2onnx's own plugins, as far as they reach.

jax2onnx and onnx are imported inside the functions, so `import interop`
stays light.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from dw5d_jax import _target
from interop import _export, _files

_FN = "export_onnx"
_FN_STREAM = "export_streaming_onnx"
# Largest error of an exported model's output, relative to max|expected|
# (tests, `dw5d export --onnx`), by the input's dtype. The convolutions
# accumulate in float32 for every dtype (float16 and bfloat16 inputs are cast
# to float32 around the `Conv`), so the half-precision errors are the output's
# rounding: 2^-11 (float16) and 2^-8 (bfloat16) of a value at most.
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


def export_onnx(
    model_or_fn: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int | None],
    params: Any = None,
    dtype: Any = "float32",
    channel_axis: int = -1,
    constraints: Sequence[str] = (),
    overwrite: bool = False,
) -> str:
  """Exports a JAX function, a Flax model or a Keras model as an ONNX file.

  The model has one input `x` and the function's outputs (`y`, or `y0`,
  `y1`, ... for several). Each `dw5d_jax` op becomes one grouped ONNX
  `Conv` (`group = C`, the kernel reshaped to `(C * M, 1, k...)` as a
  constant), with these ONNX ops around it where needed: `Transpose`
  (channels-last layouts), `Pad` (border modes reflect, edge, circular),
  `Slice` and `Concat` (symmetric), `Cast` (float16/bfloat16), and the
  activation (`Relu`, `Clip`, `Gelu`, `Sigmoid`, `Tanh`, `HardSwish`,
  `Mul`). The rest of the function converts through jax2onnx's plugins.

  Args:
    model_or_fn: a JAX function `fn(x)`, or `fn(params, x)` with `params`
      (e.g. a Flax NNX model split with `nnx.split`:
      `lambda state, x: nnx.merge(graphdef, state)(x)`; a Flax NNX module
      itself also works as `fn(x)`); or a Keras 3 model on the JAX backend
      (its weights are its own).
    path: the `.onnx` file to write (missing parent directories are made).
    input_shape: the shape of `x`: an int per fixed size, `None` per
      symbolic one, named as in `export_savedmodel` (`b, d, h, w` for rank
      5). The channel size must be an int. Symbolic spatial sizes work
      where the ops' pads do not depend on them (VALID, CAUSAL, explicit
      pads, stride 1) or where they are SAME with zero fill on every axis.
    params: the pytree of arrays `fn(params, x)` takes (constants in the
      graph); None for `fn(x)` and Keras models.
    dtype: the dtype of `x`.
    channel_axis: the axis of `input_shape` holding the channels (-1 for
      channels-last, 1 for channels-first).
    constraints: bounds on the symbolic dimensions that `fn` needs, as for
      `export_savedmodel`, e.g. `("h >= 2",)` for a border mode that
      fills 2 positions.
    overwrite: replace an existing file at `path`.

  Returns:
    `path`, as a string.

  Raises:
    ImportError: jax2onnx or onnx is missing (the `onnx` extra).
    TypeError: `input_shape` or `params` of the wrong type.
    ValueError: a `None` channel size; `path` exists (without `overwrite`)
      or cannot be written; `params` with a Keras model; a Keras backend
      other than JAX; a model that fails on `input_shape`; a primitive the
      converter cannot express (the message names it, e.g. a gradient of a
      `dw5d_jax` op, or padding that depends on a symbolic size).

  Example:
    >>> import tempfile, numpy as np, onnxruntime
    >>> import dw5d_jax as dw
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 2), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_onnx(lambda k, x: dw.depthwise_conv3d(x, k, padding_mode="reflect"),
    ...                    tmp.name + "/dw3d.onnx", params=k, input_shape=(None, 6, 7, 8, 4))
    >>> session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    >>> x = np.ones((2, 6, 7, 8, 4), np.float32)
    >>> session.run(None, {"x": x})[0].shape
    (2, 6, 7, 8, 8)
  """
  shape, names = _export._check_input_shape(input_shape, channel_axis, fn=_FN)
  x_dtype = _export._check_dtype(dtype, fn=_FN)
  path = os.fspath(path)
  _files.check_path(_FN, path, overwrite, ".onnx")
  fn = _as_function(model_or_fn, params)
  spec = _export._input_spec(shape, names, x_dtype,
                             _export._check_constraints(constraints, fn=_FN), caller=_FN)
  model = _convert(fn, [spec], ["x"])
  _files.write(path, model.SerializeToString(), ".onnx")
  return path


def export_streaming_onnx(
    init_fn: Callable[[Any, jax.Array], Any],
    step_fn: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]],
    params: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int | None],
    dtype: Any = "float32",
    constraints: Sequence[str] = (),
    overwrite: bool = False,
) -> str:
  """Exports one frame of a stream as an ONNX model with its state as rank-4 inputs and outputs.

  The model computes one step of the stream `init_fn`/`step_fn` (as for
  `export_streaming_litert`: `dw5d_jax.stream_init`/`stream_step`, a
  model's layers' `stream_init`/`stream_step`, or a Keras model's through
  `interop.keras.stream_functions`) on one frame. It takes

  * `frame`: the next frame `(N, H, W, C)` of a clip `(N, T, H, W, C)`;
  * one tensor per stream that keeps frames (a window reaching `e > 1`
    frames back in time): `state` for a single stream, `state_0`,
    `state_1`, ... for a tuple of streams (named after their place in the
    state's tree), each `(N, H, W, (e - 1) * C)`: the stream's last `e - 1`
    input frames side by side along channels, oldest first; zeros before
    the first frame (the causal padding);

  and returns `output`, the output frame `(N, H', W', C')`, and the states
  for the next step as `state_next` (`state_0_next`, ...). The graph keeps
  no state of its own: a step shifts each state by one frame (`Slice`,
  `Concat`) and adds one grouped ONNX `Conv` per time tap
  (`dw5d_jax._stream4d` builds the step, as for LiteRT). Frames are the full
  causal op's output, frame after frame.

  Args:
    init_fn: a JAX function `(params, chunk) -> state`, the state a pytree of
      `dw5d_jax.StreamState`s.
    step_fn: a JAX function `(params, state, chunk) -> (state, y)`, `y` of
      shape `(N, 1, H', W', C')` for a chunk of one frame.
    params: a pytree of arrays (constants in the graph).
    path: the `.onnx` file to write (missing parent directories are made).
    input_shape: the chunk of one frame, `(N, 1, H, W, C)`: `None` for a
      symbolic batch, height or width (named `b`, `h`, `w`), C an int.
    dtype: the dtype of the frames (and the states): float32, float16 or
      bfloat16 (bfloat16 arithmetic computes in float32 between `Cast`s).
    constraints: bounds on the symbolic sizes the step needs, as for
      `export_onnx` (e.g. `("h >= 3",)` for VALID padding).
    overwrite: replace an existing file at `path`.

  Returns:
    `path`, as a string.

  Raises:
    ImportError: jax2onnx or onnx is missing (the `onnx` extra).
    TypeError, ValueError: as `export_onnx` (shapes, dtype, `path`, what the
      converter cannot express); `input_shape` not one frame
      `(N, 1, H, W, C)`; a stream with stride along time, channels-first,
      streamed along another axis, or per example; a state holding anything
      but `StreamState`s; `valid` or `reset` in `step_fn`.

  Example:
    >>> import tempfile, numpy as np, onnxruntime
    >>> import dw5d_jax as dw
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 1), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_streaming_onnx(
    ...     lambda k, c: dw.stream_init(c, k), lambda k, s, c: dw.stream_step(s, c, k), k,
    ...     tmp.name + "/step.onnx", input_shape=(None, 1, 8, 8, 4))
    >>> session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    >>> [(i.name, i.shape) for i in session.get_inputs()]   # 2 frames of 4 channels kept
    [('frame', ['b', 8, 8, 4]), ('state', ['b', 8, 8, 8])]
    >>> y, state = session.run(None, {"frame": np.ones((2, 8, 8, 4), np.float32),
    ...                               "state": np.zeros((2, 8, 8, 8), np.float32)})
    >>> y.shape, state.shape
    ((2, 8, 8, 4), (2, 8, 8, 8))
  """
  from dw5d_jax import _stream4d

  fn = _FN_STREAM
  shape, names = _export._check_input_shape(input_shape, -1, fn=fn)
  x_dtype = _export._check_dtype(dtype, fn=fn)
  if len(shape) != 5 or shape[1] != 1:
    raise ValueError(f"{fn}: `input_shape` must be one frame of a channels-last clip, "
                     f"(N, 1, H, W, C) (a step takes one frame at a time), got "
                     f"{tuple(input_shape)}.")
  path = os.fspath(path)
  _files.check_path(fn, path, overwrite, ".onnx")
  spec = _export._input_spec(shape, names, x_dtype,
                             _export._check_constraints(constraints, fn=fn), caller=fn)
  step = _stream4d.build(init_fn, step_fn, params, spec.shape, x_dtype, fn=fn)
  constants = step.leaves
  specs = [jax.ShapeDtypeStruct(s, x_dtype) for s in (step.frame_shape, *step.state_shapes)]
  model = _convert(lambda frame, *states: step.fn(constants, frame, *states), specs,
                   ["frame", *step.state_names],
                   ["output", *(f"{name}_next" for name in step.state_names)], caller=fn)
  _files.write(path, model.SerializeToString(), ".onnx")
  return path


def run_stream(session: Any, clip: Any) -> np.ndarray:
  """Streams `clip` `(N, T, H, W, C)` through a model of `export_streaming_onnx`.

  Frame by frame in an onnxruntime session, the states starting at zeros
  and fed back by name. Returns the output frames stacked along time,
  `(N, T, H', W', C')`.
  """
  clip = np.asarray(clip)
  n, _, h, w, _ = clip.shape  # a state is (N, H, W, (e - 1) * C), as the frames
  states = {i.name: np.zeros((n, h, w, i.shape[3]), clip.dtype)
            for i in session.get_inputs() if i.name != "frame"}
  names = [o.name for o in session.get_outputs()]
  ys = []
  for t in range(clip.shape[1]):
    out = dict(zip(names, run(session, {"frame": clip[:, t], **states})))
    ys.append(out["output"])
    states = {name: out[f"{name}_next"] for name in states}
  return np.stack(ys, axis=1)


def _as_function(model_or_fn: Any, params: Any) -> Callable[[Any], Any]:
  keras = sys.modules.get("keras")
  if keras is not None and isinstance(model_or_fn, keras.layers.Layer):
    if params is not None:
      raise ValueError(f"{_FN}: `params` must be None for a Keras model (its weights are its "
                       f"own), got {type(params).__name__}.")
    backend = keras.backend.backend()
    if backend != "jax":
      raise ValueError(f"{_FN}: a Keras model on the {backend!r} backend cannot be converted; "
                       f"ONNX export traces Keras models on the JAX backend. Save the model "
                       f"and load it in a process with KERAS_BACKEND=jax (after `import "
                       f"interop.keras` if it uses its layers), then export that.")
    model = model_or_fn
    weights = ([v.value for v in model.trainable_variables],
               [v.value for v in model.non_trainable_variables])
    return lambda x: model.stateless_call(*weights, x, training=False)[0]
  if not callable(model_or_fn):
    raise TypeError(f"{_FN}: `model_or_fn` must be a Keras model or a JAX function fn(x) or "
                    f"fn(params, x), got {type(model_or_fn).__name__}.")
  if params is None:
    return model_or_fn
  leaves, treedef = _export._param_leaves(params, fn=_FN)
  constants = jax.tree_util.tree_unflatten(treedef, leaves)
  return lambda x: model_or_fn(constants, x)


def _convert(fn: Callable[..., Any], specs: Sequence[jax.ShapeDtypeStruct],
             input_names: Sequence[str], output_names: Sequence[str] | None = None, *,
             caller: str = _FN) -> Any:
  """`fn` as an ONNX `ModelProto`: inputs `input_names`, outputs `output_names`.

  Without `output_names`, one output is `y` and several are `y0`, `y1`, ....
  Errors name `caller`.
  """
  try:
    from jax2onnx import to_onnx

    from interop import _onnx_lowering  # noqa: F401  (registers the dw5d plugins)
  except ImportError as err:
    raise ImportError(f"{caller}: ONNX export needs jax2onnx and onnx (`pip install jax2onnx "
                      f"onnx onnxruntime`, or this project's `onnx` extra): {err}") from None
  if output_names is None:
    try:
      out = jax.eval_shape(fn, *specs)
    except Exception as err:  # fn is user code
      raise ValueError(f"{caller}: `model_or_fn` fails on an input of shape "
                       f"{tuple(specs[0].shape)} (`input_shape`): {type(err).__name__}: "
                       f"{err}") from err
    n_out = len(jax.tree_util.tree_leaves(out))
    output_names = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
  try:
    # The export target is a fact the ops carry (and part of jit's cache key:
    # a function jitted before is traced again for it).
    with _target.export_target("onnx"):
      model = to_onnx(fn, inputs=list(specs), model_name="dw5d",
                      input_names=list(input_names), output_names=list(output_names),
                      enable_double_precision=any(s.dtype == np.float64 for s in specs))
  except ValueError as err:
    if str(err).startswith(f"{_FN}:"):  # the plugins' messages
      raise ValueError(caller + str(err)[len(_FN):]) from None
    raise _explain(err, caller) from err
  except NotImplementedError as err:
    raise _explain(err, caller) from err
  except AttributeError as err:
    if "SymbolicScope" not in str(err):
      raise
    # jax2onnx 0.17 loses the scope of symbolic sizes with `constraints` in
    # some lowerings (a gather, as for border modes): its raw AttributeError.
    raise ValueError(f"{caller}: the converter (jax2onnx) cannot carry the symbolic sizes' "
                     f"`constraints` through this graph (AttributeError: {err}). Give the "
                     f"constrained sizes as ints in `input_shape` (or need no constraint, e.g. "
                     f"zero padding).") from err
  return _bfloat16_in_float32(model)


# Ops that onnxruntime's CPU provider has no bfloat16 kernel for (probed with
# onnxruntime 1.32: it has bfloat16 Cast, Reshape, Transpose, Slice, Concat,
# Pad, Gather, Squeeze, Identity, Clip and little else that computes).
_NO_BFLOAT16 = frozenset({
    "Abs", "Add", "Ceil", "Div", "Erf", "Exp", "Expand", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Pow", "Reciprocal",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Sigmoid", "Softmax", "Softplus", "Sqrt",
    "Sub", "Tanh"})


def _bfloat16_in_float32(model: Any) -> Any:
  """Each op of `_NO_BFLOAT16` on bfloat16 tensors as `Cast` to float32, the op, `Cast` back.

  That is how XLA computes bfloat16 arithmetic on CPU (in float32, each
  result rounded to bfloat16), and it lets onnxruntime's CPU provider run
  the graph: jax2onnx writes every `broadcast_in_dim` as `Expand` (the
  library's rank-4 inputs become rank 5 so), a stream's step adds its time
  taps with `Add`, a model's other layers compute in bfloat16. The
  library's own convolutions already compute in float32 between `Cast`s
  (interop/_onnx_lowering.py). Only the main graph is rewritten.
  """
  from onnx import TensorProto, helper

  graph = model.graph
  types = {v.name: v.type.tensor_type.elem_type
           for v in (*graph.input, *graph.value_info, *graph.output)}
  types.update((t.name, t.data_type) for t in graph.initializer)

  def narrow(node):
    return node.op_type in _NO_BFLOAT16 and any(
        types.get(name) == TensorProto.BFLOAT16 for name in node.input)

  if not any(narrow(node) for node in graph.node):
    return model
  nodes = []
  for i, node in enumerate(graph.node):
    if not narrow(node):
      nodes.append(node)
      continue
    for j, name in enumerate(node.input):
      if types.get(name) == TensorProto.BFLOAT16:
        wide = f"dw5d_f32_{i}_in{j}"
        nodes.append(helper.make_node("Cast", [name], [wide], to=TensorProto.FLOAT))
        node.input[j] = wide
    outputs = list(node.output)
    for j, name in enumerate(outputs):
      if name:  # "" is an optional output left out
        node.output[j] = f"dw5d_f32_{i}_out{j}"
    nodes.append(node)
    nodes += [helper.make_node("Cast", [node.output[j]], [name], to=TensorProto.BFLOAT16)
              for j, name in enumerate(outputs) if name]
  del graph.node[:]
  graph.node.extend(nodes)
  return model


def _explain(err: Exception, caller: str) -> ValueError:
  subject = "`model_or_fn`" if caller == _FN else "`step_fn`"
  return ValueError(f"{caller}: the converter (jax2onnx) cannot express part of {subject}: "
                    f"{type(err).__name__}: {err}")


def run(session: Any, feeds: dict[str, Any]) -> list[np.ndarray]:
  """`session.run(None, feeds)` for an onnxruntime session, bfloat16 included.

  onnxruntime's Python API maps no NumPy dtype to bfloat16 (`ml_dtypes`'
  is unknown to it): bfloat16 arrays go in as `OrtValue`s of ONNX type
  BFLOAT16 over the same bytes, and bfloat16 outputs come back as
  `ml_dtypes.bfloat16` arrays copied from the output's buffer.
  """
  bf16 = np.dtype(jax.numpy.bfloat16)
  if (all(np.asarray(a).dtype != bf16 for a in feeds.values())
      and all(o.type != "tensor(bfloat16)" for o in session.get_outputs())):
    return session.run(None, feeds)
  import ctypes

  import onnxruntime
  from onnx import TensorProto

  def value(a):
    a = np.ascontiguousarray(a)
    if a.dtype != bf16:
      return onnxruntime.OrtValue.ortvalue_from_numpy(a)
    return onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16),
                                                                   TensorProto.BFLOAT16)

  def array(v):
    if v.data_type() != "tensor(bfloat16)":
      return v.numpy()
    raw = (ctypes.c_uint16 * (v.tensor_size_in_bytes() // 2)).from_address(v.data_ptr())
    return np.frombuffer(raw, np.uint16).view(bf16).reshape(v.shape()).copy()

  values = {name: value(a) for name, a in feeds.items()}  # alive until the run ends
  return [array(v) for v in session.run_with_ort_values(None, values)]


def onnx_ops(model: Any) -> list[str]:
  """The distinct op types of an ONNX model (a path or a `ModelProto`), in graph order."""
  import onnx

  proto = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
  return list(dict.fromkeys(node.op_type for node in proto.graph.node))
