"""LiteRT export (interop._litert, public as interop.export_litert).

Each flatbuffer is run in the LiteRT interpreter (`ai-edge-litert`, XNNPACK).
Expected values: the float64 reference (`dw5d_jax._reference`) for single
ops, the JAX model itself for a Flax model from `dw5d_jax.nn`; Keras models
are checked per backend in subprocesses (tests/litert_keras_checks.py).
Errors are relative to max|expected|, within `interop._litert.TOLERANCE`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dw5d_jax as dw
import interop
from dw5d_jax._conv2d import depthwise2d_lowering
from dw5d_jax._reference import depthwise_reference
from interop import _litert
from interop._litert import TOLERANCE
from tests.helpers import Case, random_array, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERAS_CHECKS = pathlib.Path(__file__).with_name("litert_keras_checks.py")
QUANTIZE = (None, "float16", "int8")


def _error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _calibration(rng, x, n=8) -> list[np.ndarray]:
  """Calibration data covering x's range (x and `n` draws like it)."""
  return [x] + [random_array(rng, x.shape) for _ in range(n)]


def _export_and_run(tmp_path, fn, params, x, rng, quantize=None, name="m"):
  path = interop.export_litert(
      fn, tmp_path / f"{name}-{quantize}.tflite", params=params, input_shape=x.shape,
      quantize=quantize,
      representative_data=_calibration(rng, x) if quantize == "int8" else None)
  found = interop.litert_ops(path)
  assert found.all_builtin, found
  return _litert.run(_litert.interpreter(path), x), set(found.ops)


# ----------------------------------------------------------------------------
# Single ops against the float64 reference.

OP_CASES = [
    Case("2d", "NDHWC", "HW", (1, 5, 9, 10, 4), (3, 3, 4, 2), 1, 1, "SAME"),
    Case("2d", "NDHWC", "DW", (2, 6, 5, 9, 3), (3, 2, 3, 1), (1, 2), 1, "SAME"),
    Case("2d", "NCDHW", "WD", (1, 3, 7, 4, 9), (2, 3, 3, 1), 1, (2, 1), "VALID"),
    Case("2d", "NCHW", "HW", (2, 3, 9, 8), (3, 3, 3, 2), 2, 1, "SAME"),
    Case("3d", "NDHWC", "DHW", (1, 9, 10, 11, 4), (3, 2, 3, 4, 2), (2, 1, 2), (1, 2, 1),
         "SAME"),
    Case("3d", "NCDHW", "DHW", (2, 3, 7, 8, 9), (3, 3, 3, 3, 1), 2, 1, "VALID"),
    Case("3d", "NDHWC", "DHW", (1, 6, 7, 8, 2), (2, 3, 3, 2, 2), 1, 1,
         ((1, 0), (2, 1), (0, 3))),
]


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{c.op}-{c.layout}-{c.axes}")
def test_op_is_depthwise_conv2d_graph_matching_reference(tmp_path, rng, case):
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  y, ops = _export_and_run(tmp_path, lambda k, x: run(case, x, k), k, x, rng)
  assert "DEPTHWISE_CONV_2D" in ops
  assert not ops & {"MUL", "BROADCAST_TO", "CONV_3D"}, ops  # no elementwise taps
  assert _error(y, case.expected(x, k)) <= TOLERANCE[None]


def test_padding_modes_match_reference(tmp_path, rng):
  """Border modes: the input padded by slices and reversals, then DEPTHWISE_CONV_2D."""
  for j, (case, mode) in enumerate(((OP_CASES[4], ("reflect", "edge", "circular")),
                                    (OP_CASES[1], "symmetric"))):
    case = dataclasses.replace(case, padding_mode=mode)
    x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
    y, ops = _export_and_run(tmp_path, lambda k, x, c=case: run(c, x, k), k, x, rng,
                             name=f"m{j}")
    assert "DEPTHWISE_CONV_2D" in ops
    assert not ops & {"MUL", "CONV_3D"}, ops  # (edge repeats a row: BROADCAST_TO)
    assert _error(y, case.expected(x, k)) <= TOLERANCE[None], case.name


@pytest.mark.parametrize("quantize", ["float16", "int8"])
def test_quantized_op_matches_reference(tmp_path, rng, quantize):
  case = OP_CASES[4]
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  y, ops = _export_and_run(tmp_path, lambda k, x: run(case, x, k), k, x, rng, quantize)
  assert "DEPTHWISE_CONV_2D" in ops
  err = _error(y, case.expected(x, k))
  assert err <= TOLERANCE[quantize]
  assert err > TOLERANCE[None]  # it did quantize


def test_lowering_matches_reference_in_jax(rng):
  """The substituted lowering on its own (no converter): every OP_CASES row, in JAX."""
  from dw5d_jax import _args

  for case in OP_CASES:
    x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
    kw = case.kwargs()
    layout = _args.check_layout("t", x, case.layout, allowed_5d=True, allowed_4d=True)
    x5, k5, spec = _args.normalize(
        "t", jnp.asarray(x), jnp.asarray(k), conv_axes=case.axes, layout=layout,
        strides=_args.int_tuple("t", "s", kw["strides"], len(case.axes), case.axes),
        dilations=_args.int_tuple("t", "d", kw["dilations"], len(case.axes),
                                  case.axes),
        padding=_args.check_padding("t", case.padding, case.axes), precision=None,
        preferred=None)
    y = depthwise2d_lowering(x5, k5, spec).reshape(case.expected(x, k).shape)
    assert _error(y, case.expected(x, k)) <= TOLERANCE[None], case


def test_jax2tf_route_is_elementwise_and_matches_reference(rng):
  case = OP_CASES[4]
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  concrete, owner = _litert.jax_concrete_function(lambda k, x: run(case, x, k), k, x.shape,
                                                  route="jax2tf")
  flatbuffer = _litert.convert(concrete, owner)
  ops = set(interop.litert_ops(flatbuffer).ops)
  assert "DEPTHWISE_CONV_2D" not in ops and {"MUL", "ADD", "PAD"} <= ops, ops
  y = _litert.run(_litert.interpreter(flatbuffer), x)
  assert _error(y, case.expected(x, k)) <= TOLERANCE[None]


def test_epilogue_is_depthwise_conv2d_graph_matching_reference(tmp_path, rng):
  """Bias and activation: the unfused formula around the substituted convolution."""
  case = OP_CASES[4]
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  b = random_array(rng, (8,))
  y, ops = _export_and_run(
      tmp_path, lambda p, x: run(case, x, p[0], bias=p[1], activation="relu6"), (k, b), x, rng)
  assert "DEPTHWISE_CONV_2D" in ops
  assert not ops & {"MUL", "BROADCAST_TO", "CONV_3D"}, ops
  want = np.clip(case.expected(x, k) + b, 0, 6)
  assert _error(y, want) <= TOLERANCE[None]


def test_jitted_function_traced_before_still_gets_depthwise_graph(tmp_path, rng):
  k = random_array(rng, (3, 3, 3, 2, 1))
  x = random_array(rng, (1, 5, 6, 7, 2))
  fn = jax.jit(lambda k, x: dw.depthwise_conv3d(x, k))
  fn(k, x)  # cached trace: the shift lowering
  y, ops = _export_and_run(tmp_path, fn, k, x, rng)
  assert "DEPTHWISE_CONV_2D" in ops and "MUL" not in ops, ops
  assert _error(y, depthwise_reference(x, k, axes="DHW")) <= TOLERANCE[None]
  np.testing.assert_allclose(fn(k, x), y, rtol=1e-5, atol=1e-5)  # jit still works after


# ----------------------------------------------------------------------------
# A Flax NNX model from dw5d_jax.nn.


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv3 = dw.nn.DepthwiseConv3D(2, 3, depth_multiplier=3, rngs=rngs)
    self.conv2 = dw.nn.DepthwiseConv2D(6, (3, 2), axes="DW", strides=2, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = self.conv2(nnx.gelu(self.conv3(x)))
    return self.head(h.mean(axis=(1, 2, 3)))


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_flax_model_matches_jax(tmp_path, rng, quantize):
  model = _Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = random_array(rng, (2, 6, 8, 7, 2))
  y, ops = _export_and_run(tmp_path, lambda s, x: nnx.merge(graphdef, s)(x), state, x, rng,
                           quantize)
  assert "DEPTHWISE_CONV_2D" in ops
  assert _error(y, model(x)) <= TOLERANCE[quantize]


# ----------------------------------------------------------------------------
# Keras models: one process per backend.


# The JAX run checks the float32 export (the JAX route, which the Flax tests
# above cover quantized) and saves its model; the TensorFlow run checks the rest.
_JAX_SELECT = ("requested_backend or (model_matches_keras and None) or save_model "
               "or other_backends")


def _keras_run(backend: str, exchange: pathlib.Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "KERAS_BACKEND": backend, "DW5D_KERAS_EXCHANGE": str(exchange)}
  select = ["-k", _JAX_SELECT] if backend == "jax" else []
  return subprocess.run(
      [sys.executable, "-m", "pytest", str(KERAS_CHECKS), "-q", "-p", "no:cacheprovider",
       "-rA", *select], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def keras_exchange(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("litert_keras")


@pytest.fixture(scope="module")
def keras_jax_run(keras_exchange) -> subprocess.CompletedProcess:
  return _keras_run("jax", keras_exchange)


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_keras_models(request, keras_exchange, keras_jax_run, backend):
  # The JAX run saves its model first; the TensorFlow run exports it too.
  proc = keras_jax_run if backend == "jax" else _keras_run("tensorflow", keras_exchange)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"LiteRT checks on the {backend} backend failed:\n{out[-12000:]}"
  summary = out.strip().splitlines()[-1]
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed.group(1)) >= (4 if backend == "jax" else 12), summary
  assert not re.search(r"error|failed", summary), summary
  if backend == "tensorflow":  # the model the JAX run saved was exported
    assert ("PASSED tests/litert_keras_checks.py::test_model_saved_on_jax_backend_exports_"
            "from_tensorflow[None]") in out, out[-12000:]


# ----------------------------------------------------------------------------
# Bad input.


def _op(k, x):
  return dw.depthwise_conv3d(x, k)


K3 = np.ones((3, 3, 3, 2, 1), np.float32)


@pytest.mark.parametrize("shape", [(None, 4, 4, 4, 2), (1, "d", 4, 4, 2)])
def test_symbolic_size_is_refused(tmp_path, shape):
  with pytest.raises(ValueError, match=r"export_litert: LiteRT needs static shapes: every "
                     r"size in `input_shape` must be an int, got .* \(symbolic at axis [01]\)"):
    interop.export_litert(_op, tmp_path / "m.tflite", params=K3, input_shape=shape)
  assert not list(tmp_path.iterdir())


def test_op_outside_builtin_set_is_named(tmp_path):
  def grouped_conv3d(k, x):  # what Keras's Conv3D(groups=C) is on the JAX backend
    return jax.lax.conv_general_dilated(
        x, k.reshape(3, 3, 3, 1, 2), (1, 1, 1), "SAME", feature_group_count=2,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

  with pytest.raises(ValueError, match=r"(?s)export_litert: LiteRT's builtin op set cannot "
                     r"express tf\.Conv3D: the flatbuffer would need TensorFlow's Flex ops "
                     r"\(SELECT_TF_OPS\) or custom ops, which this export refuses\. Note: a "
                     r"grouped 3D convolution .*interop\.keras\.DepthwiseConv3D or "
                     r"dw5d_jax\.depthwise_conv3d.*The converter said: tf\.Conv3D\("):
    interop.export_litert(grouped_conv3d, tmp_path / "m.tflite", params=K3,
                          input_shape=(1, 4, 4, 4, 2))
  assert not list(tmp_path.iterdir())


def test_flex_ops_in_a_flatbuffer_are_named():
  import tensorflow as tf

  fn = tf.function(lambda x: tf.nn.conv3d(x, tf.ones((3, 3, 3, 1, 2)), [1] * 5, "SAME"),
                   input_signature=[tf.TensorSpec((1, 4, 4, 4, 2))])
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                         tf.lite.OpsSet.SELECT_TF_OPS]
  flatbuffer = converter.convert()
  found = interop.litert_ops(flatbuffer)
  assert found.not_builtin == ("FlexConv3D",) and not found.all_builtin, found
  with pytest.raises(ValueError, match=r"export_litert: the flatbuffer holds ops outside "
                     r"LiteRT's builtin set: FlexConv3D \(FlexConv3D: TensorFlow ops run by "
                     r"the Flex delegate, SELECT_TF_OPS\); the plain LiteRT interpreter "
                     r"cannot run it\."):
    _litert.check_builtin_ops(flatbuffer)


def test_int8_needs_representative_data(tmp_path):
  with pytest.raises(ValueError, match=r"export_litert: quantize='int8' needs "
                     r"`representative_data`: typical inputs"):
    interop.export_litert(_op, tmp_path / "m.tflite", params=K3, input_shape=(1, 4, 4, 4, 2),
                          quantize="int8")


@pytest.mark.parametrize("quantize, data, message", [
    ("int4", None, r"`quantize` must be None, 'float16' or 'int8', got 'int4'\."),
    ("float16", [np.zeros((1, 4, 4, 4, 2))], r"`representative_data` calibrates int8 "
     r"quantization; it is unused with quantize='float16'"),
    ("int8", [np.zeros((1, 4, 4, 4, 3))], r"`representative_data` item 0 must be a float "
     r"array of shape `input_shape` \(1, 4, 4, 4, 2\), got float64 \(1, 4, 4, 4, 3\)\."),
    ("int8", lambda: iter(()), r"`representative_data` is empty"),
])
def test_bad_quantize_arguments(tmp_path, quantize, data, message):
  with pytest.raises(ValueError, match="export_litert: " + message):
    interop.export_litert(_op, tmp_path / "m.tflite", params=K3, input_shape=(1, 4, 4, 4, 2),
                          quantize=quantize, representative_data=data)


def test_unwritable_path(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match=r"export_litert: `path` '.*file/sub/m\.tflite' cannot "
                     r"be written \(.*\); choose a path in a writable directory\."):
    interop.export_litert(_op, blocker / "sub" / "m.tflite", params=K3,
                          input_shape=(1, 4, 4, 4, 2))
  with pytest.raises(ValueError, match=r"export_litert: `path` '.*' is a directory; give the "
                     r"path of the \.tflite file to write\."):
    interop.export_litert(_op, tmp_path, params=K3, input_shape=(1, 4, 4, 4, 2))


def test_existing_file_needs_overwrite(tmp_path):
  path = tmp_path / "m.tflite"
  path.write_bytes(b"old")
  with pytest.raises(ValueError, match=r"export_litert: `path` '.*m\.tflite' exists; choose a "
                     r"new path or pass overwrite=True to replace it\."):
    interop.export_litert(_op, path, params=K3, input_shape=(1, 4, 4, 4, 2))
  assert path.read_bytes() == b"old"
  assert interop.export_litert(_op, path, params=K3, input_shape=(1, 4, 4, 4, 2),
                               overwrite=True) == str(path)
  assert "DEPTHWISE_CONV_2D" in interop.litert_ops(path).ops
  assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]  # no temporary files left


def test_function_failing_on_input_shape(tmp_path):
  with pytest.raises(ValueError, match=r"export_litert: `model_or_fn` fails on an input of "
                     r"shape \(1, 4, 4, 4, 3\) \(`input_shape`\) with `params`: ValueError: "
                     r"depthwise_conv3d: `kernel` in_channels"):
    interop.export_litert(_op, tmp_path / "m.tflite", params=K3, input_shape=(1, 4, 4, 4, 3))


def test_not_a_model_or_function(tmp_path):
  with pytest.raises(TypeError, match=r"export_litert: `model_or_fn` must be a Keras model or "
                     r"a JAX function apply_fn\(params, x\), got ndarray\."):
    interop.export_litert(K3, tmp_path / "m.tflite", input_shape=(1, 4, 4, 4, 2))


def test_litert_ops_errors(tmp_path):
  with pytest.raises(ValueError, match=r"litert_ops: `model` must be a \.tflite path or its "
                     r"bytes; '.*missing\.tflite' cannot be read"):
    interop.litert_ops(tmp_path / "missing.tflite")
  (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x04onnx-but-not-tflite")
  with pytest.raises(ValueError, match=r"litert_ops: `model` is not a TFLite flatbuffer \(no "
                     r"'TFL3' identifier in its first 8 bytes\)\."):
    interop.litert_ops(tmp_path / "m.onnx")
