"""The primitive's own rules (dw5d_jax._primitive) with the shift lowering (dw5d_jax._shift).

Its input and kernel gradients are hand-written (a flipped-kernel shift
convolution of the dilated cotangent, and per-tap partial sums), so they are
checked here against gradients built from the float64 reference alone: the op
is linear in each argument, so `dL/dx[p] = <ref(e_p, k), ct>` and
`dL/dk[q] = <ref(x, e_q), ct>` with one-hot `e`. test_grads.py covers
`check_grads` (orders 1 and 2, both modes) for every method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dw5d_jax import _shift
from tests.helpers import Case, assert_close, random_array, reference_grads, run

ODD_CASES = [
    # strides, dilations and a multiplier together, both layouts, 2D and 3D
    Case("3d", "NDHWC", "DHW", (2, 5, 6, 7, 3), (3, 2, 3, 3, 2), (2, 1, 3), (1, 2, 1), "SAME"),
    Case("3d", "NCDHW", "DHW", (1, 2, 7, 5, 6), (2, 3, 2, 2, 3), (1, 2, 2), (2, 1, 2),
         ((0, 2), (1, 0), (3, 1))),
    Case("2d", "NDHWC", "WD", (2, 4, 3, 9, 2), (3, 2, 2, 2), (3, 2), (1, 2), "VALID"),
    Case("2d", "NHWC", "HW", (1, 3, 2, 3), (4, 5, 3, 1), 1, 1, "SAME"),  # input < kernel
]


@pytest.fixture(params=[False, True], ids=["reduce", "unrolled"])
def unrolled(request, monkeypatch):
  """Runs a test with the kernel gradient's row unrolling off, and forced on."""
  if request.param:
    monkeypatch.setattr(_shift, "_MIN_ROW", 1)
    monkeypatch.setattr(_shift, "_MAX_UNROLL", 6)
  return request.param


@pytest.mark.parametrize("case", ODD_CASES, ids=lambda c: f"{c.op}-{c.layout}-{c.axes}")
def test_gradients_match_reference(rng, case, unrolled):
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  gx, gk = jax.jit(jax.grad(lambda a, b: jnp.sum(run(case, a, b, method="shift") * ct),
                            argnums=(0, 1)))(x, k)
  want_gx, want_gk = reference_grads(case, x, k, ct)
  assert_close(gx, want_gx, err_msg="dx")
  assert_close(gk, want_gk, err_msg="dk")


def test_reverse_mode_has_no_slow_autodiff_transposes():
  """The backward pass is the primitive's rules, not JAX's transposes of slices (pads)."""
  case = ODD_CASES[0]
  x = jnp.zeros(case.x_shape)
  k = jnp.zeros(case.k_shape)
  jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(run(case, a, b, method="shift")),
                                  argnums=(0, 1)))(x, k)
  text = str(jaxpr)
  assert "dw5d_depthwise" in text
  # JAX's transpose of the forward's tap slices would be one pad per tap.
  assert text.count("pad[") <= 3, text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_gradients_keep_dtypes(rng, dtype):
  case = ODD_CASES[0]
  x, k = random_array(rng, case.x_shape, dtype), random_array(rng, case.k_shape, dtype)
  ct = random_array(rng, case.expected(x, k).shape, dtype)
  gx, gk = jax.grad(lambda a, b: jnp.sum(run(case, a, b, method="shift").astype(jnp.float32)
                                         * ct.astype(np.float32)), argnums=(0, 1))(x, k)
  assert gx.dtype == jnp.dtype(dtype) and gk.dtype == jnp.dtype(dtype)
  want_gx, want_gk = reference_grads(case, np.asarray(x, np.float64),
                                      np.asarray(k, np.float64), np.asarray(ct, np.float64))
  assert_close(gx, want_gx, dtype)
  assert_close(gk, want_gk, dtype)


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0)])
def test_vmap_of_grad_matches_loop(rng, in_axes):
  """The batching rule, applied to the primitive and to its gradient rules."""
  case = ODD_CASES[1]
  b = 2
  xs = random_array(rng, (b, *case.x_shape) if in_axes[0] == 0 else case.x_shape)
  ks = random_array(rng, (b, *case.k_shape) if in_axes[1] == 0 else case.k_shape)

  def loss(a, w):
    y = run(case, a, w, method="shift")
    return jnp.sum(y * jnp.sin(y))

  grad = jax.grad(loss, argnums=(0, 1))
  got = jax.jit(jax.vmap(grad, in_axes=in_axes))(xs, ks)
  for i in range(b):
    xi = xs[i] if in_axes[0] == 0 else xs
    ki = ks[i] if in_axes[1] == 0 else ks
    want = jax.grad(lambda a, w: loss(a, w), argnums=(0, 1))(xi, ki)
    assert_close(got[0][i], want[0], err_msg=f"dx {i}")
    assert_close(got[1][i], want[1], err_msg=f"dk {i}")
