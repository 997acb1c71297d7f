"""The float64 reference itself: against a brute-force loop and against TF.

Expected values here come from (a) a per-output-element loop written straight
from the definition, and (b) `tf.nn.depthwise_conv2d` on the fold-depth path:
reshape (N, D, H, W, C) to (N*D, H, W, C), which is right for axes "HW"
because D sits next to batch. Also the comparison rule (`TOLERANCES`,
`tolerance`, `compare`) and `Case`, which every comparison with the reference
shares.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dw5d_jax._reference import TOLERANCES, Case, compare, depthwise_reference, tolerance
from tests.helpers import random_array


def _brute_force(x, k, strides, dilations, pads):
  """One output element at a time; x channels-last (N, *S, C), S = convolved axes only."""
  nsp = x.ndim - 2
  n, c, m = x.shape[0], x.shape[-1], k.shape[-1]
  outs = [(x.shape[1 + i] + pads[i][0] + pads[i][1] - ((k.shape[i] - 1) * dilations[i] + 1))
          // strides[i] + 1 for i in range(nsp)]
  y = np.zeros((n, *outs, c * m))
  for b, *o in itertools.product(range(n), *(range(s) for s in outs)):
    for ch, mm in itertools.product(range(c), range(m)):
      total = 0.0
      for t in itertools.product(*(range(s) for s in k.shape[:nsp])):
        p = [o[i] * strides[i] + t[i] * dilations[i] - pads[i][0] for i in range(nsp)]
        if all(0 <= p[i] < x.shape[1 + i] for i in range(nsp)):
          total += x[(b, *p, ch)] * k[(*t, ch, mm)]
      y[(b, *o, ch * m + mm)] = total
  return y


@pytest.mark.parametrize("strides,dilations,pads", [
    ((1, 1, 1), (1, 1, 1), ((0, 0), (0, 0), (0, 0))),
    ((2, 1, 3), (1, 2, 1), ((1, 0), (0, 2), (2, 1))),
    ((1, 2, 2), (2, 1, 2), ((0, 1), (1, 1), (0, 0))),
])
def test_reference_matches_brute_force_3d(rng, strides, dilations, pads):
  x = rng.standard_normal((2, 5, 6, 4, 3))
  k = rng.standard_normal((2, 3, 2, 3, 2))
  got = depthwise_reference(x, k, axes="DHW", strides=strides, dilations=dilations, padding=pads)
  np.testing.assert_allclose(got, _brute_force(x, k, strides, dilations, pads), rtol=1e-12)


@pytest.mark.parametrize("strides,dilations", [((1, 1, 1), (1, 1, 1)), ((2, 1, 3), (1, 2, 2)),
                                               ((3, 2, 1), (2, 1, 3))])
def test_reference_causal_is_the_whole_reach_low(rng, strides, dilations):
  """CAUSAL: pads (e - 1, 0) on every axis, so output o reads inputs <= o * s only."""
  x = rng.standard_normal((2, 5, 2, 4, 3))  # H smaller than the dilated kernel
  k = rng.standard_normal((2, 3, 2, 3, 2))
  pads = [((k.shape[i] - 1) * dilations[i], 0) for i in range(3)]
  got = depthwise_reference(x, k, axes="DHW", strides=strides, dilations=dilations,
                            padding="CAUSAL")
  np.testing.assert_allclose(got, _brute_force(x, k, strides, dilations, pads), rtol=1e-12)
  assert got.shape[1:4] == tuple(-(-n // s) for n, s in zip(x.shape[1:4], strides))
  # Mixed entries: causal along D only.
  mixed = depthwise_reference(x, k, axes="DHW", strides=strides, dilations=dilations,
                              padding=("causal", (2, 2), (2, 0)))
  np.testing.assert_allclose(
      mixed, _brute_force(x, k, strides, dilations, [pads[0], (2, 2), (2, 0)]), rtol=1e-12)


@pytest.mark.parametrize("axes", ["HW", "DW", "DH", "WD"])
def test_reference_matches_brute_force_per_slice(rng, axes):
  """Per-slice 2D: move the carried axis into batch by hand, then brute force."""
  x = rng.standard_normal((2, 4, 5, 6, 2))
  k = rng.standard_normal((3, 2, 2, 2))
  pads = ((1, 1), (0, 2))
  got = depthwise_reference(x, k, axes=axes, strides=(2, 1), dilations=(1, 2), padding=pads)
  carried = "DHW".replace(axes[0], "").replace(axes[1], "")
  order = [1 + "DHW".index(a) for a in (carried, *axes)]
  xt = x.transpose(0, *order, 4)  # (N, carried, a0, a1, C)
  flat = xt.reshape(-1, *xt.shape[2:])
  flat_out = _brute_force(flat, k, (2, 1), (1, 2), pads)
  want = flat_out.reshape(xt.shape[0], xt.shape[1], *flat_out.shape[1:])
  inv = np.argsort([0, *order, 4])
  np.testing.assert_allclose(got, want.transpose(inv), rtol=1e-12)


def test_reference_same_padding_split_matches_brute_force(rng):
  """SAME with stride: TF's split puts the smaller half low (n=6, k=4, s=2 -> (1, 2))."""
  x = rng.standard_normal((1, 6, 1))
  k = rng.standard_normal((4, 1, 1))
  got = depthwise_reference(x[:, None, None], k[None], axes="HW", strides=2, padding="SAME")
  want = _brute_force(x, k, (2,), (1,), ((1, 2),))
  np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-12)


def test_compare_applies_the_dtype_tolerance():
  want = np.array([[1.0, -4.0], [0.5, 2.0]])
  close = compare(want + 1e-6, want, "float32")
  assert close.max_abs == pytest.approx(1e-6) and close.max_rel == pytest.approx(0.25e-6)
  assert close.ok and close.ratio < 1
  assert not compare(want + 1e-3, want, "float32").ok
  assert compare(want + 1e-3, want, "bfloat16").ok
  assert compare(want.astype(np.float16), want, np.float16).ok  # dtypes, not only names
  assert compare(want[:1], want, "float32") == (np.inf, np.inf, np.inf)
  assert compare(np.zeros(0), np.zeros(0), "float32").ok


def test_tolerance_scales_atol_by_the_largest_magnitude():
  rtol, atol = TOLERANCES["float16"]
  assert tolerance(np.array([0.25, -0.5]), "float16") == (rtol, atol)  # max(1, 0.5) = 1
  assert tolerance(np.array([3.0, -8.0]), "float16") == (rtol, 8 * atol)
  # The rule at its edge: an error of exactly atol * scale + rtol * |expected| passes.
  want = np.array([3.0, -8.0])
  edge = want + (8 * atol + rtol * np.abs(want)) * np.array([1, -1]) * (1 - 1e-9)
  assert compare(edge, want, "float16").ok
  assert not compare(edge * (1 + 1e-3), want, "float16").ok


def test_compare_names_the_known_dtypes():
  with pytest.raises(ValueError, match=r"compare: `dtype` must be one of float64, float32, "
                     r"float16, bfloat16, got 'int8'"):
    compare(np.ones(2), np.ones(2), "int8")


def test_case_describes_a_call():
  per_slice = Case("2d", "NCDHW", "DW", (1, 2, 6, 3, 5), (3, 2, 2, 1), (2, 1), 1,
                   ((1, 0), (0, 1)))
  assert per_slice.op_name == "depthwise_conv2d"
  assert per_slice.kwargs() == {"strides": (2, 1), "dilations": 1,
                                "padding": ((1, 0), (0, 1)), "data_format": "NCDHW",
                                "axes": "DW"}
  assert per_slice.name == "2d DW NCDHW k3x2 s2,1 r1 pad(1,0)(0,1) M1"
  assert "axes" not in Case("2d", "NHWC", "HW", (1, 5, 5, 2), (3, 3, 2, 1)).kwargs()
  x, k = np.ones(per_slice.x_shape), np.ones(per_slice.k_shape)
  np.testing.assert_array_equal(
      per_slice.expected(x, k),
      depthwise_reference(x, k, axes="DW", strides=(2, 1), padding=((1, 0), (0, 1)),
                          data_format="NCDHW"))


tf = pytest.importorskip("tensorflow")


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides,dilations", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("multiplier", [1, 3])
def test_reference_matches_tf_fold_depth(rng, padding, strides, dilations, multiplier):
  n, d, h, w, c = 2, 3, 9, 8, 4
  x = random_array(rng, (n, d, h, w, c), "float64")
  k = random_array(rng, (3, 2, c, multiplier), "float64")
  folded = tf.reshape(tf.constant(x), (n * d, h, w, c))
  y = tf.nn.depthwise_conv2d(folded, tf.constant(k), strides=[1, strides, strides, 1],
                             padding=padding, dilations=[dilations, dilations])
  want = tf.reshape(y, (n, d, *y.shape[1:])).numpy()
  got = depthwise_reference(x, k, axes="HW", strides=strides, dilations=dilations,
                            padding=padding)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_reference_matches_tf_explicit_padding_nchw(rng):
  x = random_array(rng, (2, 3, 7, 6), "float64")  # NCHW
  k = random_array(rng, (3, 3, 3, 2), "float64")
  pads = ((2, 0), (1, 3))
  want = tf.nn.depthwise_conv2d(
      tf.transpose(tf.constant(x), (0, 2, 3, 1)), tf.constant(k), strides=[1, 1, 1, 1],
      padding=[[0, 0], list(pads[0]), list(pads[1]), [0, 0]])
  got = depthwise_reference(x, k, axes="HW", padding=pads, data_format="NCHW")
  np.testing.assert_allclose(got, tf.transpose(want, (0, 3, 1, 2)).numpy(), rtol=1e-10,
                             atol=1e-10)
