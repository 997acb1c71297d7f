"""`method="auto"` resolves per platform (dw5d_jax._policy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import dw5d_jax as dw


def _hlo(method: str) -> str:
  x = jnp.zeros((1, 4, 8, 8, 3), jnp.float32)
  k = jnp.zeros((3, 3, 3, 3, 1), jnp.float32)
  return jax.jit(lambda a, b: dw.depthwise_conv3d(a, b, method=method)).lower(x, k).as_text(
      dialect="hlo")


def test_auto_uses_shift_on_cpu():
  assert jax.default_backend() == "cpu"
  assert "convolution(" not in _hlo("auto")
  assert "convolution(" not in _hlo("shift")
  assert "convolution(" in _hlo("conv")


def test_auto_lowering_has_no_runtime_switch_on_one_platform():
  """platform_dependent is resolved while lowering for a single platform."""
  text = _hlo("auto")
  assert "conditional(" not in text, text[:2000]


def test_auto_result_equals_shift_on_cpu():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6, 7, 3)).astype(np.float32)
  k = rng.standard_normal((3, 2, 3, 3, 2)).astype(np.float32)
  a = dw.depthwise_conv3d(x, k, strides=(1, 2, 1))
  b = dw.depthwise_conv3d(x, k, strides=(1, 2, 1), method="shift")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
