"""Shared test set-up: strict JAX mode, hypothesis profile, tolerances, data."""

from __future__ import annotations

import os
import zlib

import hypothesis
import jax
import numpy as np
import pytest

# The native CPU kernels on every configuration they support, not only where
# they are faster (dw5d_jax._policy.worthwhile), so that the whole suite
# checks them; DW5D_JAX_NATIVE=0 in the environment runs it on XLA's lowering.
os.environ.setdefault("DW5D_JAX_NATIVE", "all")

# Strict mode: the library must never rely on implicit rank promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "dev", deadline=None, max_examples=150,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerances keyed by input dtype: (rtol, atol) relative to the output scale.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def assert_close(actual, expected, dtype="float32", err_msg=""):
  """Compares to a float64 reference with the dtype's tolerance.

  The absolute tolerance is scaled by the largest magnitude of the reference,
  so the check holds for sums of many taps as well as for small outputs.
  """
  rtol, atol = TOLERANCES[str(np.dtype(dtype))]
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
  scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg)


def random_array(rng: np.random.Generator, shape, dtype="float32"):
  """Normal random data (never zeros or ones alone)."""
  return rng.standard_normal(shape).astype(jax.numpy.dtype(dtype))


@pytest.fixture
def rng(request):
  """A generator seeded per test, so failures reproduce."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
