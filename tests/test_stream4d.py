"""A stream's step of one frame over rank-4 tensors (dw5d_jax._stream4d), in JAX.

Streamed frame by frame, the step must give the full causal op on the whole
clip: expected values from the float64 reference
(`dw5d_jax._reference.depthwise_reference`) with CAUSAL padding along time;
a Flax model against its own call on the whole clip. The LiteRT export of
the same step is tested in test_stream_export.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given
from hypothesis import strategies as st

import dw5d_jax as dw
from dw5d_jax import _stream4d
from dw5d_jax._reference import depthwise_reference
from dw5d_jax.nn import DepthwiseConv2D, DepthwiseConv3D
from tests.helpers import assert_close, random_array

# (kernel shape, op arguments): the 3D op and the 2D op per slice, time
# convolved (with a dilation, M > 1, strides and border modes along H, W) or
# carried (axes="HW", no ring), windows of 1 and 2 frames in time (no ring,
# a ring of one frame).
OPS = [
    ((3, 3, 2, 3, 2), dict(dilations=(2, 1, 1), strides=(1, 2, 1))),
    ((2, 3, 3, 3, 1), dict(padding=("CAUSAL", (2, 0), "VALID"), padding_mode=("zeros", "reflect", "zeros"))),
    ((1, 3, 3, 3, 2), {}),
    ((2, 3, 3, 1), dict(axes="DW")),
    ((3, 2, 3, 2), dict(axes="WD", dilations=(1, 3), padding=("SAME", "CAUSAL"))),
    ((3, 3, 3, 2), dict(axes="HW", strides=2)),
]


def _causal(k_shape, kw):
  """The op's arguments for the full clip: CAUSAL along D, SAME elsewhere by default."""
  axes = kw.get("axes", "DHW" if len(k_shape) == 5 else "HW")
  return {**kw, "axes": axes,
          "padding": kw.get("padding", tuple("CAUSAL" if a == "D" else "SAME" for a in axes))}


def _op_step(k, kw, chunk_shape):
  return _stream4d.build(lambda k, c: dw.stream_init(c, k, **kw),
                         lambda k, s, c: dw.stream_step(s, c, k, **kw), k, chunk_shape,
                         fn="test")


@pytest.mark.parametrize("k_shape, kw", OPS, ids=lambda v: str(v))
def test_frame_steps_equal_the_full_causal_op(rng, k_shape, kw):
  x, k = random_array(rng, (2, 6, 7, 8, 3)), random_array(rng, k_shape)
  step = _op_step(k, kw, (2, 1, 7, 8, 3))
  args = _causal(k_shape, kw)
  e = (k_shape[args["axes"].index("D")] - 1) * (kw.get("dilations") or (1, 1, 1))[
      args["axes"].index("D")] + 1 if "D" in args["axes"] else 1
  assert step.state_shapes == (((2, 7, 8, 3 * (e - 1)),) if e > 1 else ())
  assert step.state_names == (("state",) if e > 1 else ())
  ys, states = step.run(x)
  assert all(s.ndim == 4 for frame in states for s in frame)
  got = np.stack(ys, axis=1)
  assert got.shape[1:] == (6, *step.output_shape[1:])
  assert_close(got, depthwise_reference(x, k, **args))


@st.composite
def _streams(draw):
  """A random stream: op (3D, or 2D over DW/DH/HW), kernel sizes 1-3, a dilation
  along time, M, strides and border modes along the other axes, odd and tiny
  sizes (frames smaller than the kernel), N, T, C."""
  axes = draw(st.sampled_from(["DHW", "DW", "DH", "HW"]))
  ks = [draw(st.integers(1, 3)) for _ in axes]
  c, m = draw(st.integers(1, 5)), draw(st.integers(1, 2))
  n, t, h, w = (draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 6)),
                draw(st.integers(1, 6)))
  dil = [draw(st.integers(1, 3)) if a == "D" else 1 for a in axes]
  strides = [1 if a == "D" else draw(st.integers(1, 2)) for a in axes]
  modes = [("zeros" if a == "D" else draw(st.sampled_from(
      ["zeros", "edge", "reflect", "symmetric", "circular"]))) for a in axes]
  sizes = {"H": h, "W": w}
  for a, k, mode in zip(axes, ks, modes):  # a mirrored or wrapped border needs the frame
    if a != "D" and mode != "zeros":
      assume(sizes[a] > k // 2)
  kw = dict(axes=axes, dilations=tuple(dil), strides=tuple(strides), padding_mode=tuple(modes))
  return (n, t, h, w, c), (*ks, c, m), kw


@given(_streams(), st.integers(0, 2**31 - 1))
def test_random_streams_step_like_the_full_causal_op(stream, seed):
  """Random configurations mixed (not one feature at a time), frame by frame."""
  x_shape, k_shape, kw = stream
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, x_shape), random_array(rng, k_shape)
  n, _, h, w, c = x_shape
  step = _op_step(k, kw, (n, 1, h, w, c))
  ys, states = step.run(x)
  assert all(s.ndim == 4 for frame in states for s in frame)
  assert_close(np.stack(ys, axis=1), depthwise_reference(x, k, **_causal(k_shape, kw)))


def test_the_ring_holds_the_last_frames_oldest_first(rng):
  x, k = random_array(rng, (1, 5, 4, 4, 2)), random_array(rng, (3, 1, 1, 2, 1))
  step = _op_step(k, dict(dilations=(2, 1, 1)), (1, 1, 4, 4, 2))  # e = 5: 4 frames kept
  _, states = step.run(x)
  ring = states[-1][0]  # what the last step met: frames 0..3
  np.testing.assert_array_equal(ring, np.concatenate([x[:, t] for t in range(4)], axis=-1))
  np.testing.assert_array_equal(states[2][0][..., :4], np.zeros((1, 4, 4, 4)))  # causal zeros


class Net(nnx.Module):
  """Two streaming layers with bias and activations, a pointwise layer between."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.temporal = DepthwiseConv3D(c, 3, depth_multiplier=2, activation="relu",
                                    padding=("CAUSAL", "SAME", "SAME"), rngs=rngs)
    self.pointwise = nnx.Linear(2 * c, 4, rngs=rngs)
    self.time2d = DepthwiseConv2D(4, (2, 3), axes="DW", dilations=(2, 1),
                                  padding=("CAUSAL", "SAME"), activation=jax.nn.silu, rngs=rngs)

  def __call__(self, x):
    return self.time2d(self.pointwise(self.temporal(x)))

  def stream_init(self, chunk):
    hidden = jax.ShapeDtypeStruct((*chunk.shape[:-1], 4), chunk.dtype)
    return self.temporal.stream_init(chunk), self.time2d.stream_init(hidden)

  def stream_step(self, state, chunk):
    s1, h = self.temporal.stream_step(state[0], chunk)
    s2, y = self.time2d.stream_step(state[1], self.pointwise(h))
    return (s1, s2), y


def make_net(rng, c=3):
  net = Net(c, nnx.Rngs(0))
  for layer in (net.temporal, net.time2d):
    layer.bias[...] = jnp.asarray(random_array(rng, layer.bias.shape))
  graphdef, params = nnx.split(net)
  return (net, params, lambda p, c: nnx.merge(graphdef, p).stream_init(c),
          lambda p, s, c: nnx.merge(graphdef, p).stream_step(s, c))


def test_model_of_layers_steps_like_its_call(rng):
  net, params, init_fn, step_fn = make_net(rng)
  x = random_array(rng, (2, 7, 5, 6, 3))
  step = _stream4d.build(init_fn, step_fn, params, (2, 1, 5, 6, 3), fn="test")
  assert step.state_names == ("state_0", "state_1")
  assert step.state_shapes == ((2, 5, 6, 6), (2, 5, 6, 8))  # 2 frames of 3, 2 frames of 4
  ys, _ = step.run(x)
  assert_close(np.stack(ys, axis=1), np.asarray(net(x), np.float64))


@pytest.mark.parametrize("kw, chunk, match", [
    (dict(strides=(2, 1, 1)), (1, 1, 6, 6, 2),
     r"test: the stream of `state` has stride 2 along the streamed axis D; .* stride 1"),
    (dict(data_format="NCDHW"), (1, 2, 1, 6, 6),
     r"test: the stream of `state` streams a NCDHW input; .* channels-last"),
    (dict(axis="H", padding=("SAME", "CAUSAL", "SAME")), (1, 4, 1, 6, 2),
     r"test: the stream of `state` streams along axis H; .* first spatial axis D"),
    (dict(per_example=True), (1, 1, 6, 6, 2), r"test: the stream of `state` is per example"),
    ({}, (1, 2, 6, 6, 2), r"test: `input_shape` must be one frame .* got \(1, 2, 6, 6, 2\)"),
])
def test_unsupported_streams_are_refused_by_name(kw, chunk, match):
  k = jnp.ones((3, 3, 3, 2, 1))
  step_kw = {a: v for a, v in kw.items() if a != "per_example"}
  with pytest.raises(ValueError, match=match):
    _stream4d.build(lambda k, c: dw.stream_init(c, k, **kw),
                    lambda k, s, c: dw.stream_step(s, c, k, **step_kw), k, chunk, fn="test")


def test_state_of_other_leaves_and_valid_or_reset_are_refused():
  k = jnp.ones((3, 3, 3, 2, 1))
  init = lambda k, c: dw.stream_init(c, k)  # noqa: E731
  with pytest.raises(ValueError, match=r"test: the state's leaf `state_1` is a "
                                       r"ShapeDtypeStruct; .*\(StreamState\) only"):
    _stream4d.build(lambda k, c: (init(k, c), jnp.zeros(3)), None, k, (1, 1, 6, 6, 2),
                    fn="test")
  with pytest.raises(ValueError, match=r"stream_step: `valid` must be None or 1 in a rank-4 "
                                       r"step of one frame .* got 0"):
    _stream4d.build(init, lambda k, s, c: dw.stream_step(s, c, k, valid=0), k,
                    (1, 1, 6, 6, 2), fn="test")
  with pytest.raises(ValueError, match=r"stream_step: `reset` is not supported in a rank-4 "):
    _stream4d.build(init, lambda k, s, c: dw.stream_step(s, c, k, reset=True), k,
                    (1, 1, 6, 6, 2), fn="test")
  with pytest.raises(ValueError, match=r"stream_step: `valid` .* got a traced value"):
    _stream4d.build(init, lambda k, s, c: dw.stream_step(s, c, k, valid=jnp.sum(c > 9)), k,
                    (1, 1, 6, 6, 2), fn="test")


def test_outside_the_export_the_stream_is_unchanged(rng):
  # A step traced inside `frames()` (jit-keyed) leaves later jitted steps alone.
  x, k = random_array(rng, (1, 3, 5, 5, 2)), random_array(rng, (3, 3, 3, 2, 1))
  step = jax.jit(lambda s, c: dw.stream_step(s, c, k))
  _op_step(k, {}, (1, 1, 5, 5, 2)).run(x)
  state = dw.stream_init(x[:, :1], k)
  state, y = step(state, x[:, :1])
  assert state.buffer.shape == (1, 3, 5, 5, 2) and y.shape == (1, 1, 5, 5, 2)
