"""Test configuration and fixtures: strict JAX mode, hypothesis profiles, `rng`.

Shared helpers (cases, tolerances, reference gradients) are in tests/helpers.py.
"""

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


@pytest.fixture
def rng(request):
  """A generator seeded per test, so failures reproduce."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
