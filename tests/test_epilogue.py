"""The epilogue: `bias=` and `activation=` on both ops (dw5d_jax/_epilogue.py).

Expected values come from the float64 reference: `depthwise_reference`, plus
the bias, then the activation written here in NumPy from its definition
(`scipy.special.erf` for the exact GELU). Gradients too: with
`g = ct * act'(z)` (act' from the definition), the gradient of
`sum(y * ct)` is the convolution's gradient for the cotangent g
(`reference_grads`, from the reference alone) and `db = sum(g)`.
conftest.py sets `DW5D_JAX_NATIVE=all`, so float32 and bfloat16 cases run
the fused native kernels (channels-last), channels-first ones the native
convolution and XLA's epilogue.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import special

import dw5d_jax as dw
from dw5d_jax import _activations, _native_build
from tests.helpers import Case, assert_close, random_array, reference_grads, run

ACTS = (None, "relu", "relu6", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hard_swish")


def _np_act(name, z):
  """The activation in float64 NumPy, from its definition."""
  if name is None:
    return z
  sig = 1 / (1 + np.exp(-z))
  return {
      "relu": lambda: np.maximum(z, 0),
      "relu6": lambda: np.clip(z, 0, 6),
      "gelu": lambda: 0.5 * z * (1 + special.erf(z / np.sqrt(2))),
      "gelu_tanh": lambda: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
      "silu": lambda: z * sig,
      "sigmoid": lambda: sig,
      "tanh": lambda: np.tanh(z),
      "hard_swish": lambda: z * np.clip(z + 3, 0, 6) / 6,
  }[name]()


def _np_slope(name, z):
  """`act'(z)`: a central difference of `_np_act` in float64 (off the kinks)."""
  h = 1e-6 * (1 + np.abs(z))
  return (_np_act(name, z + h) - _np_act(name, z - h)) / (2 * h)


def _channel_shape(case: Case, rank: int) -> list[int]:
  shape = [1] * rank
  shape[-1 if case.layout.endswith("C") else 1] = -1
  return shape


def _reference(case: Case, x, k, b, act):
  """`(y, z)` in float64."""
  z = case.expected(x, k)
  if b is not None:
    z = z + np.asarray(b, np.float64).reshape(_channel_shape(case, z.ndim))
  return _np_act(act, z), z


# One case per op and layout, with a multiplier, strides or dilations.
CASES = [
    Case("3d", "NDHWC", "DHW", (1, 3, 4, 6, 8), (3, 3, 3, 8, 1), 1, 1, "SAME"),
    Case("3d", "NCDHW", "DHW", (1, 4, 3, 4, 5), (3, 2, 3, 4, 2), (1, 2, 1), 1, "SAME"),
    Case("2d", "NDHWC", "DW", (1, 3, 2, 7, 4), (3, 3, 4, 2), (2, 1), (1, 2), "VALID"),
    Case("2d", "NHWC", "HW", (2, 5, 6, 4), (3, 3, 4, 1), 1, 1, ((1, 0), (2, 1))),
    # Channels-first and wide: the channels-first kernels (the NCDHW case above
    # is narrow: its gradients transposed around the channels-last ones).
    Case("2d", "NCDHW", "HW", (1, 3, 2, 3, 14), (3, 3, 3, 2), 1, 1, "SAME"),
]
_IDS = [f"{c.op}-{c.layout}-{c.axes}" for c in CASES]
# Border modes: the native kernels do not fuse them, the formula corrects the borders.
MODE_CASES = [
    dataclasses.replace(CASES[0], padding_mode="reflect"),
    dataclasses.replace(CASES[1], padding_mode=("edge", "circular", "symmetric")),
]
_MODE_IDS = ["reflect-NDHWC", "modes-NCDHW"]


def _data(rng, case: Case, dtype="float32", scale=1.0):
  x = random_array(rng, case.x_shape, dtype)
  k = random_array(rng, case.k_shape, dtype)
  b = (scale * random_array(rng, (case.k_shape[-2] * case.k_shape[-1],))).astype(x.dtype)
  return x, k, b


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_forward_matches_reference(rng, case, act):
  x, k, b = _data(rng, case)
  want, _ = _reference(case, x, k, b, act)
  assert_close(run(case, x, k, bias=b, activation=act), want, err_msg="bias")
  want, _ = _reference(case, x, k, None, act)
  assert_close(jax.jit(lambda a, w: run(case, a, w, activation=act))(x, k), want,
               err_msg="no bias")


# Outputs of 16 MiB and more are written with non-temporal stores, and x is
# prefetched where x and y exceed 32 MiB together (channels_last_forward.cc):
# the plain rows streamed from the row kernels, the epilogue's from a row
# buffer, M = 2 woven rows. 3x3 per slice keeps the reference cheap.
_LARGE = Case("2d", "NDHWC", "HW", (1, 16, 64, 64, 64), (3, 3, 64, 1), 1, 1, "SAME")


@pytest.mark.parametrize("multiplier,bias,act", [(1, False, None), (1, True, "gelu"),
                                                 (2, True, None)])
def test_large_outputs_streamed(rng, multiplier, bias, act):
  case = dataclasses.replace(_LARGE, x_shape=(1, 16 // multiplier, 64, 64, 64),
                             k_shape=(3, 3, 64, multiplier))
  x, k, b = _data(rng, case)
  b = b if bias else None
  want, _ = _reference(case, x, k, b, act)
  assert want.nbytes // 2 >= 16 << 20  # float32 y
  assert_close(jax.jit(lambda a, w: run(case, a, w, bias=b, activation=act))(x, k), want)


def _identity_layer(z: np.ndarray):
  """`(1, 1, 1, n / 16, 16)` float32 z and a `(1, 1, 1, 16, 1)` kernel of ones: conv(z) = z exactly."""
  z = np.asarray(z, np.float32).reshape(1, 1, 1, -1, 16)
  return z, np.ones((1, 1, 1, 16, 1), np.float32), np.zeros(16, np.float32)


def _cpu_has(*flags: str) -> bool:
  """Whether /proc/cpuinfo lists every flag (False where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      words = set(f.read().split())
  except OSError:
    return False
  return all(flag in words for flag in flags)


def _float32_grid() -> np.ndarray:
  """Both signs of every 997th float32 bit pattern (zero to the largest finite,
  denormals included), 2^18 points of [-10, 10], and the edges; a multiple of 16."""
  bits = np.arange(0, 0x7F800000, 997, dtype=np.uint32).view(np.float32)
  z = np.concatenate([bits, -bits, np.linspace(-10, 10, 1 << 18, dtype=np.float32),
                      np.float32([np.finfo(np.float32).max, -np.finfo(np.float32).max, 4.5, -4.5])])
  return np.concatenate([z, np.zeros(-len(z) % 16, np.float32)])


def test_exact_gelu_over_the_float32_range():
  """GELU(z) = z * (1 + erf(z / sqrt 2)) / 2 of the fused forward, against float64 erf.

  The native forward computes it as h + |h| erf(|z| / sqrt 2), h = z / 2, so
  |y - GELU(z)| / |h| bounds the error of its erf (epilogue.h: a table of
  polynomials with AVX-512, XLA's rational function elsewhere; measured on
  this grid: 9.2e-8 |z| and 2.0e-7 |z|, checked to 1.2e-7 and 2.5e-7). Denormals (inputs and
  outputs) may be flushed to zero, hence the absolute `tiny`. Non-finite values as
  `jax.nn.gelu`'s: NaN -> NaN, inf -> inf, -inf -> NaN (-inf * 0).
  """
  z = _float32_grid()
  zz, k, b = _identity_layer(z)
  y = np.asarray(jax.jit(lambda a: dw.depthwise_conv3d(a, k, bias=b, activation="gelu"))(zz))
  y = y.ravel().astype(np.float64)
  z64 = z.astype(np.float64)
  want = 0.5 * z64 * special.erfc(-z64 / np.sqrt(2))  # erfc: no cancellation for z << 0
  err = np.abs(y - want)
  table = dw.native_status().speed == "native" and _cpu_has("avx512f", "avx512dq")
  bound = (1.2e-7 if table else 2.5e-7) * np.abs(z64) + np.finfo(np.float32).tiny
  worst = np.argmax(err - bound)
  assert np.all(err <= bound), f"z = {z[worst]!r}: got {y[worst]!r}, want {want[worst]!r}"
  specials = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0] + [1.0] * 11)
  got = np.asarray(dw.depthwise_conv3d(*_identity_layer(specials)[:2], bias=b,
                                       activation="gelu")).ravel()[:5]
  np.testing.assert_array_equal(got, np.float32([np.nan, np.inf, np.nan, 0.0, 0.0]))
  np.testing.assert_array_equal(got, jax.nn.gelu(specials[:5], approximate=False))
  # Its slope (the fused backward: g = ct * GELU'(z), ct = 1) on [-10, 10].
  zs = np.linspace(-10, 10, 1 << 16, dtype=np.float32)
  g = jax.jit(jax.grad(lambda a: jnp.sum(dw.depthwise_conv3d(a, k, bias=b, activation="gelu"))))(
      _identity_layer(zs)[0])
  z64 = zs.astype(np.float64)
  want = 0.5 * special.erfc(-z64 / np.sqrt(2)) + z64 * np.exp(-0.5 * z64**2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(np.asarray(g).ravel(), want, rtol=0, atol=5e-7)


@pytest.mark.parametrize("method", ["conv", "shift"])
@pytest.mark.parametrize("act", ["gelu", "relu6", "sigmoid"])
def test_every_method_matches_reference(rng, method, act):
  case = CASES[0]
  x, k, b = _data(rng, case, scale=3.0)
  want, _ = _reference(case, x, k, b, act)
  assert_close(run(case, x, k, bias=b, activation=act, method=method), want)


@pytest.mark.parametrize("case", MODE_CASES, ids=_MODE_IDS)
def test_border_modes_match_reference(rng, case):
  x, k, b = _data(rng, case)
  for act in ("gelu", "relu"):
    want, _ = _reference(case, x, k, b, act)
    assert_close(jax.jit(lambda a, w, c, act=act: run(case, a, w, bias=c, activation=act))(
        x, k, b), want, err_msg=act)


@pytest.mark.parametrize("case", CASES + MODE_CASES, ids=_IDS + _MODE_IDS)
def test_gradients_match_reference(rng, case):
  """x, kernel and bias gradients of `sum(y * ct)`, from the reference alone, every activation."""
  x, k, b = _data(rng, case)
  _, z0 = _reference(case, x, k, b, None)
  ct = random_array(rng, z0.shape)
  jx, jk = _jacobians(case, x, k)
  channel = -1 if case.layout.endswith("C") else 1

  def grads(a, w, c):  # every activation's gradients in one compilation
    return [jax.grad(lambda a, w, c, act=act: jnp.sum(run(case, a, w, bias=c, activation=act) * ct),
                     argnums=(0, 1, 2))(a, w, c) for act in ACTS]

  for act, (gx, gk, gb) in zip(ACTS, jax.jit(grads)(x, k, b)):
    _, z = _reference(case, x, k, b, act)
    g = ct * (_np_slope(act, z) if act is not None else 1.0)
    assert_close(gx, (g.ravel() @ jx).reshape(x.shape), err_msg=f"dx {act}")
    assert_close(gk, (g.ravel() @ jk).reshape(k.shape), err_msg=f"dk {act}")
    want_gb = np.moveaxis(g, channel, -1).reshape(-1, g.shape[channel]).sum(0)
    assert_close(gb, want_gb, err_msg=f"db {act}")


def _jacobians(case: Case, x, k) -> tuple[np.ndarray, np.ndarray]:
  """d y / d x and d y / d k of the convolution (it is linear in each), from the reference.

  `reference_grads` for every cotangent at once: column p of the first is
  `ref(e_p, k)`, column q of the second `ref(x, e_q)`, one-hot `e`.
  """
  cols = []
  for shape, fn in ((x.shape, lambda e: case.expected(e, k)),
                    (k.shape, lambda e: case.expected(x, e))):
    eye = np.eye(int(np.prod(shape)))
    cols.append(np.stack([fn(e.reshape(shape)).ravel() for e in eye], axis=1))
  return cols[0], cols[1]


@pytest.mark.parametrize("act", ACTS)
def test_second_order_check_grads(rng, act):
  """`check_grads` to order 2 in float64 (the formulas), reverse mode for every activation.

  Forward mode too for one activation of each backward variant (bias only,
  act' from y, act' from z): forward mode never reaches the backward
  primitive, whose rules are the same for every activation of a variant.
  """
  case = CASES[1]
  modes = ["fwd", "rev"] if act in (None, "tanh", "gelu") else ["rev"]
  with jax.enable_x64(True):
    x, k, b = (jnp.asarray(v, jnp.float64) for v in _data(rng, case))
    check_grads(jax.jit(lambda a, w, c: run(case, a, w, bias=c, activation=act)), (x, k, b),
                order=2, modes=modes)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_second_order_through_the_fused_kernels(rng, act):
  """Hessian-vector products with the fused first order (float32) equal float64's."""
  case = CASES[0]
  x, k, b = _data(rng, case)
  v = random_array(rng, case.x_shape)

  def hvp(a, w, c):
    loss = lambda a, w, c: jnp.sum(jnp.sin(run(case, a, w, bias=c, activation=act)))  # noqa: E731
    grad_x = lambda a, w, c: jnp.sum(jax.grad(loss)(a, w, c) * v)  # noqa: E731
    return jax.grad(grad_x, argnums=(0, 1, 2))(a, w, c)

  got = jax.jit(hvp)(x, k, b)
  with jax.enable_x64(True):
    want = hvp(*(jnp.asarray(a, jnp.float64) for a in (x, k, b)))
  for name, g, w in zip(("x", "k", "b"), got, want):
    assert_close(g, np.asarray(w), err_msg=name)


@pytest.mark.parametrize("in_axes", [(0, None, None), (None, 0, 0), (0, 0, 0)])
def test_vmap_matches_loop(rng, in_axes):
  """vmap of the layer and of its gradient (batch folded into N or into the channels)."""
  case = CASES[0]
  x, k, b = _data(rng, case)
  n = 2
  args = [np.stack([a * (i + 1) for i in range(n)]) if ax == 0 else a
          for a, ax in zip((x, k, b), in_axes)]
  layer = lambda a, w, c: run(case, a, w, bias=c, activation="gelu")  # noqa: E731
  grad = jax.grad(lambda a, w, c: jnp.sum(jnp.sin(layer(a, w, c))), argnums=(0, 1, 2))
  got_y = jax.jit(jax.vmap(layer, in_axes=in_axes))(*args)
  got_g = jax.jit(jax.vmap(grad, in_axes=in_axes))(*args)
  for i in range(n):
    one = [a[i] if ax == 0 else a for a, ax in zip(args, in_axes)]
    assert_close(got_y[i], layer(*one), err_msg=f"y {i}")
    for name, g, w in zip("xkb", got_g, grad(*one)):
      assert_close(g[i], w, err_msg=f"d{name} {i}")


def test_bfloat16(rng):
  case = CASES[0]
  x, k, b = _data(rng, case, "bfloat16")
  for act in ("gelu", "relu6", "sigmoid"):
    want, z = _reference(case, *(np.asarray(a, np.float64) for a in (x, k, b)), act)
    y = run(case, x, k, bias=b, activation=act)
    assert y.dtype == jnp.bfloat16
    assert_close(y, want, "bfloat16", err_msg=act)
    ct = random_array(rng, z.shape, "bfloat16")
    gx, gk, gb = jax.grad(lambda a, w, c: jnp.sum(
        run(case, a, w, bias=c, activation=act).astype(jnp.float32) * ct.astype(np.float32)),
        argnums=(0, 1, 2))(x, k, b)
    assert (gx.dtype, gk.dtype, gb.dtype) == (jnp.bfloat16,) * 3
    g = np.asarray(ct, np.float64) * _np_slope(act, z)
    want_gx, want_gk = reference_grads(case, np.asarray(x, np.float64),
                                       np.asarray(k, np.float64), g)
    assert_close(gx, want_gx, "bfloat16", err_msg=f"dx {act}")
    assert_close(gk, want_gk, "bfloat16", err_msg=f"dk {act}")
    assert_close(gb, g.reshape(-1, g.shape[-1]).sum(0), "bfloat16", err_msg=f"db {act}")


def test_preferred_element_type(rng):
  """The epilogue in the accumulator (float32), cast to the output dtype once."""
  case = CASES[0]
  x, k, b = _data(rng, case, "bfloat16")
  y = run(case, x, k, bias=b, activation="silu", preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32
  want, _ = _reference(case, *(np.asarray(a, np.float64) for a in (x, k, b)), "silu")
  assert_close(y, want, "float32")


def test_aliases_and_case():
  x = jnp.asarray(np.linspace(-4, 4, 2 * 3 * 3 * 3 * 4).reshape(2, 3, 3, 3, 4), jnp.float32)
  k = jnp.ones((1, 1, 1, 4, 1))
  run = lambda act: dw.depthwise_conv3d(x, k, activation=act)  # noqa: E731
  np.testing.assert_array_equal(run("swish"), run("silu"))
  np.testing.assert_array_equal(run("hard_silu"), run("hard_swish"))
  np.testing.assert_array_equal(run("GELU"), run("gelu"))
  np.testing.assert_array_equal(run("gelu_approximate"), run("gelu_tanh"))
  np.testing.assert_array_equal(run("linear"), dw.depthwise_conv3d(x, k))


def test_without_epilogue_nothing_changes():
  """No keyword: the same jaxpr (and so HLO) as the op had before the epilogue."""
  x, k = jnp.zeros((1, 4, 4, 4, 4)), jnp.zeros((3, 3, 3, 4, 1))
  text = str(jax.make_jaxpr(lambda a, w: dw.depthwise_conv3d(a, w))(x, k))
  assert "dw5d_depthwise" in text and "epilogue" not in text
  text = str(jax.make_jaxpr(lambda a, w: dw.depthwise_conv3d(a, w, bias=jnp.zeros(4)))(x, k))
  assert "dw5d_epilogue" in text


def _custom_calls(text: str) -> set[str]:
  return set(re.findall(r"custom_call @(dw5d_\w+)", text))


@pytest.mark.parametrize("layout", ["NDHWC", "NCDHW"])
@pytest.mark.parametrize("act, grad_call", [
    ("gelu", "dw5d_epilogue_grad"), ("relu", "dw5d_epilogue_grad_y"),
    (None, "dw5d_bias_grad")])
def test_native_calls_are_fused(act, grad_call, layout):
  """float32: one forward call, one backward pass (+ the input gradient)."""
  if _native_build.mode() == "off" or not dw.native_status().active:
    pytest.skip("native kernels off")
  x = jnp.zeros((1, 4, 4, 16, 8) if layout == "NDHWC" else (1, 8, 4, 4, 16))
  k, b = jnp.zeros((3, 3, 3, 8, 1)), jnp.zeros(8)
  loss = lambda a, w, c: jnp.sum(dw.depthwise_conv3d(  # noqa: E731
      a, w, bias=c, activation=act, data_format=layout) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, k, b).as_text()
  assert _custom_calls(text) == {"dw5d_forward_epilogue", grad_call, "dw5d_input_grad"}


@pytest.mark.parametrize("act", ["gelu", "tanh"])
def test_export_is_portable_and_equal(rng, act):
  """jax.export lowers the unfused formula (no custom call), with the same results."""
  case = CASES[0]
  x, k, b = _data(rng, case)
  fn = jax.jit(lambda a, w, c: run(case, a, w, bias=c, activation=act))
  exported = jax.export.export(fn)(x, k, b)
  assert not _custom_calls(exported.mlir_module())
  assert_close(exported.call(x, k, b), fn(x, k, b))
  grad = jax.jit(jax.grad(lambda a, w, c: jnp.sum(fn(a, w, c) ** 2), argnums=(0, 1, 2)))
  exported = jax.export.export(grad)(x, k, b)
  assert not _custom_calls(exported.mlir_module())
  for got, want in zip(exported.call(x, k, b), grad(x, k, b)):
    assert_close(got, want)


def test_symbolic_batch(rng):
  case = CASES[0]
  x, k, b = _data(rng, case)
  shape = jax.export.symbolic_shape("n, " + ", ".join(map(str, case.x_shape[1:])))
  fn = jax.jit(lambda a, w, c: run(case, a, w, bias=c, activation="gelu"))
  exported = jax.export.export(fn)(jax.ShapeDtypeStruct(shape, np.float32), k, b)
  want, _ = _reference(case, x, k, b, "gelu")
  assert_close(exported.call(x, k, b), want)


@pytest.mark.parametrize("activation, error, match", [
    ("elu", ValueError, r"depthwise_conv3d: `activation` must be None or one of 'relu', "
     r"'relu6', 'gelu', 'gelu_tanh', 'silu', 'sigmoid', 'tanh', 'hard_swish' \(or the "
     r"aliases 'swish', .*'linear'\); got 'elu'\."),
    (jax.nn.relu, TypeError, r"`activation` must be None or one of .*; got the callable "
     r"relu\. Pass its name if it is one of these, else apply it to the result\."),
    (3, TypeError, r"`activation` must be None or one of .*; got int 3\."),
])
def test_activation_errors(activation, error, match):
  with pytest.raises(error, match=match):
    dw.depthwise_conv3d(jnp.ones((1, 3, 3, 3, 2)), jnp.ones((3, 3, 3, 2, 1)),
                        activation=activation)


@pytest.mark.parametrize("bias, error, match", [
    (np.ones(3, np.float32), ValueError,
     r"depthwise_conv2d: `bias` must have shape \(C \* M,\) = \(4,\) for 2 channels and "
     r"multiplier 2, got shape \(3,\)\."),
    (np.ones((1, 4), np.float32), ValueError, r"`bias` must have shape .* got shape \(1, 4\)"),
    (jnp.ones(4, jnp.bfloat16), TypeError,
     r"depthwise_conv2d: `bias` must have x's dtype float32, got bfloat16; cast it\."),
    ([1.0, 2.0, 3.0, 4.0], TypeError,
     r"depthwise_conv2d: `bias` must be a jax.Array or numpy.ndarray, got list\."),
])
def test_bias_errors(bias, error, match):
  with pytest.raises(error, match=match):
    dw.depthwise_conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2)), bias=bias)


def test_activation_names_match_the_native_kernels():
  """The names `_activations.ACTIVATIONS` knows are the C++ kernels' (epilogue.h)."""
  import importlib.resources

  header = importlib.resources.files("dw5d_jax").joinpath("_csrc", "epilogue.h").read_text()
  native = set(re.findall(r'\{Act::k\w+, "(\w+)"\}', header))
  assert native == {"none", *_activations.ACTIVATIONS}
