"""The public ops against the float64 reference (dw5d_jax._depthwise).

Expected values come from `dw5d_jax._reference.depthwise_reference`, a direct
sum over kernel taps in float64 that shares no code with the lowerings and is
itself checked against brute force and TF in test_reference.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

import dw5d_jax as dw
from dw5d_jax._reference import depthwise_reference
from tests.helpers import METHODS, Case, assert_close, cases, random_array, reference_grads, run


@given(case=cases(), seed=st.integers(0, 2**31 - 1))
def test_every_method_matches_reference(case: Case, seed):
  rng = np.random.default_rng(seed)
  x = random_array(rng, case.x_shape)
  k = random_array(rng, case.k_shape)
  want = case.expected(x, k)
  for method in METHODS:
    y = run(case, x, k, method=method)
    assert y.dtype == jnp.float32
    assert_close(y, want, "float32", err_msg=f"{case} method={method}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["NDHWC", "NCDHW"])
@pytest.mark.parametrize("axes", ["HW", "DW", "DH", "WH"])
def test_per_slice_grid(rng, method, layout, axes):
  """Every fold axis and layout, with odd sizes, stride, dilation and multiplier."""
  case = Case("2d", layout, axes,
              x_shape=((2, 5, 7, 9, 3) if layout == "NDHWC" else (2, 3, 5, 7, 9)),
              k_shape=(3, 2, 3, 2), strides=(2, 1), dilations=(1, 2), padding="SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(run(case, x, k, method=method), case.expected(x, k))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (0, 1), (1, 3))])
def test_3d_grid(rng, method, padding):
  case = Case("3d", "NDHWC", "DHW", x_shape=(2, 6, 7, 5, 4), k_shape=(3, 2, 3, 4, 2),
              strides=(1, 2, 3), dilations=(2, 1, 1), padding=padding)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(run(case, x, k, method=method), case.expected(x, k))


@pytest.mark.parametrize("method", METHODS)
def test_inputs_smaller_than_kernel(rng, method):
  """SAME padding on axes shorter than the (dilated) kernel."""
  case = Case("3d", "NDHWC", "DHW", x_shape=(1, 1, 2, 3, 2), k_shape=(3, 5, 4, 2, 1),
              strides=(1, 2, 1), dilations=(1, 1, 2), padding="SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(run(case, x, k, method=method), case.expected(x, k))


@pytest.mark.parametrize("method", METHODS)
def test_rank4_is_a_drop_in_for_tf(rng, method):
  tf = pytest.importorskip("tensorflow")
  x = random_array(rng, (2, 9, 8, 3))
  k = random_array(rng, (3, 3, 3, 2))
  y = dw.depthwise_conv2d(x, k, strides=2, method=method)
  want = tf.nn.depthwise_conv2d(x, k, strides=[1, 2, 2, 1], padding="SAME").numpy()
  chex.assert_shape(y, (2, 5, 4, 6))
  assert_close(y, want)


class WithAndWithoutJitTest(chex.TestCase):
  """Every method, traced under `jit` and run op by op, against the reference."""

  CASE = Case("2d", "NDHWC", "DW", (2, 4, 5, 6, 3), (3, 3, 3, 2), 2, 1, "SAME")

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*METHODS)
  def test_forward(self, method):
    rng = np.random.default_rng(0)
    x, k = random_array(rng, self.CASE.x_shape), random_array(rng, self.CASE.k_shape)
    y = self.variant(lambda a, b: run(self.CASE, a, b, method=method))(x, k)
    chex.assert_shape(y, (2, 2, 5, 3, 6))  # D and W strided by 2, C * M = 6
    assert_close(y, self.CASE.expected(x, k))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*METHODS)
  def test_gradients(self, method):
    rng = np.random.default_rng(1)
    x, k = random_array(rng, self.CASE.x_shape), random_array(rng, self.CASE.k_shape)
    ct = random_array(rng, (2, 2, 5, 3, 6))
    grad = self.variant(jax.grad(lambda a, b: jnp.sum(run(self.CASE, a, b, method=method) * ct),
                                 argnums=(0, 1)))
    assert_close(grad(x, k), reference_grads(self.CASE, x, k, ct))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("in_axes", [(0, None), (0, 0), (None, 0)])
def test_vmap_matches_loop(rng, method, in_axes):
  case = Case("3d", "NCDHW", "DHW", (1, 2, 4, 5, 3), (2, 3, 2, 2, 2), (1, 2, 1), 1, "SAME")
  b = 3
  xs = random_array(rng, (b, *case.x_shape) if in_axes[0] == 0 else case.x_shape)
  ks = random_array(rng, (b, *case.k_shape) if in_axes[1] == 0 else case.k_shape)
  got = jax.vmap(lambda a, w: run(case, a, w, method=method), in_axes=in_axes)(xs, ks)
  for i in range(b):
    xi = xs[i] if in_axes[0] == 0 else xs
    ki = ks[i] if in_axes[1] == 0 else ks
    assert_close(got[i], case.expected(xi, ki))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_dtypes(rng, method, dtype):
  """Output keeps x's dtype; accumulation is float32 so errors stay at input rounding."""
  case = Case("3d", "NDHWC", "DHW", (2, 4, 6, 5, 3), (3, 3, 3, 3, 2), (1, 2, 1), 1, "SAME")
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  y = run(case, x, k, method=method)
  assert y.dtype == jnp.dtype(dtype)
  want = case.expected(np.asarray(x, np.float64), np.asarray(k, np.float64))
  assert_close(y, want, dtype)


@pytest.mark.parametrize("method", METHODS)
def test_preferred_element_type(rng, method):
  case = Case("2d", "NHWC", "HW", (2, 7, 6, 3), (3, 3, 3, 1), 1, 1, "VALID")
  x = random_array(rng, case.x_shape, "bfloat16")
  k = random_array(rng, case.k_shape, "bfloat16")
  y = run(case, x, k, method=method, preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32
  # Products of bfloat16 values are exact in float32; only the sum rounds.
  assert_close(y, case.expected(np.asarray(x, np.float64), np.asarray(k, np.float64)),
               "float32")


@pytest.mark.parametrize("method", METHODS)
def test_float64(rng, method):
  with jax.enable_x64(True):
    case = Case("3d", "NCDHW", "DHW", (1, 2, 5, 4, 6), (2, 3, 3, 2, 2), 1, (1, 2, 1), "SAME")
    x, k = random_array(rng, case.x_shape, "float64"), random_array(rng, case.k_shape, "float64")
    y = run(case, jnp.asarray(x), jnp.asarray(k), method=method)
    assert y.dtype == jnp.float64
    assert_close(y, case.expected(x, k), "float64")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("strides", [1, 2])
def test_nan_inf_reach_exactly_the_covering_outputs(rng, method, bad, strides):
  case = Case("3d", "NDHWC", "DHW", (2, 5, 6, 7, 3), (3, 2, 3, 3, 2), strides, (1, 2, 1),
              "SAME")
  x = random_array(rng, case.x_shape)
  k = random_array(rng, case.k_shape)
  pos = (1, 2, 3, 4, 1)
  x[pos] = bad
  y = np.asarray(run(case, x, k, method=method))
  # Which outputs read position `pos`: the reference on an indicator input.
  indicator = np.zeros(case.x_shape)
  indicator[pos] = 1.0
  covers = case.expected(indicator, np.ones(case.k_shape)) > 0
  np.testing.assert_array_equal(~np.isfinite(y), covers)
  assert_close(np.where(covers, 0.0, y), np.where(covers, 0.0, case.expected(
      np.where(np.isfinite(x), x, 0.0), k)))


def test_classic_reshape_mistake_is_not_what_axes_dw_computes(rng):
  """The classic mistake: fold H into batch by reshaping (B, D, H, W, C) to (B*H, D, W, C).

  Without a transpose first, that reshape regroups memory so that each "slice"
  mixes positions from different H rows (H is not next to batch).
  `axes="DW"` must convolve each H slice over (D, W) instead.
  """
  b, d, h, w, c = 2, 4, 3, 5, 2
  x = random_array(rng, (b, d, h, w, c))
  k = random_array(rng, (3, 3, c, 1))
  ours = np.asarray(dw.depthwise_conv2d(x, k, axes="DW"))
  # The correct answer: per H slice, from the reference.
  assert_close(ours, depthwise_reference(x, k, axes="DW"))
  # The mistake, reshape without transpose, with the reference's 2D op.
  wrong = depthwise_reference(x.reshape(b * h, d, w, c), k, axes="HW",
                              data_format="NHWC").reshape(b, h, d, w, c)
  wrong_as_ours = wrong.transpose(0, 2, 1, 3, 4)  # the same (B, D, H, W, C) layout
  assert not np.allclose(ours, wrong_as_ours, atol=1e-3)
  assert not np.allclose(ours.transpose(0, 2, 1, 3, 4).reshape(-1), wrong.reshape(-1),
                         atol=1e-3)
  # And the correct transpose-then-reshape fold does equal ours.
  fixed = depthwise_reference(x.transpose(0, 2, 1, 3, 4).reshape(b * h, d, w, c), k,
                              axes="HW", data_format="NHWC")
  assert_close(ours, fixed.reshape(b, h, d, w, c).transpose(0, 2, 1, 3, 4))
