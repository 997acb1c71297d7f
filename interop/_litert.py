"""LiteRT (TFLite) export with builtin ops only: Keras models and JAX functions.

`export_litert` writes a `.tflite` flatbuffer that the LiteRT interpreter
(the `ai-edge-litert` package) runs on phones and embedded devices without
TensorFlow's Flex delegate: the converter is limited to LiteRT's builtin ops,
and the written flatbuffer's operator codes are read back to make sure.

Two graphs are possible for a JAX function (`dw5d_jax`'s ops inside):

* `"depthwise"` (the default): the function traced for the export target
  `"litert"` (`dw5d_jax._target`), for which the ops lower to grouped 2D
  convolutions (`dw5d_jax/_conv2d.py`), which become DEPTHWISE_CONV_2D;
* `"jax2tf"`: the function as `export_savedmodel` lowers it, whose CPU
  lowering of the ops (the portable "shift" computation) becomes an
  elementwise graph (PAD, SLICE, MUL, ADD per tap).

Under the LiteRT interpreter (XNNPACK, 2 threads) the first ran 5.5-7.2x
faster on a W1-size 2D op, 7.2-8.3x on a W2-size 3D op and 2.6-3.2x on the
demo model (three runs on a loaded 2-core machine; benchmarks/RESULTS.md,
"LiteRT (TFLite) export"). Keras models on the TensorFlow backend convert as
a `tf.function` of `model.stateless_call`; `interop.keras` layers there are
`interop`'s TF ops, which also become DEPTHWISE_CONV_2D. Keras models on the
JAX backend convert as the JAX function `model.stateless_call`, through the
default route. Weights are constants in the graph either way.

TensorFlow and the LiteRT packages are imported inside the functions, so
`import interop` stays light.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core
import numpy as np

from dw5d_jax import _target
from interop import _files

_FN = "export_litert"
QUANTIZE = (None, "float16", "int8")
ROUTES = ("depthwise", "jax2tf")
DEFAULT_ROUTE = "depthwise"
# Largest error of an exported flatbuffer's output, relative to max|expected|,
# by `quantize` (tests, `dw5d export --litert`). Measured on the tests' ops and
# models: float32 up to 2e-7, float16 (weights rounded) up to 3e-4, int8 up to
# 2e-2 on single ops and 3.4e-2 on a small three-layer model, when the
# calibration data covers the input's range (inputs beyond it clip: single
# ops reached 0.1 to 0.25 with 8 calibration samples that did not).
TOLERANCE = {None: 1e-5, "float16": 1e-3, "int8": 5e-2}
# Op names the converter's errors mention; TensorFlow's and StableHLO's dialects.
_OP_IN_ERROR = re.compile(r"'((?:tf|stablehlo|vhlo|mhlo|chlo|tfl)\.[\w.]+)' op")
# What to use instead, for ops users hit with depthwise models.
_HINTS = {
    "Conv3D": "a grouped 3D convolution (e.g. keras.layers.Conv3D(groups=C), or "
              "lax.conv_general_dilated on rank-5 input with feature_group_count) has no "
              "builtin op; for depthwise 3D use interop.keras.DepthwiseConv3D or "
              "dw5d_jax.depthwise_conv3d, which export to DEPTHWISE_CONV_2D",
}


def export_litert(
    model_or_fn: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    params: Any = None,
    quantize: str | None = None,
    representative_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    overwrite: bool = False,
) -> str:
  """Exports a Keras model or a JAX function as a LiteRT (`.tflite`) flatbuffer.

  The flatbuffer uses LiteRT's builtin ops only (no Flex/`SELECT_TF_OPS`, no
  custom ops), so the plain LiteRT interpreter runs it, with the XNNPACK
  delegate on CPU. It takes one float32 input `x` of shape `input_shape`
  and returns the model's outputs (float32 for every `quantize`).

  `dw5d_jax` ops in a JAX function (or a Keras model on the JAX backend)
  become DEPTHWISE_CONV_2D ops: a 2D op per slice is one, a 3D op one per
  depth tap, their results added. That graph ran 5.5-8.3x faster under
  XNNPACK (2 threads) than the elementwise graph of `export_savedmodel`'s
  jax2tf lowering on W1/W2-size ops, 2.6-3.2x on the demo model.

  Args:
    model_or_fn: a Keras 3 model or layer (`interop.keras` layers and Keras's
      own), on the TensorFlow or JAX backend; or a JAX function
      `apply_fn(params, x)` as for `export_savedmodel` (e.g. a Flax NNX model
      split with `nnx.split`: `lambda state, x: nnx.merge(graphdef, state)(x)`).
    path: the `.tflite` file to write (missing parent directories are made).
    input_shape: the shape of `x`, an int per dimension: LiteRT needs static
      shapes.
    params: the pytree of arrays `apply_fn` takes (stored as constants in the
      flatbuffer); None for a Keras model, whose weights are its own.
    quantize: None (float32 weights and compute), `"float16"` (float16
      weights, half the size; computed in float32 on CPU), or `"int8"`
      (post-training full-integer quantization: int8 weights and
      activations, calibrated on `representative_data`; float32 input and
      output). Measured errors: see docs/export.md ("LiteRT").
    representative_data: `"int8"` only: an iterable of float arrays of shape
      `input_shape` (or a function returning one), typical inputs from
      which the converter picks each activation's int8 range; about 100 is
      customary.
    overwrite: replace an existing file at `path`.

  Returns:
    `path`, as a string.

  Raises:
    ImportError: the `ai-edge-litert` package is missing.
    TypeError: `input_shape` not a sequence of ints.
    ValueError: a `None` or symbolic size in `input_shape`; a bad
      `quantize`; `"int8"` without `representative_data`, or data of the
      wrong shape; `path` exists (without `overwrite`), is a directory or
      cannot be written; `params` with a Keras model; a Keras backend other
      than TensorFlow or JAX; a model or function that fails on
      `input_shape`; an op outside LiteRT's builtin set (the message names
      it).

  Example:
    >>> import tempfile, numpy as np
    >>> import dw5d_jax as dw
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 1), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_litert(lambda k, x: dw.depthwise_conv3d(x, k), tmp.name + "/dw3d.tflite",
    ...                      params=k, input_shape=(1, 8, 8, 8, 4))
    >>> sorted(litert_ops(path).ops)
    ['ADD', 'DEPTHWISE_CONV_2D', 'PAD', 'RESHAPE', 'SLICE']
  """
  shape = _check_input_shape(input_shape)
  _check_quantize(quantize, representative_data)
  _litert_module("schema_py_generated")  # the builtin-ops check needs it: fail early
  path = os.fspath(path)
  _files.check_path(_FN, path, overwrite, ".tflite")
  samples = (None if representative_data is None
             else _representative_samples(representative_data, shape))
  if _keras_backend(model_or_fn) is not None:
    if params is not None:
      raise ValueError(f"{_FN}: `params` is for JAX functions; a Keras model exports its "
                       f"own weights, so pass params=None (got {type(params).__name__}).")
    concrete, owner = keras_concrete_function(model_or_fn, shape)
  elif callable(model_or_fn):
    concrete, owner = jax_concrete_function(model_or_fn, params, shape)
  else:
    raise TypeError(f"{_FN}: `model_or_fn` must be a Keras model or a JAX function "
                    f"apply_fn(params, x), got {type(model_or_fn).__name__}.")
  flatbuffer = convert(concrete, owner, quantize=quantize, samples=samples)
  _files.write(path, flatbuffer, ".tflite")
  return path


# ----------------------------------------------------------------------------
# Argument checks.


def _check_input_shape(input_shape: Any, fn: str = _FN) -> tuple[int, ...]:
  if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
    raise TypeError(f"{fn}: `input_shape` must be a sequence of ints, got {input_shape!r}.")
  symbolic = [i for i, d in enumerate(input_shape) if d is None or isinstance(d, str)]
  if symbolic:
    raise ValueError(
        f"{fn}: LiteRT needs static shapes: every size in `input_shape` must be an int, "
        f"got {tuple(input_shape)!r} (symbolic at axis {', '.join(map(str, symbolic))}). "
        f"Export once per input size you serve, or use export_savedmodel for symbolic "
        f"sizes.")
  if not input_shape or not all(_is_int(d) and d >= 1 for d in input_shape):
    raise TypeError(f"{fn}: `input_shape` must be a non-empty sequence of positive ints, "
                    f"got {input_shape!r}.")
  return tuple(int(d) for d in input_shape)


def _check_quantize(quantize: Any, representative_data: Any, fn: str = _FN,
                    what: str = "arrays of shape `input_shape`") -> None:
  if quantize not in QUANTIZE:
    raise ValueError(f"{fn}: `quantize` must be None, 'float16' or 'int8', got "
                     f"{quantize!r}.")
  if quantize == "int8" and representative_data is None:
    raise ValueError(f"{fn}: quantize='int8' needs `representative_data`: typical inputs "
                     f"({what}, about 100) from which the converter "
                     f"calibrates each activation's int8 range.")
  if quantize != "int8" and representative_data is not None:
    raise ValueError(f"{fn}: `representative_data` calibrates int8 quantization; it is "
                     f"unused with quantize={quantize!r}, so pass None or quantize='int8'.")


def _representative_samples(data: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
  items = data() if callable(data) else data
  samples = []
  for i, item in enumerate(items):
    a = np.asarray(item)
    if a.shape != shape or a.dtype.kind != "f":
      raise ValueError(f"{_FN}: `representative_data` item {i} must be a float array of "
                       f"shape `input_shape` {shape}, got {a.dtype} {a.shape}.")
    samples.append(a.astype(np.float32))
  if not samples:
    raise ValueError(f"{_FN}: `representative_data` is empty; give typical inputs of shape "
                     f"{shape} (about 100).")
  return samples


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _keras_backend(obj: Any) -> str | None:
  """The Keras backend of a Keras layer or model, or None for anything else."""
  keras = sys.modules.get("keras")  # a Keras object means Keras is imported
  if keras is None or not isinstance(obj, keras.layers.Layer):
    return None
  return keras.backend.backend()


# ----------------------------------------------------------------------------
# Models and functions as TensorFlow concrete functions.


def keras_concrete_function(model: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
  """`model` as a concrete function of one float32 `x` of `shape`, and its owner.

  Raises:
    ValueError: a backend other than TensorFlow or JAX; `model` fails on `shape`.
  """
  import keras

  backend = keras.backend.backend()
  if backend not in ("jax", "tensorflow"):
    raise ValueError(
        f"{_FN}: a Keras model on the {backend!r} backend cannot be converted; LiteRT export "
        f"runs on the TensorFlow or JAX backend. Save the model (model.save('m.keras')) and "
        f"load it in a process with KERAS_BACKEND=tensorflow (after `import interop.keras` "
        f"if it uses its layers), then export that.")
  if not model.built:
    model(np.zeros(shape, np.float32))
  if backend == "jax":
    weights = ([v.value for v in model.trainable_variables],
               [v.value for v in model.non_trainable_variables])

    def apply_fn(weights, x):
      return model.stateless_call(*weights, x, training=False)[0]

    return jax_concrete_function(apply_fn, weights, shape)
  import tensorflow as tf

  # The weights as constants: captured as variables, the converter would keep
  # some as uninitialised resource variables (VAR_HANDLE, READ_VARIABLE).
  weights = ([tf.constant(v.value) for v in model.trainable_variables],
             [tf.constant(v.value) for v in model.non_trainable_variables])
  fn = tf.function(lambda x: model.stateless_call(*weights, x, training=False)[0],
                   input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
  try:
    return fn.get_concrete_function(), model
  except Exception as err:  # the model is user code: any error means the same
    raise ValueError(f"{_FN}: the Keras model fails on an input of shape {shape} "
                     f"(`input_shape`): {type(err).__name__}: {err}") from err


def jax_concrete_function(apply_fn: Callable[[Any, jax.Array], Any], params: Any,
                          shape: tuple[int, ...], *,
                          route: str = DEFAULT_ROUTE) -> tuple[Any, Any]:
  """`apply_fn(params, x)` as a concrete function of one float32 `x`, and its owner.

  `route` is `"depthwise"` (`dw5d_jax` ops as grouped 2D convolutions) or
  `"jax2tf"` (as `export_savedmodel` lowers them); see the module docstring.

  Raises:
    ValueError: `apply_fn` fails on `shape` with `params`; a bad `route`.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  if route not in ROUTES:
    raise ValueError(f"{_FN}: `route` must be one of {ROUTES}, got {route!r}.")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  leaves = [np.asarray(a) for a in leaves]
  leaf_specs = [jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype))
                for a in leaves]

  def flat_fn(leaves, x):
    return jax.tree_util.tree_leaves(apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), x))

  closed = _trace(flat_fn, leaf_specs, jax.ShapeDtypeStruct(shape, np.float32), route)

  def jaxpr_fn(leaves, x):
    return jax.extend.core.jaxpr_as_fun(closed)(*leaves, x)

  converted = jax2tf.convert(jaxpr_fn, native_serialization_platforms=("cpu",),
                             with_gradient=False)
  # The params as constants, as for Keras models (see keras_concrete_function).
  constants = [tf.constant(a.astype(s.dtype)) for a, s in zip(leaves, leaf_specs)]

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
  def serve(x):
    ys = converted(constants, x)
    return ys[0] if len(ys) == 1 else tuple(ys)

  # The converter takes the function's owner (an empty module: nothing to track).
  return serve.get_concrete_function(), tf.Module()


def _trace(flat_fn, leaf_specs, x_spec, route) -> Any:
  # The export target is part of jit's cache key: a jitted apply_fn traced
  # before is traced again here, its ops for the target.
  target = "litert" if route == "depthwise" else None
  try:
    with _target.export_target(target):
      return jax.make_jaxpr(flat_fn)(leaf_specs, x_spec)
  except Exception as err:  # apply_fn is user code
    raise ValueError(f"{_FN}: `model_or_fn` fails on an input of shape {x_spec.shape} "
                     f"(`input_shape`) with `params`: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------
# Conversion and the builtin-ops check.


def convert(concrete: Any, owner: Any, *, quantize: str | None = None,
            samples: Sequence[Any] | None = None, int8_interface: bool = False,
            fn: str = _FN) -> bytes:
  """Converts a concrete function to a flatbuffer of LiteRT builtin ops.

  `int8_interface` (with `quantize="int8"` only): the inputs and outputs
  are int8 tensors (the converter's `inference_input_type` and
  `inference_output_type`), each with its own scale and zero point, rather
  than float32 ones (de)quantized inside the graph.

  Raises:
    ValueError: the converter fails (the message names the ops it could not
      express) or the flatbuffer holds Flex or custom ops.
  """
  import tensorflow as tf

  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], owner)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantize == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == "int8":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # A sample is one input, or a dict of a signature's inputs by name.
    converter.representative_dataset = lambda: (s if isinstance(s, dict) else [s]
                                                for s in samples)
    if int8_interface:
      converter.inference_input_type = tf.int8
      converter.inference_output_type = tf.int8
  try:
    with warnings.catch_warnings():  # int8 calibration runs TF's own deprecated interpreter
      warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated",
                              category=UserWarning)
      flatbuffer = converter.convert()
  except Exception as err:  # ConverterError, or errors of the calibration run
    raise _conversion_error(err, quantize, fn) from err
  check_builtin_ops(flatbuffer, fn)
  return flatbuffer


def _conversion_error(err: Exception, quantize: str | None, fn: str = _FN) -> ValueError:
  text = str(err)
  ops = list(dict.fromkeys(_OP_IN_ERROR.findall(text)))
  select = re.search(r"TF Select ops: ([^\n]*)", text)
  if select:
    ops += [f"tf.{op.strip()}" for op in select.group(1).split(",")
            if f"tf.{op.strip()}" not in ops]
  # The converter lists each offending op with its operand types after "Details:".
  details = re.search(r"Details:\n((?:\t[^\n]*\n?)+)", text)
  said = ("\n".join(line.strip() for line in details.group(1).splitlines())
          if details else _first_lines(text))
  if not ops:
    return ValueError(f"{fn}: the LiteRT converter failed"
                      f"{' to quantize to int8' if quantize == 'int8' else ''}: "
                      f"{type(err).__name__}: {said}")
  hints = [h for name, h in _HINTS.items() if any(op.split(".")[-1] == name for op in ops)]
  return ValueError(
      f"{fn}: LiteRT's builtin op set cannot express {', '.join(ops)}: the flatbuffer "
      f"would need TensorFlow's Flex ops (SELECT_TF_OPS) or custom ops, which this export "
      f"refuses." + (f" Note: {'; '.join(hints)}." if hints else "")
      + f"\nThe converter said: {said}")


def _first_lines(text: str, n: int = 6) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


class LiteRTOps(NamedTuple):
  """What `litert_ops` found in a `.tflite` flatbuffer.

  Attributes:
    ops: the distinct operator codes, in the model's order: builtin ops by
      their `BuiltinOperator` name (`DEPTHWISE_CONV_2D`), custom ops (Flex
      ops included: `FlexConv3D`) by their custom code.
    not_builtin: those of `ops` outside LiteRT's builtin set.
  """

  ops: tuple[str, ...]
  not_builtin: tuple[str, ...]

  @property
  def all_builtin(self) -> bool:
    """Whether the plain LiteRT interpreter runs every op (no Flex, no custom ops)."""
    return not self.not_builtin


def litert_ops(model: str | os.PathLike | bytes) -> LiteRTOps:
  """Lists a `.tflite` model's ops and whether all are LiteRT builtins.

  Reads the flatbuffer's operator codes with the schema that ships with
  `ai-edge-litert` (no interpreter, no TensorFlow).

  Args:
    model: the path of a `.tflite` file, or its bytes.

  Returns:
    A `LiteRTOps`: `.ops` (distinct names, in the model's order),
    `.not_builtin` (Flex and custom ops) and `.all_builtin`.

  Raises:
    ImportError: the `ai-edge-litert` package is missing.
    ValueError: `model` cannot be read, or is not a TFLite flatbuffer.

  Example:
    >>> import tempfile, numpy as np
    >>> import dw5d_jax as dw
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 4, 1), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_litert(lambda k, x: dw.depthwise_conv2d(x, k), tmp.name + "/dw.tflite",
    ...                      params=k, input_shape=(1, 8, 8, 4))
    >>> found = litert_ops(path)
    >>> found.all_builtin, "DEPTHWISE_CONV_2D" in found.ops
    (True, True)
  """
  fn = "litert_ops"
  if isinstance(model, (bytes, bytearray)):
    flatbuffer = bytes(model)
  else:
    shown = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    try:
      with open(shown, "rb") as f:
        flatbuffer = f.read()
    except (OSError, TypeError) as err:
      raise ValueError(f"{fn}: `model` must be a .tflite path or its bytes; {shown!r} cannot "
                       f"be read: {err}") from None
  schema = _litert_module("schema_py_generated", fn)
  if len(flatbuffer) < 8 or flatbuffer[4:8] != b"TFL3":
    raise ValueError(f"{fn}: `model` is not a TFLite flatbuffer (no 'TFL3' identifier in "
                     f"its first 8 bytes).")
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  ops = []
  for code in schema.ModelT.InitFromPackedBuf(flatbuffer, 0).operatorCodes or ():
    if code.customCode:
      ops.append(code.customCode.decode())
    else:  # codes past 127 live in builtinCode only (the schema's deprecation scheme)
      ops.append(names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?"))
  ops = tuple(dict.fromkeys(ops))
  builtin = set(names.values()) - {"CUSTOM"}
  return LiteRTOps(ops, tuple(op for op in ops if op not in builtin))


def check_builtin_ops(flatbuffer: bytes, fn: str = _FN) -> None:
  """Raises a ValueError naming the Flex or custom ops in `flatbuffer`, if any."""
  bad = litert_ops(flatbuffer).not_builtin
  if bad:
    flex = [op for op in bad if op.startswith("Flex")]
    raise ValueError(
        f"{fn}: the flatbuffer holds ops outside LiteRT's builtin set: {', '.join(bad)}"
        + (f" ({', '.join(flex)}: TensorFlow ops run by the Flex delegate, SELECT_TF_OPS)"
           if flex else "")
        + "; the plain LiteRT interpreter cannot run it.")


def _litert_module(name: str, fn: str = _FN) -> Any:
  """`ai_edge_litert.<name>`, or an ImportError that says how to install it."""
  import importlib

  try:
    return importlib.import_module(f"ai_edge_litert.{name}")
  except ImportError as err:
    raise ImportError(f"{fn}: LiteRT export and its checks need the ai-edge-litert package "
                      f"(`pip install ai-edge-litert`, or this project's `litert` extra): "
                      f"{err}") from None


# ----------------------------------------------------------------------------
# Running a flatbuffer (tests, `dw5d export --litert`, benchmarks).


def interpreter(model: str | os.PathLike | bytes, *, num_threads: int = 2) -> Any:
  """A LiteRT interpreter (XNNPACK delegate on CPU) with tensors allocated."""
  make = _litert_module("interpreter").Interpreter
  if isinstance(model, bytes):
    it = make(model_content=model, num_threads=num_threads)
  else:
    it = make(model_path=os.fspath(model), num_threads=num_threads)
  it.allocate_tensors()
  return it


def run(it: Any, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
  """Runs `it` on `x`: its output, or the list of its outputs."""
  it.set_tensor(it.get_input_details()[0]["index"], np.asarray(x, np.float32))
  it.invoke()
  outs = [it.get_tensor(d["index"]) for d in it.get_output_details()]
  return outs[0] if len(outs) == 1 else outs


# ----------------------------------------------------------------------------
# Rank-5 tensors of a unit axis out of a flatbuffer (GPU delegates refuse 5D).

# Ops that compute the same on tensors of any rank (elementwise, with
# NumPy broadcasting, or along the last axis), so a unit axis dropped from
# every rank-5 operand and result changes nothing. RESHAPE and BROADCAST_TO
# take the new shape as an input, rewritten with it.
_RANK_FREE = frozenset({
    "ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE", "POW",
    "LOGISTIC", "TANH", "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LEAKY_RELU",
    "HARD_SWISH", "GELU", "EXP", "LOG", "NEG", "ABS", "SQRT", "RSQRT", "SQUARE", "SIN", "COS",
    "ERF", "FLOOR", "CEIL", "ROUND", "SIGN", "CAST", "QUANTIZE", "DEQUANTIZE",
    "FULLY_CONNECTED", "SELECT", "SELECT_V2", "RESHAPE", "BROADCAST_TO",
    # comparisons (an erf's branches, Keras's exact GELU)
    "LESS", "LESS_EQUAL", "GREATER", "GREATER_EQUAL", "EQUAL", "NOT_EQUAL", "LOGICAL_AND",
    "LOGICAL_OR", "LOGICAL_NOT"})
_SHAPE_INPUT = frozenset({"RESHAPE", "BROADCAST_TO"})


def drop_unit_axis(flatbuffer: bytes, axis: int = 1) -> bytes | None:
  """`flatbuffer` with `axis` (of size 1) dropped from every rank-5 tensor, or None.

  A stream's step computes on one frame, `(N, 1, H, W, C)` where a model's
  layers see a chunk; elementwise ops there (a bias, an activation) leave
  rank-5 tensors whose time axis has size 1. Dropping that axis gives the
  same graph over rank-4 tensors. None where a rank-5 tensor is not of that
  kind or meets an op outside `_RANK_FREE` (the graph is then kept as it
  is); the caller checks the result numerically.
  """
  schema = _litert_module("schema_py_generated")
  import flatbuffers

  model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  codes = [names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "?")
           for c in model.operatorCodes or ()]
  users: dict[int, int] = {}  # buffer -> tensors using it, over every subgraph
  for sub in model.subgraphs:
    for t in sub.tensors:
      users[t.buffer] = users.get(t.buffer, 0) + 1
  changed = False
  for sub in model.subgraphs:
    five = {i for i, t in enumerate(sub.tensors)
            if t.shape is not None and len(t.shape) == 5}
    if not five:
      continue
    if any(sub.tensors[i].shape[axis] != 1 for i in five) or five & {
        *sub.inputs, *sub.outputs}:  # the model's own inputs and outputs keep their shapes
      return None
    for op in sub.operators:
      touched = {*op.inputs, *op.outputs} & five
      name = codes[op.opcodeIndex]
      if not touched:
        continue
      if name not in _RANK_FREE:
        return None
      if name in _SHAPE_INPUT and op.outputs[0] in five:
        shape_tensor = sub.tensors[op.inputs[1]]
        buffer = model.buffers[shape_tensor.buffer]
        if users[shape_tensor.buffer] != 1 or buffer.data is None:
          return None
        dims = np.frombuffer(bytes(np.asarray(buffer.data, np.uint8)), "<i4")
        if len(dims) != 5:
          return None
        buffer.data = np.frombuffer(np.delete(dims, axis).astype("<i4").tobytes(), np.uint8)
        shape_tensor.shape = np.asarray([4], np.int32)
        options = op.builtinOptions
        if getattr(options, "newShape", None) is not None:
          options.newShape = np.delete(np.asarray(options.newShape), axis).astype(np.int32)
    for i in five:
      t = sub.tensors[i]
      q = t.quantization
      if q is not None and q.scale is not None and len(q.scale) > 1:
        if q.quantizedDimension == axis:
          return None
        q.quantizedDimension -= q.quantizedDimension > axis
      t.shape = np.delete(np.asarray(t.shape), axis).astype(np.int32)
      if t.shapeSignature is not None and len(t.shapeSignature) == 5:
        t.shapeSignature = np.delete(np.asarray(t.shapeSignature), axis).astype(np.int32)
    changed = True
  if not changed:
    return flatbuffer
  builder = flatbuffers.Builder(len(flatbuffer) + 1024)
  builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
  return bytes(builder.Output())


def max_rank(model: str | os.PathLike | bytes) -> int:
  """The largest rank of a flatbuffer's tensors."""
  it = interpreter(model)
  return max(len(d["shape"]) for d in it.get_tensor_details())
