"""ONNX export (interop.export_onnx, interop/_onnx_lowering.py), run in onnxruntime.

Expected values come from the float64 reference (`depthwise_reference`, a
direct sum over taps) with bias and activation applied in float64 NumPy
(`ACTIVATIONS` below, written from their definitions). Errors are relative
to max|expected|, within `interop._onnx.TOLERANCE` (by dtype). Keras models
(JAX backend) are checked in tests/keras_backend_checks.py, which runs in a
process per Keras backend.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from scipy.special import erf

import dw5d_jax as dw
import interop
from dw5d_jax._reference import depthwise_reference
from interop import _onnx
from interop._onnx_lowering import OPS
from tests.helpers import random_array


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


ACTIVATIONS = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "relu6": lambda z: np.clip(z, 0, 6),
    "gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z * _sigmoid(z),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "hard_swish": lambda z: z * np.clip(z + 3, 0, 6) / 6,
}

# (op, layout, axes, x shape with None for symbolic sizes, served shape, kernel, options).
# Together: both ops, both layouts (rank 4 and 5), every padding kind and border mode,
# strides, dilations, multipliers 1-3, bias and every activation, symbolic sizes.
CASES = [
    ("3d", "NDHWC", "DHW", (None, 6, 7, 8, 3), (2, 6, 7, 8, 3), (3, 3, 3, 3, 2),
     dict(strides=2, padding="SAME", padding_mode="reflect", activation="relu")),
    ("3d", "NCDHW", "DHW", (None, 2, None, None, None), (1, 2, 7, 6, 5), (3, 2, 3, 2, 1),
     dict(padding="VALID", dilations=(2, 1, 1)), ("d >= 5", "h >= 2", "w >= 3")),
    ("3d", "NDHWC", "DHW", (None, None, None, None, 4), (2, 5, 6, 7, 4), (2, 3, 3, 4, 3),
     dict(padding="CAUSAL", padding_mode=("edge", "symmetric", "circular"),
          activation="gelu"), ("h >= 2", "w >= 2")),
    ("3d", "NCDHW", "DHW", (None, 3, 7, 6, 8), (2, 3, 7, 6, 8), (3, 3, 2, 3, 2),
     dict(strides=(1, 2, 3), padding=((2, 1), (0, 2), (1, 1)), padding_mode="symmetric",
          activation="silu")),
    ("3d", "NDHWC", "DHW", (None, None, None, None, 2), (1, 9, 8, 7, 2), (3, 3, 3, 2, 1),
     dict(strides=2, padding="SAME", activation="hard_swish")),  # symbolic SAME: auto_pad
    ("3d", "NDHWC", "DHW", (1, 5, 8, 6, 3), (1, 5, 8, 6, 3), (3, 3, 3, 3, 1),
     dict(dilations=(1, 2, 2), padding="SAME", padding_mode="circular", activation="tanh")),
    ("2d", "NHWC", "HW", (None, 7, None, 3), (2, 7, 9, 3), (3, 3, 3, 2),
     dict(strides=(2, 1), padding="SAME", padding_mode="edge", activation="relu6")),
    ("2d", "NCHW", "HW", (None, 4, 8, 7), (3, 4, 8, 7), (2, 3, 4, 3),
     dict(padding=((1, 0), (2, 2)), padding_mode="reflect", dilations=(2, 1),
          activation="sigmoid")),
    ("2d", "NDHWC", "DW", (None, 5, 4, 7, 2), (2, 5, 4, 7, 2), (3, 2, 2, 2),
     dict(strides=2, padding="VALID", activation="gelu_tanh")),
    ("2d", "NCDHW", "HW", (None, 3, 4, 6, 7), (1, 3, 4, 6, 7), (3, 3, 3, 1),
     dict(padding="SAME", padding_mode=("symmetric", "circular"))),
]


def _expected(op, layout, axes, x, k, options, bias):
  conv = {key: v for key, v in options.items() if key != "activation"}
  z = depthwise_reference(x, k, axes=axes, data_format=layout, **conv)
  if bias is not None:
    z = z + bias.reshape((-1, *(1,) * (x.ndim - 2)) if layout[1] == "C" else (-1,))
  return ACTIVATIONS[options.get("activation")](z)


# What jax2onnx itself emits for the library's reshapes of a rank-4 input (to rank 5 and
# back) under a symbolic batch; the op's own nodes are `OPS`.
SHAPE_OPS = {"Concat", "Expand", "Gather", "Reshape", "Shape", "Squeeze", "Unsqueeze"}


def _count(path, op_type):
  return sum(node.op_type == op_type for node in onnx.load(os.fspath(path)).graph.node)


def _session(path):
  return onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def _error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[6]}")
def test_op_against_reference(tmp_path, rng, case, dtype):
  """Every case in every dtype onnxruntime runs: float16 and bfloat16 in and out, the
  `Conv` in float32 between `Cast`s. The reference takes the same (rounded) inputs."""
  op, layout, axes, x_shape, served, k_shape, options, *constraints = case
  k = random_array(rng, k_shape, dtype)
  cm = k_shape[-2] * k_shape[-1]
  bias = random_array(rng, (cm,), dtype) if "activation" in options else None
  fn = dw.depthwise_conv3d if op == "3d" else dw.depthwise_conv2d
  kwargs = dict(options, data_format=layout, **({} if op == "3d" else {"axes": axes}))

  def apply(params, x):
    return fn(x, params["k"], bias=params.get("b"), **kwargs)

  params = {"k": k} if bias is None else {"k": k, "b": bias}
  path = interop.export_onnx(apply, tmp_path / "m.onnx", params=params, input_shape=x_shape,
                             dtype=dtype, channel_axis=layout.index("C") - len(layout),
                             constraints=constraints[0] if constraints else ())
  ops = _onnx.onnx_ops(path)
  assert _count(path, "Conv") == 1 and set(ops) <= set(OPS) | SHAPE_OPS, ops
  if len(layout) == 5:
    assert set(ops) <= set(OPS), ops
  assert ("Cast" in ops) == (dtype != "float32"), ops
  session = _session(path)
  # Another batch size through the same model where the batch is symbolic.
  for batch in (served[0], served[0] + 1)[:1 + (x_shape[0] is None)]:
    x = random_array(rng, (batch, *served[1:]), dtype)
    want = _expected(op, layout, axes, x, k, options, bias)
    (y,) = _onnx.run(session, {"x": x})
    assert y.dtype == np.dtype(jax.numpy.dtype(dtype))
    assert _error(y, want) <= _onnx.TOLERANCE[dtype]


def test_flax_model_symbolic_batch(tmp_path, rng):
  """A Flax NNX model of the library's layers and Flax's own, split into (state, x)."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dw = dw.nn.DepthwiseConv3D(4, 3, depth_multiplier=2, padding_mode="reflect",
                                      activation="gelu", rngs=rngs)
      self.dw2 = dw.nn.DepthwiseConv3D(8, (3, 1, 1), strides=(2, 1, 1), rngs=rngs)
      self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
      return self.head(jax.nn.relu(self.dw2(self.dw(x))).mean(axis=(1, 2, 3)))

  model = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  path = interop.export_onnx(lambda s, x: nnx.merge(graphdef, s)(x), tmp_path / "net.onnx",
                             params=state, input_shape=(None, 6, 5, 7, 4))
  assert _count(path, "Conv") == 2
  session = _session(path)
  x = random_array(rng, (4, 6, 5, 7, 4))
  want = model(x)  # once (eager Flax compiles per shape); batches 1 and 3 in onnxruntime
  for part in (slice(0, 1), slice(1, 4)):
    assert _error(session.run(None, {"x": x[part]})[0], want[part]) <= _onnx.TOLERANCE["float32"]


K = np.random.default_rng(1).standard_normal((3, 3, 3, 2, 1)).astype(np.float32)


def test_gradient_is_refused_naming_the_primitive(tmp_path):
  def grad_fn(k, x):
    return jax.grad(lambda v: dw.depthwise_conv3d(v, k).sum())(x)

  with pytest.raises(ValueError, match=r"export_onnx: the primitive `dw5d_depthwise` with "
                     r"op='dx' \(a gradient\) has no ONNX form; ONNX export covers the forward "
                     r"ops"):
    interop.export_onnx(grad_fn, tmp_path / "g.onnx", params=K, input_shape=(1, 4, 4, 4, 2))


def test_symbolic_padding_with_modes_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"export_onnx: `dw5d_depthwise` with padding .* and "
                     r"padding_mode \('reflect', 'reflect', 'reflect'\) depends on a symbolic "
                     r"spatial size .*; give those spatial sizes as ints in `input_shape`"):
    interop.export_onnx(
        lambda k, x: dw.depthwise_conv3d(x, k, strides=2, padding_mode="reflect"),
        tmp_path / "m.onnx", params=K, input_shape=(None, None, 8, 8, 2),
        constraints=("d >= 2",))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(input_shape=(1, 4, 4, 4, None)), ValueError,
     r"export_onnx: the channel dimension of `input_shape` \(axis -1\) must be an int"),
    (dict(input_shape="1,4,4,4,2"), TypeError, r"export_onnx: `input_shape` must be a "
     r"sequence of ints and None"),
    (dict(input_shape=(1, 4, 4, 4, 3)), ValueError, r"export_onnx: `model_or_fn` fails on an "
     r"input of shape \(1, 4, 4, 4, 3\)"),
])
def test_bad_arguments(tmp_path, kwargs, error, message):
  with pytest.raises(error, match=message):
    interop.export_onnx(lambda k, x: dw.depthwise_conv3d(x, k), tmp_path / "m.onnx",
                        params=K, **kwargs)


def test_existing_file_needs_overwrite(tmp_path):
  path = tmp_path / "m.onnx"
  path.write_bytes(b"old")
  with pytest.raises(ValueError, match=r"export_onnx: `path` '.*m\.onnx' exists; choose a new "
                     r"path or pass overwrite=True to replace it\."):
    interop.export_onnx(lambda k, x: dw.depthwise_conv3d(x, k), path, params=K,
                        input_shape=(1, 4, 4, 4, 2))
  assert path.read_bytes() == b"old"
  interop.export_onnx(lambda k, x: dw.depthwise_conv3d(x, k), path, params=K,
                      input_shape=(1, 4, 4, 4, 2), overwrite=True)
  assert "Conv" in _onnx.onnx_ops(path)


# ----------------------------------------------------------------------------
# Streaming: one frame per step, the state as named rank-4 inputs and outputs
# (interop.export_streaming_onnx), run frame by frame in onnxruntime against
# the float64 reference and the full causal op (dw5d_jax) on the whole clip.

# (kernel shape, stream options, kept frames e - 1, height): a 3D op dilated
# in time (e = 5) and strided in H; a 2D op over (D, W) (each time tap a 1D
# convolution along W, kt = 2: the new state is the frame); a 2D op over
# (H, W) that carries time (no state at all), with a border mode. Height
# None is symbolic (a border mode would need the constraint `h >= 2`, which
# jax2onnx 0.17's gather lowering cannot copy: test_stream_errors).
STREAMS = [
    ((3, 3, 2, 3, 2), dict(dilations=(2, 1, 1), strides=(1, 2, 1)), 4, None),
    ((2, 3, 3, 2), dict(axes="DW"), 1, None),
    ((3, 3, 3, 1), dict(axes="HW", padding_mode="reflect"), 0, 6),
]


def _stream_padding(options):
  axes = options.get("axes", "DHW")
  return tuple("CAUSAL" if a == "D" else "SAME" for a in axes)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: str(s[1]))
def test_stream_step_equals_the_full_causal_op(tmp_path, rng, stream, dtype):
  k_shape, options, kept, height = stream
  k = random_array(rng, k_shape, dtype)
  c = k_shape[-2]
  path = interop.export_streaming_onnx(
      lambda k, ch: dw.stream_init(ch, k, **options),
      lambda k, s, ch: dw.stream_step(s, ch, k, **options), k, tmp_path / "step.onnx",
      input_shape=(None, 1, height, 8, c), dtype=dtype)  # symbolic batch
  session = _session(path)
  inputs = {i.name: i.shape for i in session.get_inputs()}
  outputs = {o.name: o.shape for o in session.get_outputs()}
  h = height or "h"
  if kept:
    assert inputs == {"frame": ["b", h, 8, c], "state": ["b", h, 8, kept * c]}
    assert list(outputs) == ["output", "state_next"]
    assert outputs["state_next"] == inputs["state"]
  else:
    assert inputs == {"frame": ["b", h, 8, c]} and list(outputs) == ["output"]
  ops = _onnx.onnx_ops(path)
  assert set(ops) <= set(OPS) | SHAPE_OPS | {"Add"}, ops
  assert _count(path, "Conv") == (1 if options.get("axes") == "HW" else k_shape[0])  # per tap
  conv = dict(options, padding=_stream_padding(options))
  for batch, rows in ((2, height or 9), (1, height or 5)):  # two sizes, one model
    x = random_array(rng, (batch, 7, rows, 8, c), dtype)
    got = _onnx.run_stream(session, x)
    assert got.dtype == np.dtype(jax.numpy.dtype(dtype))
    want = depthwise_reference(x, k, **{"axes": "DHW", **conv})
    assert _error(got, want) <= _onnx.TOLERANCE[dtype]
    full = dw.depthwise_conv3d if len(k_shape) == 5 else dw.depthwise_conv2d
    assert _error(got, full(x, k, **conv)) <= _onnx.TOLERANCE[dtype]


def test_stream_of_a_model_of_layers_steps_like_its_call(tmp_path, rng):
  """Two streaming Flax layers (bias, activations) with a pointwise layer between."""
  from tests.test_stream4d import make_net

  net, params, init, step = make_net(rng)
  path = interop.export_streaming_onnx(init, step, params, tmp_path / "net.onnx",
                                       input_shape=(None, 1, 5, 6, 3))
  session = _session(path)
  assert {i.name: i.shape for i in session.get_inputs()} == {
      "frame": ["b", 5, 6, 3], "state_0": ["b", 5, 6, 6], "state_1": ["b", 5, 6, 8]}
  assert [o.name for o in session.get_outputs()] == ["output", "state_0_next", "state_1_next"]
  assert all(len(v.shape) == 4 for v in (*session.get_inputs(), *session.get_outputs()))
  x = random_array(rng, (2, 6, 5, 6, 3))
  got = _onnx.run_stream(session, x)
  assert _error(got, np.asarray(net(x), np.float64)) <= _onnx.TOLERANCE["float32"]


def test_stream_errors(tmp_path):
  """Unsupported streams and bad arguments are refused by name, and nothing is written."""
  def args(**kw):
    return (lambda k, c: dw.stream_init(c, k, **kw), lambda k, s, c: dw.stream_step(s, c, k, **kw),
            K, tmp_path / "s.onnx")

  with pytest.raises(ValueError, match=r"export_streaming_onnx: `input_shape` must be one frame "
                                       r"of a channels-last clip, \(N, 1, H, W, C\) .* got "
                                       r"\(1, 3, 8, 8, 2\)"):
    interop.export_streaming_onnx(*args(), input_shape=(1, 3, 8, 8, 2))
  with pytest.raises(ValueError, match=r"export_streaming_onnx: the stream of `state` has "
                                       r"stride 2 along the streamed axis D"):
    interop.export_streaming_onnx(*args(strides=(2, 1, 1)), input_shape=(1, 1, 8, 8, 2))
  with pytest.raises(ValueError, match=r"export_streaming_onnx: the channel dimension of "
                                       r"`input_shape` \(axis -1\) must be an int"):
    interop.export_streaming_onnx(*args(), input_shape=(1, 1, 8, 8, None))
  with pytest.raises(TypeError, match=r"export_streaming_onnx: `dtype` must be a dtype"):
    interop.export_streaming_onnx(*args(), input_shape=(1, 1, 8, 8, 2), dtype="half-ish")
  # A border mode with a symbolic height needs `h >= 2`, which jax2onnx 0.17's
  # gather lowering loses (a raw AttributeError inside the converter).
  with pytest.raises(ValueError, match=r"export_streaming_onnx: the converter \(jax2onnx\) "
                                       r"cannot carry the symbolic sizes' `constraints` .* "
                                       r"as ints in `input_shape`"):
    interop.export_streaming_onnx(
        lambda k, c: dw.stream_init(c, k, axes="HW", padding_mode="reflect"),
        lambda k, s, c: dw.stream_step(s, c, k, axes="HW", padding_mode="reflect"),
        K[0], tmp_path / "s.onnx", input_shape=(None, 1, None, 8, 2), constraints=("h >= 2",))
  assert not list(tmp_path.iterdir())
