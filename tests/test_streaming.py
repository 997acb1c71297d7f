"""Streaming (dw5d_jax._streaming and the Flax layers' stream methods).

A stream fed chunk by chunk must give the full causal op on the whole
sequence. Expected values come from the float64 reference
(`dw5d_jax._reference.depthwise_reference`) on the whole sequence, and from
the library's own full op with the same method: bitwise where every step has
several frames (the step runs the same op on the same frames in the same
order), within rounding where 1-frame steps sum the time taps in the ring
buffer's order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given
from hypothesis import strategies as st
from jax import export, lax

import dw5d_jax as dw
from dw5d_jax._reference import depthwise_reference
from dw5d_jax.nn import DepthwiseConv2D, DepthwiseConv3D
from tests.helpers import METHODS, assert_close, output_nonempty, random_array


def full_op(x, k, *, axes, **kw):
  if axes == "DHW":
    return dw.depthwise_conv3d(x, k, **kw)
  return dw.depthwise_conv2d(x, k, **({"axes": axes} if x.ndim == 5 else {}), **kw)


def run_stream(x, k, chunks, *, axis, method="auto", **kw):
  """Feeds `x` in chunks of the given lengths; the emitted outputs, concatenated."""
  layout = kw.get("data_format") or ("NDHWC" if x.ndim == 5 else "NHWC")
  t = layout.index(axis)
  state = dw.stream_init(lax.slice_in_dim(x, 0, 1, axis=t), k, axis=axis, **kw)
  outs, start = [], 0
  for length in chunks:
    state, y = dw.stream_step(state, lax.slice_in_dim(x, start, start + length, axis=t), k,
                              axis=axis, method=method, **kw)
    outs.append(lax.slice_in_dim(y, 0, int(state.emitted), axis=t))
    start += length
  return np.asarray(jnp.concatenate(outs, axis=t))


@st.composite
def streams(draw):
  """A causal convolution, its input and a split of the input into chunks."""
  kind = draw(st.sampled_from(["3d", "2d", "2d-rank4"]))
  layout = draw(st.sampled_from(["NHWC", "NCHW"] if kind == "2d-rank4" else ["NDHWC", "NCDHW"]))
  spatial = "".join(a for a in layout if a in "DHW")
  axes = {"3d": "DHW", "2d-rank4": "HW"}.get(kind) or "".join(draw(st.permutations("DHW"))[:2])
  axis = draw(st.sampled_from(spatial))  # for "2d", possibly a carried axis
  chunks = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
  sizes = {a: sum(chunks) if a == axis else draw(st.integers(1, 5)) for a in spatial}
  ks, ss, rs, pads = [], [], [], []
  for a in axes:
    k, s, r = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad = "CAUSAL" if a == axis else draw(st.sampled_from(
        ["SAME", "VALID", "CAUSAL", (draw(st.integers(0, 2)), draw(st.integers(0, 2)))]))
    assume(output_nonempty(sizes[a], k, r, pad))
    ks.append(k), ss.append(s), rs.append(r), pads.append(pad)
  c, m, n = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
  x_shape = tuple(n if a == "N" else c if a == "C" else sizes[a] for a in layout)
  kw = dict(axes=axes, strides=tuple(ss), dilations=tuple(rs), padding=tuple(pads),
            data_format=layout)
  return x_shape, (*ks, c, m), axis, chunks, kw


@given(stream=streams(), method=st.sampled_from(METHODS), seed=st.integers(0, 2**31 - 1))
def test_stream_equals_the_full_op(stream, method, seed):
  """Any chunking, strides and dilations along time, both layouts, carried time axes."""
  x_shape, k_shape, axis, chunks, kw = stream
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, x_shape), random_array(rng, k_shape)
  got = run_stream(jnp.asarray(x), jnp.asarray(k), chunks, axis=axis, method=method, **kw)
  want = depthwise_reference(x, k, axes=kw["axes"], strides=kw["strides"],
                             dilations=kw["dilations"], padding=kw["padding"],
                             data_format=kw["data_format"])
  assert_close(got, want, err_msg=f"{stream} {method}")
  same = np.asarray(full_op(x, k, method=method, **kw))
  t = kw["axes"].find(axis)
  if 1 in chunks and t >= 0 and k_shape[t] > 1 and kw["dilations"][t] == 1:
    np.testing.assert_allclose(got, same, rtol=1e-6, atol=1e-6 * max(1, np.abs(same).max()))
  else:
    np.testing.assert_array_equal(got, same)


def test_one_frame_steps_of_a_clip(rng):
  """docs/streaming.md's case: a clip (N, T, H, W, C), causal 3x3x3, one frame per step."""
  x = random_array(rng, (2, 6, 7, 5, 4))
  k = random_array(rng, (3, 3, 3, 4, 2))
  padding = ("CAUSAL", "SAME", "SAME")
  state = dw.stream_init(x[:, :1], k)
  assert state.buffer.shape == (2, 3, 7, 5, 4)  # a ring: 2 frames kept, 1 free slot
  ys = []
  for t in range(6):
    state, y = dw.stream_step(state, x[:, t:t + 1], k)
    assert y.shape == (2, 1, 7, 5, 8) and int(state.emitted) == 1 and int(state.phase) == 0
    ys.append(y)
  got = np.concatenate(ys, axis=1)
  assert_close(got, depthwise_reference(x, k, axes="DHW", padding=padding))
  assert_close(got, dw.depthwise_conv3d(x, k, padding=padding))


def test_donated_state(rng):
  """A serving loop donates the state: the step then updates the ring in place."""
  x = random_array(rng, (1, 4, 5, 5, 4))
  k = random_array(rng, (3, 3, 3, 4, 1))
  step = jax.jit(lambda s, c: dw.stream_step(s, c, k), donate_argnums=0)
  state = dw.stream_init(x[:, :1], k)
  ys = []
  for t in range(4):
    state, y = step(state, x[:, t:t + 1])
    ys.append(y)
  assert_close(np.concatenate(ys, axis=1), depthwise_reference(
      x, k, axes="DHW", padding=("CAUSAL", "SAME", "SAME")))


# 1-frame steps take the ring path: rotated taps without dilation along time,
# the taps' frames gathered from the ring with it. Both ops, a multiplier,
# strides along time, both layouts, bfloat16.
ONE_FRAME = [
    ("DHW", (3, 3, 2), dict(dilations=(1, 2, 1)), "NDHWC", "float32"),
    ("DHW", (3, 2, 3), dict(dilations=(2, 1, 1), strides=(1, 2, 1)), "NDHWC", "float32"),
    ("DHW", (2, 3, 3), dict(dilations=(3, 1, 2), strides=(2, 1, 1)), "NCDHW", "float32"),
    ("DW", (3, 3), dict(dilations=(2, 1)), "NDHWC", "float32"),
    ("DH", (3, 2), dict(strides=(2, 1)), "NCDHW", "float32"),
    ("DHW", (3, 3, 3), dict(dilations=(2, 1, 1)), "NDHWC", "bfloat16"),
    ("DHW", (3, 3, 3), {}, "NDHWC", "bfloat16"),
]


@pytest.mark.parametrize("axes,window,kw,layout,dtype", ONE_FRAME)
def test_one_frame_steps_frame_by_frame(rng, axes, window, kw, layout, dtype):
  """Every 1-frame step's real outputs against the float64 reference and the full op,
  eagerly, jitted with the state donated, and in `lax.scan`."""
  shape = {"N": 2, "D": 7, "H": 5, "W": 6, "C": 4}
  x = random_array(rng, tuple(shape[a] for a in layout)).astype(jnp.dtype(dtype))
  k = random_array(rng, (*window, 4, 2)).astype(jnp.dtype(dtype))
  kw = dict(axes=axes, padding=tuple("CAUSAL" if a == "D" else "SAME" for a in axes),
            data_format=layout, **kw)
  t = layout.index("D")
  x64 = np.asarray(x, np.float64)
  want = depthwise_reference(x64, np.asarray(k, np.float64), **kw)
  full = np.asarray(full_op(x, k, **kw), np.float64)
  step = jax.jit(lambda s, c: dw.stream_step(s, c, k, **kw), donate_argnums=0)

  def body(s, frame):
    s, y = dw.stream_step(s, jnp.expand_dims(frame, t), k, **kw)
    return s, (lax.index_in_dim(y, 0, t, keepdims=False), s.emitted)

  init = dw.stream_init(lax.slice_in_dim(x, 0, 1, axis=t), k, **kw)
  _, (scanned, real) = jax.jit(lambda s, xs: lax.scan(body, s, xs))(init, jnp.moveaxis(x, t, 0))
  scanned = np.moveaxis(np.asarray(scanned, np.float64)[np.asarray(real) == 1], 0, t)
  for run in (functools.partial(dw.stream_step, kernel=k, **kw), lambda s, c: step(s, c)):
    state = dw.stream_init(lax.slice_in_dim(x, 0, 1, axis=t), k, **kw)
    outs = []
    for i in range(x.shape[t]):
      state, y = run(state, lax.slice_in_dim(x, i, i + 1, axis=t))
      outs.append(np.asarray(lax.slice_in_dim(y, 0, int(state.emitted), axis=t), np.float64))
    got = np.concatenate(outs, axis=t)
    assert_close(got, want, dtype, err_msg=f"{axes} {kw}")
    assert_close(got, full, dtype, err_msg=f"{axes} {kw} against the full op")
  np.testing.assert_array_equal(scanned, got)


# The fused native step (`_ring.py`: one `dw5d_stream_step` call writes the
# frame into the ring and convolves the window where it lies), channels-last
# along D: channel counts of every packet width, multipliers, dilations and
# strides along time, strides along H/W, frames smaller than the kernel,
# bfloat16. (C, M, window, kw, (H, W), dtype).
NATIVE_STEPS = [
    (1, 1, (3, 3, 3), {}, (4, 5), "float32"),
    (3, 2, (3, 3, 3), dict(dilations=(2, 1, 1)), (5, 4), "float32"),
    (5, 1, (2, 3, 3), dict(strides=(1, 2, 2)), (7, 6), "float32"),
    (32, 2, (3, 3, 3), dict(dilations=(3, 1, 1), strides=(2, 1, 2)), (6, 6), "float32"),
    (54, 1, (3, 5, 5), dict(strides=(1, 2, 1)), (3, 2), "float32"),
    (32, 1, (3, 3, 3), {}, (6, 5), "bfloat16"),
    (5, 2, (3, 3, 3), dict(dilations=(2, 1, 1)), (2, 2), "bfloat16"),
]


def _step_hlo(step, *args) -> str:
  return step.lower(*args).compile().as_text()


@pytest.mark.parametrize("c,m,window,kw,hw,dtype", NATIVE_STEPS)
def test_native_step(rng, c, m, window, kw, hw, dtype):
  """1-frame steps through the fused native call, jitted with the state donated and in
  `lax.scan`, against the float64 reference; float32 bitwise the full op (the taps are
  summed in its order)."""
  x = random_array(rng, (2, 5, *hw, c)).astype(jnp.dtype(dtype))
  k = random_array(rng, (*window, c, m)).astype(jnp.dtype(dtype))
  kw = dict(padding=("CAUSAL", "SAME", "SAME"), **kw)
  step = jax.jit(lambda s, f: dw.stream_step(s, f, k, **kw), donate_argnums=0)
  init = dw.stream_init(x[:, :1], k, **kw)
  text = _step_hlo(step, init, x[:, :1])
  assert "dw5d_stream_step" in text and "dynamic-update-slice" not in text, text

  def body(s, frame):
    s, y = dw.stream_step(s, frame[:, None], k, **kw)
    return s, (y[:, 0], s.emitted)

  scan = jax.jit(lambda s, xs: lax.scan(body, s, xs))
  assert "dw5d_stream_step" in _step_hlo(scan, init, jnp.moveaxis(x, 1, 0))
  _, (scanned, real) = scan(init, jnp.moveaxis(x, 1, 0))
  scanned = np.moveaxis(np.asarray(scanned, np.float64)[np.asarray(real) == 1], 0, 1)
  state, outs = init, []
  for t in range(x.shape[1]):
    state, y = step(state, x[:, t:t + 1])
    outs.append(np.asarray(y[:, :int(state.emitted)], np.float64))
  got = np.concatenate(outs, axis=1)
  assert_close(got, depthwise_reference(np.asarray(x, np.float64), np.asarray(k, np.float64),
                                        axes="DHW", **kw), dtype)
  np.testing.assert_array_equal(scanned, got)
  if dtype == "float32":
    np.testing.assert_array_equal(got, dw.depthwise_conv3d(x, k, **kw))


def test_exported_step_is_the_formula(rng):
  """`jax.export` of a 1-frame step names no custom call (the XLA formula); jit does."""
  x = random_array(rng, (1, 3, 5, 4, 8))
  k = random_array(rng, (3, 3, 3, 8, 1))
  step = jax.jit(lambda s, c: dw.stream_step(s, c, k))
  state = dw.stream_init(x[:, :1], k)
  assert "dw5d_stream_step" in step.lower(state, x[:, :1]).as_text()
  exp = export.export(step)(state, x[:, :1])
  assert "custom_call" not in exp.mlir_module()
  native, exported = state, state
  for t in range(3):
    native, y = step(native, x[:, t:t + 1])
    exported, y_exported = exp.call(exported, x[:, t:t + 1])
    assert_close(y_exported, np.asarray(y, np.float64))


def test_native_step_gradients(rng):
  """Gradients through 1-frame steps (the formula's, `_ring.py`) equal the full op's."""
  x = random_array(rng, (1, 4, 5, 4, 5))
  k = random_array(rng, (3, 3, 3, 5, 2))
  ct = random_array(rng, (1, 4, 5, 4, 10))
  kw = dict(dilations=(2, 1, 1))

  def streamed(x, k):
    state, ys = dw.stream_init(x[:, :1], k, **kw), []
    for t in range(x.shape[1]):
      state, y = dw.stream_step(state, x[:, t:t + 1], k, **kw)
      ys.append(y)
    return jnp.sum(jnp.concatenate(ys, axis=1) * ct)

  def full(x, k):
    return jnp.sum(dw.depthwise_conv3d(x, k, padding=("CAUSAL", "SAME", "SAME"), **kw) * ct)

  got = jax.jit(jax.grad(streamed, argnums=(0, 1)))(x, k)
  want = jax.grad(full, argnums=(0, 1))(x, k)
  assert_close(tuple(map(np.asarray, got)), tuple(np.asarray(w, np.float64) for w in want))


@pytest.mark.parametrize("chunks", [[2, 3, 2], [7]])
def test_chunks_of_several_frames_are_bitwise_the_full_op(rng, chunks):
  x = random_array(rng, (1, 7, 6, 5, 4))
  k = random_array(rng, (3, 2, 3, 4, 1))
  kw = dict(strides=(1, 2, 1), padding=("CAUSAL", "SAME", "CAUSAL"))
  np.testing.assert_array_equal(run_stream(x, k, chunks, axis="D", **kw),
                                dw.depthwise_conv3d(x, k, **kw))


STRIDED = dict(strides=(2, 1, 2), dilations=(2, 1, 1), padding=("CAUSAL", "SAME", (1, 0)))


@pytest.mark.parametrize("length", [1, 2, 3])
def test_scan_with_a_time_stride(rng, length):
  """Under jit(lax.scan): slots of fixed size, `emitted` says which are real.

  Stride 2 along time: 1-frame steps emit 1, 0, 1, 0, ... outputs, 3-frame
  steps 2, 1, 2, 1, ...; 2-frame steps always 1.
  """
  steps = 5
  x = random_array(rng, (1, steps * length, 5, 6, 3))
  k = random_array(rng, (3, 2, 3, 3, 1))
  chunks = jnp.moveaxis(x.reshape(1, steps, length, 5, 6, 3), 1, 0)

  def body(state, chunk):
    state, y = dw.stream_step(state, chunk, k, **STRIDED)
    return state, (y, state.emitted)

  state = dw.stream_init(x[:, :1], k, **STRIDED)
  final, (ys, emitted) = jax.jit(lambda s, c: lax.scan(body, s, c))(state, chunks)
  slots = -(-length // 2)
  assert ys.shape == (steps, 1, slots, 5, 3, 3)
  if length == 1:
    assert emitted.tolist() == [1, 0, 1, 0, 1]
  got = np.concatenate([ys[i, :, :int(emitted[i])] for i in range(steps)], axis=1)
  want = depthwise_reference(x, k, axes="DHW", **STRIDED)
  assert_close(got, want)
  assert int(final.phase) == (-(steps * length)) % 2


@pytest.mark.parametrize("length", [1, 3])
def test_strided_streams_chain_with_valid(rng, length):
  """A stride-2 stream feeding a causal one, `valid=emitted`, in one jitted scan.

  With 1-frame chunks the second stream gets 1-frame chunks that are real
  every other step (valid 1, 0, 1, ...); with 3-frame chunks, 2 slots of
  which 2, 1, 2 are real.
  """
  x = random_array(rng, (2, 9, 4, 5, 2))
  k1 = random_array(rng, (2, 3, 3, 2, 2))
  k2 = random_array(rng, (3, 1, 2, 4, 1))
  kw1 = dict(strides=(2, 1, 1), padding=("CAUSAL", "SAME", "SAME"))
  kw2 = dict(dilations=(2, 1, 1), padding=("CAUSAL", "VALID", "SAME"))

  def body(states, chunk):
    s1, s2 = states
    s1, h = dw.stream_step(s1, chunk, k1, **kw1)
    s2, y = dw.stream_step(s2, h, k2, valid=s1.emitted, **kw2)
    return (s1, s2), (y, s2.emitted)

  s1 = dw.stream_init(x[:, :1], k1, **kw1)
  s2 = dw.stream_init(jnp.zeros((2, 1, 4, 5, 4)), k2, **kw2)
  steps = 9 // length
  chunks = jnp.moveaxis(x.reshape(2, steps, length, 4, 5, 2), 1, 0)
  _, (ys, emitted) = jax.jit(lambda s, c: lax.scan(body, s, c))((s1, s2), chunks)
  assert emitted.tolist() == ([1, 0] * 4 + [1] if length == 1 else [2, 1, 2])
  got = np.concatenate([ys[i, :, :int(emitted[i])] for i in range(steps)], axis=1)
  hidden = depthwise_reference(x, k1, axes="DHW", **kw1)
  assert_close(got, depthwise_reference(hidden, k2, axes="DHW", **kw2))


def test_vmap_over_streams(rng):
  """A batch of independent streams with their own kernels."""
  xs = random_array(rng, (3, 1, 4, 5, 5, 2))
  ks = random_array(rng, (3, 2, 3, 3, 2, 1))
  states = jax.vmap(lambda x, k: dw.stream_init(x[:, :1], k))(xs, ks)
  step = jax.vmap(lambda s, c, k: dw.stream_step(s, c, k))
  outs = []
  for t in range(4):
    states, y = step(states, xs[:, :, t:t + 1], ks)
    outs.append(y)
  got = np.concatenate(outs, axis=2)
  for i in range(3):
    assert_close(got[i], depthwise_reference(xs[i], ks[i], axes="DHW",
                                             padding=("CAUSAL", "SAME", "SAME")))


@pytest.mark.parametrize("length, dilation", [("l", 2), ("1", 1)], ids=["any-length", "1-frame"])
def test_export_step_with_symbolic_sizes(rng, length, dilation):
  """jax.export of a step: symbolic batch, height, width, and chunk length or 1-frame chunks."""
  k = random_array(rng, (3, 3, 2, 3, 1))
  kw = dict(strides=(1, 2, 1), dilations=(dilation, 1, 1))
  spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {length}, h, w, 3"), jnp.float32)
  state_spec = jax.eval_shape(lambda c: dw.stream_init(c, k, **kw), spec)
  exp = export.export(jax.jit(lambda s, c: dw.stream_step(s, c, k, **kw)))(state_spec, spec)
  cases = [((1, 5, 6, 4, 3), [2, 1, 2]), ((2, 4, 3, 7, 3), [4])] if length == "l" else [
      ((1, 4, 6, 4, 3), [1] * 4), ((2, 3, 3, 7, 3), [1] * 3)]
  for shape, chunks in cases:
    x = random_array(rng, shape)
    state = dw.stream_init(x[:, :1], k, **kw)
    outs, start = [], 0
    for length in chunks:
      state, y = exp.call(state, x[:, start:start + length])
      outs.append(y)
      start += length
    assert_close(np.concatenate(outs, axis=1), depthwise_reference(
        x, k, axes="DHW", padding=("CAUSAL", "SAME", "SAME"), **kw), err_msg=str(shape))


# ----------------------------------------------------------------------------
# Per-example streams: valid and reset per example.

PER_EXAMPLE = {
    # 1-frame steps with one valid for all take the ring path, others the copying one.
    "3x3x3": ((3, 3, 3, 3, 1), dict()),
    "time-stride-2": ((3, 2, 3, 3, 2), dict(strides=(2, 1, 2), padding=("CAUSAL", "SAME", "VALID"))),
    "time-dilation-2": ((2, 3, 2, 3, 1), dict(dilations=(2, 1, 1))),
    "per-frame-2d": ((3, 3, 3, 1), dict(axes="HW")),  # time carried: no ring
}


def separate_streams(x_steps, k, valids, resets, **kw):
  """Each example as a stream of its own (the scalar API): emitted counts and real outputs."""
  n = x_steps[0].shape[0]
  emitted, outs = np.zeros((len(x_steps), n), int), [[] for _ in range(n)]
  for i in range(n):
    state = None
    for step, x in enumerate(x_steps):
      if state is None or resets[step][i]:
        state = dw.stream_init(x[i:i + 1], k, **kw)
      state, y = dw.stream_step(state, x[i:i + 1], k, valid=int(valids[step][i]), **kw)
      emitted[step, i] = int(state.emitted)
      outs[i].append(np.asarray(y[0, :emitted[step, i]]))
  return emitted, outs


def reference_streams(x_steps, k, valids, resets, **kw):
  """The float64 reference on each example's real frames, split where a stream restarts."""
  n = x_steps[0].shape[0]
  padding = kw.get("padding", ("CAUSAL", "SAME", "SAME")[-len(k.shape) + 2:])
  axes = kw.get("axes", "DHW")
  want = []
  for i in range(n):
    segments = [[]]
    for step, x in enumerate(x_steps):
      if resets[step][i] and step:
        segments.append([])
      segments[-1].append(np.asarray(x[i:i + 1, :valids[step][i]]))
    outs = []
    for frames in segments:
      seq = np.concatenate(frames, axis=1)
      if seq.shape[1]:
        outs.append(depthwise_reference(seq, k, axes=axes, padding=padding,
                                        strides=kw.get("strides", 1),
                                        dilations=kw.get("dilations", 1))[0])
    want.append(np.concatenate(outs) if outs else None)
  return want


@pytest.mark.parametrize("case", list(PER_EXAMPLE))
@pytest.mark.parametrize("seed", [0, 1])
def test_per_example_streams_equal_separate_streams(case, seed):
  """Random chunk lengths, valid counts and resets per example, stepped under jit."""
  rng = np.random.default_rng(seed)
  k_shape, kw = PER_EXAMPLE[case]
  k = random_array(rng, k_shape)
  n, steps = 3, 7
  lengths = [1, 1, 1, 1] + [int(v) for v in rng.integers(1, 4, steps - 4)]
  x_steps = [random_array(rng, (n, length, 5, 4, 3)) for length in lengths]
  valids = [rng.integers(0, length + 1, n) for length in lengths]
  valids[1][:] = 1  # one valid for all: the ring path
  resets = [rng.random(n) < 0.3 for _ in lengths]
  step = jax.jit(lambda s, c, v, r: dw.stream_step(s, c, k, valid=v, reset=r, **kw))
  state = dw.stream_init(x_steps[0], k, per_example=True, **kw)
  got_emitted, got = np.zeros((steps, n), int), [[] for _ in range(n)]
  for i, x in enumerate(x_steps):
    valid = jnp.int32(1) if i == 1 else jnp.asarray(valids[i])
    state, y = step(state, x, valid, jnp.asarray(resets[i]))
    assert state.emitted.shape == state.phase.shape == (n,)
    got_emitted[i] = np.asarray(state.emitted)
    for j in range(n):
      got[j].append(np.asarray(y[j, :got_emitted[i, j]]))
  want_emitted, want = separate_streams(x_steps, k, valids, resets, **kw)
  np.testing.assert_array_equal(got_emitted, want_emitted)
  for j, ref in enumerate(reference_streams(x_steps, k, valids, resets, **kw)):
    assert_close(np.concatenate(got[j]), np.concatenate(want[j]), err_msg=f"example {j}")
    if ref is not None:
      assert_close(np.concatenate(got[j]), ref, err_msg=f"example {j} against the reference")


@pytest.mark.parametrize("case", ["3x3x3", "time-stride-2"])
def test_per_example_streams_under_scan_and_vmap(rng, case):
  """lax.scan over steps (the carry keeps its shapes), and vmap over groups of such batches."""
  k_shape, kw = PER_EXAMPLE[case]
  k = random_array(rng, k_shape)
  groups, n, steps, length = 2, 3, 6, 2
  xs = random_array(rng, (groups, steps, n, length, 4, 5, 3))
  valids = rng.integers(0, length + 1, (groups, steps, n))
  resets = rng.random((groups, steps, n)) < 0.3

  def run(x, valid, reset):  # one group: scan over its steps
    def body(state, inputs):
      state, y = dw.stream_step(state, *inputs[:1], k, valid=inputs[1], reset=inputs[2], **kw)
      return state, (y, state.emitted)

    return lax.scan(body, dw.stream_init(x[0], k, per_example=True, **kw),
                    (x, valid, reset))[1]

  ys, emitted = jax.jit(jax.vmap(run))(xs, jnp.asarray(valids), jnp.asarray(resets))
  for g in range(groups):
    want_emitted, want = separate_streams(list(xs[g]), k, valids[g], resets[g], **kw)
    np.testing.assert_array_equal(emitted[g], want_emitted)
    for j in range(n):
      got = np.concatenate([ys[g, i, j, :int(emitted[g, i, j])] for i in range(steps)])
      assert_close(got, np.concatenate(want[j]), err_msg=f"group {g} example {j}")


def test_scalar_valid_api_is_unchanged(rng):
  """A state that is not per example keeps scalar phase and emitted, whatever `valid` is."""
  x = random_array(rng, (2, 3, 4, 4, 3))
  k = random_array(rng, (3, 3, 3, 3, 1))
  state = dw.stream_init(x, k)
  assert [a.shape for a in jax.tree.leaves(state)] == [(2, 3, 4, 4, 3), (), (), ()]
  for valid in (None, 2, jnp.int32(1)):
    state, _ = dw.stream_step(state, x, k, valid=valid)
    assert state.emitted.shape == state.phase.shape == ()


# ----------------------------------------------------------------------------
# Flax layers.


def test_layers_take_the_new_padding_forms(rng):
  x = random_array(rng, (2, 5, 6, 4, 3))
  layer = DepthwiseConv3D(3, (3, 2, 3), strides=(2, 1, 1), padding=("causal", (1, 0), "SAME"),
                          use_bias=False, rngs=nnx.Rngs(0))
  assert layer.padding == ("CAUSAL", (1, 0), "SAME")
  assert_close(layer(x), depthwise_reference(x, np.asarray(layer.kernel[...]), axes="DHW",
                                             strides=(2, 1, 1),
                                             padding=("CAUSAL", (1, 0), "SAME")))
  per_slice = DepthwiseConv2D(3, 3, axes="DW", padding="CAUSAL", use_bias=False,
                              rngs=nnx.Rngs(0))
  assert_close(per_slice(x), depthwise_reference(x, np.asarray(per_slice.kernel[...]),
                                                 axes="DW", padding="CAUSAL"))


@pytest.mark.parametrize("make, batch", [
    (lambda: DepthwiseConv3D(3, 3, depth_multiplier=2, strides=(2, 1, 1), dilations=(2, 1, 1),
                             padding=("CAUSAL", "SAME", "SAME"), activation="gelu",
                             rngs=nnx.Rngs(0)), (2, 3)),
    (lambda: DepthwiseConv2D(3, (3, 2), axes="WD", padding=((1, 0), "CAUSAL"),
                             activation=jax.nn.silu, rngs=nnx.Rngs(1)), (2,)),
    (lambda: DepthwiseConv2D(3, 3, axes="HW", strides=2, activation=lambda z: z * z,
                             rngs=nnx.Rngs(2)), ()),  # per frame
], ids=["3d-gelu", "2d-WD-silu", "2d-HW-carried-square"])
def test_layer_stream_equals_call(rng, make, batch):
  layer = make()
  layer.bias[...] = jnp.asarray(random_array(rng, layer.bias.shape))
  x = jnp.asarray(random_array(rng, (*batch, 7, 5, 4, 3)))
  t = len(batch)
  state = layer.stream_init(jax.ShapeDtypeStruct(x.shape, x.dtype))
  outs, start = [], 0
  for length in [3, 1, 2, 1]:
    state, y = layer.stream_step(state, lax.slice_in_dim(x, start, start + length, axis=t))
    outs.append(lax.slice_in_dim(y, 0, int(state.emitted), axis=t))
    start += length
  assert_close(jnp.concatenate(outs, axis=t), layer(x))


class CausalSeparable(nnx.Module):
  """A small streaming video model: per-frame 2D, causal 3D depthwise, pointwise."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.spatial = DepthwiseConv2D(c, 3, axes="HW", rngs=rngs)
    self.temporal = DepthwiseConv3D(c, 3, depth_multiplier=2, padding=("CAUSAL", "SAME", "SAME"),
                                    rngs=rngs)
    self.pointwise = nnx.Linear(2 * c, 5, rngs=rngs)

  def __call__(self, x):
    return self.pointwise(nnx.relu(self.temporal(nnx.relu(self.spatial(x)))))

  def stream_init(self, chunk):
    return self.temporal.stream_init(chunk)

  def stream_step(self, state, chunk):
    state, h = self.temporal.stream_step(state, nnx.relu(self.spatial(chunk)))
    return state, self.pointwise(nnx.relu(h))


def test_separable_model_streams_under_jit_and_scan(rng):
  model = CausalSeparable(4, nnx.Rngs(0))
  x = jnp.asarray(random_array(rng, (2, 8, 6, 5, 4)))
  graphdef, params = nnx.split(model)

  @jax.jit
  def stream(params, x):
    def body(state, frame):
      state, y = nnx.merge(graphdef, params).stream_step(state, frame[:, None])
      return state, y[:, 0]

    state = nnx.merge(graphdef, params).stream_init(x[:, :1])
    _, ys = lax.scan(body, state, jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1)

  assert_close(stream(params, x), model(x))
  # And step by step under nnx.jit.
  step = nnx.jit(lambda m, s, c: m.stream_step(s, c))
  state = model.stream_init(x[:, :1])
  outs = []
  for t in range(0, 8, 2):
    state, y = step(model, state, x[:, t:t + 2])
    outs.append(y)
  assert_close(jnp.concatenate(outs, axis=1), model(x))


# ----------------------------------------------------------------------------
# Errors.

X = jnp.zeros((1, 1, 6, 6, 4), jnp.float32) + 0.5
K = jnp.ones((3, 3, 3, 4, 1), jnp.float32)


ERROR_IDS = [
    "padding SAME on time", "explicit non-causal pair", "unknown axis", "no frame at init",
    "channels at init", "kernel rank", "other size", "channels", "batch", "dtype", "no frame",
    "strides", "kernel window", "axes", "not a state", "valid too large", "valid not scalar",
    "chunk rank", "valid array too large", "valid array negative", "valid per example, state not",
    "reset, state not per example", "reset not bool", "valid per example too large",
    "valid per example shape", "reset shape", "per_example not bool", "valid float",
]
XS = jnp.zeros((3, 2, 6, 6, 4), jnp.float32) + 0.5  # three streams of 2-frame chunks


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: dw.stream_init(X, K, padding="SAME"), ValueError,
     r"stream_init: `padding` along the streamed axis D must be 'CAUSAL' \(pads \(e - 1, 0\) = "
     r"\(2, 0\) for kernel 3, dilation 1\): a stream's outputs may read only past and present "
     r"frames; got 'SAME'\."),
    (lambda: dw.stream_init(X, K, dilations=(2, 1, 1), padding=((2, 0), "SAME", "SAME")),
     ValueError, r"pads \(e - 1, 0\) = \(4, 0\) for kernel 3, dilation 2\).*got \(2, 0\)\."),
    (lambda: dw.stream_init(X, K, axis="T"), ValueError,
     r"stream_init: `axis` must be None or one of the spatial axes 'D', 'H', 'W' of `chunk` "
     r"\(NDHWC\), got 'T'\."),
    (lambda: dw.stream_init(X[:, :0], K), ValueError,
     r"stream_init: `chunk` must hold at least one frame along the streamed axis D, got 0\."),
    (lambda: dw.stream_init(X, K[..., :3, :]), ValueError,
     r"stream_init: `kernel` in_channels \(dim 3, size 3\) must equal the channels of `chunk` "
     r"\(4, layout NDHWC\); got chunk shape \(1, 1, 6, 6, 4\) and kernel shape "
     r"\(3, 3, 3, 3, 1\)\."),
    (lambda: dw.stream_init(X, K[0], axes="DHW"), ValueError,
     r"stream_init: `kernel` must have rank 5 \(kd, kh, kw, in_channels, multiplier\) for "
     r"axes='DHW', got shape \(3, 3, 4, 1\)\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X[:, :, :5], K), ValueError,
     r"stream_step: `chunk` has shape \(1, 1, 5, 6, 4\), but the state was made for chunks "
     r"\(N=1, D=L, H=6, W=6, C=4\) \(NDHWC, L >= 1 frames along the streamed axis D\): batch, "
     r"channels and the other sizes must stay\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), jnp.zeros((1, 1, 6, 6, 3)),
                            jnp.ones((3, 3, 3, 3, 1))), ValueError,
     r"stream_step: `chunk` has shape \(1, 1, 6, 6, 3\), but the state was made for chunks "
     r"\(N=1, D=L, H=6, W=6, C=4\)"),
    (lambda: dw.stream_step(dw.stream_init(X, K), jnp.zeros((2, 3, 6, 6, 4)), K), ValueError,
     r"stream_step: `chunk` has shape \(2, 3, 6, 6, 4\), but the state was made for chunks "
     r"\(N=1, D=L"),
    (lambda: dw.stream_step(dw.stream_init(X, K), X.astype(jnp.float16),
                            K.astype(jnp.float16)), TypeError,
     r"stream_step: `chunk` has dtype float16, but the state holds float32 frames; cast the "
     r"chunk or make the state from a float16 chunk\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X[:, :0], K), ValueError,
     r"stream_step: `chunk` must hold at least one frame along the streamed axis D, got 0\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K, strides=(2, 1, 1)), ValueError,
     r"stream_step: `state` was made for another configuration: strides \(2, 1, 1\) here, "
     r"\(1, 1, 1\) in the state\. Make it with stream_init and the same arguments as "
     r"stream_step\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K[:2]), ValueError,
     r"stream_step: `state` was made for another configuration: window \(2, 3, 3\) here, "
     r"\(3, 3, 3\) in the state"),
    (lambda: dw.stream_step(dw.stream_init(X, K[0], axes="HW"), X, K), ValueError,
     r"stream_step: `state` was made for another configuration: axes 'DHW' here, 'HW' in the "
     r"state; window \(3, 3, 3\) here, \(3, 3\) in the state"),
    (lambda: dw.stream_step({"buffer": X}, X, K), TypeError,
     r"stream_step: `state` must be a StreamState from stream_init or stream_step, got dict\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K, valid=2), ValueError,
     r"stream_step: `valid` must be between 0 and the chunk's 1 frames along the streamed "
     r"axis, got 2\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K, valid=jnp.ones(2, jnp.int32)), ValueError,
     r"stream_step: `valid` must have shape \(\) \(an integer scalar: this state is not per "
     r"example; make it with stream_init\(\.\.\., per_example=True\) for one count per "
     r"example\), got shape \(2,\)\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X[0], K), ValueError,
     r"stream_step: `chunk` must have rank 5 \(NDHWC, NCDHW\), got rank 4 with shape "
     r"\(1, 6, 6, 4\)\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K, valid=jnp.int32(5)), ValueError,
     r"stream_step: `valid` must be between 0 and the chunk's 1 frames along the streamed "
     r"axis, got 5\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K, valid=np.int64(-1) + jnp.zeros((), int)),
     ValueError, r"stream_step: `valid` must be between 0 and the chunk's 1 frames along the "
     r"streamed axis, got -1\."),
    (lambda: dw.stream_step(dw.stream_init(XS, K), XS, K, valid=jnp.array([2, 1, 0])),
     ValueError, r"stream_step: `valid` must have shape \(\) \(an integer scalar: this state "
     r"is not per example"),
    (lambda: dw.stream_step(dw.stream_init(XS, K), XS, K, reset=jnp.array([True, False, True])),
     ValueError, r"stream_step: `reset` needs a per-example state \(stream_init\(\.\.\., "
     r"per_example=True\)\); for a state of one stream, make a new one with stream_init\."),
    (lambda: dw.stream_step(dw.stream_init(XS, K, per_example=True), XS, K,
                            reset=jnp.array([1, 0, 1])), TypeError,
     r"stream_step: `reset` must be None, a bool or a bool array, got \w+ int32\."),
    (lambda: dw.stream_step(dw.stream_init(XS, K, per_example=True), XS, K,
                            valid=jnp.array([2, 3, 0])), ValueError,
     r"stream_step: `valid` must be between 0 and the chunk's 2 frames along the streamed "
     r"axis, got \[2, 3, 0\]\."),
    (lambda: dw.stream_step(dw.stream_init(XS, K, per_example=True), XS, K,
                            valid=jnp.array([2, 1])), ValueError,
     r"stream_step: `valid` must have shape \(\) or \(3,\) \(one per example\), got shape "
     r"\(2,\)\."),
    (lambda: dw.stream_step(dw.stream_init(XS, K, per_example=True), XS, K,
                            reset=jnp.ones((3, 1), bool)), ValueError,
     r"stream_step: `reset` must have shape \(\) or \(3,\) \(one per example\), got shape "
     r"\(3, 1\)\."),
    (lambda: dw.stream_init(XS, K, per_example=1), TypeError,
     r"stream_init: `per_example` must be a bool, got int 1\."),
    (lambda: dw.stream_step(dw.stream_init(X, K), X, K, valid=jnp.float32(1)), TypeError,
     r"stream_step: `valid` must be None, an int or an integer array, got \w+ float32 of "
     r"shape \(\)\."),
], ids=ERROR_IDS)
def test_errors(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()


def test_errors_under_jit():
  state = dw.stream_init(X, K)
  with pytest.raises(ValueError, match=r"stream_step: `chunk` has shape \(1, 1, 6, 5, 4\)"):
    jax.jit(lambda s, c: dw.stream_step(s, c, K))(state, X[:, :, :, :5])
  with pytest.raises(ValueError, match=r"stream_step: `state` was made for another "
                     r"configuration: dilations \(1, 2, 1\) here"):
    jax.jit(lambda s, c: dw.stream_step(s, c, K, dilations=(1, 2, 1)))(state, X)


@pytest.mark.parametrize("given, clamped", [(5, 2), (-3, 0), (1, 1)])
def test_valid_under_jit_is_clamped(rng, given, clamped):
  """Under jit `valid` is unknown at trace time: it is clamped to [0, L] (documented)."""
  x = random_array(rng, (1, 2, 5, 4, 3))
  k = random_array(rng, (3, 2, 2, 3, 1))
  kw = dict(strides=(2, 1, 1))
  step = jax.jit(lambda s, c, v: dw.stream_step(s, c, k, valid=v, **kw))
  state = dw.stream_init(x, k, **kw)
  got_state, got = step(state, x, jnp.int32(given))
  want_state, want = dw.stream_step(state, x, k, valid=clamped, **kw)
  assert int(got_state.emitted) == int(want_state.emitted) == -(-clamped // 2)
  assert int(got_state.phase) == int(want_state.phase)
  np.testing.assert_array_equal(got_state.buffer, want_state.buffer)
  np.testing.assert_array_equal(got, want)


def test_layer_stream_errors():
  layer = DepthwiseConv3D(4, 3, rngs=nnx.Rngs(0))  # SAME along time
  with pytest.raises(ValueError, match=r"stream_init: `padding` along the streamed axis D must "
                     r"be 'CAUSAL'"):
    layer.stream_init(X)
  causal = DepthwiseConv3D(4, 3, padding=("CAUSAL", "SAME", "SAME"), rngs=nnx.Rngs(0))
  other = DepthwiseConv3D(4, 3, strides=(1, 2, 2), padding=("CAUSAL", "SAME", "SAME"),
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`state` was made for another configuration: strides "
                     r"\(1, 2, 2\) here, \(1, 1, 1\) in the state"):
    other.stream_step(causal.stream_init(X), X)
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_init: input must have shape "
                     r"\(\*batch, D, H, W, C\), got shape \(6, 4\)"):
    causal.stream_init(X[0, 0, 0])
  longer = DepthwiseConv3D(4, (5, 3, 3), padding=("CAUSAL", "SAME", "SAME"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_step: `state` was made for "
                     r"another configuration: window \(3, 3, 3\) here, \(5, 3, 3\) in the "
                     r"state"):
    causal.stream_step(longer.stream_init(X), X)
  half = DepthwiseConv3D(4, 3, padding=("CAUSAL", "SAME", "SAME"), dtype=jnp.float16,
                         rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"DepthwiseConv3D.stream_step: `chunk` has dtype float32, "
                     r"but the state holds float16 frames"):
    causal.stream_step(half.stream_init(X), X)
  per_slice = DepthwiseConv2D(4, 3, axes="DW", padding=("CAUSAL", "SAME"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_step: `state` was made for "
                     r"another configuration: axes 'DHW' here, 'DW' in the state"):
    jax.jit(causal.stream_step)(per_slice.stream_init(X), X)
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_step: `chunk` must have "
                     r"in_features=4 channels \(its last dim\), got shape \(1, 1, 6, 6, 3\)\."):
    causal.stream_step(causal.stream_init(X), X[..., :3])
