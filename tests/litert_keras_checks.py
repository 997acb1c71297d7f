"""`interop.export_litert` of Keras models, on the Keras backend KERAS_BACKEND names.

Keras fixes its backend at import, so tests/test_litert.py runs this file with
pytest once per backend (not collected on its own: its name does not start
with `test_`). The JAX run saves a model to `DW5D_KERAS_EXCHANGE`, with its
input and output; the TensorFlow run, started after it, loads and exports it.
Expected values: the Keras model's own output, and the float64 reference
(`dw5d_jax._reference`) for a single `DepthwiseConv3D`.
"""

from __future__ import annotations

import os
import pathlib

import jax
import keras
import numpy as np
import pytest

import interop
import interop.keras as ik
from dw5d_jax._reference import depthwise_reference
from interop import _litert
from interop._litert import TOLERANCE
from tests.helpers import random_array

# Keras's own layers broadcast by rank promotion (Dense's bias on the JAX backend),
# which tests/conftest.py makes an error for the library's sake.
jax.config.update("jax_numpy_rank_promotion", "allow")

BACKEND = keras.backend.backend()
EXCHANGE = pathlib.Path(os.environ["DW5D_KERAS_EXCHANGE"])
SHAPE = (2, 6, 8, 8, 3)  # (N, D, H, W, C)


def _model(seed: int) -> keras.Model:
  """interop.keras layers and Keras's own (per slice through TimeDistributed)."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(SHAPE[1:])
  h = ik.DepthwiseConv3D(3, depth_multiplier=2, padding="same", activation="relu")(inputs)
  h = keras.layers.BatchNormalization()(h)  # non-trainable weights too
  h = ik.DepthwiseConv2D((3, 2), axes="DW", strides=2, padding="same")(h)
  h = keras.layers.TimeDistributed(keras.layers.DepthwiseConv2D(3, padding="same"))(h)
  h = keras.layers.Conv3D(4, 1)(h)
  h = keras.layers.GlobalAveragePooling3D()(h)
  model = keras.Model(inputs, keras.layers.Dense(2)(h))
  # Moving statistics away from (0, 1), so the export must carry them.
  bn = model.layers[2]
  bn.moving_mean.assign(np.linspace(-0.5, 0.5, 6).astype(np.float32))
  bn.moving_variance.assign(np.linspace(0.5, 2.0, 6).astype(np.float32))
  return model


def _error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _export_and_run(model, path, x, quantize, rng):
  data = ([x] + [random_array(rng, x.shape) for _ in range(8)]) if quantize == "int8" else None
  interop.export_litert(model, path, input_shape=x.shape, quantize=quantize,
                        representative_data=data)
  found = interop.litert_ops(path)
  assert found.all_builtin, found
  ops = set(found.ops)
  return _litert.run(_litert.interpreter(path), x), ops


def test_runs_on_the_requested_backend():
  assert BACKEND == os.environ["KERAS_BACKEND"]


@pytest.mark.parametrize("quantize", [None, "float16", "int8"])
def test_model_matches_keras(tmp_path, quantize):
  rng = np.random.default_rng(1)
  model = _model(seed=1)
  x = random_array(rng, SHAPE)
  y, ops = _export_and_run(model, tmp_path / "m.tflite", x, quantize, rng)
  assert "DEPTHWISE_CONV_2D" in ops
  assert _error(y, keras.ops.convert_to_numpy(model(x))) <= TOLERANCE[quantize]


@pytest.mark.parametrize("quantize", [None, "float16", "int8"])
def test_single_layer_matches_reference(tmp_path, quantize):
  rng = np.random.default_rng(2)
  layer = ik.DepthwiseConv3D((3, 2, 3), strides=(1, 2, 2), padding="same", use_bias=False)
  model = keras.Sequential([keras.Input(SHAPE[1:]), layer])
  x = random_array(rng, SHAPE)
  y, ops = _export_and_run(model, tmp_path / "m.tflite", x, quantize, rng)
  kernel = keras.ops.convert_to_numpy(layer.kernel.value)
  want = depthwise_reference(x, kernel, axes="DHW", strides=(1, 2, 2))
  assert _error(y, want) <= TOLERANCE[quantize]


@pytest.mark.skipif(BACKEND != "jax", reason="saves the model the TensorFlow run exports")
def test_save_model_for_the_tensorflow_backend():
  model = _model(seed=3)
  x = random_array(np.random.default_rng(3), SHAPE)
  model.save(EXCHANGE / "jax_model.keras")
  np.savez(EXCHANGE / "jax_model.npz", x=x, y=keras.ops.convert_to_numpy(model(x)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="loads the model the JAX run saved")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_model_saved_on_jax_backend_exports_from_tensorflow(tmp_path, quantize):
  model = keras.models.load_model(EXCHANGE / "jax_model.keras")
  saved = np.load(EXCHANGE / "jax_model.npz")
  y, ops = _export_and_run(model, tmp_path / "m.tflite", saved["x"], quantize,
                           np.random.default_rng(4))
  assert "DEPTHWISE_CONV_2D" in ops
  assert _error(y, saved["y"]) <= TOLERANCE[quantize]


def test_grouped_conv3d_is_refused_with_the_op_named(tmp_path):
  inputs = keras.Input((4, 6, 6, 4))
  model = keras.Model(inputs, keras.layers.Conv3D(8, 3, groups=4)(inputs))
  with pytest.raises(ValueError, match=r"export_litert: LiteRT's builtin op set cannot "
                     r"express tf\.Conv3D: .*Note: a grouped 3D convolution \(e\.g\. "
                     r"keras\.layers\.Conv3D\(groups=C\)"):
    interop.export_litert(model, tmp_path / "m.tflite", input_shape=(1, 4, 6, 6, 4))


def test_params_with_a_keras_model(tmp_path):
  with pytest.raises(ValueError, match=r"export_litert: `params` is for JAX functions; a Keras "
                     r"model exports its own weights, so pass params=None \(got dict\)\."):
    interop.export_litert(_model(seed=5), tmp_path / "m.tflite", input_shape=SHAPE,
                          params={"w": 1})


def test_other_backends_are_refused_with_a_way_out(tmp_path, monkeypatch):
  model = _model(seed=6)
  monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
  with pytest.raises(ValueError, match=r"export_litert: a Keras model on the 'torch' backend "
                     r"cannot be converted; LiteRT export runs on the TensorFlow or JAX "
                     r"backend\. Save the model \(model\.save\('m\.keras'\)\) and load it in a "
                     r"process with KERAS_BACKEND=tensorflow"):
    interop.export_litert(model, tmp_path / "m.tflite", input_shape=SHAPE)
