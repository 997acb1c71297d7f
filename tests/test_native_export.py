"""Exported artifacts that keep the native kernels (dw5d_jax/_native_export.py).

The artifact is serialized here and run in fresh processes: one that
imports dw5d_jax (`deserialize_native`: it runs the kernels), one that does
not (XLA refuses it, naming the target) and one with the kernels off (a
clear error before any compile). Expected values come from the float64
reference (tests/helpers.py: `reference_grads`, and the bias and relu
applied to the reference by hand).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import dw5d_jax as dw
from dw5d_jax import _native_build
from tests.helpers import Case, assert_close, random_array, reference_grads

TARGETS = ["dw5d_forward", "dw5d_input_grad", "dw5d_kernel_grad"]
_CASE = Case("3d", "NDHWC", "DHW", (2, 4, 5, 6, 8), (3, 3, 3, 8, 1), 1, 1, "SAME")


@pytest.fixture(scope="module", autouse=True)
def native():
  if _native_build.mode() == "off":
    pytest.skip("DW5D_JAX_NATIVE=0: no native kernels to export")
  assert dw.native_status().active, dw.native_status().detail


def _calls(text: str) -> list[str]:
  return sorted(set(re.findall(r"custom_call @(dw5d_\w+)", text)))


def _train_step(x, k, ct):
  """The forward and both gradients: all three kernels."""
  y, pullback = jax.vjp(lambda a, b: dw.depthwise_conv3d(a, b), x, k)
  return (y, *pullback(ct))


def _arrays(rng):
  x, k = random_array(rng, _CASE.x_shape), random_array(rng, _CASE.k_shape)
  return x, k, random_array(rng, _CASE.x_shape)


def _check(x, k, ct, y, dx, dk):
  x64, k64, ct64 = (np.asarray(a, np.float64) for a in (x, k, ct))
  assert_close(y, _CASE.expected(x64, k64), err_msg="y")
  assert_close((dx, dk), reference_grads(_CASE, x64, k64, ct64), err_msg="dx, dk")


def test_native_and_portable_exports_of_one_function_stay_apart(rng):
  """The opt-in is in the lowering cache key: neither export gets the other's lowering."""
  x, k, ct = _arrays(rng)
  fn = jax.jit(_train_step)
  portable = export.export(fn)(x, k, ct)
  native = dw.export_native(fn)(x, k, ct)
  again = export.export(fn)(x, k, ct)
  assert (_calls(portable.mlir_module()), _calls(again.mlir_module())) == ([], [])
  assert _calls(native.mlir_module()) == TARGETS
  _check(x, k, ct, *native.call(x, k, ct))


def test_epilogue_is_fused_in_the_native_export(rng):
  x, k = random_array(rng, _CASE.x_shape), random_array(rng, _CASE.k_shape)
  b = random_array(rng, (8,))
  fn = jax.jit(lambda a, w, c: dw.depthwise_conv3d(a, w, bias=c, activation="relu"))
  exp = dw.export_native(fn)(x, k, b)
  assert _calls(exp.mlir_module()) == ["dw5d_forward_epilogue"]
  want = np.maximum(_CASE.expected(np.float64(x), np.float64(k)) + np.float64(b), 0)
  assert_close(exp.call(x, k, b), want)


def test_export_without_the_kernels_warns_once(rng, monkeypatch):
  """A plain export says once per process that it runs without the native kernels."""
  monkeypatch.setattr(_native_build, "_export_noted", False)
  x, k, ct = _arrays(rng)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(_train_step).lower(x, k, ct)  # jit: the kernels run, nothing to say
    dw.export_native(jax.jit(_train_step))(x, k, ct)
    assert caught == []
    export.export(jax.jit(_train_step))(x, k, ct)
    export.export(jax.jit(lambda a, b: dw.depthwise_conv3d(a, b, strides=2)))(x, k)
  assert [str(w.message) for w in caught] == [
      "dw5d_jax: exported computations use XLA's portable lowering, not the native CPU "
      "kernels (an artifact must not call custom calls that the serving process may lack), "
      "so they run slower than under jax.jit here; dw5d_jax.export_native keeps the kernels "
      "for serving processes that import dw5d_jax."]


_SERVE = textwrap.dedent("""
    import json, re, sys
    import numpy as np
    import jax
    blob, arrays, how = sys.argv[1:]
    data = np.load(arrays)
    args = (data["x"], data["k"], data["ct"])
    try:
      if how == "plain jax":
        exp = jax.export.deserialize(open(blob, "rb").read())
      else:
        import dw5d_jax as dw
        exp = dw.deserialize_native(open(blob, "rb").read())
      compiled = jax.jit(exp.call).lower(*args).compile()
      np.savez(arrays + ".out.npz", *compiled(*args))
      calls = re.findall(r'custom_call_target="(dw5d_\\w+)"', compiled.as_text())
      print(json.dumps(dict(calls=sorted(set(calls)), dw5d="dw5d_jax" in sys.modules)))
    except Exception as e:
      print(json.dumps(dict(error=type(e).__name__, message=str(e),
                            dw5d="dw5d_jax" in sys.modules)))
""")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  """The serialized native export of `_train_step` and its arguments, on disk."""
  tmp = tmp_path_factory.mktemp("artifact")
  x, k, ct = _arrays(np.random.default_rng(7))
  exp = dw.export_native(jax.jit(_train_step))(x, k, ct)
  (tmp / "blob").write_bytes(exp.serialize())
  np.savez(tmp / "arrays.npz", x=x, k=k, ct=ct)
  return tmp


def _serve(artifact, how: str, **env) -> dict:
  env = {**{k: v for k, v in os.environ.items() if k != "DW5D_JAX_NATIVE"},
         "JAX_PLATFORMS": "cpu", **env}
  done = subprocess.run(
      [sys.executable, "-c", _SERVE, str(artifact / "blob"), str(artifact / "arrays.npz"), how],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_round_trip_in_a_process_that_imports_dw5d_jax(artifact):
  got = _serve(artifact, "dw5d_jax")
  assert got == dict(calls=TARGETS, dw5d=True)
  data, out = np.load(artifact / "arrays.npz"), np.load(artifact / "arrays.npz.out.npz")
  _check(data["x"], data["k"], data["ct"], *(out[f"arr_{i}"] for i in range(3)))


def test_a_process_without_dw5d_jax_gets_an_error_naming_the_target(artifact):
  got = _serve(artifact, "plain jax")
  assert not got["dw5d"] and got["error"] == "JaxRuntimeError", got
  assert re.search(r"No FFI handler registered for dw5d_\w+", got["message"]), got["message"]


def test_a_process_with_the_kernels_off_gets_an_error_saying_why(artifact):
  got = _serve(artifact, "dw5d_jax", DW5D_JAX_NATIVE="0")
  assert got == dict(
      error="RuntimeError", dw5d=True,
      message="deserialize_native: the artifact calls dw5d_jax's native CPU kernels "
              "(dw5d_forward, dw5d_input_grad, dw5d_kernel_grad), which this process lacks: "
              "disabled by DW5D_JAX_NATIVE=0. Run it where `dw5d_jax.native_status().active` "
              "is True, or export it with `jax.export.export` (the portable lowering).")


def test_a_portable_artifact_loads_anywhere(tmp_path, rng):
  x, k, ct = _arrays(rng)
  exp = export.export(jax.jit(_train_step))(x, k, ct)
  loaded = dw.deserialize_native(exp.serialize())
  assert _calls(loaded.mlir_module()) == []
  _check(x, k, ct, *loaded.call(x, k, ct))


def test_multi_platform_native_export_keeps_the_cuda_lowering(rng):
  """CPU gets the kernels; the CUDA branch of the same artifact XLA's convolution."""
  x, k = random_array(rng, _CASE.x_shape), random_array(rng, _CASE.k_shape)
  exp = dw.export_native(jax.jit(dw.depthwise_conv3d), platforms=("cpu", "cuda"))(
      jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32))
  text = exp.mlir_module()
  assert _calls(text) == ["dw5d_forward"] and "stablehlo.convolution" in text
  assert_close(exp.call(x, k), _CASE.expected(np.float64(x), np.float64(k)))
