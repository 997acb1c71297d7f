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



# The order files start in under `make test` (`-n 2 --dist loadfile
# --no-loadscope-reorder`: each file is one unit on one worker, its module
# fixtures built once). Longest first (files ranked by their summed
# `--durations` in a loaded 2-core run on 2026-12-07: test_sharding.py about
# 1900 s of 4200 s, test_native.py 650 s with one 610 s test, a real build
# since replaced by a recording compiler, ~10 s), so that the last file to
# start is a short one and both workers finish together;
# xdist's default order (most tests first) started these last.
_LONG_FIRST = ("test_sharding.py", "test_native.py", "test_epilogue.py", "test_grads.py",
               "test_docs.py", "test_modes.py", "test_litert.py", "test_keras.py",
               "test_prebuilt.py", "test_pallas.py", "test_export.py", "test_app_demo.py",
               "test_app_export.py", "test_tf_ops.py", "test_streaming.py", "test_onnx.py",
               "test_gpu_script.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order
