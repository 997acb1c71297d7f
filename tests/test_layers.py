"""Flax NNX layers (dw5d_jax._layers, public as dw5d_jax.nn)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dw5d_jax as dw
from dw5d_jax._reference import depthwise_reference
from dw5d_jax.nn import DepthwiseConv2D, DepthwiseConv3D
from tests.helpers import assert_close, random_array


def _params(layer) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv3d_shapes_params_and_reference(rng, use_bias):
  layer = DepthwiseConv3D(3, (3, 2, 3), depth_multiplier=2, strides=(1, 2, 1), dilations=(2, 1, 1),
                          use_bias=use_bias, rngs=nnx.Rngs(0))
  chex.assert_shape(layer.kernel[...], (3, 2, 3, 3, 2))
  assert _params(layer) == 3 * 2 * 3 * 3 * 2 + (6 if use_bias else 0)
  if use_bias:
    layer.bias[...] = jnp.asarray(random_array(rng, (6,)))
  x = random_array(rng, (2, 5, 6, 7, 3))
  y = layer(x)
  chex.assert_shape(y, (2, 5, 3, 7, 6))
  want = depthwise_reference(x, np.asarray(layer.kernel[...]), axes="DHW", strides=(1, 2, 1),
                             dilations=(2, 1, 1))
  if use_bias:
    want = want + np.asarray(layer.bias[...])
  assert_close(y, want)


@pytest.mark.parametrize("axes", [None, "HW", "DW", "WD"])
def test_conv2d_matches_functional_api(rng, axes):
  layer = DepthwiseConv2D(4, (3, 2), depth_multiplier=3, axes=axes, padding="VALID",
                          rngs=nnx.Rngs(1))
  layer.bias[...] = jnp.asarray(random_array(rng, (12,)))
  x = random_array(rng, (2, 6, 7, 4) if axes is None else (2, 5, 6, 7, 4))
  kw = {} if axes is None else {"axes": axes}
  want = dw.depthwise_conv2d(x, layer.kernel[...], padding="VALID", **kw)
  want = want + layer.bias[...].reshape((1,) * (want.ndim - 1) + (12,))
  chex.assert_trees_all_close(layer(x), want, rtol=1e-6, atol=1e-6)


def test_leading_batch_dims_and_unbatched_input(rng):
  layer = DepthwiseConv3D(2, 3, rngs=nnx.Rngs(0))
  x = random_array(rng, (3, 2, 4, 5, 6, 2))  # two batch dims
  y = layer(x)
  chex.assert_shape(y, (3, 2, 4, 5, 6, 2))
  chex.assert_trees_all_close((layer(x[1]), layer(x[1, 0])), (y[1], y[1, 0]), rtol=1e-6,
                              atol=1e-6)


def test_nnx_jit_and_grad_match_functional(rng):
  layer = DepthwiseConv3D(3, 3, depth_multiplier=2, strides=2, rngs=nnx.Rngs(0))
  x = jnp.asarray(random_array(rng, (2, 5, 6, 7, 3)))
  ct = jnp.asarray(random_array(rng, (2, 3, 3, 4, 6)))

  @nnx.jit
  def loss(model, x):
    return jnp.sum(model(x) * ct)

  grads = nnx.grad(loss)(layer, x)
  k, b = layer.kernel[...], layer.bias[...]
  gk, gb = jax.grad(
      lambda k, b: jnp.sum((dw.depthwise_conv3d(x, k, strides=2) + b.reshape(1, 1, 1, 1, 6))
                           * ct), argnums=(0, 1))(k, b)
  assert_close(grads["kernel"][...], gk)
  assert_close(grads["bias"][...], gb)
  assert_close(loss(layer, x), jnp.sum(layer(x) * ct))


@pytest.mark.parametrize("activation, name, want", [
    ("gelu", "gelu", lambda z: jax.nn.gelu(z, approximate=False)),
    ("SWISH", "silu", jax.nn.silu),
    (jax.nn.gelu, "gelu_tanh", lambda z: jax.nn.gelu(z, approximate=True)),
    (jax.nn.relu6, "relu6", jax.nn.relu6),
    (jnp.tanh, "tanh", jnp.tanh),
    (jax.nn.elu, None, jax.nn.elu),  # not fused: applied after
    (lambda z: z * 2, None, lambda z: z * 2),
], ids=["gelu", "SWISH", "jax.nn.gelu", "relu6", "jnp.tanh", "elu", "lambda"])
def test_activation_fused_with_the_bias(rng, activation, name, want):
  """Names and JAX's functions go into the op (`activation=`), others run after it."""
  layer = DepthwiseConv3D(4, 3, depth_multiplier=2, activation=activation, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(random_array(rng, (8,)))
  x = random_array(rng, (2, 3, 4, 5, 4))
  z = depthwise_reference(x, np.asarray(layer.kernel[...]), axes="DHW") + np.asarray(
      layer.bias[...], np.float64)
  assert_close(layer(x), np.asarray(want(jnp.asarray(z, jnp.float32))))
  text = str(jax.make_jaxpr(lambda a: layer(a))(x))
  assert "dw5d_epilogue" in text
  assert f"activation={name}" in text


def test_fused_layer_gradients_match_unfused(rng):
  layer = DepthwiseConv3D(4, (3, 2, 3), strides=(1, 2, 1), activation="gelu", rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(random_array(rng, (4,)))
  x = jnp.asarray(random_array(rng, (2, 3, 6, 5, 4)))
  ct = jnp.asarray(random_array(rng, layer(x).shape))

  @nnx.jit
  def loss(model, x):
    return jnp.sum(model(x) * ct)

  grads = nnx.grad(loss)(layer, x)
  gk, gb = jax.grad(lambda k, b: jnp.sum(jax.nn.gelu(
      dw.depthwise_conv3d(x, k, strides=(1, 2, 1)) + b.reshape(1, 1, 1, 1, 4),
      approximate=False) * ct),
      argnums=(0, 1))(layer.kernel[...], layer.bias[...])
  assert_close(grads["kernel"][...], gk)
  assert_close(grads["bias"][...], gb)


def test_kernel_init_uses_per_filter_fan_in():
  """lecun normal: std = 1/sqrt(fan_in) with fan_in = kd*kh*kw, not kd*kh*kw*C."""
  layer = DepthwiseConv3D(64, 3, depth_multiplier=4, rngs=nnx.Rngs(0))
  std = float(jnp.std(layer.kernel[...]))
  assert abs(std - 1 / np.sqrt(27)) < 0.05 / np.sqrt(27), std


def test_dtypes():
  layer = DepthwiseConv2D(2, 3, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert layer.kernel[...].dtype == jnp.float32
  y = layer(jnp.ones((1, 5, 5, 2), jnp.float32))
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("make,pattern", [
    (lambda: DepthwiseConv3D(0, 3, rngs=nnx.Rngs(0)),
     r"DepthwiseConv3D: `in_features` must be a positive int, got 0"),
    (lambda: DepthwiseConv3D(2, (3, 3), rngs=nnx.Rngs(0)),
     r"DepthwiseConv3D: `kernel_size` must be a positive int or a sequence of 3 positive "
     r"ints, one per convolved axis \(D, H, W\); got 2 values"),
    (lambda: DepthwiseConv2D(2, 3, depth_multiplier=0, rngs=nnx.Rngs(0)),
     r"DepthwiseConv2D: `depth_multiplier` must be a positive int, got 0"),
    (lambda: DepthwiseConv2D(2, 3, axes="XY", rngs=nnx.Rngs(0)),
     r"DepthwiseConv2D: `axes` must be two distinct letters"),
    (lambda: DepthwiseConv2D(2, 3, padding="full", rngs=nnx.Rngs(0)),
     r"DepthwiseConv2D: `padding` must be one of 'SAME', 'VALID', 'CAUSAL'"),
    (lambda: DepthwiseConv3D(2, 3, strides=0, rngs=nnx.Rngs(0)),
     r"DepthwiseConv3D: `strides` must be positive"),
    (lambda: DepthwiseConv3D(2, 3, activation="elu", rngs=nnx.Rngs(0)),
     r"DepthwiseConv3D: `activation` must be None or one of 'relu', .*; got 'elu'\."),
    (lambda: DepthwiseConv3D(2, 3, padding_mode="replicate", rngs=nnx.Rngs(0)),
     r"DepthwiseConv3D: `padding_mode` must be one of 'zeros', 'reflect', 'symmetric', "
     r"'edge', 'circular', or a sequence of 3 of them"),
    (lambda: DepthwiseConv2D(2, 3, padding="VALID", padding_mode="edge", rngs=nnx.Rngs(0)),
     r"DepthwiseConv2D: `padding_mode` 'edge' along axis H fills padding, but `padding` is "
     r"'VALID' there"),
])
def test_bad_construction_raises(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


def test_bad_activation_type_raises():
  with pytest.raises(TypeError, match=r"DepthwiseConv2D: `activation` must be None, a name "
                     r"\(e.g. 'gelu'\) or a callable, got int 3\."):
    DepthwiseConv2D(2, 3, activation=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padding_mode", ["reflect", ("circular", "edge", "symmetric")])
def test_padding_mode(rng, padding_mode):
  """Border modes under nnx.jit and grad, against the reference and the functional op."""
  layer = DepthwiseConv3D(3, (3, 2, 3), depth_multiplier=2, padding=("CAUSAL", "SAME", "SAME"),
                          padding_mode=padding_mode, rngs=nnx.Rngs(1))
  x = random_array(rng, (2, 4, 5, 6, 3))
  kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  want = depthwise_reference(x, kernel, axes="DHW", padding=("CAUSAL", "SAME", "SAME"),
                             padding_mode=padding_mode) + bias
  assert_close(nnx.jit(lambda m, a: m(a))(layer, x), want)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  want_gk = jax.grad(lambda k: jnp.sum((dw.depthwise_conv3d(
      x, k, padding=("CAUSAL", "SAME", "SAME"), padding_mode=padding_mode)
      + bias.reshape(1, 1, 1, 1, -1)) ** 2))(jnp.asarray(kernel))
  assert_close(grads.kernel[...], want_gk)
  layer2 = DepthwiseConv2D(3, 3, axes="DW", padding_mode="edge", rngs=nnx.Rngs(2))
  assert_close(layer2(x), depthwise_reference(x, np.asarray(layer2.kernel[...]), axes="DW",
                                              padding_mode="edge"))


def test_bad_input_raises():
  layer = DepthwiseConv2D(3, 3, axes="HW", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"DepthwiseConv2D: input must have shape "
                     r"\(\*batch, D, H, W, C\), got shape \(5, 5\)"):
    layer(jnp.ones((5, 5)))
  with pytest.raises(ValueError, match=r"DepthwiseConv2D: `x` must have in_features=3 channels "
                     r"\(its last dim\), got shape \(1, 2, 5, 5, 4\)\."):
    layer(jnp.ones((1, 2, 5, 5, 4)))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D: `x` must have in_features=4 channels "
                     r"\(its last dim\), got shape \(2, 3, 5, 5, 5, 3\)\."):
    DepthwiseConv3D(4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 5, 5, 5, 3)))
  reflect = DepthwiseConv3D(4, (1, 5, 3), padding_mode="reflect", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"DepthwiseConv3D: `x` of shape \(1, 3, 2, 5, 4\): "
                     r"`padding_mode` 'reflect' along axis H fills at most n - 1 = 1 positions "
                     r"per side of an input of size 2, but `padding` 'SAME' pads \(2, 2\) "
                     r"there\."):
    reflect(jnp.ones((1, 3, 2, 5, 4)))
  with pytest.raises(ValueError, match=r"DepthwiseConv2D: `x` of shape \(1, 6, 4, 3\): along "
                     r"axis W the window \(kernel 5, dilation 1: effective size 5\) does not fit "
                     r"the padded input \(size 4 = 4 \+ padding \(0, 0\)\) with padding "
                     r"'VALID'"):
    DepthwiseConv2D(3, 5, padding="VALID", rngs=nnx.Rngs(0))(jnp.ones((1, 6, 4, 3)))


@pytest.mark.parametrize("config", [
    dict(kernel_size=(3, 2), depth_multiplier=2, strides=2, padding="same"),
    dict(kernel_size=3, dilation_rate=(1, 2), padding="valid"),
], ids=str)
def test_loads_keras_depthwise_conv2d_weights(rng, config):
  """Keras DepthwiseConv2D -> interop.weights_from_keras -> DepthwiseConv2D, no reshuffling."""
  keras = pytest.importorskip("keras")
  interop = pytest.importorskip("interop")
  x = random_array(rng, (2, 9, 8, 3))
  klayer = keras.layers.DepthwiseConv2D(**config, bias_initializer="random_normal")
  want = np.asarray(klayer(x))
  w = interop.weights_from_keras(klayer)
  assert w.options["data_format"] == "NHWC"
  layer = DepthwiseConv2D(w.kernel.shape[-2], w.kernel.shape[:2],
                          depth_multiplier=w.kernel.shape[-1], strides=w.options["strides"],
                          padding=w.options["padding"], dilations=w.options["dilations"],
                          rngs=nnx.Rngs(0))
  assert layer.kernel.shape == w.kernel.shape
  layer.kernel[...] = jnp.asarray(w.kernel)
  layer.bias[...] = jnp.asarray(w.bias)
  assert_close(layer(x), want)


def test_loads_keras_grouped_conv3d_weights(rng):
  """Keras Conv3D(groups=C) -> interop.weights_from_keras -> DepthwiseConv3D."""
  keras = pytest.importorskip("keras")
  interop = pytest.importorskip("interop")
  x = random_array(rng, (2, 5, 6, 4, 3))
  klayer = keras.layers.Conv3D(6, (3, 2, 3), groups=3, strides=(1, 2, 1), padding="same",
                               bias_initializer="random_normal")
  want = np.asarray(klayer(x))
  w = interop.weights_from_keras(klayer)
  layer = DepthwiseConv3D(3, (3, 2, 3), depth_multiplier=2, strides=w.options["strides"],
                          padding=w.options["padding"], dilations=w.options["dilations"],
                          rngs=nnx.Rngs(0))
  layer.kernel[...] = jnp.asarray(w.kernel)
  layer.bias[...] = jnp.asarray(w.bias)
  assert_close(layer(x), want)


def test_importing_dw5d_jax_does_not_import_flax():
  import subprocess
  import sys
  code = ("import sys, dw5d_jax; assert 'flax' not in sys.modules; "
          "dw5d_jax.nn.DepthwiseConv3D; assert 'flax' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
