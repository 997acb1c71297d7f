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
from tests.helpers import assert_close, keras_output, random_array


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
  # Builds the layer with random weights; None where TF refuses unequal strides.
  want = keras_output(layer, x, config.get("strides", 1))
  w = interop.weights_from_keras(layer)
  m = config["depth_multiplier"]
  assert w.kernel.shape == (*np.broadcast_to(config["kernel_size"], 2), 3, m)
  assert (w.bias is None) == (config.get("use_bias") is False)
  bias = 0.0 if w.bias is None else w.bias
  # The reference, with the options spelled out as TF names.
  ref = depthwise_reference(x, w.kernel, axes="HW", strides=w.options["strides"],
                            padding=w.options["padding"], dilations=w.options["dilations"])
  if want is not None:
    assert_close(ref + bias, np.asarray(want))
  assert_close(np.asarray(dw.depthwise_conv2d(x, w.kernel, **w.options)) + bias,
               ref + bias if want is None else np.asarray(want))


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


# ----------------------------------------------------------------------------
# Whole PyTorch modules (weights_from_torch), against PyTorch's own output.

TORCH_MODULES = [
    # (x shape NC..., M, kernel size, module keyword arguments)
    ((2, 3, 7, 6, 5), 1, (5, 1, 1), dict(padding=(2, 0, 0))),  # X3D's temporal conv
    ((1, 4, 5, 9, 8), 1, 3, dict(stride=(1, 2, 2), padding=1, bias=False)),  # X3D's 3x3x3
    ((2, 2, 5, 6, 7), 2, (3, 2, 3), dict(padding="same", dilation=(1, 2, 1),
                                         padding_mode="reflect")),
    ((1, 3, 6, 5, 7), 3, (2, 3, 3), dict(padding=(1, 2, 0), stride=(2, 1, 3),
                                         dilation=(2, 1, 1), padding_mode="replicate")),
    ((2, 2, 5, 6, 4), 1, 3, dict(padding="valid", stride=2)),
    ((1, 2, 6, 7, 5), 2, (3, 3, 2), dict(padding=(1, 2, 1), padding_mode="circular")),
    ((2, 3, 7, 6), 2, (3, 2), dict(padding="same", padding_mode="circular")),
    ((1, 4, 8, 9), 1, 3, dict(padding=(0, 2), stride=(2, 1), dilation=2,
                              padding_mode="reflect")),
    ((2, 3, 7, 6), 3, 3, dict(stride=2, padding=1, padding_mode="replicate", bias=False)),
]


def check_torch_module(rng, torch, module, x_shape):
  """`weights_from_torch(module)` through the library against `module(x)` itself."""
  x = random_array(rng, x_shape)
  with torch.no_grad():
    want = module(torch.from_numpy(x)).numpy().astype(np.float64)
  w = interop.weights_from_torch(module)
  op = dw.depthwise_conv3d if w.kernel.ndim == 5 else dw.depthwise_conv2d
  y = np.asarray(op(x, w.kernel, **w.options), np.float64)
  if w.bias is not None:
    y = y + w.bias.reshape(-1, *(1,) * (x.ndim - 2))
  # PyTorch computes in float32 too: the float32 tolerance, scaled by max|want|.
  assert_close(y, want, err_msg=f"{module}")
  return w


@pytest.mark.parametrize("x_shape, m, ksize, kwargs", TORCH_MODULES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_weights_from_torch(rng, x_shape, m, ksize, kwargs):
  import torch

  torch.manual_seed(int(rng.integers(2**31)))
  c = x_shape[1]
  cls = torch.nn.Conv3d if len(x_shape) == 5 else torch.nn.Conv2d
  module = cls(c, c * m, ksize, groups=c, **kwargs)
  w = check_torch_module(rng, torch, module, x_shape)
  assert w.kernel.shape == (*np.broadcast_to(ksize, len(x_shape) - 2), c, m)
  assert (w.bias is None) == (kwargs.get("bias") is False)
  assert w.options["data_format"] == ("NCDHW" if len(x_shape) == 5 else "NCHW")


def test_weights_from_torch_x3d(rng):
  """Every depthwise module of pytorchvideo's X3D (random weights), where it imports."""
  try:
    from pytorchvideo.models.x3d import create_x3d
  except Exception as err:  # ImportError, or a torchvision that does not fit torch
    pytest.skip(f"pytorchvideo's X3D does not import here: {type(err).__name__}: {err}")
  import torch

  torch.manual_seed(0)
  model = create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=10)
  depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)
               and m.groups == m.in_channels > 1]
  assert len(depthwise) > 10
  seen = set()
  for module in depthwise:  # one of each configuration
    key = (module.in_channels, module.kernel_size, module.stride, module.padding)
    if key not in seen:
      seen.add(key)
      check_torch_module(rng, torch, module, (1, module.in_channels, 5, 9, 8))
  assert (2, 0, 0) in {k[3] for k in seen}  # the temporal conv the README recipe got wrong


def test_weights_from_torch_errors():
  import torch

  with pytest.raises(ValueError, match=r"weights_from_torch: `module` \(Conv3d\) is not "
                     r"depthwise: groups=2 with in_channels=4 gives 2 input channels per "
                     r"group; a depthwise convolution has groups == in_channels"):
    interop.weights_from_torch(torch.nn.Conv3d(4, 4, 3, groups=2))
  for module in (torch.nn.Conv1d(2, 2, 3, groups=2), torch.nn.ConvTranspose2d(2, 2, 3, groups=2),
                 torch.nn.Linear(2, 2), "conv.pt"):
    with pytest.raises(TypeError, match=r"weights_from_torch: `module` must be a PyTorch "
                       r"Conv2d or Conv3d with groups equal to its in_channels, got "):
      interop.weights_from_torch(module)
  with pytest.raises(TypeError, match=r"weights_from_torch: the module's `weight` "
                     r"\(torch.bfloat16\) cannot become a NumPy array"):
    interop.weights_from_torch(torch.nn.Conv2d(2, 2, 3, groups=2).to(torch.bfloat16))


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
