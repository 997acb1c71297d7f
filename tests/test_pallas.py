"""The "pallas" lowering (dw5d_jax._pallas): interpret mode on CPU, compiled on a GPU.

Expected values come from the float64 NumPy reference
(`dw5d_jax._reference`); expected gradients from its linearity
(`tests.helpers.reference_grads`: the reference on one-hot inputs). The
public `method="pallas"` only lowers for CUDA, so these tests normalise the
arguments as the public ops do and call the lowering directly: in Pallas
interpret mode where the default backend is not a GPU (CI), compiled Triton
kernels where it is (`python3 -m pytest tests/test_pallas.py` on a machine with a
CUDA GPU). Tiles are tiny so every case spans several programs with ragged edges
and masked channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import dw5d_jax as dw
from dw5d_jax import _args, _pallas, _policy, _primitive
from dw5d_jax._pallas import Tiles
from tests.helpers import GRAD_CASES, Case, assert_close, cases, random_array, reference_grads

INTERPRET = jax.default_backend() != "gpu"
TINY = {"fwd": Tiles(2, 2, 2, 2), "dx": Tiles(1, 2, 2, 4), "dk": Tiles(1, 1, 2, 2, steps=2)}

FORWARD_CASES = [
    # 3D, stride and dilation on different axes, 3 channels over 2-wide tiles.
    Case("3d", "NDHWC", "DHW", (2, 3, 5, 6, 3), (3, 2, 3, 3, 1), (1, 2, 1), (1, 1, 2), "SAME"),
    # Per-slice 2D over H, W; M=3 (not a power of two), 5 channels, stride 2.
    Case("2d", "NDHWC", "HW", (1, 3, 5, 6, 5), (2, 3, 5, 3), 2, 1, "SAME"),
    # Channels-first 3D with explicit asymmetric padding and M=2.
    Case("3d", "NCDHW", "DHW", (1, 6, 3, 4, 5), (3, 3, 3, 6, 2), (2, 1, 1), 1,
         ((1, 0), (0, 2), (1, 1))),
    # Rank 4, dilated VALID.
    Case("2d", "NHWC", "HW", (2, 5, 6, 3), (3, 2, 3, 2), 1, 2, "VALID"),
    # Per-slice 2D over D, W: the carried H axis sits between them.
    Case("2d", "NCDHW", "DW", (1, 2, 4, 3, 5), (2, 3, 2, 1), (2, 1), (1, 2), "SAME"),
    # Input smaller than the kernel, strided.
    Case("3d", "NDHWC", "DHW", (1, 2, 1, 2, 3), (3, 3, 3, 3, 1), 2, 1, "SAME"),
]


def _ids(case: Case) -> str:
  return f"{case.op}-{case.layout}-{case.axes}-{case.x_shape}"


def run(case: Case, x, k, *, tiles=TINY, preferred=None):
  """`case` through the public ops' normalisation and the interpret-mode lowering."""
  fn, axes = "test_pallas", case.axes
  x5, k5, spec = _args.normalize(
      fn, jnp.asarray(x), jnp.asarray(k), conv_axes=axes, layout=case.layout,
      strides=_args.int_tuple(fn, "strides", case.strides, len(axes), axes),
      dilations=_args.int_tuple(fn, "dilations", case.dilations, len(axes), axes),
      padding=_args.check_padding(fn, case.padding, axes), precision=None,
      preferred=preferred)
  y = _primitive.conv(x5, k5, spec, _pallas.impl(interpret=INTERPRET, tiles=tiles))
  if len(case.x_shape) == 4:
    y = y.squeeze(1 if spec.channels_last else 2)
  return y


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_ids)
def test_forward_matches_reference(rng, case):
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  y = run(case, x, k)
  assert y.dtype == jnp.float32
  assert_close(y, case.expected(x, k), "float32", err_msg=str(case))


def test_default_tiles_and_jit(rng):
  """The default tiles (what method="pallas" uses), under jit."""
  case = Case("2d", "NDHWC", "HW", (2, 3, 9, 10, 6), (3, 3, 6, 1), 1, 1, "SAME")
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  y = jax.jit(lambda a, b: run(case, a, b, tiles=None))(x, k)
  assert_close(y, case.expected(x, k), "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_accumulates_in_float32(rng, dtype):
  case = FORWARD_CASES[0]
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  want = case.expected(np.asarray(x, np.float64), np.asarray(k, np.float64))
  y = run(case, x, k)
  assert y.dtype == jnp.dtype(dtype)
  assert_close(y, want, dtype)
  wide = run(case, x, k, preferred=jnp.float32)  # float32 out: only input rounding left
  assert wide.dtype == jnp.float32
  assert_close(wide, want, "float16")


@pytest.mark.parametrize("case", GRAD_CASES, ids=_ids)
def test_grads_match_reference(rng, case):
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  gx, gk = jax.grad(lambda a, b: jnp.sum(run(case, a, b) * ct), argnums=(0, 1))(x, k)
  want_gx, want_gk = reference_grads(case, x, k, ct)
  assert_close(gx, want_gx)
  assert_close(gk, want_gk)


def test_grads_with_multiplier_and_low_precision_output(rng):
  """M=3, and cotangents that are float32 while x and kernel are bfloat16."""
  case = FORWARD_CASES[1]
  x = random_array(rng, case.x_shape, "bfloat16")
  k = random_array(rng, case.k_shape, "bfloat16")
  ct = random_array(rng, case.expected(x, k).shape)
  gx, gk = jax.grad(lambda a, b: jnp.sum(run(case, a, b, preferred=jnp.float32) * ct),
                    argnums=(0, 1))(x, k)
  assert gx.dtype == gk.dtype == jnp.bfloat16
  want_gx, want_gk = reference_grads(case, np.asarray(x, np.float64),
                                      np.asarray(k, np.float64), ct)
  assert_close(gx, want_gx, "bfloat16")
  assert_close(gk, want_gk, "bfloat16")


def test_check_grads_second_order(rng):
  """Forward and reverse mode to second order (the primitive's bilinear rules)."""
  case = GRAD_CASES[0]
  with jax.enable_x64(True):
    x = jnp.asarray(random_array(rng, case.x_shape, "float64"))
    k = jnp.asarray(random_array(rng, case.k_shape, "float64"))
    check_grads(lambda a, b: run(case, a, b), (x, k), order=2, modes=["fwd", "rev"])


def test_jvp_matches_reference(rng):
  """Forward mode: the tangent of a bilinear op is f(dx, k) + f(x, dk)."""
  case = FORWARD_CASES[2]
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  dx, dk = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  _, tangent = jax.jvp(lambda a, b: run(case, a, b), (x, k), (dx, dk))
  assert_close(tangent, case.expected(dx, k) + case.expected(x, dk))


@pytest.mark.parametrize("in_axes", [(0, None), (0, 0), (None, 0)])
def test_vmap_matches_loop(rng, in_axes):
  case = FORWARD_CASES[1]
  xs = random_array(rng, (2, *case.x_shape))
  ks = random_array(rng, (2, *case.k_shape))
  args = [xs if in_axes[0] == 0 else xs[0], ks if in_axes[1] == 0 else ks[0]]
  got = jax.vmap(lambda a, b: run(case, a, b), in_axes=in_axes)(*args)
  for i in range(2):
    assert_close(got[i], case.expected(xs[i] if in_axes[0] == 0 else xs[0],
                                       ks[i] if in_axes[1] == 0 else ks[0]))


def test_vmap_of_grad_matches_loop(rng):
  """Batching the transposed ops (dx, dk) too."""
  case = GRAD_CASES[2]
  xs = random_array(rng, (2, *case.x_shape))
  ks = random_array(rng, (2, *case.k_shape))
  ct = random_array(rng, case.expected(xs[0], ks[0]).shape)
  grad = jax.grad(lambda a, b: jnp.sum(run(case, a, b) * ct), argnums=(0, 1))
  gxs, gks = jax.vmap(grad)(xs, ks)
  for i in range(2):
    want_gx, want_gk = reference_grads(case, xs[i], ks[i], ct)
    assert_close(gxs[i], want_gx)
    assert_close(gks[i], want_gk)


@settings(max_examples=6)
@given(case=cases(max_size=5, max_kernel=3), seed=st.integers(0, 2**31 - 1),
       tile=st.tuples(*(st.sampled_from([1, 2, 4]) for _ in range(4))))
def test_random_cases_match_reference(case, seed, tile):
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  y = run(case, x, k, tiles={"fwd": Tiles(*tile)})
  assert_close(y, case.expected(x, k), "float32", err_msg=f"{case} {tile}")


# ----------------------------------------------------------------------------
# Errors and lowering.

X5 = np.random.default_rng(0).standard_normal((1, 4, 5, 6, 3)).astype(np.float32)
K3 = np.random.default_rng(1).standard_normal((3, 3, 3, 3, 1)).astype(np.float32)


def test_public_method_is_gpu_only():
  conv3d = jax.jit(lambda a, b: dw.depthwise_conv3d(a, b, method="pallas"))
  with pytest.raises(ValueError, match=r"method='pallas' runs on CUDA GPUs only .*"
                     r"lowered for platform 'cpu'\. Use method='auto', 'conv' or 'shift'"):
    conv3d.trace(X5, K3).lower(lowering_platforms=("cpu",))
  if jax.default_backend() == "cpu":  # the plain call, as a CPU user makes it
    with pytest.raises(ValueError, match=r"method='pallas' runs on CUDA GPUs only"):
      dw.depthwise_conv2d(X5, K3[0], axes="HW", method="pallas")


def test_symbolic_shapes_are_rejected():
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, d, h, w, 3"), jnp.float32)
  with pytest.raises(ValueError, match=r"method='pallas' needs static shapes"):
    jax.export.export(jax.jit(lambda a: dw.depthwise_conv3d(a, K3, method="pallas")))(spec)


def test_oversized_sample_is_rejected():
  big = jax.ShapeDtypeStruct((1, 1024, 1024, 1024, 2), jnp.float32)
  kernel = jax.ShapeDtypeStruct((1, 1, 1, 2, 1), jnp.float32)
  with pytest.raises(ValueError, match=r"one sample of the input has 2147483648 elements.*"
                     r"fewer than 2\*\*31"):
    jax.eval_shape(lambda a, b: dw.depthwise_conv3d(a, b, method="pallas"), big, kernel)


def test_auto_on_cuda_keeps_conv_until_measured():
  """`_GPU_CHOICE` is empty until GPU timings say otherwise: auto lowers to XLA's conv on CUDA."""
  assert _policy._GPU_CHOICE == {}
  lowered = jax.jit(lambda a, b: dw.depthwise_conv3d(a, b)).trace(X5, K3).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "stablehlo.convolution" in text and "dw5d_fwd" not in text


@pytest.mark.parametrize("tiles, error, match", [
    ({"fwd": Tiles(3, 2, 2, 2)}, ValueError, r"tile size `d` must be a power of two"),
    ({"dk": Tiles(1, 1, 2, 2, steps=0)}, ValueError, r"`steps` must be positive"),
    ({"bwd": Tiles(1, 1, 1, 1)}, ValueError, r"`tiles` keys must be among"),
    ({"fwd": (1, 1, 1, 1)}, TypeError, r"`tiles` values must be Tiles"),
])
def test_bad_tiles(tiles, error, match):
  with pytest.raises(error, match=match):
    run(FORWARD_CASES[0], X5[:, :3, :5, :6], K3[:, :2], tiles=tiles)


@pytest.mark.parametrize("case, dtype", [
    (GRAD_CASES[0], "float32"),  # 3D, strided, dilated, M=2
    (FORWARD_CASES[2], "float16"),  # channels-first, explicit padding
    (FORWARD_CASES[4], "bfloat16"),  # per-slice, non-adjacent axes
])
def test_lowers_to_triton_for_cuda(case, dtype):
  """Forward and both gradient kernels lower to Triton IR (no GPU needed).

  This checks what the Pallas Triton lowering accepts (power-of-two shapes,
  supported primitives); compiling that IR needs a GPU.
  """
  def loss(x, k, ct):
    fn, axes = "test_pallas", case.axes
    x5, k5, spec = _args.normalize(
        fn, x, k, conv_axes=axes, layout=case.layout,
        strides=_args.int_tuple(fn, "strides", case.strides, len(axes), axes),
        dilations=_args.int_tuple(fn, "dilations", case.dilations, len(axes), axes),
        padding=_args.check_padding(fn, case.padding, axes), precision=None, preferred=None)
    y = _primitive.conv(x5, k5, spec, _pallas.impl())
    return jnp.sum(y.astype(jnp.float32) * ct)

  x = jax.ShapeDtypeStruct(case.x_shape, jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct(case.k_shape, jnp.dtype(dtype))
  y_shape = case.expected(np.zeros(case.x_shape), np.zeros(case.k_shape)).shape
  ct = jax.ShapeDtypeStruct(y_shape, jnp.float32)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  try:
    text = grad.trace(x, k, ct).lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:  # JAX >= 0.11 needs a GPU (or an abstract one) to lower
    if "No supported GPU devices" in str(e):
      pytest.skip(f"this JAX cannot lower Pallas Triton kernels without a GPU: {e}")
    raise
  for name in ("dw5d_fwd", "dw5d_dx", "dw5d_dk"):  # the three kernels' custom calls
    assert f'name = "{name}"' in text, name
