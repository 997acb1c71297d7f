"""Gradients: `check_grads` (first and second order, both modes) and the reference.

The op is linear in `x` and in `kernel`, so the exact gradient of
`L = sum(y * ct)` is `dL/dx[p] = <ref(e_p, k), ct>` and
`dL/dk[q] = <ref(x, e_q), ct>`, with `e_p` a one-hot array. That gives an
expected gradient from the float64 reference alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from tests.helpers import (
  GRAD_CASES,
  METHODS,
  assert_close,
  cases,
  random_array,
  reference_grads,
  run,
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c.op}-{c.layout}-{c.axes}")
def test_check_grads_second_order(rng, method, case):
  with jax.enable_x64(True):
    x = jnp.asarray(random_array(rng, case.x_shape, "float64"))
    k = jnp.asarray(random_array(rng, case.k_shape, "float64"))
    check_grads(lambda a, b: run(case, a, b, method=method), (x, k), order=2,
                modes=["fwd", "rev"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c.op}-{c.layout}-{c.axes}")
def test_grads_match_reference(rng, method, case):
  x = random_array(rng, case.x_shape)
  k = random_array(rng, case.k_shape)
  y_shape = case.expected(x, k).shape
  ct = random_array(rng, y_shape)
  gx, gk = jax.grad(lambda a, b: jnp.sum(run(case, a, b, method=method) * ct),
                    argnums=(0, 1))(x, k)
  want_gx, want_gk = reference_grads(case, x, k, ct)
  assert_close(gx, want_gx)
  assert_close(gk, want_gk)


@settings(max_examples=10)
@given(case=cases(max_size=5, max_kernel=3), seed=st.integers(0, 2**31 - 1))
def test_random_grads_agree_across_methods(case, seed):
  """VJPs of every method agree with `conv`'s and with the reference on one tap."""
  rng = np.random.default_rng(seed)
  x, k = random_array(rng, case.x_shape), random_array(rng, case.k_shape)
  ct = random_array(rng, case.expected(x, k).shape)
  grads = {m: jax.grad(lambda a, b, m=m: jnp.sum(run(case, a, b, method=m) * ct),
                       argnums=(0, 1))(x, k) for m in METHODS}
  for m in METHODS:
    assert_close(grads[m][0], grads["conv"][0], err_msg=f"dx {m} {case}")
    assert_close(grads[m][1], grads["conv"][1], err_msg=f"dk {m} {case}")
  # Kernel gradient at one tap, straight from the reference.
  q = tuple(int(rng.integers(s)) for s in case.k_shape)
  e = np.zeros(case.k_shape)
  e[q] = 1.0
  want = np.sum(case.expected(x, e) * ct)
  assert_close(grads["auto"][1][q], want, err_msg=str(case))
