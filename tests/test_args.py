"""Bad input gets a clear error at trace time, never a result (dw5d_jax._args)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dw5d_jax as dw

X5 = jnp.zeros((1, 4, 6, 6, 3), jnp.float32) + 0.5
K2 = jnp.ones((3, 3, 3, 1), jnp.float32)
K3 = jnp.ones((3, 3, 3, 3, 1), jnp.float32)

conv2d, conv3d = dw.depthwise_conv2d, dw.depthwise_conv3d

CASES = [
    # (op, x, kernel, kwargs, error type, message pattern)
    ("rank of x", conv3d, jnp.ones((4, 6, 6, 3)), K3, {}, ValueError,
     r"depthwise_conv3d: `x` must have rank 5 \(NDHWC, NCDHW\), got rank 4 with shape "
     r"\(4, 6, 6, 3\)"),
    ("rank of x 2d", conv2d, jnp.ones((6, 6, 3)), K2, {}, ValueError,
     r"depthwise_conv2d: `x` must have rank 4 \(NHWC, NCHW\) or 5 \(NDHWC, NCDHW\), got rank 3"),
    ("rank of kernel 3d", conv3d, X5, jnp.ones((3, 3, 3, 1)), {}, ValueError,
     r"depthwise_conv3d: `kernel` must have rank 5 \(kd, kh, kw, in_channels, multiplier\), "
     r"got shape \(3, 3, 3, 1\)"),
    ("rank of kernel 2d", conv2d, X5, K3, {"axes": "DW"}, ValueError,
     r"depthwise_conv2d: `kernel` must have rank 4 \(kd, kw, in_channels, multiplier\), got "
     r"shape \(3, 3, 3, 3, 1\)"),
    ("channel mismatch", conv3d, X5, jnp.ones((3, 3, 3, 4, 1)), {}, ValueError,
     r"depthwise_conv3d: `kernel` in_channels \(dim 3, size 4\) must equal the channels of "
     r"`x` \(3, layout NDHWC\)"),
    ("channel mismatch ncdhw", conv2d, X5, K2, {"data_format": "NCDHW"}, ValueError,
     r"must equal the channels of `x` \(4, layout NCDHW\)"),
    ("zero stride", conv3d, X5, K3, {"strides": 0}, ValueError,
     r"depthwise_conv3d: `strides` must be positive, got 0"),
    ("negative stride", conv2d, X5, K2, {"strides": (1, -2)}, ValueError,
     r"depthwise_conv2d: `strides` must be positive, got \(1, -2\)"),
    ("float stride", conv2d, X5, K2, {"strides": 2.0}, TypeError,
     r"depthwise_conv2d: `strides` must be a positive int or a sequence of 2 positive ints, "
     r"one per convolved axis \(H, W\); got float 2.0"),
    ("float in strides", conv3d, X5, K3, {"strides": (1, 1.5, 1)}, TypeError,
     r"`strides` must contain only ints, got float 1.5"),
    ("bool stride", conv3d, X5, K3, {"strides": True}, TypeError, r"got bool True"),
    ("TF-style 4 strides", conv2d, X5, K2, {"strides": (1, 2, 2, 1)}, ValueError,
     r"one per convolved axis \(H, W\); got 4 values \(1, 2, 2, 1\)"),
    ("zero dilation", conv3d, X5, K3, {"dilations": (1, 0, 1)}, ValueError,
     r"depthwise_conv3d: `dilations` must be positive, got \(1, 0, 1\)"),
    ("wrong dilations length", conv3d, X5, K3, {"dilations": (2, 2)}, ValueError,
     r"`dilations` must be a positive int or a sequence of 3 positive ints, one per "
     r"convolved axis \(D, H, W\); got 2 values"),
    ("unknown padding", conv3d, X5, K3, {"padding": "FULL"}, ValueError,
     r"depthwise_conv3d: `padding` must be one of 'SAME', 'VALID', 'CAUSAL', or a sequence "
     r"of 3 entries, one per convolved axis \(D, H, W\), each one of those or a \(lo, hi\) "
     r"pair of non-negative ints; got 'FULL'\."),
    ("unknown padding entry", conv2d, X5, K2, {"padding": ("SAME", "FULL")}, ValueError,
     r"depthwise_conv2d: `padding` must be .*; got entry 'FULL' in \('SAME', 'FULL'\)\."),
    ("padding pairs count", conv2d, X5, K2, {"padding": ((1, 1),)}, ValueError,
     r"depthwise_conv2d: `padding` must be .* a sequence of 2 entries, one per convolved "
     r"axis \(H, W\), .*; got 1 entries"),
    ("negative pad", conv2d, X5, K2, {"padding": ((1, 1), (-1, 0))}, ValueError,
     r"got negative padding \(-1, 0\)"),
    ("pad not a pair", conv2d, X5, K2, {"padding": ((1, 1), 2)}, TypeError,
     r"got entry 2 in"),
    ("padding type", conv2d, X5, K2, {"padding": 3}, TypeError, r"got int 3"),
    ("empty output VALID", conv3d, X5, jnp.ones((5, 3, 3, 3, 1)), {"padding": "VALID"},
     ValueError,
     r"depthwise_conv3d: along axis D the window \(kernel 5, dilation 1: effective size 5\) "
     r"does not fit the padded input \(size 4 = 4 \+ padding \(0, 0\)\).*the output would "
     r"be empty"),
    ("empty output dilated", conv2d, X5, K2, {"padding": ((1, 0), (0, 0)), "dilations": 4},
     ValueError, r"along axis H the window \(kernel 3, dilation 4: effective size 9\)"),
    ("zero-size spatial", conv3d, jnp.ones((1, 0, 6, 6, 3)), K3, {}, ValueError,
     r"along axis D .* the output would be empty"),
    ("zero-size kernel", conv3d, X5, jnp.ones((3, 0, 3, 3, 1)), {}, ValueError,
     r"depthwise_conv3d: `kernel` must not have a zero-size dimension, got shape "
     r"\(3, 0, 3, 3, 1\)"),
    ("zero multiplier", conv2d, X5, jnp.ones((3, 3, 3, 0)), {}, ValueError,
     r"`kernel` must not have a zero-size dimension"),
    ("unknown data_format", conv3d, X5, K3, {"data_format": "NHWDC"}, ValueError,
     r"depthwise_conv3d: `data_format` must be None or one of 'NDHWC', 'NCDHW' for rank-5 "
     r"`x`, got 'NHWDC'"),
    ("4d layout for 5d x", conv2d, X5, K2, {"data_format": "NHWC"}, ValueError,
     r"`data_format` must be None or one of 'NDHWC', 'NCDHW' for rank-5 `x`, got 'NHWC'"),
    ("unknown axes", conv2d, X5, K2, {"axes": "HX"}, ValueError,
     r"depthwise_conv2d: `axes` must be two distinct letters from 'D', 'H', 'W' \(e.g. "
     r"'HW'\), got 'HX'"),
    ("repeated axes", conv2d, X5, K2, {"axes": "HH"}, ValueError,
     r"`axes` must be two distinct letters .* got 'HH'"),
    ("three axes", conv2d, X5, K2, {"axes": "DHW"}, ValueError, r"got 'DHW'"),
    ("axes on rank 4", conv2d, jnp.ones((1, 6, 6, 3)), K2, {"axes": "DW"}, ValueError,
     r"`axes` applies to rank-5 `x` only"),
    ("unknown method", conv3d, X5, K3, {"method": "fft"}, ValueError,
     r"depthwise_conv3d: `method` must be one of 'auto', 'conv', 'shift'.*, got 'fft'"),
    ("list input", conv3d, X5.tolist(), K3, {}, TypeError,
     r"depthwise_conv3d: `x` must be a jax.Array or numpy.ndarray, got list"),
    ("scalar kernel", conv2d, X5, 1.0, {}, TypeError,
     r"depthwise_conv2d: `kernel` must be a jax.Array or numpy.ndarray, got float"),
    ("integer x", conv3d, jnp.ones((1, 4, 6, 6, 3), jnp.int32), K3, {}, TypeError,
     r"depthwise_conv3d: `x` must have a floating dtype \(float16, bfloat16, float32, "
     r"float64\), got int32"),
    ("integer kernel", conv2d, X5, jnp.ones((3, 3, 3, 1), jnp.int32), {}, TypeError,
     r"`kernel` must have a floating dtype .* got int32"),
    ("complex x", conv3d, X5.astype(jnp.complex64), K3, {}, TypeError,
     r"`x` must have a floating dtype .* got complex64"),
    ("mismatched dtypes", conv3d, X5, K3.astype(jnp.bfloat16), {}, TypeError,
     r"depthwise_conv3d: `x` and `kernel` must have the same dtype, got x float32 and "
     r"kernel bfloat16"),
    ("bad precision", conv3d, X5, K3, {"precision": "ultra"}, ValueError,
     r"depthwise_conv3d: `precision` must be None, a jax.lax.Precision"),
    ("integer preferred type", conv3d, X5, K3, {"preferred_element_type": jnp.int32},
     TypeError, r"`preferred_element_type` must be a floating dtype .* got int32"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_with_message(case):
  _, op, x, k, kwargs, exc, pattern = case
  with pytest.raises(exc, match=pattern):
    op(x, k, **kwargs)


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c[2], jax.Array)
                                  and isinstance(c[3], jax.Array)],
                         ids=lambda c: c[0])
def test_bad_input_raises_under_jit(case):
  """The same errors fire while tracing under `jit` (no result is ever returned)."""
  _, op, x, k, kwargs, exc, pattern = case
  with pytest.raises(exc, match=pattern):
    jax.jit(lambda a, b: op(a, b, **kwargs))(x, k)


def test_message_reads_as_one_sentence():
  """No stray tuple formatting (equinox once shipped a message printed as a tuple)."""
  with pytest.raises(ValueError) as info:
    conv3d(X5, jnp.ones((3, 3, 8, 1)))
  msg = str(info.value)
  assert not msg.startswith("("), msg
  assert msg.endswith("."), msg
  assert re.fullmatch(r"depthwise_conv3d: `kernel` must have rank 5 .*\.", msg), msg


def test_accepted_spellings():
  """Lower-case padding/axes/layout, numpy ints and arrays are accepted."""
  x = np.random.default_rng(0).standard_normal((1, 3, 5, 5, 2)).astype(np.float32)
  k = np.ones((3, 3, 2, 1), np.float32)
  a = conv2d(x, k, padding="same", axes="hw", strides=np.int64(1))
  b = conv2d(jnp.asarray(x), jnp.asarray(k), padding="SAME", axes="HW", data_format="ndhwc")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
