"""Weights from Keras and PyTorch, in the library's `(..., C, M)` kernel layout.

`dw5d_jax` kernels are TF's depthwise layout: spatial dims first, then
`(C, M)`, output channel `c * M + m`. Grouped convolutions with one input
channel per group (`groups == C`) are depthwise convolutions with the same
output order (group `c` owns outputs `c * M ... c * M + M - 1`), so only the
layout changes:

* Keras `DepthwiseConv2D`: `(kh, kw, C, M)`, already the library's layout.
* Keras `Conv2D`/`Conv3D(groups=C)`: `(k..., 1, C * M)`.
* PyTorch `Conv2d`/`Conv3d(groups=C)`: `(C * M, 1, k...)`. Biases, `(C * M,)`,
  need no change in any of them.

Only NumPy is needed here: layers and modules are read through their
attributes (neither Keras nor PyTorch is imported).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class DepthwiseWeights(NamedTuple):
  """A depthwise layer's weights, ready for `dw5d_jax`.

  Attributes:
    kernel: `(kh, kw, C, M)` or `(kd, kh, kw, C, M)`.
    bias: `(C * M,)`, or None for a layer without one.
    options: `strides`, `padding`, `dilations` and `data_format` of the layer,
      as keyword arguments of `depthwise_conv2d` (2D kernel) or
      `depthwise_conv3d` (3D kernel) for the layer's own input rank.

  Example:
    >>> import dw5d_jax as dw
    >>> w = DepthwiseWeights(np.ones((3, 3, 2, 1), np.float32), None,
    ...                      {"strides": (2, 2), "padding": "SAME", "data_format": "NHWC"})
    >>> dw.depthwise_conv2d(np.ones((1, 6, 6, 2), np.float32), w.kernel, **w.options).shape
    (1, 3, 3, 2)
  """

  kernel: np.ndarray
  bias: np.ndarray | None
  options: dict[str, Any]


def weights_from_keras(layer: Any) -> DepthwiseWeights:
  """Reads a built Keras depthwise layer.

  Accepts `DepthwiseConv2D`, and `Conv2D`/`Conv3D` with `groups` equal to
  the input channels (one input channel per group), which Keras 3 has in
  place of a `DepthwiseConv3D`. `dw.depthwise_conv2d(x, w.kernel,
  **w.options) + w.bias` (or `depthwise_conv3d`) then reproduces
  `layer(x)` for the layer's input `x`.

  Args:
    layer: the Keras layer, built (called once, or `layer.build(shape)`).

  Returns:
    The kernel in `(..., C, M)` layout, the bias and the layer's options.

  Raises:
    TypeError: not one of the layers above.
    ValueError: the layer is not built, or its groups see more than one
      input channel each (not a depthwise convolution).

  Example:
    >>> import keras
    >>> import dw5d_jax as dw
    >>> layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")
    >>> x = np.random.default_rng(0).standard_normal((1, 5, 6, 4)).astype(np.float32)
    >>> y = keras.ops.convert_to_numpy(layer(x))
    >>> w = weights_from_keras(layer)
    >>> w.kernel.shape, w.bias.shape, w.options["padding"]
    ((3, 3, 4, 2), (8,), 'SAME')
    >>> ours = np.asarray(dw.depthwise_conv2d(x, w.kernel, **w.options)) + w.bias
    >>> np.allclose(ours, y, atol=1e-5)
    True
  """
  fn = "weights_from_keras"
  bases = {cls.__name__ for cls in type(layer).__mro__}
  name = type(layer).__name__
  kind = "depthwise" if "BaseDepthwiseConv" in bases else "grouped" if "BaseConv" in bases else None
  rank = getattr(layer, "rank", None)
  if kind is None or rank not in ((2,) if kind == "depthwise" else (2, 3)):
    raise TypeError(f"{fn}: `layer` must be a Keras DepthwiseConv2D, or a Conv2D/Conv3D with "
                    f"groups equal to its input channels, got {name}.")
  if not getattr(layer, "built", False) or getattr(layer, "kernel", None) is None:
    raise ValueError(f"{fn}: `layer` ({name}) is not built; call it on an input once or "
                     f"call layer.build(input_shape) first.")
  kernel = np.asarray(layer.kernel)
  if kind == "grouped":
    if kernel.shape[-2] != 1:
      raise ValueError(
          f"{fn}: `layer` ({name}) is not depthwise: groups={layer.groups} with "
          f"{layer.groups * kernel.shape[-2]} input channels gives {kernel.shape[-2]} input "
          f"channels per group (kernel shape {kernel.shape}); set groups to the number of "
          f"input channels.")
    kernel = kernel_from_keras_grouped(kernel, in_channels=int(layer.groups))
  bias = np.asarray(layer.bias) if getattr(layer, "use_bias", False) else None
  channels_last = layer.data_format == "channels_last"
  layout = {(2, True): "NHWC", (2, False): "NCHW", (3, True): "NDHWC", (3, False): "NCDHW"}
  options = dict(strides=tuple(layer.strides), padding=layer.padding.upper(),
                 dilations=tuple(layer.dilation_rate), data_format=layout[rank, channels_last])
  return DepthwiseWeights(kernel, bias, options)


# PyTorch's `padding_mode` -> the library's `padding_mode` (numpy.pad's names).
_TORCH_MODES = {"zeros": "zeros", "reflect": "reflect", "replicate": "edge",
                "circular": "circular"}


def weights_from_torch(module: Any) -> DepthwiseWeights:
  """Reads a PyTorch `Conv2d`/`Conv3d` with `groups == in_channels`.

  `dw.depthwise_conv2d(x, w.kernel, **w.options)` (a 2D kernel) or
  `dw.depthwise_conv3d(...)` (3D), plus `w.bias` along the channel axis,
  reproduces `module(x)` for the module's own input `x`, `(N, C, H, W)` or
  `(N, C, D, H, W)`. Options map as follows (per axis, in D, H, W order):

  * `stride` -> `strides`, `dilation` -> `dilations`;
  * `padding=p` (an int or one per axis) -> explicit `((p_i, p_i), ...)`,
    e.g. X3D's `padding=(2, 0, 0)` -> `((2, 2), (0, 0), (0, 0))`;
    `"same"` -> `"SAME"` (PyTorch allows it only with stride 1, where both
    put the odd pad at the high end), `"valid"` -> `"VALID"`;
  * `padding_mode`: `"zeros"`, `"reflect"`, `"replicate"` -> `"edge"`,
    `"circular"`, the library's names for the same fills;
  * the layout -> `data_format` `"NCHW"` or `"NCDHW"`.

  Only the module's attributes are read (PyTorch is not imported here).

  Args:
    module: a `torch.nn.Conv2d` or `torch.nn.Conv3d` whose `groups` equals
      its `in_channels` (a depthwise convolution, `M = out_channels / C`
      filters per channel).

  Returns:
    The kernel in `(..., C, M)` layout (float32 for a float32 module), the
    bias `(C * M,)` or None, and the options above.

  Raises:
    TypeError: not a PyTorch `Conv2d`/`Conv3d` (a transposed or 1D
      convolution included); weights NumPy cannot hold (e.g. bfloat16).
    ValueError: `groups` is not `in_channels` (not depthwise), or a
      `padding_mode` with no counterpart here.

  Example:
    >>> import torch
    >>> import dw5d_jax as dw
    >>> conv = torch.nn.Conv3d(4, 8, (5, 1, 1), padding=(2, 0, 0), groups=4)
    >>> w = weights_from_torch(conv)
    >>> w.kernel.shape, w.options["padding"]
    ((5, 1, 1, 4, 2), ((2, 2), (0, 0), (0, 0)))
    >>> x = np.random.default_rng(0).standard_normal((1, 4, 6, 5, 5)).astype(np.float32)
    >>> with torch.no_grad():
    ...   want = conv(torch.from_numpy(x)).numpy()
    >>> y = np.asarray(dw.depthwise_conv3d(x, w.kernel, **w.options))
    >>> np.allclose(y + w.bias.reshape(-1, 1, 1, 1), want, atol=1e-5)
    True
  """
  fn = "weights_from_torch"
  name = type(module).__name__
  bases = {cls.__name__ for cls in type(module).__mro__}
  rank = 2 if "Conv2d" in bases else 3 if "Conv3d" in bases else None
  if rank is None or "_ConvNd" not in bases or getattr(module, "transposed", False):
    raise TypeError(f"{fn}: `module` must be a PyTorch Conv2d or Conv3d with groups equal "
                    f"to its in_channels, got {name}.")
  c, groups = int(module.in_channels), int(module.groups)
  if groups != c:
    raise ValueError(
        f"{fn}: `module` ({name}) is not depthwise: groups={groups} with "
        f"in_channels={c} gives {c // groups} input channels per group; a depthwise "
        f"convolution has groups == in_channels.")
  mode = _TORCH_MODES.get(module.padding_mode)
  if mode is None:
    raise ValueError(f"{fn}: `module` ({name}) has padding_mode={module.padding_mode!r}; "
                     f"expected one of {', '.join(map(repr, _TORCH_MODES))}.")
  kernel = kernel_from_torch_grouped(_torch_array(fn, module.weight, "weight"),
                                     in_channels=c)
  bias = None if module.bias is None else _torch_array(fn, module.bias, "bias")
  padding = module.padding
  if isinstance(padding, str):  # PyTorch accepts "same" and "valid" only
    padding = padding.upper()
  else:
    padding = tuple((int(p), int(p)) for p in padding)
  options = dict(strides=tuple(int(s) for s in module.stride), padding=padding,
                 padding_mode=mode, dilations=tuple(int(r) for r in module.dilation),
                 data_format="NCHW" if rank == 2 else "NCDHW")
  return DepthwiseWeights(kernel, bias, options)


def _torch_array(fn: str, tensor: Any, name: str) -> np.ndarray:
  try:
    return tensor.detach().cpu().numpy()
  except TypeError as err:  # dtypes NumPy lacks
    raise TypeError(f"{fn}: the module's `{name}` ({tensor.dtype}) cannot become a NumPy "
                    f"array: {err}; convert the module first, e.g. module.float().") from None


def kernel_from_keras_grouped(kernel: Any, *, in_channels: int) -> np.ndarray:
  """A Keras `Conv2D`/`Conv3D(groups=C)` kernel in `(..., C, M)` layout.

  Args:
    kernel: `(kh, kw, 1, C * M)` or `(kd, kh, kw, 1, C * M)`.
    in_channels: `C`, the layer's `groups` (= its input channels).

  Returns:
    `(kh, kw, C, M)` or `(kd, kh, kw, C, M)`.

  Raises:
    TypeError, ValueError: a kernel of another rank or layout, or an
      `in_channels` that does not divide its output channels.

  Example:
    >>> k = np.arange(3 * 3 * 3 * 1 * 8, dtype=np.float32).reshape(3, 3, 3, 1, 8)
    >>> kernel_from_keras_grouped(k, in_channels=4).shape
    (3, 3, 3, 4, 2)
  """
  fn = "kernel_from_keras_grouped"
  kernel = _as_array(fn, kernel, "(k..., 1, C*M)")
  c = _check_channels(fn, in_channels)
  if kernel.ndim not in (4, 5) or kernel.shape[-2] != 1:
    raise ValueError(f"{fn}: `kernel` must be (kh, kw, 1, C*M) or (kd, kh, kw, 1, C*M), the "
                     f"kernel of a Keras Conv2D/Conv3D with groups=C, got shape "
                     f"{kernel.shape}.")
  m = _multiplier(fn, kernel.shape[-1], c, "kernel", kernel.shape, "last")
  # Output channel o = c * M + m: a reshape splits it, the spatial dims stay.
  return kernel.reshape(*kernel.shape[:-2], c, m)


def kernel_from_torch_grouped(weight: Any, *, in_channels: int) -> np.ndarray:
  """A PyTorch `Conv2d`/`Conv3d(groups=C)` weight in `(..., C, M)` layout.

  PyTorch convolutions are cross-correlations like TF's and JAX's, so the
  kernel is not flipped. `weights_from_torch(module)` reads the whole
  module (bias, padding, strides, dilations, padding mode, layout).

  Args:
    weight: `(C * M, 1, kh, kw)` or `(C * M, 1, kd, kh, kw)`, e.g.
      `conv.weight.detach().numpy()`.
    in_channels: `C`, the layer's `groups` (= its `in_channels`).

  Returns:
    `(kh, kw, C, M)` or `(kd, kh, kw, C, M)`.

  Raises:
    TypeError, ValueError: a weight of another rank or layout, or an
      `in_channels` that does not divide its output channels.

  Example:
    >>> w = np.zeros((8, 1, 3, 5, 5), np.float32)   # Conv3d(4, 8, (3, 5, 5), groups=4)
    >>> kernel_from_torch_grouped(w, in_channels=4).shape
    (3, 5, 5, 4, 2)
  """
  fn = "kernel_from_torch_grouped"
  weight = _as_array(fn, weight, "(C*M, 1, k...)", name="weight")
  c = _check_channels(fn, in_channels)
  if weight.ndim not in (4, 5) or weight.shape[1] != 1:
    raise ValueError(f"{fn}: `weight` must be (C*M, 1, kh, kw) or (C*M, 1, kd, kh, kw), the "
                     f"weight of a PyTorch Conv2d/Conv3d with groups=C, got shape "
                     f"{weight.shape}.")
  m = _multiplier(fn, weight.shape[0], c, "weight", weight.shape, "first")
  spatial = weight.shape[2:]
  # (C*M, 1, k...) -> (C, M, k...) -> (k..., C, M).
  w = weight.reshape(c, m, *spatial)
  return np.transpose(w, (*range(2, 2 + len(spatial)), 0, 1))


def _as_array(fn: str, a: Any, layout: str, name: str = "kernel") -> np.ndarray:
  try:
    array = np.asarray(a)
  except Exception:  # objects NumPy cannot convert
    array = np.asarray(None)
  if not np.issubdtype(array.dtype, np.floating):
    raise TypeError(f"{fn}: `{name}` must be a floating-point array {layout}, got "
                    f"{type(a).__name__} with dtype {array.dtype}.")
  return array


def _check_channels(fn: str, in_channels: Any) -> int:
  if not isinstance(in_channels, (int, np.integer)) or isinstance(in_channels, bool) \
      or in_channels < 1:
    raise ValueError(f"{fn}: `in_channels` must be a positive int (the layer's groups), got "
                     f"{in_channels!r}.")
  return int(in_channels)


def _multiplier(fn: str, out: int, c: int, name: str, shape: tuple, where: str) -> int:
  if out % c:
    raise ValueError(f"{fn}: the {where} dim of `{name}` (shape {shape}) holds C*M = {out} "
                     f"output channels, which `in_channels`={c} does not divide.")
  return out // c
