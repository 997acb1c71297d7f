"""A SavedModel from `interop.export_savedmodel` in a process with TensorFlow only.

The exported model has every batch and spatial dimension symbolic. A separate
venv (tests/tf_only_env.py) with neither JAX nor this project loads it and runs
it at three input sizes, forward and `tf.GradientTape` gradients. Expected
values come from the float64 reference: the forward pass directly, and the
gradients from its linearity (`tests.helpers.input_grad`, `kernel_grad`).
A streaming SavedModel (`interop.export_streaming_savedmodel`) is fed clips
chunk by chunk there, and must give the reference on the whole clip.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest

import dw5d_jax as dw
import interop
from dw5d_jax._reference import depthwise_reference
from tests import tf_only_env
from tests.helpers import assert_close, input_grad, kernel_grad, random_array
from tests.test_stream_export import gather, init_fn, model_params, model_reference, step_fn

RUNNER = pathlib.Path(__file__).with_name("tf_only_runner.py")
STREAM_RUNNER = pathlib.Path(__file__).with_name("tf_only_stream_runner.py")

# A small linear model: strided SAME 3D depthwise, then a dilated per-slice 2D
# depthwise over (D, W) with a depth multiplier, then a bias.
CONV3 = dict(axes="DHW", strides=(1, 2, 2), padding="SAME")
CONV2 = dict(axes="DW", strides=1, dilations=(2, 1), padding="SAME")


def apply_fn(params, x):
  y = dw.depthwise_conv3d(x, params["k3"], strides=CONV3["strides"])
  y = dw.depthwise_conv2d(y, params["k2"], axes="DW", dilations=CONV2["dilations"])
  return y + params["b"].reshape(1, 1, 1, 1, -1)


def linear_reference(x, params):
  """The model without its bias, in float64: the part that gradients see."""
  y = depthwise_reference(x, params["k3"], **CONV3)
  return depthwise_reference(y, params["k2"], **CONV2)


@pytest.fixture(scope="module")
def tf_only_python():
  return tf_only_env.ensure()


@pytest.mark.slow
def test_savedmodel_runs_without_jax(tmp_path, rng, tf_only_python):
  params = {"k3": random_array(rng, (3, 3, 3, 3, 1)), "k2": random_array(rng, (2, 3, 3, 2)),
            "b": random_array(rng, (6,))}
  path = interop.export_savedmodel(apply_fn, params, tmp_path / "model",
                                   input_shape=(None, None, None, None, 3))
  # Three sizes: odd and even for the strides, one smaller than the kernels.
  shapes = [(2, 5, 6, 7, 3), (1, 3, 9, 4, 3), (3, 1, 2, 1, 3)]
  inputs = {}
  for i, shape in enumerate(shapes):
    inputs[f"x{i}"] = random_array(rng, shape)
    inputs[f"ct{i}"] = random_array(rng, linear_reference(inputs[f"x{i}"], params).shape)
  np.savez(tmp_path / "in.npz", **inputs)

  proc = subprocess.run(
      [str(tf_only_python), "-I", str(RUNNER), path, tmp_path / "in.npz", tmp_path / "out.npz"],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["importable"] == [] and not report["jax_imported"], report
  assert report["count"] == 3
  # Forward and gradient functions, each lowered for both platforms.
  assert len(report["platforms"]) >= 2
  assert all(p == ["CPU", "CUDA"] for p in report["platforms"]), report["platforms"]

  out = np.load(tmp_path / "out.npz")
  leaves = [params["b"], params["k2"], params["k3"]]  # tree_leaves order (sorted keys)
  for i, shape in enumerate(shapes):
    x, ct = inputs[f"x{i}"], inputs[f"ct{i}"]
    want = linear_reference(x, params) + params["b"]
    assert_close(out[f"y{i}"], want, err_msg=f"forward at {shape}")
    assert_close(out[f"sig{i}"], want, err_msg=f"serving_default at {shape}")
    want_dx = input_grad(lambda v: linear_reference(v, params), x.shape, ct)
    assert_close(out[f"dx{i}"], want_dx, err_msg=f"d/dx at {shape}")
    assert_close(out[f"dp{i}_0"], ct.sum(axis=(0, 1, 2, 3)), err_msg=f"d/db at {shape}")
    want_dk3 = kernel_grad(lambda e: depthwise_reference(
        depthwise_reference(x, e, **CONV3), params["k2"], **CONV2), params["k3"].shape, ct)
    assert_close(out[f"dp{i}_2"], want_dk3, err_msg=f"d/dk3 at {shape}")
    assert [out[f"dp{i}_{j}"].shape for j in range(3)] == [a.shape for a in leaves]


@pytest.mark.slow
def test_streaming_savedmodel_runs_without_jax(tmp_path, rng, tf_only_python):
  """Strided and chained causal streams (test_stream_export.py's model), TF only."""
  params = model_params(rng)
  path = interop.export_streaming_savedmodel(init_fn, step_fn, params, tmp_path / "stream",
                                             input_shape=(None, None, None, None, 3))
  clips = [((1, 9, 5, 4, 3), 3), ((2, 5, 3, 6, 3), 1)]  # chunk lengths 3 and 1
  inputs = {}
  for i, (shape, length) in enumerate(clips):
    inputs[f"x{i}"], inputs[f"len{i}"] = random_array(rng, shape), np.int32(length)
  np.savez(tmp_path / "in.npz", **inputs)
  proc = subprocess.run(
      [str(tf_only_python), "-I", str(STREAM_RUNNER), path, tmp_path / "in.npz",
       tmp_path / "out.npz"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["importable"] == [] and not report["jax_imported"], report
  assert report["steps"] == 3 + 5
  out = np.load(tmp_path / "out.npz")
  for i, (shape, length) in enumerate(clips):
    steps = range(-(-shape[1] // length))
    emitted = [out[f"s{i}_{j}_state_1_emitted"] for j in steps]
    want = model_reference(params, inputs[f"x{i}"])
    assert_close(gather([out[f"y{i}_{j}"] for j in steps], emitted), want,
                 err_msg=f"step at {shape}")
    assert_close(gather([out[f"sig{i}_{j}"] for j in steps], emitted), want,
                 err_msg=f"serving_default at {shape}")
