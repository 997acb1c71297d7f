"""interop.keras on the Keras backend that KERAS_BACKEND names.

Keras fixes its backend when it is imported, so each backend needs a process
of its own: tests/test_keras.py runs this file with pytest once per backend
(it is not collected on its own: its name does not start with `test_`).
Expected values come from the float64 NumPy reference
(`dw5d_jax._reference`), Keras's own `DepthwiseConv2D` where Keras has the
op, and the values a model produced on the other backend.

`DW5D_KERAS_EXCHANGE` names a directory shared by the runs: the
`*_other_backend` tests save a model there, and load the one the other backend
saved.
"""

from __future__ import annotations

import doctest
import os
import pathlib
import sys

import keras
import numpy as np
import pytest
from scipy import special

import interop.keras as ik
from dw5d_jax._reference import depthwise_reference
from interop import _keras
from interop.keras import DepthwiseConv2D, DepthwiseConv3D
from tests.helpers import assert_close, keras_output, random_array

BACKEND = keras.backend.backend()
OTHER = {"jax": "tensorflow", "tensorflow": "jax"}[BACKEND]
_LAYOUT = {(5, "channels_last"): "NDHWC", (5, "channels_first"): "NCDHW",
           (4, "channels_last"): "NHWC", (4, "channels_first"): "NCHW"}


def test_runs_on_the_requested_backend():
  assert BACKEND == os.environ["KERAS_BACKEND"]


def test_docstring_examples():
  failures, tried = doctest.testmod(_keras, optionflags=doctest.ELLIPSIS)
  assert tried > 0
  assert failures == 0


def _np(a) -> np.ndarray:
  if isinstance(a, keras.Variable):
    a = a.value  # NumPy's conversion of the variable itself warns (no `copy=`)
  return np.asarray(keras.ops.convert_to_numpy(a))


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


# Keras's activations in float64 NumPy, from their definitions.
ACTIVATIONS = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "relu6": lambda z: np.clip(z, 0, 6),
    "gelu": lambda z: 0.5 * z * (1 + special.erf(z / np.sqrt(2))),
    "silu": lambda z: z * _sigmoid(z),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "hard_silu": lambda z: z * np.clip(z + 3, 0, 6) / 6,
}


def pre_activation(layer, x: np.ndarray, kernel=None) -> np.ndarray:
  """The layer's convolution plus bias in float64, from the reference and its weights."""
  kernel = _np(layer.kernel) if kernel is None else kernel
  rank = np.ndim(x)
  axes = "DHW" if isinstance(layer, DepthwiseConv3D) else layer.axes or "HW"
  padding = layer.padding.upper()
  if padding == "CAUSAL":  # along the first spatial axis only (D; H of 4D input)
    first = "D" if rank == 5 else "H"
    padding = tuple("CAUSAL" if a.upper() == first else "SAME" for a in axes)
  y = depthwise_reference(x, kernel, axes=axes.upper(), strides=layer.strides,
                          padding=padding, dilations=layer.dilation_rate,
                          data_format=_LAYOUT[rank, layer.data_format],
                          padding_mode=layer.padding_mode)
  if layer.use_bias:
    shape = [1] * rank
    shape[-1 if layer.data_format == "channels_last" else 1] = -1
    y = y + _np(layer.bias).astype(np.float64).reshape(shape)
  return y


def reference(layer, x: np.ndarray, kernel=None) -> np.ndarray:
  """The layer's output in float64, from the reference and the layer's weights."""
  return ACTIVATIONS[layer.get_config()["activation"]](pre_activation(layer, x, kernel))


# ----------------------------------------------------------------------------
# Outputs against the float64 reference.

CONV3D = [
    (dict(kernel_size=(3, 2, 3), depth_multiplier=2, strides=(1, 2, 1), dilation_rate=(2, 1, 1),
          padding="same"), (2, 5, 6, 7, 3)),
    (dict(kernel_size=3, strides=2, padding="valid"), (1, 7, 5, 6, 2)),
    (dict(kernel_size=(2, 3, 3), depth_multiplier=3, strides=(2, 1, 2), dilation_rate=(1, 2, 1),
          padding="SAME", data_format="channels_first"), (2, 2, 4, 5, 3)),
    # Input smaller than the kernel.
    (dict(kernel_size=3, padding="same", activation="relu"), (1, 2, 1, 2, 2)),
    # Activations fused with the bias on the JAX backend.
    (dict(kernel_size=3, padding="same", activation="gelu"), (2, 3, 4, 5, 8)),
    (dict(kernel_size=(1, 3, 3), depth_multiplier=2, activation="swish"), (1, 2, 5, 6, 4)),
    (dict(kernel_size=3, padding="same", activation="hard_silu", use_bias=False,
          data_format="channels_first"), (1, 4, 3, 4, 5)),
    # Causal along D (time), SAME along H and W; strided and dilated in time.
    (dict(kernel_size=(3, 2, 3), strides=(2, 1, 2), dilation_rate=(2, 1, 1),
          padding="causal"), (2, 5, 4, 6, 2)),
    (dict(kernel_size=3, padding="CAUSAL", data_format="channels_first"), (1, 2, 2, 3, 4)),
    (dict(kernel_size=3, strides=(1, 2, 1), padding="same", padding_mode="reflect"),
     (2, 4, 5, 6, 2)),
    (dict(kernel_size=(2, 3, 3), padding="same", data_format="channels_first",
          padding_mode=("edge", "circular", "symmetric")), (1, 2, 3, 4, 5)),
]

CONV2D = [
    (dict(kernel_size=(3, 2), depth_multiplier=2, strides=2, padding="same"), (2, 9, 8, 3)),
    (dict(kernel_size=3, dilation_rate=2, padding="valid", data_format="channels_first"),
     (2, 3, 9, 8)),
    (dict(kernel_size=3, axes="HW", strides=(2, 1), padding="same"), (2, 4, 7, 6, 3)),
    (dict(kernel_size=(2, 3), axes="DW", depth_multiplier=2, padding="valid"), (2, 5, 4, 6, 2)),
    (dict(kernel_size=(3, 2), axes="wd", strides=2, dilation_rate=2, padding="same",
          data_format="channels_first"), (1, 2, 5, 4, 6)),
    (dict(kernel_size=5, axes="DH", padding="same", activation="relu"), (1, 2, 3, 4, 2)),
    (dict(kernel_size=3, axes="HW", padding="same", activation="sigmoid"), (1, 2, 4, 5, 4)),
    (dict(kernel_size=3, padding="same", activation="relu6"), (2, 5, 6, 8)),
    (dict(kernel_size=3, padding="same", activation="tanh", depth_multiplier=2), (1, 5, 6, 4)),
    # Causal along the first spatial axis: D (second in axes="WD"), or H of 4D input.
    (dict(kernel_size=(2, 3), axes="WD", strides=(1, 2), padding="causal"), (2, 5, 3, 4, 2)),
    (dict(kernel_size=3, dilation_rate=(2, 1), padding="causal"), (2, 6, 5, 3)),
    (dict(kernel_size=3, axes="DW", padding="same", padding_mode=("edge", "reflect")),
     (2, 4, 3, 5, 2)),
]


@pytest.mark.parametrize("cls, config, x_shape", [
    *((DepthwiseConv3D, c, s) for c, s in CONV3D), *((DepthwiseConv2D, c, s) for c, s in CONV2D)],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_matches_reference(rng, cls, config, x_shape):
  layer = cls(**config, bias_initializer="random_normal")
  x = random_array(rng, x_shape)
  y = layer(x)
  assert tuple(y.shape) == layer.compute_output_shape(x_shape)
  assert_close(_np(y), reference(layer, x))


@pytest.mark.parametrize("config", [
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=(2, 4), depth_multiplier=2, strides=(2, 1), padding="same"),
    dict(kernel_size=(3, 2), dilation_rate=2, padding="valid"),
    dict(kernel_size=3, padding="same", activation="relu", use_bias=False),
], ids=str)
def test_matches_keras_depthwise_conv2d(rng, config):
  """Rank-4 input is Keras's DepthwiseConv2D, with Keras's SAME split (even kernels)."""
  ours = DepthwiseConv2D(**config, bias_initializer="random_normal")
  theirs = keras.layers.DepthwiseConv2D(**config)
  x = random_array(rng, (2, 9, 8, 3))
  y = ours(x)
  theirs.build(x.shape)
  theirs.set_weights(ours.get_weights())
  want = keras_output(theirs, x, config.get("strides", 1))  # None: TF refuses these strides
  assert_close(_np(y), reference(ours, x) if want is None else _np(want))
  assert theirs.compute_output_shape(x.shape) == ours.compute_output_shape(x.shape)


def test_mixed_precision(rng):
  layer = DepthwiseConv3D((2, 3, 3), depth_multiplier=2, padding="same",
                          bias_initializer="random_normal", dtype="mixed_bfloat16")
  x = random_array(rng, (2, 4, 5, 6, 3))
  y = layer(x)
  assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
  assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
  rounded = _np(keras.ops.cast(layer.kernel, "bfloat16")).astype(np.float64)
  x16 = _np(keras.ops.cast(x, "bfloat16")).astype(np.float64)
  assert_close(_np(keras.ops.cast(y, "float32")), reference(layer, x16, rounded), "bfloat16")


# ----------------------------------------------------------------------------
# Symbolic shapes, gradients, training.


@pytest.mark.parametrize("padding", ["same", "causal"])
def test_functional_model_with_unknown_sizes(rng, padding):
  inputs = keras.Input((None, None, None, 3))
  layer = DepthwiseConv3D(3, depth_multiplier=2, strides=(2, 1, 2), padding=padding,
                          bias_initializer="random_normal")
  outputs = layer(inputs)
  assert tuple(outputs.shape) == (None, None, None, None, 6)
  model = keras.Model(inputs, outputs)
  for shape in [(2, 5, 4, 7, 3), (1, 8, 3, 2, 3)]:
    x = random_array(rng, shape)
    y = model.predict(x, verbose=0)
    assert y.shape == layer.compute_output_shape(shape)
    assert_close(y, reference(layer, x))


def _gradients(layer, x, ct) -> list[np.ndarray]:
  """d sum(layer(x) * ct) / d (kernel, bias) with the backend's autodiff."""
  if BACKEND == "jax":
    import jax
    import jax.numpy as jnp

    def loss(values):
      y, _ = layer.stateless_call(values, [], x)
      return jnp.sum(y * ct)

    return [np.asarray(g) for g in jax.grad(loss)([v.value for v in layer.trainable_variables])]
  import tensorflow as tf

  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(layer(x) * ct)
  return [g.numpy() for g in tape.gradient(loss, layer.trainable_variables)]


@pytest.mark.parametrize("cls, config, x_shape", [
    (DepthwiseConv3D, dict(kernel_size=(2, 3, 2), depth_multiplier=2, strides=(1, 2, 1),
                           padding="same"), (2, 4, 5, 3, 2)),
    (DepthwiseConv2D, dict(kernel_size=(3, 2), axes="DW", dilation_rate=(1, 2),
                           data_format="channels_first"), (2, 2, 5, 3, 6)),
], ids=["3d", "2d-DW"])
def test_gradients_match_reference(rng, cls, config, x_shape):
  layer = cls(**config)
  x = random_array(rng, x_shape)
  y_shape = layer.compute_output_shape(x_shape)
  layer.build(x_shape)
  ct = random_array(rng, y_shape)
  g_kernel, g_bias = _gradients(layer, x, ct)
  # The output is linear in the kernel: each kernel entry's gradient is the
  # output for a one-hot kernel (no bias) against the cotangent.
  kernel = _np(layer.kernel)
  want = np.zeros(kernel.shape)
  for idx in np.ndindex(kernel.shape):
    one_hot = np.zeros(kernel.shape)
    one_hot[idx] = 1.0
    want[idx] = np.sum((reference(layer, x, one_hot) - _np(layer.bias).reshape(
        [-1 if i == (1 if layer.data_format == "channels_first" else len(y_shape) - 1) else 1
         for i in range(len(y_shape))])) * ct)
  assert_close(g_kernel, want)
  channel = 1 if layer.data_format == "channels_first" else len(y_shape) - 1
  assert_close(g_bias, ct.astype(np.float64).sum(axis=tuple(
      i for i in range(len(y_shape)) if i != channel)))


@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_gradients_with_activation_match_reference(rng, activation):
  """With `g = ct * act'(z)`: d/dkernel is the convolution's for cotangent g, d/dbias sum(g)."""
  layer = DepthwiseConv3D((3, 2, 3), padding="same", depth_multiplier=2, activation=activation,
                          bias_initializer="random_normal")
  x = random_array(rng, (2, 3, 4, 5, 4))
  layer.build(x.shape)
  ct = random_array(rng, layer.compute_output_shape(x.shape))
  g_kernel, g_bias = _gradients(layer, x, ct)
  z = pre_activation(layer, x)
  h = 1e-6 * (1 + np.abs(z))
  act = ACTIVATIONS[activation]
  g = ct * (act(z + h) - act(z - h)) / (2 * h)
  kernel = _np(layer.kernel)
  bias = _np(layer.bias).astype(np.float64)
  want = np.zeros(kernel.shape)
  for idx in np.ndindex(kernel.shape):
    one_hot = np.zeros(kernel.shape)
    one_hot[idx] = 1.0
    want[idx] = np.sum((pre_activation(layer, x, one_hot) - bias) * g)
  assert_close(g_kernel, want)
  assert_close(g_bias, g.reshape(-1, g.shape[-1]).sum(0))


def test_fused_on_the_jax_backend(rng):
  """On JAX the bias and a Keras activation are the op's epilogue; other activations are not.

  (The TensorFlow backend applies them with TF's ops: nothing to check here.)
  """
  if BACKEND != "jax":
    return
  import jax

  x = random_array(rng, (1, 3, 4, 5, 4))
  for activation, fused in (("gelu", "gelu"), ("swish", "silu"), (None, "None"),
                            ("elu", None), (keras.activations.hard_silu, "hard_swish")):
    layer = DepthwiseConv3D(3, padding="same", activation=activation)
    layer.build(x.shape)
    values = [v.value for v in layer.trainable_variables]
    text = str(jax.make_jaxpr(lambda v: layer.stateless_call(v, [], x)[0])(values))
    if fused is None:
      assert "dw5d_epilogue" not in text, activation
    else:
      assert f"activation={fused}" in text, (activation, text)


def test_fit_reduces_loss_under_the_backend_compiler(rng):
  """`fit` with jit_compile=True: XLA through jax.jit or TF's tf.function(jit_compile=True)."""
  keras.utils.set_random_seed(0)
  x = random_array(rng, (16, 5, 6, 7, 2))
  teacher = DepthwiseConv3D(3, depth_multiplier=2, padding="same", bias_initializer="random_normal")
  y = _np(teacher(x))
  model = keras.Sequential([keras.Input((None, None, None, 2)),
                            DepthwiseConv3D(3, depth_multiplier=2, padding="same")])
  model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=True)
  history = model.fit(x, y, batch_size=8, epochs=15, verbose=0).history["loss"]
  assert history[-1] < 0.2 * history[0], history


# ----------------------------------------------------------------------------
# Streaming.


def _stream(layer, x: np.ndarray, chunks, compiled: bool) -> np.ndarray:
  """Feeds `x` along its first spatial axis in chunks; the real outputs, concatenated."""
  t = 1 if layer.data_format == "channels_last" else 2
  state = layer.stream_init(x.shape)
  step = layer.stream_step
  if compiled and BACKEND == "jax":
    import jax

    step = jax.jit(step)
  elif compiled:
    import tensorflow as tf

    step = tf.function(step)
  outs, start = [], 0
  for length in chunks:
    state, y = step(state, np.take(x, range(start, start + length), axis=t))
    outs.append(np.take(_np(y), range(int(_np(state["emitted"]))), axis=t))
    start += length
  return np.concatenate(outs, axis=t)


@pytest.mark.parametrize("cls, config, x_shape", [
    (DepthwiseConv3D, dict(kernel_size=(3, 2, 3), depth_multiplier=2, strides=(2, 1, 2),
                           dilation_rate=(2, 1, 1), padding="causal"), (2, 7, 4, 5, 2)),
    (DepthwiseConv3D, dict(kernel_size=3, padding="causal", data_format="channels_first",
                           activation="relu"), (1, 2, 6, 3, 4)),
    (DepthwiseConv2D, dict(kernel_size=(2, 3), axes="WD", padding="causal", activation="gelu"),
     (2, 6, 3, 4, 2)),
    (DepthwiseConv2D, dict(kernel_size=3, axes="HW", strides=2, padding="same"), (1, 6, 5, 4, 2)),
    (DepthwiseConv2D, dict(kernel_size=3, strides=(2, 1), padding="causal"), (2, 7, 5, 3)),
    (DepthwiseConv3D, dict(kernel_size=3, padding="causal",
                           padding_mode=("zeros", "reflect", "circular")), (1, 7, 4, 5, 2)),
], ids=["3d-strided", "3d-channels-first", "2d-WD", "2d-HW-per-frame", "2d-rank4",
        "3d-padding-modes"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stream_equals_call(rng, cls, config, x_shape, compiled):
  layer = cls(**config, bias_initializer="random_normal")
  x = random_array(rng, x_shape)
  want = _np(layer(x))
  t = 1 if layer.data_format == "channels_last" else 2
  chunks = [3, 1, 2] + [1] * (x_shape[t] - 6)
  assert_close(_stream(layer, x, chunks, compiled), want)


def test_stream_errors():
  layer = DepthwiseConv3D(3, padding="same")
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_init: streaming needs the layer "
                     r"causal along D \(the first spatial axis\): padding='causal', got "
                     r"padding='same'\."):
    layer.stream_init((1, 1, 4, 4, 2))
  causal = DepthwiseConv3D(3, padding="causal")
  state = causal.stream_init((1, 1, 4, 4, 2))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_step: `chunk` has shape "
                     r"\(1, 1, 4, 5, 2\), but the state was made for chunks \(1, 'L', 4, 4, "
                     r"2\) \(L >= 1 frames along time, axis 1\)\."):
    causal.stream_step(state, np.zeros((1, 1, 4, 5, 2), np.float32))
  with pytest.raises(ValueError, match=r"stream_init: `input_shape` must be fully known"):
    causal.stream_init((None, 1, 4, 4, 2))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_init: streaming needs "
                     r"`padding_mode` 'zeros' along D \(the state starts from the causal "
                     r"zeros\), got 'edge'"):
    DepthwiseConv3D(3, padding="causal", padding_mode="edge").stream_init((1, 1, 4, 4, 2))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_init: `input_shape` must hold "
                     r"positive ints \(any int along time, axis 1\), got \(1, 1, -5, 4, 2\)\."):
    causal.stream_init((1, 1, -5, 4, 2))
  with pytest.raises(TypeError, match=r"DepthwiseConv3D.stream_step: `state` must be the "
                     r"StreamState of a stream_init or stream_step of a layer with this one's "
                     r"settings, got dict\."):
    causal.stream_step({}, np.zeros((1, 1, 4, 4, 2), np.float32))


def _compiled(step):
  """`step` under jax.jit or tf.function, as the backend compiles."""
  if BACKEND == "jax":
    import jax

    return jax.jit(step)
  import tensorflow as tf

  return tf.function(step)


@pytest.mark.parametrize("other, differs", [
    (lambda: DepthwiseConv3D((5, 3, 3), padding="causal"),
     r"kernel_size \(3, 3, 3\) here, \(5, 3, 3\) in the state"),
    (lambda: DepthwiseConv3D(3, padding="causal", dtype="float16"),
     r"dtype 'float32' here, 'float16' in the state"),
    (lambda: DepthwiseConv3D(3, padding="causal", strides=(2, 1, 1), dilation_rate=(1, 2, 1)),
     r"strides \(1, 1, 1\) here, \(2, 1, 1\) in the state; dilation_rate \(1, 1, 1\) here, "
     r"\(1, 2, 1\) in the state"),
    (lambda: DepthwiseConv3D(3, padding="causal", padding_mode=("zeros", "edge", "zeros")),
     r"padding_mode \('zeros', 'zeros', 'zeros'\) here, \('zeros', 'edge', 'zeros'\) in the "
     r"state"),
    (lambda: DepthwiseConv3D(3, padding="causal", depth_multiplier=2),
     r"depth_multiplier 1 here, 2 in the state"),
    (lambda: DepthwiseConv2D(3, axes="DW", padding="causal"),
     r"layer 'DepthwiseConv3D' here, 'DepthwiseConv2D' in the state; kernel_size \(3, 3, 3\) "
     r"here, \(3, 3\) in the state"),
], ids=["time-kernel", "float16", "strides-dilations", "padding-mode", "multiplier", "2d"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stream_state_of_another_layer_is_refused(other, differs, compiled):
  """The state carries the layer's settings: a state from another layer cannot step this one.

  (Before, a time kernel of 5 on a layer of 3 gave 4 output frames for 2.)
  """
  layer = DepthwiseConv3D(3, padding="causal")
  state = other().stream_init((1, 1, 4, 4, 2))
  step = _compiled(layer.stream_step) if compiled else layer.stream_step
  with pytest.raises(ValueError, match=r"DepthwiseConv3D.stream_step: `state` was made for "
                     r"another configuration: .*" + differs + r".*Make it with this layer's "
                     r"stream_init \(or one with the same settings\)\."):
    step(state, np.zeros((1, 2, 4, 4, 2), np.float32))


def test_stream_state_is_a_structure_of_the_backend():
  """Flattened by jax.tree_util or tf.nest into its tensors; the settings stay static."""
  layer = DepthwiseConv3D(3, padding="causal")
  state = layer.stream_init((1, 1, 4, 4, 2))
  if BACKEND == "jax":
    import jax

    leaves, tree = jax.tree_util.tree_flatten(state)
    again = jax.tree_util.tree_unflatten(tree, leaves)
  else:
    import tensorflow as tf

    leaves = tf.nest.flatten(state)
    again = tf.nest.pack_sequence_as(state, leaves)
  assert [tuple(a.shape) for a in leaves] == [(1, 2, 4, 4, 2), (), ()]
  assert again.settings == state.settings == layer._stream_settings()
  assert [_np(again[k]).tolist() for k in ("phase", "emitted")] == [0, 0]
  with pytest.raises(KeyError, match=r"StreamState: the tensors are 'buffer', 'phase', "
                     r"'emitted'; got 'head'\."):
    state["head"]


# ----------------------------------------------------------------------------
# Serialisation.


def test_config_round_trip(rng):
  layer = DepthwiseConv2D(
      (3, 2), axes="DW", strides=(1, 2), padding="same", padding_mode=("circular", "edge"),
      depth_multiplier=2,
      data_format="channels_first", dilation_rate=(2, 1), activation="relu",
      depthwise_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=1),
      bias_initializer="random_normal",
      depthwise_regularizer=keras.regularizers.L2(0.01),
      bias_regularizer=keras.regularizers.L1(0.02),
      activity_regularizer=keras.regularizers.L2(0.03),
      depthwise_constraint=keras.constraints.MaxNorm(2.0),
      bias_constraint=keras.constraints.NonNeg(), name="per_slice")
  x = random_array(rng, (2, 3, 4, 5, 6))
  y = _np(layer(x))
  config = layer.get_config()
  clone = DepthwiseConv2D.from_config(config)
  assert clone.get_config() == config
  clone.build(x.shape)
  clone.set_weights(layer.get_weights())
  assert_close(_np(clone(x)), y)
  # Through Keras's registry, as model.save does it.
  restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
  assert type(restored) is DepthwiseConv2D and restored.get_config() == config
  assert isinstance(restored.depthwise_regularizer, keras.regularizers.L2)
  assert isinstance(restored.bias_constraint, keras.constraints.NonNeg)
  assert keras.saving.get_registered_name(DepthwiseConv2D) == "dw5d>DepthwiseConv2D"
  # The regularizers are applied: kernel L2, bias L1, activity L2 on the output.
  kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
  want = 0.01 * np.sum(kernel ** 2) + 0.02 * np.sum(np.abs(bias)) + 0.03 * np.sum(
      y.astype(np.float64) ** 2) / x.shape[0]
  assert np.isclose(sum(float(_np(v)) for v in layer.losses), want, rtol=1e-5)


def test_model_save_and_load_same_backend(rng, tmp_path):
  inputs = keras.Input((None, None, None, 2))
  hidden = DepthwiseConv3D((3, 3, 2), padding="same", bias_initializer="random_normal")(inputs)
  outputs = DepthwiseConv2D(3, axes="HW", depth_multiplier=2, use_bias=False)(hidden)
  model = keras.Model(inputs, outputs)
  x = random_array(rng, (2, 4, 6, 5, 2))
  y = model.predict(x, verbose=0)
  model.save(tmp_path / "model.keras")
  loaded = keras.models.load_model(tmp_path / "model.keras")
  assert [type(layer) for layer in loaded.layers[1:]] == [DepthwiseConv3D, DepthwiseConv2D]
  assert_close(loaded.predict(x, verbose=0), y)


def _exchange(backend: str) -> pathlib.Path:
  return pathlib.Path(os.environ["DW5D_KERAS_EXCHANGE"]) / backend


def _chain_reference(model, x: np.ndarray) -> np.ndarray:
  for layer in model.layers[1:]:
    x = reference(layer, x)
  return x


def test_save_for_other_backend(rng):
  keras.utils.set_random_seed(1)
  inputs = keras.Input((None, None, None, 3))
  h = DepthwiseConv3D(3, depth_multiplier=2, strides=(1, 2, 2), padding="same",
                      padding_mode="reflect", activation="relu",
                      bias_initializer="random_normal")(inputs)
  outputs = DepthwiseConv2D((3, 2), axes="DW", padding="causal",
                            bias_initializer="random_normal")(h)
  model = keras.Model(inputs, outputs)
  x = random_array(rng, (2, 5, 7, 8, 3))
  y = model.predict(x, verbose=0)
  assert_close(y, _chain_reference(model, x))
  out = _exchange(BACKEND)
  out.mkdir(parents=True, exist_ok=True)
  model.save(out / "model.keras")
  np.savez(out / "data.npz", x=x, y=y)


def test_load_model_saved_on_other_backend():
  source = _exchange(OTHER)
  assert (source / "model.keras").is_file(), (
      f"no model saved by the {OTHER} backend in {source}: run its checks first")
  model = keras.models.load_model(source / "model.keras")
  data = np.load(source / "data.npz")
  assert [type(layer) for layer in model.layers[1:]] == [DepthwiseConv3D, DepthwiseConv2D]
  y = model.predict(data["x"], verbose=0)
  assert_close(y, data["y"])
  assert_close(y, _chain_reference(model, data["x"]))


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: DepthwiseConv3D(3, padding="full"), ValueError,
     r"DepthwiseConv3D: `padding` must be 'valid', 'same' or 'causal' \(any case\), got "
     r"'full'"),
    (lambda: DepthwiseConv2D(3, axes="HW", padding="causal"), ValueError,
     r"DepthwiseConv2D: padding='causal' is causal along the first spatial axis, D, which "
     r"axes='HW' carries \(convolves H and W only\): CAUSAL on a carried axis means nothing\. "
     r"Use axes that include 'D', or padding 'same' or 'valid'\."),
    (lambda: DepthwiseConv3D((3, 3)), ValueError,
     r"DepthwiseConv3D: `kernel_size` must be a positive int or a sequence of 3 positive "
     r"ints, one per convolved axis \(D, H, W\); got 2 values"),
    (lambda: DepthwiseConv3D(3, strides=0), ValueError,
     r"DepthwiseConv3D: `strides` must be positive, got 0"),
    (lambda: DepthwiseConv2D(3, dilation_rate=1.5), TypeError,
     r"DepthwiseConv2D: `dilation_rate` must be a positive int or a sequence of 2"),
    (lambda: DepthwiseConv3D(3, padding_mode="reflect"), ValueError,
     r"DepthwiseConv3D: `padding_mode` 'reflect' along axis D fills padding, but `padding` "
     r"is 'VALID' there"),
    (lambda: DepthwiseConv2D(3, padding="same", padding_mode="mirror"), ValueError,
     r"DepthwiseConv2D: `padding_mode` must be one of 'zeros', 'reflect', 'symmetric', "
     r"'edge', 'circular', or a sequence of 2 of them, one per convolved axis \(H, W\); "
     r"got 'mirror'"),
    (lambda: DepthwiseConv2D(3, padding="same", padding_mode="reflect").build((1, 1, 4, 2)),
     ValueError, r"DepthwiseConv2D: `padding_mode` 'reflect' along axis H fills at most "
     r"n - 1 = 0 positions per side of an input of size 1, but `padding` 'SAME' pads "
     r"\(1, 1\) there"),
    (lambda: DepthwiseConv2D(3, depth_multiplier=0), ValueError,
     r"DepthwiseConv2D: `depth_multiplier` must be a positive int, got 0"),
    (lambda: DepthwiseConv2D(3, axes="XY"), ValueError,
     r"DepthwiseConv2D: `axes` must be two distinct letters"),
    (lambda: DepthwiseConv2D(3, data_format="NHWC"), ValueError,
     r"DepthwiseConv2D: `data_format` must be None, 'channels_last' or 'channels_first', "
     r"got 'NHWC'"),
    (lambda: DepthwiseConv3D(3, activation="not_an_activation"), ValueError,
     r"DepthwiseConv3D: `activation` must be None, a Keras activation name \(e\.g\. 'relu', "
     r"'gelu'\) or a callable, got 'not_an_activation'"),
    (lambda: _keras.backend_op("DepthwiseConv3D", "torch", 3), ValueError,
     r"DepthwiseConv3D: the Keras backend must be one of 'jax', 'tensorflow' \(set "
     r"KERAS_BACKEND before importing keras\), got 'torch'"),
])
def test_bad_arguments_raise(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


def test_bad_inputs_raise():
  per_slice = DepthwiseConv2D(3, axes="HW")
  with pytest.raises(ValueError, match=r"DepthwiseConv2D: input must have rank 5, "
                     r"\(N, D, H, W, C\) for data_format 'channels_last', got shape "
                     r"\(2, 5, 5, 3\)"):
    per_slice(np.ones((2, 5, 5, 3), np.float32))
  layer = DepthwiseConv3D(3, data_format="channels_first")
  layer(np.ones((1, 2, 4, 4, 4), np.float32))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D: the layer was built for 2 input "
                     r"channels, got an input of shape \(1, 3, 4, 4, 4\)"):
    layer(np.ones((1, 3, 4, 4, 4), np.float32))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D: along axis D the window \(kernel "
                     r"5, dilation 1: effective size 5\) does not fit the padded input \(size 3 = 3 \+ "
                     r"padding \(0, 0\)\) with padding 'VALID'"):
    DepthwiseConv3D(5)(np.ones((1, 3, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match=r"the channel dimension of the input must be known"):
    DepthwiseConv3D(3)(keras.Input((4, 4, 4, None)))


def test_backend_modules():
  """The JAX backend never loads interop's TF ops; the TF backend ran them.

  (Keras itself imports TensorFlow on the JAX backend when it saves a model.)
  """
  if BACKEND == "jax":
    assert "interop._tf_ops" not in sys.modules
  else:
    assert "interop._tf_ops" in sys.modules


def test_onnx_export(rng, tmp_path):
  """`interop.export_onnx` of a Keras model: run in onnxruntime on the JAX backend
  (against the model itself; the layers' reference is checked above); refused,
  naming the backend, on the TensorFlow backend."""
  import interop
  from interop import _onnx

  model = keras.Sequential([keras.Input((5, 6, 7, 3)),
                            DepthwiseConv3D(3, depth_multiplier=2, padding="same",
                                            activation="relu"),
                            keras.layers.Dense(4)])
  path = tmp_path / "k.onnx"
  if BACKEND != "jax":
    with pytest.raises(ValueError, match=r"export_onnx: a Keras model on the 'tensorflow' "
                       r"backend cannot be converted; .* KERAS_BACKEND=jax"):
      interop.export_onnx(model, path, input_shape=(None, 5, 6, 7, 3))
    assert not path.exists()
    return
  import jax
  import onnxruntime

  with jax.numpy_rank_promotion("allow"):  # Keras's Dense adds its bias with promotion
    interop.export_onnx(model, path, input_shape=(None, 5, 6, 7, 3))
    want = np.asarray(model(x := random_array(rng, (2, 5, 6, 7, 3))))
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  y = session.run(None, {"x": x})[0]
  assert np.max(np.abs(y - want)) <= _onnx.TOLERANCE["float32"] * np.max(np.abs(want))


# ----------------------------------------------------------------------------
# Streaming export of a Keras model (interop.keras.stream_functions, then
# interop.export_streaming_litert / export_streaming_onnx): one frame per
# step, the states named rank-4 tensors, checked frame by frame against the
# model's own call on the whole clip (the layers' reference is checked above).


def _stream_model(seed: int = 0, activation: str = "gelu") -> keras.Model:
  """Two streaming layers (dilated in time, multiplier, activations) and a Dense between."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((None, 6, 7, 3))
  h = DepthwiseConv3D(3, padding="causal", dilation_rate=(2, 1, 1), depth_multiplier=2,
                      activation="relu", bias_initializer="random_normal",
                      name="temporal")(inputs)
  h = keras.layers.Dense(4, name="pointwise")(h)
  h = DepthwiseConv2D((2, 3), axes="DW", padding="causal", activation=activation,
                      name="dw")(h)
  return keras.Model(inputs, h)


def _call(model: keras.Model, clip: np.ndarray) -> np.ndarray:
  import jax

  with jax.numpy_rank_promotion("allow"):  # Keras's Dense adds its bias with promotion
    return np.asarray(model(clip))


def test_stream_functions_docstring_examples():
  from interop import _keras_stream

  if BACKEND != "jax":
    return  # the refusal on other backends: test_streaming_export_on_other_backends_is_refused
  failures, tried = doctest.testmod(_keras_stream, optionflags=doctest.ELLIPSIS)
  assert tried > 0 and failures == 0


@pytest.mark.parametrize("quantize", [None, "float16", "int8"])
def test_streaming_litert_export_steps_like_the_call(rng, tmp_path, quantize):
  if BACKEND != "jax":
    return  # refused there: test_streaming_export_on_other_backends_is_refused
  import interop
  from interop import _litert
  from interop._stream_export import run_litert_stream

  # (LiteRT's int8 quantizer aborts the process on GELU's erf: relu there.)
  model = _stream_model(activation="relu" if quantize == "int8" else "gelu")
  shape = (2, 1, 6, 7, 3)
  clip = random_array(rng, (2, 5, 6, 7, 3))
  path = interop.export_streaming_litert(
      *ik.stream_functions(model, shape), tmp_path / "k.tflite", input_shape=shape,
      quantize=quantize,
      representative_data=[clip, random_array(rng, clip.shape)] if quantize == "int8" else None)
  runner = _litert.interpreter(path).get_signature_runner()
  inputs = {k: tuple(d["shape"]) for k, d in runner.get_input_details().items()}
  assert inputs == {"frame": (2, 6, 7, 3), "state_temporal": (2, 6, 7, 12),  # 4 frames of 3
                    "state_dw": (2, 6, 7, 4)}                                # 1 frame of 4
  outputs = {k: tuple(d["shape"]) for k, d in runner.get_output_details().items()}
  assert outputs == {**{k: v for k, v in inputs.items() if k != "frame"},
                     "output": (2, 6, 7, 4)}  # the state, rank 4, in and out
  assert _litert.max_rank(pathlib.Path(path).read_bytes()) == 4  # every tensor, GELU's too
  assert not interop.litert_ops(path).not_builtin
  got = run_litert_stream(path, clip)
  want = _call(model, clip)
  # (int8, calibrated on the clip as tests/test_stream_export.py does: 2.9e-2 measured.)
  assert np.max(np.abs(got - want)) <= _litert.TOLERANCE[quantize] * np.max(np.abs(want))


def test_streaming_onnx_export_steps_like_the_call(rng, tmp_path):
  if BACKEND != "jax":
    return  # refused there: test_streaming_export_on_other_backends_is_refused
  import onnxruntime

  import interop
  from interop import _onnx

  model = _stream_model()
  shape = (None, 1, 6, 7, 3)  # symbolic batch
  path = interop.export_streaming_onnx(*ik.stream_functions(model, shape), tmp_path / "k.onnx",
                                       input_shape=shape)
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  assert {i.name: i.shape for i in session.get_inputs()} == {
      "frame": ["b", 6, 7, 3], "state_temporal": ["b", 6, 7, 12], "state_dw": ["b", 6, 7, 4]}
  for batch in (1, 3):
    clip = random_array(rng, (batch, 5, 6, 7, 3))
    want = _call(model, clip)
    got = _onnx.run_stream(session, clip)
    assert np.max(np.abs(got - want)) <= _onnx.TOLERANCE["float32"] * np.max(np.abs(want))


def test_streaming_export_errors(tmp_path):
  """Models that cannot stream one frame at a time are refused by name."""
  if BACKEND != "jax":
    return  # refused there: test_streaming_export_on_other_backends_is_refused
  inputs = keras.Input((None, 6, 6, 2))
  not_causal = keras.Model(inputs, DepthwiseConv3D(3, padding="same", name="c")(inputs))
  with pytest.raises(ValueError, match=r"stream_functions: the layer `c` of `model` cannot "
                                       r"stream: .*padding='causal', got padding='same'"):
    ik.stream_functions(not_causal, (1, 1, 6, 6, 2))
  mixes = keras.Model(inputs, keras.layers.Conv3D(2, 3, padding="same")(
      DepthwiseConv3D(3, padding="causal")(inputs)))
  with pytest.raises(ValueError, match=r"stream_functions: `model` streamed one frame at a time "
                                       r"differs from its call on the whole clip .* mixes "
                                       r"frames along time"):
    ik.stream_functions(mixes, (1, 1, 6, 6, 2))
  layer = DepthwiseConv3D(3, padding="causal", name="twice")
  twice = keras.Model(inputs, layer(layer(inputs)))
  with pytest.raises(ValueError, match=r"stream_functions: the layer `twice` is called twice "
                                       r"in `model`"):
    ik.stream_functions(twice, (1, 1, 6, 6, 2))
  with pytest.raises(ValueError, match=r"stream_functions: `input_shape` must be the chunks' "
                                       r"shape \(N, T, H, W, C\)"):
    ik.stream_functions(not_causal, (1, 6, 6, 2))
  with pytest.raises(ValueError, match=r"stream_functions: `model` must be a Keras model"):
    ik.stream_functions(DepthwiseConv3D(3, padding="causal"), (1, 1, 6, 6, 2))
  import interop

  for export, suffix in ((interop.export_streaming_litert, "tflite"),
                        (interop.export_streaming_onnx, "onnx")):
    with pytest.raises(TypeError, match=rf"{export.__name__}: `init_fn` is a Keras model "
                                        r"\(Functional\); pass its stream's functions instead: "
                                        r".*interop.keras.stream_functions"):
      export(not_causal, None, None, tmp_path / f"k.{suffix}", input_shape=(1, 1, 6, 6, 2))
  assert not list(tmp_path.iterdir())


def test_streaming_export_on_other_backends_is_refused():
  if BACKEND == "jax":
    return  # exported above
  inputs = keras.Input((None, 6, 6, 2))
  model = keras.Model(inputs, DepthwiseConv3D(3, padding="causal")(inputs))
  with pytest.raises(ValueError, match=r"stream_functions: `model` is on the 'tensorflow' Keras "
                                       r"backend; .* KERAS_BACKEND=jax"):
    ik.stream_functions(model, (1, 1, 6, 6, 2))
