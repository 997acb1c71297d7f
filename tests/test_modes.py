"""Border modes (`padding_mode`): every path against the float64 reference.

Expected values come from `dw5d_jax._reference.depthwise_reference`, which
pads with `numpy.pad` before its direct sum (no code shared with
`_geometry.source` or `_modes.py`); expected gradients from its linearity
(`tests.helpers.reference_grads`). The suite runs with `DW5D_JAX_NATIVE=all`
(conftest), so for float32 `"auto"` and `"shift"` take the native kernels
with border corrections (`_modes`, "borders") and `"conv"` pads a copy
("padded"): comparing them compares the two ways.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import export
from jax.test_util import check_grads

import dw5d_jax as dw
from dw5d_jax import _args, _geometry, _modes, _pallas, _policy, _primitive
from dw5d_jax._spec import Impl
from tests.helpers import METHODS, Case, assert_close, random_array, reference_grads, run, x_shape

MODES = ("reflect", "symmetric", "edge", "circular")


def _case(case: Case, mode: Any) -> Case:
  return dataclasses.replace(case, padding_mode=mode)


CASES = [
    # 3D, channels-last, stride and dilation on different axes, M=2.
    Case("3d", "NDHWC", "DHW", (2, 5, 6, 7, 4), (3, 3, 2, 4, 2), (1, 2, 1), (1, 1, 2), "SAME"),
    # 3D channels-first, per-axis CAUSAL / explicit / SAME.
    Case("3d", "NCDHW", "DHW", (1, 3, 4, 5, 6), (3, 2, 3, 3, 1), (2, 1, 1), 1,
         ("CAUSAL", (2, 1), "SAME")),
    # Per-slice 2D over D and W (H carried in between), odd channels.
    Case("2d", "NDHWC", "DW", (2, 6, 3, 5, 3), (3, 3, 3, 1), (1, 2), (2, 1), "SAME"),
    # Rank 4, channels-first, explicit asymmetric pads.
    Case("2d", "NCHW", "HW", (2, 4, 5, 6), (3, 2, 4, 1), 1, 1, ((2, 0), (1, 1))),
]


def _ids(case: Case) -> str:
  return f"{case.op}-{case.layout}-{case.axes}"


# ----------------------------------------------------------------------------
# Values: every method, both layouts, against the reference.


# On CPU "auto" is "shift" (native kernels, borders); the random cases below run all three.
@pytest.mark.parametrize("method", ["auto", "conv"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_reference(rng, case, mode, method):
  case = _case(case, mode)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  assert_close(run(case, x, k, method=method), case.expected(x, k), err_msg=str(case))


def test_one_mode_per_axis(rng):
  case = _case(CASES[0], ("circular", "edge", "reflect"))
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  for method in METHODS:
    assert_close(run(case, x, k, method=method), case.expected(x, k), err_msg=method)


def test_zeros_is_the_default(rng):
  case = CASES[0]
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  np.testing.assert_array_equal(run(case, x, k), run(_case(case, "zeros"), x, k))


@st.composite
def mode_cases(draw, max_size=6, max_kernel=3):
  """Random configurations whose modes fit their axes (modes x paddings x sizes)."""
  op = draw(st.sampled_from(["2d", "3d"]))
  if op == "3d":
    layout, conv_axes = draw(st.sampled_from(["NDHWC", "NCDHW"])), "DHW"
  elif draw(st.booleans()):
    layout, conv_axes = draw(st.sampled_from(["NHWC", "NCHW"])), "HW"
  else:
    layout = draw(st.sampled_from(["NDHWC", "NCDHW"]))
    conv_axes = "".join(draw(st.permutations("DHW"))[:2])
  sizes = {a: draw(st.integers(1, max_size)) for a in "DHW"}
  ks, ss, rs, pads, modes = [], [], [], [], []
  for a in conv_axes:
    k, s, r = (draw(st.integers(1, max_kernel)), draw(st.integers(1, 3)),
               draw(st.integers(1, 2)))
    pad = draw(st.sampled_from(["SAME", "CAUSAL", "VALID", "explicit"]))
    if pad == "explicit":
      pad = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    mode = "zeros" if pad == "VALID" else draw(st.sampled_from(("zeros", *MODES)))
    lo, hi, out = _geometry.resolve(sizes[a], k, s, r, pad)
    assume(out >= 1)
    limit = _geometry.mode_limit(mode, sizes[a])
    assume(limit is None or max(lo, hi) <= limit)
    ks.append(k), ss.append(s), rs.append(r), pads.append(pad), modes.append(mode)
  c, m = draw(st.integers(1, 3)), draw(st.integers(1, 2))
  return Case(op, layout, conv_axes, x_shape(layout, draw(st.integers(1, 2)), sizes, c),
              (*ks, c, m), tuple(ss), tuple(rs), tuple(pads), padding_mode=tuple(modes))


@settings(max_examples=10)
@given(case=mode_cases(), seed=st.integers(0, 2**31 - 1))
def test_random_cases_every_method(case, seed):
  """Forward and both gradients of every method against the reference."""
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  want = case.expected(x, k)
  ct = random_array(rng, want.shape)
  q = tuple(int(rng.integers(s)) for s in case.k_shape)  # one kernel tap
  e = np.zeros(case.k_shape)
  e[q] = 1.0
  p = tuple(int(rng.integers(s)) for s in case.x_shape)  # one input position
  ex = np.zeros(case.x_shape)
  ex[p] = 1.0
  for method in METHODS:
    y, pullback = jax.vjp(lambda a, b, m=method: run(case, a, b, method=m), x, k)
    assert_close(y, want, err_msg=f"{case} {method}")
    gx, gk = pullback(jnp.asarray(ct))
    assert_close(gk[q], np.sum(case.expected(x, e) * ct), err_msg=f"dk {case} {method}")
    assert_close(gx[p], np.sum(case.expected(ex, k) * ct), err_msg=f"dx {case} {method}")


# ----------------------------------------------------------------------------
# Gradients and transformations.


@pytest.mark.parametrize("method", ["auto", "conv"])
@pytest.mark.parametrize("case", CASES[:2], ids=_ids)
def test_grads_match_reference(rng, case, method):
  case = _case(case, ("reflect", "circular", "edge")[:len(case.axes)])
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  gx, gk = jax.grad(lambda a, b: jnp.sum(run(case, a, b, method=method) * ct),
                    argnums=(0, 1))(x, k)
  want_gx, want_gk = reference_grads(case, x, k, ct)
  assert_close(gx, want_gx)
  assert_close(gk, want_gk)


# float64: "auto" is "shift" (the native kernels take float32 and bfloat16).
@pytest.mark.parametrize("mode, method", [("reflect", "shift"), ("edge", "conv"),
                                          ("circular", "shift")])
def test_check_grads_second_order(rng, method, mode):
  case = _case(Case("3d", "NDHWC", "DHW", (1, 3, 4, 3, 2), (2, 3, 2, 2, 1), (1, 2, 1), 1,
                    "SAME"), mode)
  with jax.enable_x64(True):
    x = jnp.asarray(random_array(rng, case.x_shape, "float64"))
    k = jnp.asarray(random_array(rng, case.k_shape, "float64"))
    check_grads(lambda a, b: run(case, a, b, method=method), (x, k), order=2,
                modes=["fwd", "rev"])


def test_second_order_borders_match_padded(rng):
  """float32 (native kernels, borders) against conv (padded): the Hessian-vector products."""
  case = _case(CASES[1], "reflect")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  dx, dk = random_array(rng, case.x_shape), random_array(rng, case.k_shape)

  def hvp(method):
    def loss(a, b):
      return jnp.sum(run(case, a, b, method=method) * ct) ** 2
    return jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, k), (dx, dk))[1]

  for got, want in zip(hvp("auto"), hvp("conv")):
    assert_close(got, want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision(rng, dtype):
  case = _case(CASES[0], "edge")
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  y = run(case, x, k)
  assert y.dtype == jnp.dtype(dtype)
  assert_close(y, case.expected(np.float32(x), np.float32(k)), dtype)


def test_pallas_interpret(rng):
  """The Pallas kernels (interpret mode) on the padded array: forward and both gradients."""
  case = _case(Case("3d", "NCDHW", "DHW", (1, 3, 3, 4, 5), (2, 3, 2, 3, 1), (1, 2, 1), 1,
                    ("CAUSAL", "SAME", (1, 2))), ("edge", "reflect", "circular"))
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  fn = "test_modes"
  padding = _args.check_padding(fn, case.padding, "DHW")
  x5, k5, spec = _args.normalize(
      fn, jnp.asarray(x), jnp.asarray(k), conv_axes="DHW", layout=case.layout,
      strides=_args.int_tuple(fn, "strides", case.strides, 3, "DHW"),
      dilations=_args.int_tuple(fn, "dilations", case.dilations, 3, "DHW"), padding=padding,
      precision=None, preferred=None,
      padding_mode=_args.check_padding_mode(fn, case.padding_mode, padding, "DHW"))
  impl = _pallas.impl(interpret=jax.default_backend() != "gpu")
  want = case.expected(x, k)
  ct = random_array(rng, want.shape)
  y, pullback = jax.vjp(lambda a, b: _primitive.conv(a, b, spec, impl), x5, k5)
  assert_close(y, want)
  gx, gk = pullback(jnp.asarray(ct))
  want_gx, want_gk = reference_grads(case, x, k, ct)
  assert_close(gx, want_gx)
  assert_close(gk, want_gk)


# ----------------------------------------------------------------------------
# The native kernels correct the border only.


def test_native_borders_make_no_full_size_copy():
  """Forward and backward of a native problem: no padded copy, the output updated in place."""
  x = jnp.zeros((2, 4, 16, 16, 8), jnp.float32)
  k = jnp.zeros((3, 3, 3, 8, 1), jnp.float32)

  def op(a, b):
    return dw.depthwise_conv3d(a, b, padding_mode="reflect")

  fwd = jax.jit(op).lower(x, k).compile().as_text()
  bwd = jax.jit(jax.grad(lambda a, b: jnp.sum(op(a, b) * a), argnums=(0, 1))).lower(
      x, k).compile().as_text()
  for text in (fwd, bwd):
    assert "dw5d_forward" in text
    # A padded copy of x would be f32[2,6,18,18,8] or a concatenate/pad of x's size.
    assert not re.search(r"f32\[2,(6|5),1[78],1[78],8\]", text)
    assert not re.search(r"= f32\[2,4,16,16,8\]\{[^}]*\} (copy|concatenate|pad)\(", text)
  assert "dw5d_input_grad" in bwd and "dw5d_kernel_grad" in bwd


def test_padded_and_borders_agree(rng):
  """The two ways, called directly on one spec, for the three ops."""
  case = _case(CASES[0], ("reflect", "edge", "circular"))
  x = jnp.asarray(random_array(rng, case.x_shape))
  k = jnp.asarray(random_array(rng, case.k_shape))
  fn = "test_modes"
  _, _, spec = _args.normalize(fn, x, k, conv_axes="DHW", layout=case.layout,
                               strides=case.strides, dilations=case.dilations,
                               padding=("SAME",) * 3, precision=None, preferred=None,
                               padding_mode=case.padding_mode)
  ct = jnp.asarray(random_array(rng, _primitive.out_shape("fwd", x.shape, spec)))
  impl = Impl()
  for op, a, b in (("fwd", x, k), ("dx", ct, k), ("dk", x, ct)):
    dtype = np.float32
    got = jax.jit(_modes.implementation(op, spec, impl, dtype, borders=True))(a, b)
    want = jax.jit(_modes.implementation(op, spec, impl, dtype, borders=False))(a, b)
    assert_close(got, want, err_msg=op)


# ----------------------------------------------------------------------------
# Symbolic shapes.


@pytest.mark.parametrize("method, mode", [("auto", "reflect"), ("conv", "circular")])
def test_export_symbolic_forward_and_vjp(rng, method, mode):
  case = _case(Case("3d", "NDHWC", "DHW", (2, 5, 6, 7, 3), (3, 3, 2, 3, 1), (2, 1, 1), 1,
                    ("SAME", "CAUSAL", (1, 1))), mode)
  k = jnp.asarray(random_array(rng, case.k_shape))

  def vjp(x, ct):
    y, pullback = jax.vjp(lambda a, b: run(case, a, b, method=method), x, k)
    return y, *pullback(ct)

  x_spec = jax.ShapeDtypeStruct(export.symbolic_shape(
      "b, d, h, w, 3", constraints=("d >= 3", "h >= 3", "w >= 3")), jnp.float32)
  y_shape = jax.eval_shape(lambda x: run(case, x, k, method=method), x_spec).shape
  exp = export.export(jax.jit(vjp))(x_spec, jax.ShapeDtypeStruct(y_shape, jnp.float32))
  for shape in [(2, 5, 6, 7, 3), (1, 3, 4, 3, 3)]:
    concrete = dataclasses.replace(case, x_shape=shape)
    x = random_array(rng, shape)
    want = concrete.expected(x, np.asarray(k))
    ct = random_array(rng, want.shape)
    y, gx, gk = exp.call(x, ct)
    assert_close(y, want, err_msg=str(shape))
    ref_gx, ref_gk = jax.vjp(lambda a, b: run(concrete, a, b, method="conv"), x, k)[1](ct)
    assert_close(gx, ref_gx, err_msg=str(shape))
    assert_close(gk, ref_gk, err_msg=str(shape))


def test_symbolic_size_needs_a_declared_bound():
  k = jnp.ones((3, 3, 4, 1))
  x_spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, h, w, 4"), jnp.float32)
  with pytest.raises(ValueError, match=re.escape(
      "depthwise_conv2d: along axis H the input size is the symbolic dimension h; "
      "`padding_mode` 'reflect' fills at most n - 1 positions per side and `padding` 'SAME' "
      "(kernel 3, dilation 1) pads up to 1, so it needs h >= 2. Declare it, e.g. "
      "jax.export.symbolic_shape(..., constraints=('h >= 2',)).")):
    export.export(jax.jit(lambda x: dw.depthwise_conv2d(x, k, padding_mode="reflect")))(x_spec)
  # Edge fills any width; symmetric and circular need h >= 1 here, which holds.
  for mode in ("edge", "symmetric", "circular"):
    export.export(jax.jit(lambda x, m=mode: dw.depthwise_conv2d(x, k, padding_mode=m)))(x_spec)


# ----------------------------------------------------------------------------
# Errors.


def test_unknown_mode():
  x, k = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 1))
  with pytest.raises(ValueError, match=re.escape(
      "depthwise_conv3d: `padding_mode` must be one of 'zeros', 'reflect', 'symmetric', "
      "'edge', 'circular', or a sequence of 3 of them, one per convolved axis (D, H, W); "
      "got 'replicate'.")):
    dw.depthwise_conv3d(x, k, padding_mode="replicate")
  with pytest.raises(ValueError, match=re.escape(
      "got entry 'Reflect' in ('zeros', 'Reflect', 'edge').")):
    dw.depthwise_conv3d(x, k, padding_mode=("zeros", "Reflect", "edge"))
  with pytest.raises(ValueError, match=re.escape(
      "depthwise_conv2d: `padding_mode` must be one of 'zeros', 'reflect', 'symmetric', "
      "'edge', 'circular', or a sequence of 2 of them, one per convolved axis (D, W); got 3 "
      "entries ('edge', 'edge', 'edge').")):
    dw.depthwise_conv2d(x, k[0], axes="DW", padding_mode=("edge",) * 3)
  with pytest.raises(TypeError, match=re.escape("got NoneType None.")):
    dw.depthwise_conv3d(x, k, padding_mode=None)


def test_mode_with_valid_padding():
  x, k = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 1))
  with pytest.raises(ValueError, match=re.escape(
      "depthwise_conv3d: `padding_mode` 'edge' along axis H fills padding, but `padding` is "
      "'VALID' there (no padding); use 'SAME', 'CAUSAL' or a (lo, hi) pair along H, or "
      "`padding_mode` 'zeros'.")):
    dw.depthwise_conv3d(x, k, padding=("SAME", "VALID", "SAME"), padding_mode="edge")
  # zeros there is fine, and so is a mode with explicit (0, 0) padding.
  dw.depthwise_conv3d(x, k, padding=("SAME", "VALID", "SAME"),
                      padding_mode=("edge", "zeros", "edge"))
  dw.depthwise_conv3d(x, k, padding=((1, 1), (0, 0), (1, 1)), padding_mode="reflect")


@pytest.mark.parametrize("mode, n, padding, rule, limit", [
    ("reflect", 3, ((3, 0),), "n - 1", 2),
    ("symmetric", 3, ((0, 4),), "n", 3),
    ("circular", 2, "CAUSAL", "n", 2),
])
def test_padding_wider_than_the_axis(mode, n, padding, rule, limit):
  x, k = jnp.ones((1, 5, n, 3)), jnp.ones((1, 4, 3, 1))
  padding = ((0, 0), padding[0]) if isinstance(padding, tuple) else ("SAME", padding)
  lo, hi = _geometry.pads(n, 4, 1, 1, padding[1])
  with pytest.raises(ValueError, match=re.escape(
      f"depthwise_conv2d: `padding_mode` '{mode}' along axis W fills at most {rule} = "
      f"{limit} positions per side of an input of size {n}, but `padding` {padding[1]!r} "
      f"pads {(lo, hi)} there. Use a smaller kernel, dilation or padding, or 'edge' or "
      f"'zeros'.")):
    dw.depthwise_conv2d(x, k, padding=padding, padding_mode=mode)
  # At the limit it works, and edge fills any width.
  dw.depthwise_conv2d(x, k, padding=((0, 0), (limit, 0)), padding_mode=mode)
  dw.depthwise_conv2d(x, k, padding=padding, padding_mode="edge")


def test_policy_sends_modes_to_modes():
  """The native kernels only ever see zero padding (borders bind zero-padding specs)."""
  x, k = jnp.ones((1, 3, 4, 5, 4)), jnp.ones((3, 3, 3, 4, 1))
  jaxpr = jax.make_jaxpr(lambda a, b: dw.depthwise_conv3d(a, b, padding_mode="edge"))(x, k)
  specs = [e.params["spec"] for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns
           if e.primitive is _primitive.dw5d_p]
  assert [s.modes for s in specs] == [("edge",) * 3]
  assert _policy.lowering("auto", "cpu", specs[0]) == "shift"


def test_stream_with_modes_along_the_other_axes(rng):
  """A causal stream with reflect/circular in-plane equals the full op; time must be zeros."""
  x = random_array(rng, (1, 6, 5, 4, 3))  # (N, T, H, W, C)
  k = random_array(rng, (3, 3, 2, 3, 1))
  modes = ("zeros", "reflect", "circular")
  full = dw.depthwise_conv3d(x, k, padding=("CAUSAL", "SAME", "SAME"), padding_mode=modes)
  state = dw.stream_init(x[:, :1], k, padding_mode=modes)
  outs = []
  for t0, t1 in ((0, 2), (2, 3), (3, 6)):
    state, y = dw.stream_step(state, x[:, t0:t1], k, padding_mode=modes)
    outs.append(y)
  assert_close(jnp.concatenate(outs, axis=1), full)
  with pytest.raises(ValueError, match=re.escape(
      "stream_init: `padding_mode` along the streamed axis D must be 'zeros' (the state "
      "starts from the causal zeros), got 'edge'")):
    dw.stream_init(x[:, :1], k, padding_mode="edge")


# ----------------------------------------------------------------------------
# Sharding (simulated CPU devices, in a process of their own: the device count
# must be set before JAX starts).

_SHARDED = r'''
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import dw5d_jax as dw

rng = np.random.default_rng(0)
x = rng.standard_normal((4, 8, 6, 5, 4)).astype(np.float32)
k = rng.standard_normal((3, 3, 3, 4, 1)).astype(np.float32)
ct = rng.standard_normal(x.shape).astype(np.float32)
worst, gathers = {}, {}
for types in (AxisType.Auto, AxisType.Explicit):
  mesh = jax.make_mesh((4,), ("d",), axis_types=(types,))
  for spec in (P(None, "d"), P("d"), P(None, None, None, None, "d")):
    for modes, method in ((("circular", "edge", "reflect"), "auto"), ("symmetric", "conv")):
      f = lambda a, b: dw.depthwise_conv3d(a, b, padding_mode=modes, method=method)
      vjp = lambda a, b: (lambda y, pb: (y, *pb(ct)))(*jax.vjp(f, a, b))
      want = vjp(x, k)
      kspec = P(None, None, None, "d") if spec == P(None, None, None, None, "d") else P()
      with jax.set_mesh(mesh):
        args = (jax.device_put(x, NamedSharding(mesh, spec)),
                jax.device_put(k, NamedSharding(mesh, kspec)))
        compiled = jax.jit(vjp).lower(*args).compile()
        got = compiled(*args)
      name = f"{types.name} {tuple(spec)} {modes} {method}"
      gathers[name] = compiled.as_text().count(" all-gather")
      worst[name] = max(float(np.abs(np.asarray(g) - w).max() / max(1.0, np.abs(w).max()))
                        for g, w in zip(got, want))
mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
modes = ("zeros", "reflect", "circular")
f = lambda a: dw.depthwise_conv3d(a, k, padding_mode=modes, split_axes={"D": "d"})
got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(None, "d"), out_specs=P(None, "d")))(
    jax.device_put(x, NamedSharding(mesh, P(None, "d"))))
want = dw.depthwise_conv3d(x, k, padding_mode=modes)
worst["shard_map"] = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
# Modes along the split axis: the end blocks fill their padding, circular wraps around.
for modes in ("edge", ("circular", "symmetric", "zeros")):
  f = lambda a: dw.depthwise_conv3d(a, k, padding_mode=modes, split_axes={"D": "d"})
  got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(None, "d"), out_specs=P(None, "d")))(
      jax.device_put(x, NamedSharding(mesh, P(None, "d"))))
  want = dw.depthwise_conv3d(x, k, padding_mode=modes)
  worst[f"shard_map {modes}"] = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
print(json.dumps({"worst": worst, "gathers": gathers}))
'''


def test_sharded_arrays_and_shard_map():
  """jit on arrays split along D, batch or channels (Auto and Explicit mesh axes): the
  forward and both gradients equal one device's, with no all-gather in the compiled
  program; inside shard_map, modes on split and unsplit axes."""
  import json
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, capture_output=True,
                        text=True, timeout=600,
                        env={**__import__("os").environ, "PYTHONPATH": str(root)})
  assert proc.returncode == 0, proc.stderr[-6000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  bad = {name: err for name, err in out["worst"].items() if not err <= 1e-5}
  assert len(out["worst"]) == 15 and not bad, bad
  gathered = {name: n for name, n in out["gathers"].items() if n}
  assert len(out["gathers"]) == 12 and not gathered, gathered
