"""The native CPU kernels (dw5d_jax/_native.py, _native_build.py, _csrc/).

Expected values come from the float64 reference (`depthwise_reference`, and
the linearity identities `dL/dx[p] = <ref(e_p, k), ct>`, `dL/dk[q] =
<ref(x, e_q), ct>`) and from the portable XLA lowering of the same
computation, which `jax.export` always uses (an exported module must not
name the custom call). conftest.py sets `DW5D_JAX_NATIVE=all`, so every
float32/bfloat16 configuration in this file and in the rest of the suite
runs natively (channels-first ones on the channels-first kernels, or
transposed around the channels-last ones where `_policy.transposed` says);
the build, the cache and the fallbacks are checked in fresh processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

import dw5d_jax as dw
from dw5d_jax import _native_build
from dw5d_jax._native_build import NativeStatus
from dw5d_jax._reference import depthwise_reference
from tests.helpers import Case, assert_close, cases, random_array, run

TARGETS = ("dw5d_forward", "dw5d_input_grad", "dw5d_kernel_grad")


@pytest.fixture(scope="module", autouse=True)
def native():
  if _native_build.mode() == "off":
    pytest.skip("DW5D_JAX_NATIVE=0: this run checks XLA's lowering only")
  status = dw.native_status()
  assert status.active, status.detail
  return status


def _custom_calls(text: str) -> set[str]:
  return set(re.findall(r"custom_call @(dw5d_\w+)", text))


def _vjp_fn(case: Case, **extra):
  def fn(x, k, ct):
    y, pullback = jax.vjp(lambda a, b: run(case, a, b, **extra), x, k)
    return (y, *pullback(ct.astype(y.dtype)))
  return fn


def _portable(fn, *args):
  """`fn(*args)` through `jax.export`: XLA's lowering, never the custom call."""
  exp = export.export(jax.jit(fn))(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
  assert not _custom_calls(exp.mlir_module())
  return exp.call(*args)


def _check_against_reference(case: Case, x, k, ct, got, dtype="float32"):
  """Forward against the reference; one input and one kernel position of the gradients."""
  y, gx, gk = got
  x64, k64, ct64 = (np.asarray(a, np.float64) for a in (x, k, ct))
  assert_close(y, case.expected(x64, k64), dtype, err_msg=f"y {case}")
  rng = np.random.default_rng(0)
  for grad, shape, name in ((gx, case.x_shape, "dx"), (gk, case.k_shape, "dk")):
    pos = tuple(int(rng.integers(s)) for s in shape)
    e = np.zeros(shape)
    e[pos] = 1.0
    want = np.sum((case.expected(e, k64) if name == "dx" else case.expected(x64, e)) * ct64)
    assert_close(np.asarray(grad, np.float64)[pos], want, dtype, err_msg=f"{name}{pos} {case}")


@settings(max_examples=15)
@given(case=cases(max_size=6), seed=st.integers(0, 2**31 - 1))
def test_random_configs_match_reference_and_portable_path(case, seed):
  """Strides, dilations, paddings, multipliers, sizes below the kernel, layouts; all three kernels."""
  _check_random_case(case, seed)


@settings(max_examples=10)
@given(case=cases(max_size=8, channels=st.sampled_from([5, 9, 16, 17, 24, 33]),
                  multipliers=st.sampled_from([1, 1, 2])),
       seed=st.integers(0, 2**31 - 1))
def test_random_configs_with_wide_channels(case, seed):
  """The same with whole vectors of channels and tails: NCDHW's channel blocks (C >= 16,
  M = 1) and the channels-last tail lanes, mixed with every stride, dilation and padding."""
  _check_random_case(case, seed)


def _check_random_case(case: Case, seed: int) -> None:
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  fn = _vjp_fn(case)
  assert _custom_calls(jax.jit(fn).lower(x, k, ct).as_text()) == set(TARGETS)
  got = jax.jit(fn)(x, k, ct)
  _check_against_reference(case, x, k, ct, got)
  for a, b, name in zip(got, _portable(fn, x, k, ct), ("y", "dx", "dk")):
    assert_close(a, b, err_msg=f"{name} native vs XLA {case}")


def _full_transposes(fn, x, k, ct) -> list[str]:
  """The transposes in `fn(x, k, ct)`'s optimised HLO as large as x or ct (not the kernel)."""
  sizes = {x.size, ct.size}
  text = jax.jit(fn).lower(x, k, ct).compile().as_text()
  found = re.findall(r"%(\w*transpose\w*)\S* = \w+\[([\d,]*)\]", text)
  return [name for name, dims in found
          if math.prod(int(d) for d in dims.split(",") if d) in sizes]


@pytest.mark.parametrize("case", [
    Case("3d", "NDHWC", "DHW", (2, 5, 6, 19, 16), (3, 3, 3, 16, 1), 1, 1, "SAME"),
    Case("2d", "NDHWC", "HW", (1, 3, 9, 21, 12), (5, 5, 12, 2), 2, 1, "SAME"),
    Case("2d", "NDHWC", "HW", (1, 2, 7, 19, 19), (5, 5, 19, 2), (1, 2), 1, "SAME"),
    Case("2d", "NHWC", "HW", (2, 11, 17, 8), (3, 3, 8, 1), 1, 2, ((2, 1), (0, 3))),
    Case("3d", "NCDHW", "DHW", (2, 4, 5, 19, 21), (3, 3, 3, 4, 1), 1, 1, "SAME"),
    Case("2d", "NCDHW", "HW", (1, 3, 2, 23, 37), (5, 5, 3, 2), 2, 1, "SAME"),
    Case("2d", "NCHW", "HW", (2, 8, 17, 29), (3, 3, 8, 1), 1, 2, ((2, 1), (0, 3))),
    Case("2d", "NCDHW", "DH", (1, 5, 11, 9, 13), (7, 7, 5, 1), 1, 1, "VALID"),
], ids=["3d-stride1", "5x5-stride2-M2", "5x5-strides12-M2-C19", "dilated", "NCDHW-3d", "NCDHW-5x5-stride2-M2",
        "NCHW-dilated", "NCDHW-7x7-axes-DH"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_workload_shapes(rng, case, dtype):
  """The specialised W (channels-last) and H (channels-first) shapes, every packet width.

  Channels-first problems run the channels-first kernels: no transpose of
  x, the output or a cotangent around the custom calls.
  """
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  ct = random_array(rng, case.expected(x, k).shape, dtype)
  y, gx, gk = got = jax.jit(_vjp_fn(case))(x, k, ct)
  assert y.dtype == gx.dtype == gk.dtype == jnp.dtype(dtype)
  assert _custom_calls(jax.jit(_vjp_fn(case)).lower(x, k, ct).as_text()) == set(TARGETS)
  if not case.layout.endswith("C"):
    assert _full_transposes(_vjp_fn(case), x, k, ct) == []
  _check_against_reference(case, x, k, ct, got, dtype)
  for a, b in zip(got, _portable(_vjp_fn(case), x, k, ct)):
    assert_close(a, np.asarray(b, np.float64), dtype)


def test_bfloat16_with_float32_output(rng):
  """preferred_element_type: bfloat16 in, float32 out and cotangent."""
  case = Case("3d", "NDHWC", "DHW", (1, 4, 5, 9, 8), (3, 2, 3, 8, 2), (1, 2, 1), 1, "SAME")
  x = random_array(rng, case.x_shape, "bfloat16")
  k = random_array(rng, case.k_shape, "bfloat16")
  ct = random_array(rng, case.expected(x, k).shape)
  fn = _vjp_fn(case, preferred_element_type=jnp.float32)
  y, gx, gk = jax.jit(fn)(x, k, ct)
  assert (y.dtype, gx.dtype, gk.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
  assert _custom_calls(jax.jit(fn).lower(x, k, ct).as_text()) == set(TARGETS)
  _check_against_reference(case, x, k, ct, (y, gx.astype(np.float32), gk.astype(np.float32)),
                           "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_kernel_meets_the_padding_as_zeros(rng, dtype):
  """0 * inf is NaN: outputs whose inf/NaN tap lands in the padding are NaN, as in the reference."""
  case = Case("3d", "NDHWC", "DHW", (2, 3, 5, 7, 8), (3, 2, 3, 8, 2), (1, 2, 1), (1, 1, 2), "SAME")
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  k[0, 1, 2, 3, 1] = np.inf
  k[2, 0, 0, 5, 0] = np.nan
  y = np.asarray(jax.jit(lambda a, b: run(case, a, b))(x, k), np.float64)
  with np.errstate(invalid="ignore"):
    want = case.expected(np.asarray(x, np.float64), np.asarray(k, np.float64))
  np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
  np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
  finite = np.isfinite(want)
  assert 0 < finite.sum() < finite.size
  assert_close(np.where(finite, y, 0.0), np.where(finite, want, 0.0), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout,x_shape", [("NDHWC", (1, 4, 5, 23, 16)),
                                            ("NCDHW", (1, 16, 4, 5, 23))])
def test_non_finite_input_reaches_only_its_outputs(rng, dtype, layout, x_shape):
  """inf and NaN in x: NaN/inf exactly where the reference has them (y and dk).

  The bfloat16 pair kernels multiply a zero weight half with a real input
  value, and the channels-first kernel gradient sums lanes past the last
  output with a zero cotangent: both must keep 0 * inf out of the sums.
  """
  case = Case("3d", layout, "DHW", x_shape, (3, 3, 3, 16, 1), (1, 1, 2), 1, "SAME")
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  c_axis = 1 if layout == "NCDHW" else 4
  special = []
  for i, value in enumerate((np.inf, -np.inf, np.nan)):
    index = [0, 2, 3, 7 + 5 * i, 0]
    if c_axis == 1:
      index = [0, 0, *index[1:4]]
    index[c_axis] = 3 * i
    special.append((tuple(index), value))
  finite_x = np.asarray(x, np.float64)
  for index, value in special:
    x[index] = value
  ct = random_array(rng, case.expected(np.zeros(case.x_shape), k).shape, dtype)
  y, gx, gk = jax.jit(_vjp_fn(case))(x, k, ct)
  k64, ct64 = np.asarray(k, np.float64), np.asarray(ct, np.float64)
  with np.errstate(invalid="ignore"):
    want_y = case.expected(np.asarray(x, np.float64), k64)
    # dk[q] = <ref(x, e_q), ct> over the taps that read x: the finite part, plus
    # each special value times the cotangent it meets through tap q (if any).
    want_k = np.zeros(k.shape)
    for q in np.ndindex(k.shape):
      e = np.zeros(k.shape)
      e[q] = 1.0
      want_k[q] = np.sum(case.expected(finite_x, e) * ct64)
      for index, value in special:
        one = np.zeros(case.x_shape)
        one[index] = 1.0
        met = np.sum(case.expected(one, e) * ct64)
        if met != 0.0:
          want_k[q] += value * met - finite_x[index] * met
  for got, want in ((y, want_y), (gk, want_k)):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert 0 < finite.sum() < finite.size
    assert_close(np.where(finite, got, 0.0), np.where(finite, want, 0.0), dtype)
  assert np.all(np.isfinite(np.asarray(gx, np.float64)))


@pytest.mark.parametrize("layout,x_shape", [("NDHWC", (2, 8, 16, 32, 32)),
                                            ("NCDHW", (2, 32, 8, 16, 32))])
def test_parallel_results_are_deterministic(rng, layout, x_shape):
  """Large enough for XLA's thread pool; chunk sums are combined in a fixed order."""
  case = Case("3d", layout, "DHW", x_shape, (3, 3, 3, 32, 1), 1, 1, "SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  fn = jax.jit(_vjp_fn(case))
  first = [np.asarray(a) for a in fn(x, k, ct)]
  for a, b in zip(first, fn(x, k, ct)):
    np.testing.assert_array_equal(a, np.asarray(b))
  _check_against_reference(case, x, k, ct, first)


DK = ("dw5d_kernel_grad",)


@pytest.mark.parametrize("layout,c,width,strides,window,want,transposes", [
    ("NHWC", 8, 9, 1, (3, 3), TARGETS, False),
    ("NHWC", 3, 9, 1, (3, 3), DK, False),
    ("NCHW", 3, 16, 1, (3, 3), DK, False),
    ("NCHW", 3, 40, 1, (3, 3), TARGETS, False),
    ("NCHW", 8, 9, 1, (3, 3), DK, False),
    ("NCHW", 8, 9, 1, (7, 7), DK, False),
    ("NCHW", 8, 9, 2, (3, 3), TARGETS[1:], True),
    ("NCHW", 6, 9, 2, (3, 3), TARGETS[1:], True),
    ("NHWC", 6, 9, 1, (3, 3), TARGETS, False),
    ("NCHW", 8, 33, 8, (3, 3), TARGETS, False),
    ("NCHW", 32, 9, 1, (3, 3), TARGETS, False),
    ("NCHW", 16, 9, 2, (3, 3), TARGETS, False),
])
def test_default_policy_keeps_xla_where_it_is_faster(rng, monkeypatch, layout, c, width, strides,
                                                     window, want, transposes):
  """DW5D_JAX_NATIVE unset: native where measured faster (_policy.worthwhile).

  Channels-last: C >= 4, and the kernel gradient for any C. Channels-first:
  with M = 1 and C >= 16, every op on the channels-first kernels (channel
  blocks, no transposes); otherwise the channels-first kernels for the
  forward pass from an input width of 32, the input gradient from 28, the
  kernel gradient always; the gradients of fewer than 8 outputs per row
  with C >= 4 and stride 2 transposed around the channels-last kernels;
  else XLA.
  """
  monkeypatch.setenv("DW5D_JAX_NATIVE", "1")
  x_shape = (2, 7, width, c) if layout == "NHWC" else (2, c, 7, width)
  case = Case("2d", layout, "HW", x_shape, (*window, c, 1), strides, 1, "SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  fn = _vjp_fn(case)
  assert _custom_calls(jax.jit(fn).lower(x, k, ct).as_text()) == set(want)
  assert bool(_full_transposes(fn, x, k, ct)) == transposes
  _check_against_reference(case, x, k, ct, jax.jit(fn).lower(x, k, ct).compile()(x, k, ct))


@pytest.mark.parametrize("symbolic", [False, True])
def test_export_keeps_the_portable_computation(rng, symbolic):
  """jax.export (and so jax2tf) must not carry a custom call only this process knows."""
  case = Case("3d", "NDHWC", "DHW", (2, 5, 6, 7, 8), (3, 3, 3, 8, 1), 1, 1, "SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  fn = _vjp_fn(case)
  if symbolic:
    shape = export.symbolic_shape("b, d, h, w, 8")
    specs = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, k.dtype),
             jax.ShapeDtypeStruct(shape, jnp.float32))
  else:
    specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, k, ct))
  exp = export.export(jax.jit(fn))(*specs)
  assert not _custom_calls(exp.mlir_module())
  assert _custom_calls(jax.jit(fn).lower(x, k, ct).as_text()) == set(TARGETS)
  _check_against_reference(case, x, k, ct, exp.call(x, k, ct))


# A valid call of dw5d_forward: x (1, 2, 3, 4, 4), 1x3x3 window, SAME padding.
_ATTRS = dict(batch=1, channels=4, multiplier=1, channels_first=False,
              in_spatial=np.array([2, 3, 4]), out_spatial=np.array([2, 3, 4]),
              window=np.array([1, 3, 3]), strides=np.array([1, 1, 1]),
              dilations=np.array([1, 1, 1]), padding_low=np.array([0, 1, 1]))


@pytest.mark.parametrize("change,message", [
    (dict(), None),
    (dict(strides=np.array([1, 0, 1])),
     "attribute `strides` must be 3 int64 in [1, 2147483648], got (1, 0, 1)"),
    (dict(dilations=np.array([1, 1])),
     "attribute `dilations` must be 3 int64 in [1, 2147483648], got (1, 1)"),
    (dict(window=np.array([1.0, 3.0, 3.0])), "attribute `window` must be 3 int64 in [1, "),
    (dict(window=None), "attribute `window` is missing (3 int64 in [1, 2147483648])"),
    (dict(batch=-1), "attribute `batch` must be an int64 in [0, 2147483648], got -1"),
    (dict(channels=np.int32(4)), "attribute `channels` must be an int64 in [1, 2147483648]: "),
    (dict(channels_first=1), "attribute `channels_first` must be a bool: "),
    (dict(config=np.arange(22)), "unknown attribute `config`"),
    (dict(in_spatial=np.array([2, 3, 5])),
     "`x` has shape (1, 2, 3, 4, 4), the attributes give (1, 2, 3, 5, 4)"),
    (dict(multiplier=2), "`w` has shape (1, 3, 3, 4, 1), the attributes give (1, 3, 3, 4, 2)"),
    (dict(channels_first=True), "`x` has shape (1, 2, 3, 4, 4), the attributes give (1, 4, 2, 3, 4)"),
    (dict(w_dtype=jnp.float16), "`w` must be float32 or bfloat16"),
], ids=["valid", "stride-0", "2-dilations", "float-window", "no-window", "batch-1",
        "int32-channels", "int-layout", "unknown", "x-shape", "w-shape", "layout", "w-dtype"])
def test_handler_checks_every_attribute_by_name(rng, change, message):
  """A bad call is an error from XLA naming the attribute or operand, never a crash or a wrong answer.

  The FFI target is called directly, with the attributes `_native._attrs` builds.
  """
  change = dict(change)
  x = jnp.asarray(random_array(rng, (1, 2, 3, 4, 4)))
  k = jnp.asarray(random_array(rng, (1, 3, 3, 4, 1)), change.pop("w_dtype", jnp.float32))
  attrs = {name: v for name, v in {**_ATTRS, **change}.items() if v is not None}
  call = jax.ffi.ffi_call("dw5d_forward", jax.ShapeDtypeStruct(x.shape, x.dtype))
  run = jax.jit(lambda a, b: call(a, b, **attrs))
  if message is None:
    assert_close(run(x, k), depthwise_reference(x, k[0], axes="HW"))
  else:
    with pytest.raises(Exception, match=re.escape(f"dw5d_forward: {message}")):
      jax.block_until_ready(run(x, k))


# dw5d_stream_step on a ring of 3 frames (1, 3, 3, 4, 4): a 3x3x3 window, SAME along H and W.
_RING_ATTRS = dict(_ATTRS, in_spatial=np.array([3, 3, 4]), out_spatial=np.array([1, 3, 4]),
                   window=np.array([3, 3, 3]))


@pytest.mark.parametrize("change,head,message", [
    (dict(), 1, None),
    (dict(), 3, "`head` must be in [0, 3), got 3"),
    (dict(out_spatial=np.array([3, 3, 4]), padding_low=np.array([2, 1, 1])), 0,
     "takes one channels-last window along D"),
    (dict(in_spatial=np.array([3, 3, 5])),
     0, "`ring` has shape (1, 3, 3, 4, 4), the attributes give (1, 3, 3, 5, 4)"),
], ids=["valid", "head", "not-a-window", "ring-shape"])
def test_stream_step_handler(rng, change, head, message):
  """The frame goes into slot `head` in place; the window, oldest first, is slots
  head + 1, head + 2, ... (mod 3); a bad call is an error naming what is wrong."""
  ring = jnp.asarray(random_array(rng, (1, 3, 3, 4, 4)))
  frame = jnp.asarray(random_array(rng, (1, 1, 3, 4, 4)))
  k = jnp.asarray(random_array(rng, (3, 3, 3, 4, 1)))
  out = (jax.ShapeDtypeStruct(ring.shape, ring.dtype),
         jax.ShapeDtypeStruct((1, 1, 3, 4, 4), ring.dtype))
  call = jax.ffi.ffi_call("dw5d_stream_step", out, input_output_aliases={0: 0})
  run = jax.jit(lambda *a: call(*a, **{**_RING_ATTRS, **change}))
  if message is not None:
    with pytest.raises(Exception, match=re.escape(f"dw5d_stream_step: {message}")):
      jax.block_until_ready(run(ring, frame, k, jnp.int32(head)))
    return
  new, y = run(ring, frame, k, jnp.int32(head))
  want = np.asarray(ring).copy()
  want[:, 1] = np.asarray(frame)[:, 0]
  np.testing.assert_array_equal(new, want)
  assert_close(y, depthwise_reference(want[:, [2, 0, 1]], np.asarray(k), axes="DHW",
                                      padding=((0, 0), (1, 1), (1, 1))))


def test_failed_self_test_turns_the_kernels_off(monkeypatch):
  class Library:
    @staticmethod
    def Dw5dSelfTest():
      return 7

  monkeypatch.setattr(_native_build, "build",
                      lambda: (NativeStatus(True, "compiled", "/cache/lib.so"), Library()))
  assert _native_build._load_and_register() == NativeStatus(
      False, "self-test of /cache/lib.so failed (case 7)")


# ---------------------------------------------------------------------------
# Building, caching and falling back, each in a fresh process.

_PROBE = textwrap.dedent("""
    import json, re, warnings
    import numpy as np
    import jax
    import dw5d_jax as dw
    from dw5d_jax._reference import depthwise_reference
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      status = dw.native_status()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 5, 6, 8)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 8, 1)).astype(np.float32)
    fn = jax.jit(lambda a, b: dw.depthwise_conv3d(a, b))
    err = float(np.max(np.abs(np.asarray(fn(x, k)) - depthwise_reference(x, k, axes="DHW"))))
    print(json.dumps(dict(status._asdict(), warned=[str(w.message) for w in caught], err=err,
                          calls=re.findall(r"custom_call @(dw5d_\\w+)", fn.lower(x, k).as_text()),
                          file=dw.__file__)))
""")


def _probe_env(cache_dir, **env) -> dict[str, str]:
  out = {k: v for k, v in os.environ.items() if k not in ("DW5D_JAX_NATIVE", "CXX")}
  out.update(DW5D_JAX_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu", **env)
  return out


def _probe(cache_dir, cwd=None, **env) -> dict:
  done = subprocess.run([sys.executable, "-c", _PROBE], env=_probe_env(cache_dir, **env),
                        capture_output=True, text=True, timeout=600, check=False, cwd=cwd)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_disabled_by_environment(tmp_path):
  got = _probe(tmp_path, DW5D_JAX_NATIVE="0")
  assert (got["active"], got["detail"], got["speed"], got["warned"]) == (
      False, "disabled by DW5D_JAX_NATIVE=0", "portable", [])
  assert got["calls"] == [] and got["err"] < 1e-4
  assert not list(tmp_path.iterdir())  # nothing was built


def test_no_compiler_falls_back_with_a_warning(tmp_path):
  """In the checkout there are no prebuilt kernels (tests/test_prebuilt.py has the wheel's)."""
  got = _probe(tmp_path, CXX=str(tmp_path / "no-such-c++"))
  assert (got["active"], got["speed"]) == (False, "portable")
  assert got["detail"] == ("no C++ compiler found (set CXX), and this installation has no "
                           "prebuilt kernels (an editable or source install)")
  assert len(got["warned"]) == 1 and "using the XLA lowering instead" in got["warned"][0]
  assert got["calls"] == [] and got["err"] < 1e-4


def test_compile_error_falls_back(tmp_path):
  """A compiler that runs but cannot build the library (here: refuses to write `-o`)."""
  fake = tmp_path / "fake-c++"
  real = _native_build._compiler()
  assert real is not None
  fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -o ] && '
                  f'{{ echo "fake: cannot link" >&2; exit 1; }}; done\nexec {real} "$@"\n')
  fake.chmod(0o755)
  got = _probe(tmp_path / "cache", CXX=str(fake))
  assert not got["active"]
  assert "failed (exit 1): fake: cannot link" in got["detail"], got["detail"]
  assert got["calls"] == [] and got["err"] < 1e-4
  assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".so"]


def _recording_compiler(tmp_path, library: str):
  """A stand-in `CXX` that logs each call: probes run the real compiler, builds copy `library`.

  `--version` and `-dM -E` (the probe) go to the real compiler, so the
  cache key and `-march=native` are this machine's. A compile (`-c`) writes
  an empty object; the link (`-shared`) copies `library` to its `-o`, but
  only once two probes are logged (both racing processes are past their
  cache check: they block on the lock, or a broken lock lets both build)
  and two seconds more, then logs `linked`.
  """
  log = tmp_path / "cxx.log"
  log.touch()
  real = _native_build._compiler()
  assert real is not None
  cxx = tmp_path / "recording-c++"
  cxx.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      log={shlex.quote(str(log))}
      out=; prev=
      for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done
      case " $* " in
        *" -shared "*)
          echo "link $*" >> "$log"
          i=0
          while [ "$(grep -c -- ' -dM ' "$log")" -lt 2 ] && [ $i -lt 1200 ]; do
            sleep 0.1; i=$((i + 1))
          done
          sleep 2
          cp {shlex.quote(library)} "$out" && echo linked >> "$log" ;;
        *" -c "*) echo "compile $*" >> "$log"; : > "$out" ;;
        *) echo "probe $*" >> "$log"; exec {shlex.quote(real)} "$@" ;;
      esac
      """))
  cxx.chmod(0o755)
  return cxx, log


def test_parallel_processes_compile_once_then_reuse_the_cache(tmp_path, native):
  """Two processes race on an empty cache (the file lock: one compiles); a third reuses it.

  With the recording `CXX` of `_recording_compiler`: the compiler probe,
  cache key, lock, rename into place, reuse, loading and self-test all run
  for real on the library this session built from the same sources, and
  the log says exactly which build commands ran, but nothing is compiled.
  The link waits for both processes, so a missing lock (or a missing second
  look inside it) builds twice. The real build from scratch is checked by
  tests/test_prebuilt.py's wheel (the same `compile_libraries`) and by a
  session's first `native_status()` on an empty cache.
  """
  assert native.speed == "native", native  # `library` is a -march=native build of these sources
  cxx, log = _recording_compiler(tmp_path, native.library)
  cache = tmp_path / "cache"
  procs = [subprocess.Popen([sys.executable, "-c", _PROBE], env=_probe_env(cache, CXX=str(cxx)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert sorted(r["detail"] for r in results) == ["cached", "compiled"]
  calls = log.read_text().splitlines()
  compiles = [c.split() for c in calls if c.startswith("compile ")]
  links = [c.split() for c in calls if c.startswith("link ")]
  # One build: every .cc file once, with the flags, then one link; while both processes waited.
  units = sorted(n for n in _native_build._sources() if n.endswith(".cc"))
  assert sorted(os.path.basename(c[c.index("-c") + 1]) for c in compiles) == units
  flags = [*_native_build.FLAGS, _native_build.ARCH_FLAG]
  for c in (*compiles, *links):
    assert c[1:len(flags) + 1] == flags, c
  assert len(links) == 1 and "-shared" in links[0]
  probes = [i for i, c in enumerate(calls) if c.startswith("probe ") and " -dM " in c]
  assert len(probes) == 2 and probes[1] < calls.index("linked"), calls
  third = _probe(cache, CXX=str(cxx))
  assert third["detail"] == "cached" and third["library"] == results[0]["library"]
  assert [c.split()[0] for c in log.read_text().splitlines()[len(calls):]] == ["probe", "probe"]
  for r in (*results, third):
    assert r["active"] and r["warned"] == [] and r["err"] < 1e-4
    assert r["calls"] == ["dw5d_forward"]
  assert [p.suffix for p in cache.iterdir()].count(".so") == 1


# Channel counts that fill no whole packet (1, 3: single floats; 5, 54, 67:
# a last packet overlapping the one before it, ForChannels in
# _csrc/channels_last_rows.h), and narrow channels-first outputs: 5x5 frames
# and MViT's attention-pooling shape, a stride larger than the kernel.
ODD_CHANNELS = [
    *(Case("3d", "NDHWC", "DHW", (1, 3, 4, 9, c), (3, 3, 3, c, 1), 1, 1, "SAME")
      for c in (1, 3, 5, 54, 67)),
    Case("2d", "NHWC", "HW", (2, 6, 9, 5), (3, 3, 5, 2), 2, 1, "SAME"),
    *(Case("3d", "NCDHW", "DHW", (2, c, 3, 5, 5), (3, 3, 3, c, 1), 1, 1, "SAME")
      for c in (3, 54)),
    *(Case("3d", "NCDHW", "DHW", (1, c, 3, 17, 17), (3, 3, 3, c, 1), (1, 8, 8), 1,
           ((1, 1), (1, 1), (1, 1))) for c in (5, 16)),
    # C = 1, 2 channels-first, stride 2 on rows long enough for the stride-2
    # rows taken in packets (CfRows::Fill), with and without a low pad.
    *(Case("3d", "NCDHW", "DHW", (2, c, 3, 6, 40), (3, 3, 3, c, 1), (1, 2, 2), 1, "SAME")
      for c in (1, 2)),
    Case("3d", "NCDHW", "DHW", (1, 5, 2, 7, 71), (3, 3, 3, 5, 1), (1, 2, 2), 1,
         ((1, 1), (1, 1), (1, 1))),
    # Channels-first forward in channel blocks (M = 1, C >= 16: CbForwardTile):
    # a last block overlapping the one before (C = 67) on 14x14 planes, and
    # strides 2 and 4 on sizes that are no multiple of them.
    Case("3d", "NCDHW", "DHW", (1, 67, 3, 14, 14), (3, 3, 3, 67, 1), 1, 1, "SAME"),
    Case("3d", "NCDHW", "DHW", (1, 54, 5, 13, 11), (3, 3, 3, 54, 1), (2, 4, 4), 1,
         ((1, 1), (1, 1), (1, 1))),
    Case("3d", "NCDHW", "DHW", (1, 20, 4, 7, 9), (3, 3, 3, 20, 1), 2, 1, "SAME"),
]
# Channels-last small frames and strides (_csrc/channels_last_forward.h:
# rows of up to 2 * NP outputs in near-equal blocks; W strides 4 and 8 with
# their own unrolled kernels): rows of 5, 7, 10 outputs, stride 2 on 14 and
# 10, strides 4 and 8 with W below, at and above a multiple of the stride,
# odd channel counts, a multiplier (both multipliers at once).
SMALL_FRAMES = [
    Case("3d", "NDHWC", "DHW", (1, 2, 5, 5, 67), (3, 3, 3, 67, 1), 1, 1, "SAME"),
    Case("3d", "NDHWC", "DHW", (1, 2, 7, 7, 5), (3, 3, 3, 5, 1), 1, 1, "SAME"),
    Case("3d", "NDHWC", "DHW", (1, 2, 3, 10, 54), (3, 3, 3, 54, 1), 1, 1, "SAME"),
    # 4- and 2-wide rows: blocks missing both their first and last input (the
    # forward's compile-time edge patterns), with M = 2.
    *(Case("3d", "NDHWC", "DHW", (1, 2, 3, w, 19), (3, 3, 3, 19, 2), 1, 1, "SAME")
      for w in (4, 2)),
    Case("3d", "NDHWC", "DHW", (1, 3, 14, 14, 54), (3, 3, 3, 54, 1), (2, 2, 2), 1,
         ((1, 1), (1, 1), (1, 1))),
    Case("3d", "NDHWC", "DHW", (1, 2, 10, 10, 3), (3, 3, 3, 3, 1), (1, 2, 2), 1,
         ((1, 1), (1, 1), (1, 1))),
    *(Case("3d", "NDHWC", "DHW", (1, 2, w, w, c), (3, 3, 3, c, 1), (1, s, s), 1,
           ((1, 1), (1, 1), (1, 1))) for w, c, s in ((17, 5, 4), (16, 1, 4), (24, 54, 8),
                                                     (57, 16, 8))),
    Case("2d", "NHWC", "HW", (1, 9, 33, 16), (3, 3, 16, 2), 4, 1, "SAME"),
]


@pytest.mark.parametrize("case", ODD_CHANNELS + SMALL_FRAMES,
                         ids=lambda c: f"{c.layout}-{c.x_shape}-s{c.strides}")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_odd_channels_and_narrow_outputs(rng, case, dtype):
  """Forward and both gradients on the native kernels, without and with a fused epilogue.

  Expected values: the float64 reference, and for the epilogue
  `act(ref(x, k) + b)` with `g = ct * act'(z)` through the same linearity
  identities as `_check_against_reference`; `db` is the sum of g per channel.
  """
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  ct = random_array(rng, case.expected(x, k).shape, dtype)
  fn = _vjp_fn(case)
  assert _custom_calls(jax.jit(fn).lower(x, k, ct).as_text()) == set(TARGETS)
  _check_against_reference(case, x, k, ct, jax.jit(fn)(x, k, ct), dtype)

  channels = case.k_shape[-2] * case.k_shape[-1]
  b = random_array(rng, (channels,), dtype)

  def epilogue(a, w, c, ct):
    y, pullback = jax.vjp(lambda a, w, c: run(case, a, w, bias=c, activation="sigmoid"), a, w, c)
    return (y, *pullback(ct.astype(y.dtype)))

  calls = _custom_calls(jax.jit(epilogue).lower(x, k, b, ct).as_text())
  assert {"dw5d_forward_epilogue", "dw5d_input_grad"} < calls, calls
  assert calls & {"dw5d_epilogue_grad", "dw5d_epilogue_grad_y"}, calls
  y, gx, gk, gb = jax.jit(epilogue)(x, k, b, ct)
  x64, k64, b64, ct64 = (np.asarray(a, np.float64) for a in (x, k, b, ct))
  channel = -1 if case.layout.endswith("C") else 1
  shape = [1] * len(case.x_shape)
  shape[channel] = -1
  z = case.expected(x64, k64) + b64.reshape(shape)
  s = 1 / (1 + np.exp(-z))
  assert_close(y, s, dtype, err_msg=f"y {case}")
  g = ct64 * s * (1 - s)
  assert_close(gb, np.moveaxis(g, channel, -1).reshape(-1, channels).sum(0), dtype,
               err_msg=f"db {case}")
  _check_against_reference(case, x, k, g, (case.expected(x64, k64), gx, gk), dtype)
