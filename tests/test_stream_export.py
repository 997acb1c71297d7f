"""Streaming SavedModels and LiteRT steps (interop._stream_export), loaded back here.

The exported stream must give, chunk by chunk, the full model on the whole
sequence: expected values come from the float64 reference
(`dw5d_jax._reference.depthwise_reference`) on the whole sequence. Serving
without JAX is in test_savedmodel_tf_only.py. LiteRT steps run frame by
frame in the LiteRT interpreter.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import dw5d_jax as dw
import interop
import interop._stream_export
from dw5d_jax._reference import depthwise_reference
from tests.helpers import assert_close, random_array

# A strided causal depthwise layer (stride 2 in time), a pointwise matmul and
# a dilated causal depthwise layer fed the real frames of the first
# (`valid=emitted`): with chunks of 3 frames the first emits 2, 1, 2, ...
CONV1 = dict(strides=(2, 1, 1), padding=("CAUSAL", "SAME", "SAME"))
CONV2 = dict(dilations=(2, 1, 1), padding=("CAUSAL", "SAME", (1, 0)))


def model_params(rng):
  return {"k1": random_array(rng, (2, 3, 3, 3, 2)), "w": random_array(rng, (6, 4)),
          "k2": random_array(rng, (3, 1, 2, 4, 1))}


def init_fn(p, chunk):
  hidden = jax.ShapeDtypeStruct((*chunk.shape[:-1], p["w"].shape[1]), chunk.dtype)
  return dw.stream_init(chunk, p["k1"], **CONV1), dw.stream_init(hidden, p["k2"], **CONV2)


def step_fn(p, state, chunk):
  s1, s2 = state
  s1, h = dw.stream_step(s1, chunk, p["k1"], **CONV1)
  s2, y = dw.stream_step(s2, jnp.einsum("...c,cd->...d", h, p["w"]), p["k2"],
                         valid=s1.emitted, **CONV2)
  return (s1, s2), y


def model_reference(p, x):
  h = depthwise_reference(x, p["k1"], axes="DHW", **CONV1) @ p["w"].astype(np.float64)
  return depthwise_reference(h, p["k2"], axes="DHW", **CONV2)


def gather(steps, emitted):
  """The real frames of every step's output, concatenated along time."""
  return np.concatenate([y[:, :int(n)] for y, n in zip(steps, emitted)], axis=1)


def test_stream_round_trip(tmp_path, rng):
  params = model_params(rng)
  path = interop.export_streaming_savedmodel(init_fn, step_fn, params, tmp_path / "m",
                                             input_shape=(None, None, None, None, 3))
  model = interop.load_savedmodel(path)
  assert sorted(model.signatures) == ["initial_state", "serving_default"]
  names = [f"state_{i}_{field}" for i in (0, 1)
           for field in ("buffer", "emitted", "head", "phase")]
  for shape, length in [((1, 9, 5, 4, 3), 3), ((2, 5, 3, 6, 3), 1), ((1, 4, 2, 2, 3), 4)]:
    x = random_array(rng, shape)
    state = model.initial_state(x[:, :1])
    assert sorted(state) == names
    sig_state = model.signatures["initial_state"](chunk=tf.constant(x[:, :1]))
    ys, emitted, sig_ys, sig_emitted = [], [], [], []
    for t in range(0, shape[1], length):
      state, y = model.step(state, x[:, t:t + length])
      ys.append(y.numpy()), emitted.append(state["state_1_emitted"].numpy())
      out = model.signatures["serving_default"](chunk=tf.constant(x[:, t:t + length]),
                                                **sig_state)
      sig_state = {n: out[n] for n in names}
      sig_ys.append(out["output"].numpy()), sig_emitted.append(out["state_1_emitted"].numpy())
    want = model_reference(params, x)
    assert_close(gather(ys, emitted), want, err_msg=f"step at {shape}, chunks of {length}")
    assert_close(gather(sig_ys, sig_emitted), want, err_msg=f"signature at {shape}")
  assert not any(v.trainable for v in model.params)


def test_per_example_stream_round_trip(tmp_path, rng):
  """Per-example valid and reset enter the SavedModel; it steps as the JAX per-example step
  (which test_streaming.py checks against separate streams and the reference)."""
  k = random_array(rng, (3, 2, 3, 3, 1))
  kw = dict(strides=(2, 1, 1))

  def init(k, chunk):
    return dw.stream_init(chunk, k, per_example=True, **kw)

  def step(k, state, chunk, valid, reset):
    return dw.stream_step(state, chunk, k, valid=valid, reset=reset, **kw)

  path = interop.export_streaming_savedmodel(init, step, k, tmp_path / "m", per_example=True,
                                             input_shape=(None, None, None, None, 3))
  model = interop.load_savedmodel(path)
  n, length = 3, 2
  x = random_array(rng, (n, 5 * length, 4, 5, 3))
  state = model.initial_state(x[:, :length])
  assert state["state_emitted"].shape == (n,)
  sig_state = model.signatures["initial_state"](chunk=tf.constant(x[:, :length]))
  jax_state = init(k, x[:, :length])
  jax_step = jax.jit(lambda s, c, v, r: step(k, s, c, v, r))
  for t in range(0, x.shape[1], length):
    chunk = x[:, t:t + length]
    valid = rng.integers(0, length + 1, n).astype(np.int32)
    reset = rng.random(n) < 0.3
    state, y = model.step(state, chunk, valid, reset)
    out = model.signatures["serving_default"](chunk=tf.constant(chunk), valid=tf.constant(valid),
                                              reset=tf.constant(reset), **sig_state)
    sig_state = {name: out[name] for name in state}
    jax_state, want = jax_step(jax_state, chunk, valid, reset)
    np.testing.assert_array_equal(state["state_emitted"].numpy(), jax_state.emitted)
    np.testing.assert_array_equal(out["state_phase"].numpy(), jax_state.phase)
    assert_close(y.numpy(), want, err_msg=f"step at t={t}")
    assert_close(out["output"].numpy(), want, err_msg=f"signature at t={t}")


def test_docstring_examples():
  failures, tried = doctest.testmod(interop._stream_export, optionflags=doctest.ELLIPSIS)
  assert tried > 0
  assert failures == 0


K = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 1)).astype(np.float32)


def init_one(k, chunk):
  return dw.stream_init(chunk, k)


def step_one(k, state, chunk):
  return dw.stream_step(state, chunk, k)


def test_errors(tmp_path):
  """Argument checks name this function; a mismatch is explained as by export_savedmodel."""
  shape = (None, None, None, None, 4)
  with pytest.raises(ValueError, match=r"export_streaming_savedmodel: `step_fn` must return "
                     r"the state with the structure, shapes and dtypes `init_fn` gives it; "
                     r"`init_fn` gives \[\('.buffer', \(b, 3, h, w, 4\), 'float32'\), "
                     r"\('.head', \(\), 'int32'\), \('.phase', \(\), 'int32'\), "
                     r"\('.emitted', \(\), 'int32'\)\], `step_fn` returns "
                     r"\[\('', \(b, 3, h, w, 4\), 'float32'\)\]\."):
    interop.export_streaming_savedmodel(
        init_one, lambda k, s, c: (s.buffer, step_one(k, s, c)[1]), K, tmp_path / "a",
        input_shape=shape)
  with pytest.raises(ValueError, match=r"export_streaming_savedmodel: `step_fn` must return "
                     r"`\(state, y\)` with `y` one array, got PyTreeDef\(\{'y': \*\}\)\."):
    interop.export_streaming_savedmodel(
        init_one, lambda k, s, c: (step_one(k, s, c)[0], {"y": c}), K, tmp_path / "b",
        input_shape=shape)
  with pytest.raises(ValueError, match=r"export_streaming_savedmodel: `init_fn` then "
                     r"`step_fn` fails on an input of shape \(64, 64, 64, 64, 3\) .* so "
                     r"`input_shape` does not match `init_fn` and `step_fn` and `params`: "):
    interop.export_streaming_savedmodel(init_one, step_one, K, tmp_path / "c",
                                        input_shape=(None, None, None, None, 3))
  with pytest.raises(ValueError, match=r"export_streaming_savedmodel: the channel dimension "
                     r"of `input_shape` \(axis -1\) must be an int"):
    interop.export_streaming_savedmodel(init_one, step_one, K, tmp_path / "d",
                                        input_shape=(None,) * 5)
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / "x").write_text("")
  with pytest.raises(ValueError, match=r"export_streaming_savedmodel: `path` '.*e' exists "
                     r"and is not empty"):
    interop.export_streaming_savedmodel(init_one, step_one, K, tmp_path / "e",
                                        input_shape=shape)


# ----------------------------------------------------------------------------
# LiteRT: one frame per step, the state as named rank-4 tensors
# (interop.export_streaming_litert), run frame by frame in the LiteRT
# interpreter against the full causal op on the whole clip.

LITERT_OP = dict(dilations=(2, 1, 1), strides=(1, 2, 1))  # e = 5: 4 frames kept


def _tensor_ranks(path) -> int:
  from interop import _litert
  return max(len(d["shape"]) for d in _litert.interpreter(path).get_tensor_details())


def _int8_bound(path, k, x_max) -> float:
  """A worst-case bound on an int8 step's error for one op, from its quantization steps.

  With `s` the largest activation scale in the graph: the frame and the
  state are rounded once each (<= s / 2, twice: <= s), which the taps
  multiply by at most sum|k| over one output's window; each tap's output,
  each ADD and the output are rounded once (<= s / 2 each, 2 kd + 1 of
  them); per-channel int8 weights are off by at most max|k| / 254 each,
  times max|x|, over the window's K taps.
  """
  from interop import _litert
  s = max(d["quantization"][0] for d in _litert.interpreter(path).get_tensor_details()
          if d["dtype"] == np.int8 and d["quantization"][0] > 0)
  window = np.abs(k).reshape(-1, *k.shape[-2:]).sum(axis=0).max()
  taps = np.prod(k.shape[:-2])
  return float(window * s + (2 * k.shape[0] + 1) * s / 2
               + taps * np.abs(k).max() / 254 * x_max)


def _litert_stream(tmp_path, init, step, params, x, rng, quantize, name):
  calibration = [x, random_array(rng, x.shape)] if quantize == "int8" else None
  path = interop.export_streaming_litert(
      init, step, params, tmp_path / f"{name}-{quantize}.tflite",
      input_shape=(x.shape[0], 1, *x.shape[2:]), quantize=quantize,
      representative_data=calibration)
  found = interop.litert_ops(path)
  assert found.all_builtin and not {"CONV_3D", "WHILE", "GATHER"} & set(found.ops), found
  return path, interop._stream_export.run_litert_stream(path, x)


@pytest.mark.parametrize("quantize", [None, "float16", "int8"])
def test_litert_op_step_equals_the_full_causal_op(tmp_path, rng, quantize):
  x, k = random_array(rng, (2, 7, 9, 8, 3)), random_array(rng, (3, 3, 2, 3, 2))
  path, got = _litert_stream(
      tmp_path, lambda k, c: dw.stream_init(c, k, **LITERT_OP),
      lambda k, s, c: dw.stream_step(s, c, k, **LITERT_OP), k, x, rng, quantize, "op")
  runner = interop._litert.interpreter(path).get_signature_runner()
  shapes = {n: tuple(d["shape"]) for n, d in runner.get_input_details().items()}
  assert shapes == {"frame": (2, 9, 8, 3), "state": (2, 9, 8, 12)}
  assert {n: tuple(d["shape"]) for n, d in runner.get_output_details().items()} == {
      "output": (2, 5, 8, 6), "state": (2, 9, 8, 12)}
  assert _tensor_ranks(path) <= 4  # every tensor of the graph, for GPU delegates
  assert "DEPTHWISE_CONV_2D" in interop.litert_ops(path).ops
  want = depthwise_reference(x, k, axes="DHW", padding=("CAUSAL", "SAME", "SAME"), **LITERT_OP)
  err = np.abs(got - want).max()
  if quantize == "int8":
    # Within the worst case of its quantization steps (which is loose: 0.23
    # measured against a bound of 4.2, max|y| 17), and the typical int8 error.
    bound = _int8_bound(path, k, np.abs(x).max())
    assert err <= bound and bound < 0.25 * np.abs(want).max(), (err, bound)
    # The state is int8 inside, quantized and dequantized with one scale, so
    # feeding it back through the float32 interface loses nothing.
    it = interop._litert.interpreter(path)
    state_in = runner.get_input_details()["state"]["index"]
    state_out = runner.get_output_details()["state"]["index"]
    ops = it._get_ops_details()
    q_in = [o["outputs"][0] for o in ops if o["op_name"] == "QUANTIZE"
            and o["inputs"][0] == state_in]
    q_out = [o["inputs"][0] for o in ops if o["op_name"] == "DEQUANTIZE"
             and o["outputs"][0] == state_out]
    details = {d["index"]: d for d in it.get_tensor_details()}
    assert len(q_in) == len(q_out) == 1 and details[q_in[0]]["dtype"] == np.int8
    assert details[q_in[0]]["quantization"] == details[q_out[0]]["quantization"]
  assert err <= interop._litert.TOLERANCE[quantize] * np.abs(want).max(), err


def test_litert_2d_op_per_slice_with_a_one_frame_ring(tmp_path, rng):
  # axes="DW": each time tap a 1D convolution along W; kt = 2 keeps one frame,
  # so the new state is the frame itself.
  x, k = random_array(rng, (1, 5, 4, 7, 2)), random_array(rng, (2, 3, 2, 3))
  kw = dict(axes="DW")
  path, got = _litert_stream(tmp_path, lambda k, c: dw.stream_init(c, k, **kw),
                             lambda k, s, c: dw.stream_step(s, c, k, **kw), k, x, rng, None,
                             "dw")
  assert _tensor_ranks(path) <= 4
  assert_close(got, depthwise_reference(x, k, axes="DW", padding=("CAUSAL", "SAME")))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_litert_model_of_layers_steps_like_its_call(tmp_path, rng, quantize):
  from tests.test_stream4d import make_net

  net, params, init, step = make_net(rng)
  x = random_array(rng, (2, 6, 5, 6, 3))
  path, got = _litert_stream(tmp_path, init, step, params, x, rng, quantize, "net")
  runner = interop._litert.interpreter(path).get_signature_runner()
  assert sorted(runner.get_input_details()) == ["frame", "state_0", "state_1"]
  assert all(len(d["shape"]) == 4 for d in runner.get_input_details().values())
  # The layers' bias and activations, and the pointwise layer, ran on (N, 1, H, W, C)
  # chunks; their unit time axis is dropped from the graph.
  assert _tensor_ranks(path) <= 4
  want = np.asarray(net(x), np.float64)  # the model on the whole clip
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= interop._litert.TOLERANCE[quantize], err


def test_litert_keeps_rank_5_where_an_op_needs_it(tmp_path, rng):
  # A per-frame op outside the rank-free set (REVERSE_V2 along W) on the 5D
  # chunk: the unit axis stays, and the step is still right.
  x, k = random_array(rng, (1, 4, 5, 6, 2)), random_array(rng, (2, 3, 3, 2, 1))

  def step(k, s, c):
    s, y = dw.stream_step(s, c, k)
    return s, jnp.flip(y, axis=3) * 2.0

  path, got = _litert_stream(tmp_path, lambda k, c: dw.stream_init(c, k), step, k, x, rng,
                             None, "flip")
  assert _tensor_ranks(path) == 5
  want = depthwise_reference(x, k, axes="DHW", padding=("CAUSAL", "SAME", "SAME"))
  assert_close(got, np.flip(want, axis=3) * 2.0)


def test_litert_errors(tmp_path):
  """Unsupported streams and bad arguments are refused by name, before converting."""
  args = (init_one, step_one, K, tmp_path / "s.tflite")
  with pytest.raises(ValueError, match=r"export_streaming_litert: LiteRT needs static shapes"):
    interop.export_streaming_litert(*args, input_shape=(None, 1, 8, 8, 4))
  with pytest.raises(ValueError, match=r"export_streaming_litert: `input_shape` must be one "
                                       r"frame .* got \(1, 3, 8, 8, 4\)"):
    interop.export_streaming_litert(*args, input_shape=(1, 3, 8, 8, 4))
  with pytest.raises(ValueError, match=r"export_streaming_litert: quantize='int8' needs "
                                       r"`representative_data`: typical inputs \(clips"):
    interop.export_streaming_litert(*args, input_shape=(1, 1, 8, 8, 4), quantize="int8")
  with pytest.raises(ValueError, match=r"export_streaming_litert: `representative_data` item 0 "
                                       r"must be a float clip \(1, T, 8, 8, 4\), got float32 "
                                       r"\(1, 8, 8, 4\)"):
    interop.export_streaming_litert(*args, input_shape=(1, 1, 8, 8, 4), quantize="int8",
                                    representative_data=[np.ones((1, 8, 8, 4), np.float32)])
  with pytest.raises(ValueError, match=r"export_streaming_litert: the stream of `state` has "
                                       r"stride 2 along the streamed axis D"):
    interop.export_streaming_litert(
        lambda k, c: dw.stream_init(c, k, strides=(2, 1, 1)),
        lambda k, s, c: dw.stream_step(s, c, k, strides=(2, 1, 1)), K,
        tmp_path / "t.tflite", input_shape=(1, 1, 8, 8, 4))
  with pytest.raises(ValueError, match=r"export_streaming_litert: `interface` must be "
                                       r"'float32' or 'int8', got 'uint8'\."):
    interop.export_streaming_litert(*args, input_shape=(1, 1, 8, 8, 4), interface="uint8")
  with pytest.raises(ValueError, match=r"export_streaming_litert: interface='int8' \(int8 "
                                       r"frame, state and output tensors\) needs "
                                       r"quantize='int8', got quantize='float16'\."):
    interop.export_streaming_litert(*args, input_shape=(1, 1, 8, 8, 4), quantize="float16",
                                    interface="int8")
  assert not list(tmp_path.iterdir())


def test_litert_int8_interface_feeds_the_int8_state_back(tmp_path, rng):
  """interface='int8': frame, state and output are int8 tensors; each state leaves with its
  input's scale and zero point and starts at its zero point (run_litert_stream)."""
  import flatbuffers

  from interop import _litert

  x, k = random_array(rng, (2, 7, 9, 8, 3)), random_array(rng, (3, 3, 2, 3, 2))
  init = lambda k, c: dw.stream_init(c, k, **LITERT_OP)  # noqa: E731
  step = lambda k, s, c: dw.stream_step(s, c, k, **LITERT_OP)  # noqa: E731
  calibration = [x, random_array(rng, x.shape)]
  paths = {interface: interop.export_streaming_litert(
      init, step, k, tmp_path / f"{interface}.tflite", input_shape=(2, 1, 9, 8, 3),
      quantize="int8", representative_data=calibration, interface=interface)
      for interface in ("float32", "int8")}
  runner = _litert.interpreter(paths["int8"]).get_signature_runner()
  ins, outs = runner.get_input_details(), runner.get_output_details()
  assert {n: d["dtype"] for n, d in {**ins, **outs}.items()} == {
      "frame": np.int8, "state": np.int8, "output": np.int8}
  assert ins["state"]["quantization"] == outs["state"]["quantization"]
  assert interop.litert_ops(paths["int8"]).all_builtin
  assert _tensor_ranks(paths["int8"]) <= 4
  got = {i: interop._stream_export.run_litert_stream(p, x) for i, p in paths.items()}
  want = depthwise_reference(x, k, axes="DHW", padding=("CAUSAL", "SAME", "SAME"), **LITERT_OP)
  err = np.abs(got["int8"] - want).max()
  bound = _int8_bound(paths["int8"], k, np.abs(x).max())
  assert err <= min(bound, interop._litert.TOLERANCE["int8"] * np.abs(want).max()), (err, bound)
  # The same calibration gives the same scales: the float32-interface model's
  # in-graph (de)quantization is what run_litert_stream does outside.
  out_scale = outs["output"]["quantization"][0]
  assert np.abs(got["int8"] - got["float32"]).max() <= out_scale * 1.01

  # A state whose output scale differs from its input's is refused, never fed back.
  schema = _litert._litert_module("schema_py_generated")
  with open(paths["int8"], "rb") as f:
    model = schema.ModelT.InitFromPackedBuf(f.read(), 0)
  sub = model.subgraphs[0]
  sub.tensors[outs["state"]["index"]].quantization.scale = np.asarray(
      [2 * outs["state"]["quantization"][0]], np.float32)
  builder = flatbuffers.Builder(1024)
  builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
  with pytest.raises(ValueError, match=r"export_streaming_litert: the converter gave state "
                                       r"`state` different types or quantization \(type, "
                                       r"scales, zero points\) at input and output: \('int8', "
                                       r"\(0\.0\d+,\), \(-?\d+,\)\) in, \('int8', .*\) out, so "
                                       r"it cannot be fed back"):
    interop._stream_export._check_state_quantization(bytes(builder.Output()), ["state"])
