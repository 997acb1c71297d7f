"""Keras 3 layers (interop._keras, public as interop.keras) on both backends.

Keras picks its backend once per process, so the checks live in
tests/keras_backend_checks.py and run here in subprocesses, one per backend
(KERAS_BACKEND=jax, KERAS_BACKEND=tensorflow). The runs share a directory
where each saves a model for the other to load:

1. JAX: every check but loading the TensorFlow model; saves its own.
2. TensorFlow: every check, loading the model the JAX run saved.
3. JAX again: loads the model the TensorFlow run saved.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = pathlib.Path(__file__).with_name("keras_backend_checks.py")


def _run(backend: str, exchange: pathlib.Path, *select: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "KERAS_BACKEND": backend, "DW5D_KERAS_EXCHANGE": str(exchange)}
  return subprocess.run(
      [sys.executable, "-m", "pytest", str(CHECKS), "-q", "-p", "no:cacheprovider", "-rA",
       *select],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _assert_passed(proc: subprocess.CompletedProcess, backend: str, at_least: int,
                   including: str = "test_runs_on_the_requested_backend") -> None:
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"checks on the {backend} backend failed:\n{out[-12000:]}"
  summary = out.strip().splitlines()[-1]
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed.group(1)) >= at_least, summary
  assert not re.search(r"skipped|xfail|error", summary), summary
  assert f"PASSED {CHECKS.parent.name}/{CHECKS.name}::{including}" in out, out[-12000:]


@pytest.fixture(scope="module")
def exchange(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("keras_models")


@pytest.fixture(scope="module")
def jax_run(exchange) -> subprocess.CompletedProcess:
  return _run("jax", exchange, "-k", "not load_model_saved_on_other_backend")


@pytest.fixture(scope="module")
def tensorflow_run(exchange, jax_run) -> subprocess.CompletedProcess:
  return _run("tensorflow", exchange)


def test_jax_backend(jax_run):
  _assert_passed(jax_run, "jax", at_least=30)


def test_tensorflow_backend_loads_jax_model(tensorflow_run):
  _assert_passed(tensorflow_run, "tensorflow", at_least=31,
                 including="test_load_model_saved_on_other_backend")


def test_jax_backend_loads_tensorflow_model(exchange, tensorflow_run):
  proc = _run("jax", exchange, "-k", "load_model_saved_on_other_backend")
  _assert_passed(proc, "jax", at_least=1, including="test_load_model_saved_on_other_backend")


def test_importing_interop_does_not_import_keras():
  code = ("import sys, interop; assert 'keras' not in sys.modules; "
          "interop.keras.DepthwiseConv3D; assert 'keras' in sys.modules; "
          "import interop.keras as k; assert k is interop.keras")
  subprocess.run([sys.executable, "-c", code], check=True)
