"""Symbolic shapes: `jax.export` with every batch and spatial dim symbolic.

Strided SAME padding is the hard case: the padding depends on `n mod s`, and
JAX's own convolution gradient rejects symbolic padding. Expected values come
from the float64 reference at each concrete size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from tests.helpers import METHODS, Case, assert_close, random_array, run

SYMBOLIC_CASES = [
    # (case at one concrete size, symbolic spec of x, other sizes, constraints)
    (Case("3d", "NDHWC", "DHW", (2, 7, 6, 5, 3), (3, 3, 2, 3, 2), 2, (1, 2, 1), "SAME"),
     "b, d, h, w, 3", [(1, 4, 9, 3, 3), (3, 5, 5, 8, 3)], ()),
    (Case("2d", "NCDHW", "DW", (2, 3, 6, 7, 5), (3, 2, 3, 1), (2, 3), 1, "SAME"),
     "b, 3, d, h, w", [(1, 3, 4, 5, 6), (2, 3, 9, 2, 10)], ()),
    (Case("2d", "NHWC", "HW", (2, 7, 6, 4), (3, 3, 4, 1), 1, 2, "VALID"),
     "b, h, w, 4", [(1, 8, 9, 4), (3, 5, 11, 4)], ("h >= 5", "w >= 5")),
    (Case("3d", "NCDHW", "DHW", (1, 2, 5, 6, 7), (2, 2, 2, 2, 1), 3, 1,
          ((1, 0), (0, 2), (1, 1))),
     "b, 2, d, h, w", [(2, 2, 4, 4, 4), (1, 2, 7, 3, 5)], ()),
    # Causal along D and W, strided and dilated: sizes below the window too.
    (Case("3d", "NCDHW", "DHW", (1, 2, 7, 5, 6), (3, 2, 3, 2, 1), (2, 1, 2), (2, 1, 1),
          ("CAUSAL", "SAME", "CAUSAL")),
     "b, 2, d, h, w", [(2, 2, 1, 3, 2), (1, 2, 4, 6, 9)], ()),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("entry", SYMBOLIC_CASES, ids=lambda e: e[1])
def test_export_symbolic_forward_and_vjp(rng, method, entry):
  case, spec, shapes, constraints = entry
  k = random_array(rng, case.k_shape)

  def fwd(x):
    return run(case, x, jnp.asarray(k), method=method)

  def vjp(x, ct):
    y, pullback = jax.vjp(lambda a, b: run(case, a, b, method=method), x, jnp.asarray(k))
    return pullback(ct.astype(y.dtype))

  x_spec = jax.ShapeDtypeStruct(export.symbolic_shape(spec, constraints=constraints),
                                jnp.float32)
  exp_fwd = export.export(jax.jit(fwd))(x_spec)
  y_spec = exp_fwd.out_avals[0]
  ct_spec = jax.ShapeDtypeStruct(y_spec.shape, jnp.float32)
  exp_vjp = export.export(jax.jit(vjp))(x_spec, ct_spec)

  for shape in [case.x_shape, *shapes]:
    x = random_array(rng, shape)
    want = case.expected(x, k)
    y = exp_fwd.call(x)
    assert_close(y, want, err_msg=f"forward at {shape}")
    ct = random_array(rng, want.shape)
    gx, gk = exp_vjp.call(x, ct)
    ref_gx, ref_gk = jax.vjp(lambda a, b: run(case, a, b, method="conv"), x, k)[1](ct)
    assert_close(gx, ref_gx, err_msg=f"dx at {shape}")
    assert_close(gk, ref_gk, err_msg=f"dk at {shape}")
    # One kernel tap straight from the reference (the op is linear in k).
    q = (0,) * (len(case.k_shape) - 2) + (0, 0)
    e = np.zeros(case.k_shape)
    e[q] = 1.0
    assert_close(gk[q], np.sum(case.expected(x, e) * ct), err_msg=f"dk[q] at {shape}")


def test_auto_exports_for_cpu_and_cuda(rng):
  """`auto` picks its lowering per platform at lowering time (lax.platform_dependent)."""
  case = Case("3d", "NDHWC", "DHW", (2, 6, 6, 6, 4), (3, 3, 3, 4, 1), 2, 1, "SAME")
  k = jnp.asarray(random_array(rng, case.k_shape))
  x_spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, d, h, w, 4"), jnp.float32)
  exp = export.export(jax.jit(lambda x: run(case, x, k)), platforms=("cpu", "cuda"))(x_spec)
  assert exp.platforms == ("cpu", "cuda")
  text = exp.mlir_module()
  assert "convolution" in text  # the cuda branch keeps XLA's grouped convolution
  x = random_array(rng, (1, 5, 4, 7, 4))
  assert_close(exp.call(x), case.expected(x, np.asarray(k)))


@pytest.mark.parametrize("method", METHODS)
def test_valid_padding_needs_a_declared_size_bound(method):
  """Symbolic sizes are only known to be >= 1: VALID must be told the window fits."""
  case = Case("2d", "NHWC", "HW", (), (3, 3, 4, 1), 1, 1, "VALID")
  k = jnp.ones(case.k_shape)
  x_spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, h, w, 4"), jnp.float32)
  with pytest.raises(ValueError, match=r"depthwise_conv2d: along axis H the input size is "
                     r"the symbolic dimension h; with padding 'VALID' the window \(kernel 3, "
                     r"dilation 1: effective size 3\) fits only if h >= 3. Declare it, e.g. "
                     r"jax.export.symbolic_shape\(..., constraints=\('h >= 3',\)\)"):
    export.export(jax.jit(lambda x: run(case, x, k, method=method)))(x_spec)
