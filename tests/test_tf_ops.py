"""The TensorFlow reference ops (interop._tf_ops) against the float64 reference.

Expected values come from `dw5d_jax._reference.depthwise_reference` (a direct
float64 sum over kernel taps, checked against brute force in
test_reference.py). TF runs in three modes: eager, a `tf.function` whose
signature leaves batch and every spatial size `None` ("graph"), and the same
with `jit_compile=True` ("xla").
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import dw5d_jax as dw
import interop
from dw5d_jax._reference import depthwise_reference
from interop._app.parity import MODES, dynamic_spec, in_mode, tf_op
from tests.helpers import Case, assert_close, cases, random_array

tf_conv2d, tf_conv3d = interop.tf_depthwise_conv2d, interop.tf_depthwise_conv3d


def _run(case: Case, x, k, mode: str) -> tf.Tensor:
  """The TF op on `case` in `mode` (graph/xla: only the channel size is static)."""
  c = case.x_shape[case.layout.index("C")]
  fn = in_mode(tf_op(case), mode, [dynamic_spec(case.layout, c, x.dtype),
                                            tf.TensorSpec(k.shape, k.dtype)])
  return fn(tf.constant(x), tf.constant(k))


@given(case=cases(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_in_every_mode(case: Case, seed):
  """Random ops, layouts, fold axes, strides, dilations and paddings (unequal ones too)."""
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  want = case.expected(x, k)
  for mode in MODES:
    y = _run(case, x, k, mode)
    assert y.dtype == tf.float32
    assert_close(y.numpy(), want, "float32", err_msg=f"{case} mode={mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["NDHWC", "NCDHW"])
@pytest.mark.parametrize("axes", ["HW", "WH", "DW", "WD", "DH", "HD"])
def test_every_fold_axis_and_layout(rng, mode, layout, axes):
  """Unequal strides with dilations (which tf.nn.depthwise_conv2d refuses), odd sizes."""
  x_shape = (2, 5, 7, 6, 3) if layout == "NDHWC" else (2, 3, 5, 7, 6)
  case = Case("2d", layout, axes, x_shape, (3, 2, 3, 2), strides=(2, 3), dilations=(1, 2),
              padding="SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(_run(case, x, k, mode).numpy(), case.expected(x, k))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strides,dilations,padding", [
    ((2, 2), (4, 2), "SAME"),  # dilation a multiple of the stride: subsample first
    ((2, 3), (1, 1), "VALID"),  # unequal strides: TF strides by gcd, slices the rest
    ((2, 4), (1, 1), "SAME"),  # gcd 2: TF strides by 2, a slice keeps every 2nd along W
    ((3, 1), (2, 3), ((2, 1), (0, 3))),  # explicit padding, strides and dilations
    ((1, 1), (3, 2), ((1, 1), (2, 0))),
])
def test_stride_and_dilation_paths_rank4(rng, mode, strides, dilations, padding):
  case = Case("2d", "NCHW", "HW", (2, 3, 11, 10), (3, 2, 3, 2), strides, dilations, padding)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(_run(case, x, k, mode).numpy(), case.expected(x, k))


def test_one_trace_serves_every_size_with_runtime_same_split(rng):
  """Strided SAME padding depends on `n mod s`, known only when the graph runs."""
  k = random_array(rng, (3, 2, 4, 3, 2))
  fn = tf.function(
      lambda a: tf_conv3d(a, k, strides=(2, 3, 2), dilations=(1, 1, 2), data_format="NCDHW"),
      input_signature=[tf.TensorSpec([None, 3, None, None, None], tf.float32)])
  for shape in [(2, 3, 7, 6, 5), (1, 3, 8, 7, 9), (3, 3, 1, 2, 3), (1, 3, 4, 11, 6)]:
    x = random_array(rng, shape)
    want = depthwise_reference(x, k, axes="DHW", strides=(2, 3, 2), dilations=(1, 1, 2),
                               data_format="NCDHW")
    assert_close(fn(x).numpy(), want, err_msg=str(shape))
  assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("mode", MODES)
def test_inputs_smaller_than_kernel(rng, mode):
  case = Case("3d", "NDHWC", "DHW", (1, 1, 2, 3, 2), (3, 5, 4, 2, 1), (1, 2, 1), (1, 1, 2),
              "SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(_run(case, x, k, mode).numpy(), case.expected(x, k))


@pytest.mark.parametrize("op", ["2d", "3d"])
def test_gradients_are_the_adjoint(rng, op):
  """`tf.GradientTape`: <y, ct> = <x, dx> = <k, dk> (the op is bilinear), in float64,
  and one kernel tap's gradient straight from the reference."""
  if op == "2d":
    case = Case("2d", "NCDHW", "DW", (2, 3, 5, 4, 6), (3, 2, 3, 2), (2, 1), (1, 2), "SAME")
  else:
    case = Case("3d", "NDHWC", "DHW", (2, 5, 4, 6, 2), (2, 3, 2, 2, 2), (2, 1, 3), (2, 1, 1),
                ((1, 0), (2, 1), (0, 2)))
  x = tf.constant(random_array(rng, case.x_shape, "float64"))
  k = tf.constant(random_array(rng, case.k_shape, "float64"))
  with tf.GradientTape() as tape:
    tape.watch([x, k])
    y = tf_op(case)(x, k)
    ct = tf.constant(random_array(rng, y.shape, "float64"))
    loss = tf.reduce_sum(y * ct)
  gx, gk = tape.gradient(loss, [x, k])
  assert y.dtype == gx.dtype == gk.dtype == tf.float64
  np.testing.assert_allclose(tf.reduce_sum(x * gx).numpy(), loss.numpy(), rtol=1e-10)
  np.testing.assert_allclose(tf.reduce_sum(k * gk).numpy(), loss.numpy(), rtol=1e-10)
  q = (1,) * (len(case.k_shape) - 2) + (1, 1)
  e = np.zeros(case.k_shape)
  e[q] = 1.0
  np.testing.assert_allclose(gk.numpy()[q], np.sum(case.expected(x.numpy(), e) * ct.numpy()),
                             rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtypes(rng, dtype):
  """x's dtype is kept; half precision is computed in float32 (as dw5d_jax does)."""
  case = Case("3d", "NCDHW", "DHW", (2, 3, 4, 6, 5), (3, 3, 2, 3, 2), (1, 2, 1), 1, "SAME")
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  y = tf_op(case)(x, k)
  assert y.dtype == tf.as_dtype(dtype)
  want = case.expected(np.asarray(x, np.float64), np.asarray(k, np.float64))
  assert_close(np.asarray(y.numpy(), np.float64), want, dtype)


def test_variables_and_numpy_inputs(rng):
  x, k = random_array(rng, (2, 4, 5, 6, 3)), random_array(rng, (2, 3, 3, 1))
  want = depthwise_reference(x, k, axes="WH")
  assert_close(tf_conv2d(tf.Variable(x), tf.Variable(k), axes="WH").numpy(), want)
  assert_close(tf_conv2d(x, k, axes="wh", padding="same", data_format="ndhwc").numpy(), want)


def test_classic_reshape_mistake_differs_from_axes_dw(rng):
  """The classic mistake: reshape (B, D, H, W, C) to (B*H, D, W, C) without a transpose.

  H is not next to batch, so that reshape mixes H slices; `axes="DW"`
  convolves each H slice over (D, W), which is the transpose-then-reshape fold
  and what the reference computes.
  """
  b, d, h, w, c = 2, 4, 3, 5, 2
  x = tf.constant(random_array(rng, (b, d, h, w, c)))
  k = tf.constant(random_array(rng, (3, 3, c, 1)))
  ours = tf_conv2d(x, k, axes="DW").numpy()
  assert_close(ours, depthwise_reference(x.numpy(), k.numpy(), axes="DW"))
  # The mistake as it is usually written, with tf.shape for the sizes.
  s = tf.shape(x)
  wrong = tf.nn.depthwise_conv2d(tf.reshape(x, (s[0] * s[2], s[1], s[3], s[4])), k,
                                 strides=[1, 1, 1, 1], padding="SAME")
  wrong = tf.reshape(wrong, tf.concat([[s[0], s[2]], tf.shape(wrong)[1:]], axis=0)).numpy()
  assert not np.allclose(ours.transpose(0, 2, 1, 3, 4), wrong, atol=1e-3)
  # The fix: transpose H next to batch before the reshape.
  fixed = tf.nn.depthwise_conv2d(
      tf.reshape(tf.transpose(x, [0, 2, 1, 3, 4]), (b * h, d, w, c)), k,
      strides=[1, 1, 1, 1], padding="SAME")
  assert_close(ours, tf.reshape(fixed, (b, h, d, w, c)).numpy().transpose(0, 2, 1, 3, 4))


def test_importing_interop_does_not_import_tensorflow():
  """`dw5d demo` and friends must not pay for TF; the TF ops load on first use."""
  code = ("import sys, interop, interop._app.cli; assert 'tensorflow' not in sys.modules; "
          "interop.tf_depthwise_conv3d; assert 'tensorflow' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------
# Bad input.

X5 = np.full((1, 4, 6, 6, 3), 0.5, np.float32)
K2 = np.ones((3, 3, 3, 1), np.float32)
K3 = np.ones((3, 3, 3, 3, 1), np.float32)

# (id, TF op, JAX op, x, kernel, kwargs, error type): the same call to both APIs.
SHARED = [
    ("rank of x", tf_conv3d, dw.depthwise_conv3d, np.ones((4, 6, 6, 3), np.float32), K3, {},
     ValueError),
    ("rank of x 2d", tf_conv2d, dw.depthwise_conv2d, np.ones((6, 6, 3), np.float32), K2, {},
     ValueError),
    ("rank of kernel", tf_conv2d, dw.depthwise_conv2d, X5, K3, {"axes": "DW"}, ValueError),
    ("channel mismatch", tf_conv3d, dw.depthwise_conv3d, X5,
     np.ones((3, 3, 3, 4, 1), np.float32), {}, ValueError),
    ("channel mismatch ncdhw", tf_conv2d, dw.depthwise_conv2d, X5, K2,
     {"data_format": "NCDHW"}, ValueError),
    ("zero stride", tf_conv3d, dw.depthwise_conv3d, X5, K3, {"strides": 0}, ValueError),
    ("float stride", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"strides": 2.0}, TypeError),
    ("TF-style 4 strides", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"strides": (1, 2, 2, 1)},
     ValueError),
    ("wrong dilations length", tf_conv3d, dw.depthwise_conv3d, X5, K3, {"dilations": (2, 2)},
     ValueError),
    ("unknown padding", tf_conv3d, dw.depthwise_conv3d, X5, K3, {"padding": "FULL"},
     ValueError),
    ("negative pad", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"padding": ((1, 1), (-1, 0))},
     ValueError),
    ("pad not a pair", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"padding": ((1, 1), 2)},
     TypeError),
    ("empty output VALID", tf_conv3d, dw.depthwise_conv3d, X5,
     np.ones((5, 3, 3, 3, 1), np.float32), {"padding": "VALID"}, ValueError),
    ("empty output dilated", tf_conv2d, dw.depthwise_conv2d, X5, K2,
     {"padding": ((1, 0), (0, 0)), "dilations": 4}, ValueError),
    ("empty output D and W", tf_conv2d, dw.depthwise_conv2d, X5, K2,
     {"axes": "WD", "padding": "VALID", "dilations": 3}, ValueError),
    ("empty output W", tf_conv3d, dw.depthwise_conv3d, X5, K3,
     {"padding": ((0, 0), (0, 0), (1, 1)), "dilations": (1, 1, 4)}, ValueError),
    ("zero-size kernel", tf_conv3d, dw.depthwise_conv3d, X5,
     np.ones((3, 0, 3, 3, 1), np.float32), {}, ValueError),
    ("unknown data_format", tf_conv3d, dw.depthwise_conv3d, X5, K3, {"data_format": "NHWDC"},
     ValueError),
    ("4d layout for 5d x", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"data_format": "NHWC"},
     ValueError),
    ("unknown axes", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"axes": "HX"}, ValueError),
    ("repeated axes", tf_conv2d, dw.depthwise_conv2d, X5, K2, {"axes": "HH"}, ValueError),
    ("axes on rank 4", tf_conv2d, dw.depthwise_conv2d, np.ones((1, 6, 6, 3), np.float32), K2,
     {"axes": "DW"}, ValueError),
    ("list input", tf_conv3d, dw.depthwise_conv3d, X5.tolist(), K3, {}, TypeError),
    ("integer x", tf_conv3d, dw.depthwise_conv3d, np.ones((1, 4, 6, 6, 3), np.int32), K3, {},
     TypeError),
    ("complex x", tf_conv3d, dw.depthwise_conv3d, X5.astype(np.complex64), K3, {}, TypeError),
    ("mismatched dtypes", tf_conv2d, dw.depthwise_conv2d, X5, K2.astype(np.float16), {},
     TypeError),
]


@pytest.mark.parametrize("case", SHARED, ids=[c[0] for c in SHARED])
def test_errors_read_as_dw5d_jax_errors(case):
  """Each bad call raises the same error type and text as dw5d_jax (but the name)."""
  _, tf_fn, jax_fn, x, k, kwargs, exc = case
  with pytest.raises(exc) as jax_info:
    jax_fn(x, k, **kwargs)
  expected = str(jax_info.value).replace(jax_fn.__name__, f"tf_{jax_fn.__name__}")
  expected = expected.replace("jax.Array or numpy.ndarray",
                              "tf.Tensor, tf.Variable or numpy.ndarray")
  with pytest.raises(exc, match=re.escape(expected) + "$"):
    tf_fn(x, k, **kwargs)


def _graph_call(fn, x_spec, k_spec, **kwargs):
  """Traces `fn` with the given signature (errors fire while tracing)."""
  return tf.function(lambda a, b: fn(a, b, **kwargs),
                     input_signature=[x_spec, k_spec]).get_concrete_function()


def test_message_examples():
  """A few messages spelled out, as users read them."""
  with pytest.raises(ValueError, match=r"^tf_depthwise_conv3d: `kernel` must have rank 5 "
                     r"\(kd, kh, kw, in_channels, multiplier\), got shape \(3, 3, 3, 1\)\.$"):
    tf_conv3d(X5, K2)
  with pytest.raises(ValueError, match=r"^tf_depthwise_conv2d: along axis W the window "
                     r"\(kernel 3, dilation 4: effective size 9\) does not fit the padded "
                     r"input \(size 6 = 6 \+ padding \(0, 0\)\) with padding 'VALID'; the "
                     r"output would be empty\."):
    tf_conv2d(X5, K2, dilations=(1, 4), padding="VALID")
  with pytest.raises(TypeError, match=r"^tf_depthwise_conv2d: `kernel` must have a floating "
                     r"dtype \(float16, bfloat16, float32, float64\), got int32\.$"):
    tf_conv2d(X5, tf.ones((3, 3, 3, 1), tf.int32))


def test_graph_only_errors():
  """Shapes a `tf.function` signature can leave unknown: rank, channels, kernel dims.

  (TF prefixes errors raised while tracing with the user-code traceback.)
  """
  k2 = tf.TensorSpec([3, 3, 3, 1], tf.float32)
  with pytest.raises(ValueError, match=r"tf_depthwise_conv2d: `x` must have a known rank "
                     r"\(4 or 5\), got a tensor of unknown rank"):
    _graph_call(tf_conv2d, tf.TensorSpec(None, tf.float32), k2)
  with pytest.raises(ValueError, match=r"tf_depthwise_conv3d: `x` must have a known rank "
                     r"\(5\)"):
    _graph_call(tf_conv3d, tf.TensorSpec(None, tf.float32), tf.TensorSpec([3] * 4 + [1]))
  with pytest.raises(ValueError, match=r"tf_depthwise_conv2d: the channel dimension of `x` "
                     r"must be a known int, got None \(layout NCDHW\)"):
    _graph_call(tf_conv2d, tf.TensorSpec([None] * 5, tf.float32), k2, data_format="NCDHW")
  with pytest.raises(ValueError, match=r"tf_depthwise_conv2d: `kernel` must have a static "
                     r"shape, got \(3, None, 3, 1\)"):
    _graph_call(tf_conv2d, tf.TensorSpec([None, None, None, 3], tf.float32),
                tf.TensorSpec([3, None, 3, 1], tf.float32))
  with pytest.raises(ValueError, match=r"tf_depthwise_conv2d: `x` must have rank 4 "
                     r"\(NHWC, NCHW\) or 5 \(NDHWC, NCDHW\), got rank 3 with shape "
                     r"\(None, None, 3\)"):
    _graph_call(tf_conv2d, tf.TensorSpec([None, None, 3], tf.float32), k2)


def test_empty_output_at_run_time_is_an_error(rng):
  """With sizes unknown while tracing, a window that does not fit fails when run."""
  fn = tf.function(lambda a: tf_conv2d(a, K2, padding="VALID", dilations=2),
                   input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  assert fn(random_array(rng, (1, 5, 6, 3))).shape == (1, 1, 2, 3)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"tf_depthwise_conv2d: along axis H the window \(kernel 3, "
                     r"dilation 2: effective size 5\) does not fit"):
    fn(random_array(rng, (1, 4, 6, 3)))


# ----------------------------------------------------------------------------
# Border modes (`padding_mode`): tf.pad's REFLECT and SYMMETRIC, slices for edge
# and circular, against the reference's numpy.pad.

MODE_CASES = [
    Case("3d", "NCDHW", "DHW", (1, 3, 4, 6, 5), (3, 2, 3, 3, 2), (2, 1, 1), (1, 1, 2),
         ("CAUSAL", "SAME", (2, 1)), padding_mode=("edge", "reflect", "circular")),
    Case("2d", "NDHWC", "DW", (2, 5, 3, 6, 2), (3, 3, 2, 1), (1, 2), (2, 1),
         padding_mode="symmetric"),
    Case("2d", "NHWC", "HW", (1, 6, 5, 3), (2, 3, 3, 1), 1, 1, ((1, 0), (2, 2)),
         padding_mode="reflect"),
    Case("3d", "NDHWC", "DHW", (1, 3, 4, 5, 2), (3, 3, 3, 2, 1), padding_mode="circular"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", MODE_CASES, ids=lambda c: c.name)
def test_padding_modes_match_reference(rng, case, mode):
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(_run(case, x, k, mode).numpy(), case.expected(x, k), err_msg=case.name)


def test_padding_mode_errors():
  x = np.ones((1, 3, 6, 2), np.float32)
  with pytest.raises(ValueError, match=re.escape(
      "tf_depthwise_conv2d: `padding_mode` 'reflect' along axis H fills at most n - 1 = 2 "
      "positions per side of an input of size 3, but `padding` (3, 0) pads (3, 0) there.")):
    tf_conv2d(x, K2[:, :, :2], padding=((3, 0), (1, 1)), padding_mode="reflect")
  with pytest.raises(ValueError, match=re.escape(
      "tf_depthwise_conv2d: `padding_mode` 'edge' along axis W fills padding, but `padding` "
      "is 'VALID' there")):
    tf_conv2d(x, K2[:, :, :2], padding=("SAME", "VALID"), padding_mode="edge")
  with pytest.raises(ValueError, match=re.escape("got 'wrap'.")):
    tf_conv2d(x, K2[:, :, :2], padding_mode="wrap")


def test_padding_wider_than_the_axis_at_run_time(rng):
  """With sizes unknown while tracing, padding wider than the mode fills fails when run."""
  fn = tf.function(lambda a: tf_conv2d(a, K2, padding="CAUSAL", padding_mode="circular"),
                   input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  x = random_array(rng, (1, 2, 5, 3))
  assert_close(fn(x).numpy(), depthwise_reference(x, K2, axes="HW", padding="CAUSAL",
                                                  padding_mode="circular"))
  # (TF shows the message's quotes escaped.) Every time: the slices that would
  # fail with TF's own message wait for the check (20 calls: a race showed
  # about once in 60 before they did).
  small = random_array(rng, (1, 1, 5, 3))
  for _ in range(20):
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
        "along axis H fills at most n positions per side of an input of size (run-time size "
        "of H), but `padding`")):
      fn(small)
