"""Weight converters (interop._weights).

Each converter is checked two ways: against the framework's own layer where
it runs here (Keras on CPU; PyTorch only if installed, it is no dependency),
and against the framework's definition of a grouped convolution written with
the float64 reference (`grouped_by_definition`), which needs no framework.
"""

from __future__ import annotations

import doctest

import keras
import numpy as np
import pytest

import dw5d_jax as dw
import interop
import interop._weights
from dw5d_jax._reference import depthwise_reference
from tests.helpers import assert_close, random_array


def grouped_by_definition(x, filters, *, channels_first, **conv):
  """A grouped convolution with one input channel per group, from its definition.

  Output channel `o` correlates input channel `o // M` with its own filter
  `filters[o]` (spatial dims only): Keras' and PyTorch's rule for `groups=C`.
  Each single-channel correlation is the reference with C = M = 1.
  """
  c_axis = 1 if channels_first else -1
  c, cm = x.shape[c_axis], len(filters)
  outs = []
  for o in range(cm):
    xc = np.take(x, [o // (cm // c)], axis=c_axis)
    outs.append(depthwise_reference(xc, filters[o][..., None, None], **conv))
  return np.concatenate(outs, axis=c_axis)


# ----------------------------------------------------------------------------
# Keras layers, run on CPU.

KERAS_2D = [
    dict(kernel_size=3, depth_multiplier=2, strides=2, padding="same"),
    dict(kernel_size=(2, 3), depth_multiplier=1, dilation_rate=2, padding="valid",
         use_bias=False),
    dict(kernel_size=3, depth_multiplier=3, strides=(1, 2), padding="valid"),
]


@pytest.mark.parametrize("config", KERAS_2D, ids=lambda c: str(sorted(c.items())))
def test_keras_depthwise_conv2d(rng, config):
  x = random_array(rng, (2, 7, 6, 3))
  layer = keras.layers.DepthwiseConv2D(**config, bias_initializer="random_normal")
  want = np.asarray(layer(x))  # builds the layer with random weights
  w = interop.weights_from_keras(layer)
  m = config["depth_multiplier"]
  assert w.kernel.shape == (*np.broadcast_to(config["kernel_size"], 2), 3, m)
  assert (w.bias is None) == (config.get("use_bias") is False)
  bias = 0.0 if w.bias is None else w.bias
  assert_close(np.asarray(dw.depthwise_conv2d(x, w.kernel, **w.options)) + bias, want)
  # The same from the reference, with the options spelled out as TF names.
  ref = depthwise_reference(x, w.kernel, axes="HW", strides=w.options["strides"],
                            padding=w.options["padding"], dilations=w.options["dilations"])
  assert_close(ref + bias, want)


@pytest.mark.parametrize("conv_cls, x_shape, options", [
    (keras.layers.Conv3D, (2, 5, 6, 7, 3), dict(strides=(1, 2, 2), padding="same")),
    (keras.layers.Conv3D, (1, 6, 5, 4, 2), dict(dilation_rate=(2, 1, 1), padding="valid")),
    (keras.layers.Conv2D, (2, 6, 5, 3), dict(strides=2, padding="same")),
])
def test_keras_grouped_conv(rng, conv_cls, x_shape, options):
  c, m = x_shape[-1], 2
  x = random_array(rng, x_shape)
  layer = conv_cls(c * m, 3, groups=c, bias_initializer="random_normal", **options)
  want = np.asarray(layer(x))
  w = interop.weights_from_keras(layer)
  rank = len(x_shape) - 2
  assert w.kernel.shape == (3,) * rank + (c, m)
  op = dw.depthwise_conv3d if rank == 3 else dw.depthwise_conv2d
  assert_close(np.asarray(op(x, w.kernel, **w.options)) + w.bias, want)
  # By the definition, from the Keras kernel (k..., 1, C*M) itself.
  raw = np.asarray(layer.kernel)
  filters = np.moveaxis(raw[..., 0, :], -1, 0)  # (C*M, k...)
  conv = dict(axes="DHW"[3 - rank:], strides=w.options["strides"],
              padding=w.options["padding"], dilations=w.options["dilations"])
  assert_close(grouped_by_definition(x, filters, channels_first=False, **conv) + w.bias, want)
  assert_close(depthwise_reference(x, interop.kernel_from_keras_grouped(
      raw, in_channels=c), **conv) + w.bias, want)


def test_keras_layer_errors(rng):
  with pytest.raises(ValueError, match=r"weights_from_keras: `layer` \(DepthwiseConv2D\) is "
                     r"not built; call it on an input once or call layer.build"):
    interop.weights_from_keras(keras.layers.DepthwiseConv2D(3))
  with pytest.raises(TypeError, match=r"weights_from_keras: `layer` must be a Keras "
                     r"DepthwiseConv2D, or a Conv2D/Conv3D with groups equal to its input "
                     r"channels, got Dense"):
    interop.weights_from_keras(keras.layers.Dense(3))
  with pytest.raises(TypeError, match=r"got Conv1D"):
    interop.weights_from_keras(keras.layers.Conv1D(4, 3, groups=2))
  layer = keras.layers.Conv3D(4, 3, groups=2)
  layer(random_array(rng, (1, 3, 3, 3, 4)))
  with pytest.raises(ValueError, match=r"weights_from_keras: `layer` \(Conv3D\) is not "
                     r"depthwise: groups=2 with 4 input channels gives 2 input channels per "
                     r"group \(kernel shape \(3, 3, 3, 2, 4\)\); set groups to the number of "
                     r"input channels"):
    interop.weights_from_keras(layer)


# ----------------------------------------------------------------------------
# PyTorch weights, as NumPy arrays.

TORCH_CASES = [
    # (x shape NC..., M, kernel size, stride, padding p (PyTorch's symmetric), dilation)
    ((2, 3, 5, 6, 7), 2, (3, 2, 3), (1, 2, 2), 1, (1, 1, 2)),
    ((1, 2, 4, 4, 5), 1, (2, 2, 2), 1, 0, 1),
    ((2, 3, 7, 6), 3, (3, 3), 2, 2, 1),
]


def torch_conv_kwargs(x_ndim, stride, pad, dilation):
  rank = x_ndim - 2
  return dict(axes="DHW"[3 - rank:], strides=stride, dilations=dilation,
              padding=((pad, pad),) * rank, data_format="NCDHW" if rank == 3 else "NCHW")


@pytest.mark.parametrize("x_shape, m, ksize, stride, pad, dilation", TORCH_CASES)
def test_torch_grouped_by_definition(rng, x_shape, m, ksize, stride, pad, dilation):
  c = x_shape[1]
  x = random_array(rng, x_shape)
  weight = random_array(rng, (c * m, 1, *ksize))
  kernel = interop.kernel_from_torch_grouped(weight, in_channels=c)
  assert kernel.shape == (*ksize, c, m)
  conv = torch_conv_kwargs(len(x_shape), stride, pad, dilation)
  want = grouped_by_definition(x, weight[:, 0], channels_first=True, **conv)
  assert_close(depthwise_reference(x, kernel, **conv), want)
  op = dw.depthwise_conv3d if len(x_shape) == 5 else dw.depthwise_conv2d
  conv.pop("axes")
  assert_close(op(x, kernel, **conv), want)


@pytest.mark.parametrize("x_shape, m, ksize, stride, pad, dilation", TORCH_CASES)
def test_torch_grouped_against_torch(rng, x_shape, m, ksize, stride, pad, dilation):
  """An extra check where PyTorch happens to be installed (it is no dependency)."""
  torch = pytest.importorskip("torch")
  c = x_shape[1]
  x = random_array(rng, x_shape)
  cls = torch.nn.Conv3d if len(x_shape) == 5 else torch.nn.Conv2d
  layer = cls(c, c * m, ksize, stride=stride, padding=pad, dilation=dilation, groups=c)
  with torch.no_grad():
    want = layer(torch.from_numpy(x)).numpy()
  kernel = interop.kernel_from_torch_grouped(layer.weight.detach().numpy(), in_channels=c)
  conv = torch_conv_kwargs(len(x_shape), stride, pad, dilation)
  conv.pop("axes")
  op = dw.depthwise_conv3d if len(x_shape) == 5 else dw.depthwise_conv2d
  bias = layer.bias.detach().numpy().reshape(1, -1, *(1,) * (len(x_shape) - 2))
  assert_close(np.asarray(op(x, kernel, **conv)) + bias, want)


@pytest.mark.parametrize("fn, array, in_channels, error, message", [
    (interop.kernel_from_torch_grouped, np.zeros((6, 2, 3, 3, 3)), 3, ValueError,
     r"kernel_from_torch_grouped: `weight` must be \(C\*M, 1, kh, kw\) or \(C\*M, 1, kd, kh, "
     r"kw\), the weight of a PyTorch Conv2d/Conv3d with groups=C, got shape \(6, 2, 3, 3, 3\)"),
    (interop.kernel_from_torch_grouped, np.zeros((6, 1, 3)), 3, ValueError,
     r"got shape \(6, 1, 3\)"),
    (interop.kernel_from_torch_grouped, np.zeros((6, 1, 3, 3)), 4, ValueError,
     r"kernel_from_torch_grouped: the first dim of `weight` \(shape \(6, 1, 3, 3\)\) holds "
     r"C\*M = 6 output channels, which `in_channels`=4 does not divide"),
    (interop.kernel_from_torch_grouped, np.zeros((6, 1, 3, 3)), 0, ValueError,
     r"`in_channels` must be a positive int \(the layer's groups\), got 0"),
    (interop.kernel_from_torch_grouped, np.zeros((6, 1, 3, 3), np.int32), 3, TypeError,
     r"kernel_from_torch_grouped: `weight` must be a floating-point array \(C\*M, 1, k...\), "
     r"got ndarray with dtype int32"),
    (interop.kernel_from_keras_grouped, np.zeros((3, 3, 3, 2, 6)), 3, ValueError,
     r"kernel_from_keras_grouped: `kernel` must be \(kh, kw, 1, C\*M\) or \(kd, kh, kw, 1, "
     r"C\*M\), the kernel of a Keras Conv2D/Conv3D with groups=C, got shape "
     r"\(3, 3, 3, 2, 6\)"),
    (interop.kernel_from_keras_grouped, np.zeros((3, 3, 1, 6)), 4, ValueError,
     r"the last dim of `kernel` \(shape \(3, 3, 1, 6\)\) holds C\*M = 6 output channels"),
    (interop.kernel_from_keras_grouped, np.zeros((3, 3, 1, 6)), 2.0, ValueError,
     r"`in_channels` must be a positive int"),
    (interop.kernel_from_keras_grouped, "weights.npy", 2, TypeError,
     r"`kernel` must be a floating-point array \(k..., 1, C\*M\), got str"),
])
def test_converter_errors(fn, array, in_channels, error, message):
  with pytest.raises(error, match=message):
    fn(array, in_channels=in_channels)


def test_docstring_examples():
  failures, tried = doctest.testmod(interop._weights)
  assert tried > 0
  assert failures == 0
