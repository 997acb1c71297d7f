"""Flax NNX layers over the functional ops (public through `dw5d_jax.nn`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax
from jax.typing import DTypeLike

from dw5d_jax import _activations, _args, _geometry, _streaming
from dw5d_jax._depthwise import depthwise_conv2d, depthwise_conv3d
from dw5d_jax._streaming import StreamState

Initializer = Any
Activation = str | Callable[[jax.Array], jax.Array] | None
_ZEROS = nnx.initializers.zeros_init()  # the default bias initializer, as nnx.Conv

# JAX's own activation functions the ops fuse, by the ops' names (jax.nn.gelu
# is the tanh approximation by default).
_FUSED = {jax.nn.relu: "relu", jax.nn.relu6: "relu6", jax.nn.gelu: "gelu_tanh",
          jax.nn.silu: "silu", jax.nn.swish: "silu", jax.nn.sigmoid: "sigmoid",
          jax.nn.tanh: "tanh", jnp.tanh: "tanh", jax.nn.hard_swish: "hard_swish",
          jax.nn.hard_silu: "hard_swish"}


def resolve_activation(fn: str, activation: Activation) -> tuple[str | None, Callable | None]:
  """`(name, after)`: the name the ops fuse, or a callable applied to their result.

  A name (`dw5d_jax.depthwise_conv3d`'s `activation`, any case) or one of
  JAX's functions above is fused; any other callable runs after the op.
  """
  if activation is None or isinstance(activation, str):
    return _args.check_activation(fn, activation), None
  if not callable(activation):
    raise TypeError(f"{fn}: `activation` must be None, a name (e.g. 'gelu') or a callable, "
                    f"got {type(activation).__name__} {activation!r}.")
  try:
    name = _FUSED.get(activation)
  except TypeError:  # unhashable callables
    name = None
  return (name, None) if name is not None else (None, activation)


def depthwise_kernel_init(base: Initializer | None = None) -> Initializer:
  """Initialises a `(*window, C, M)` depthwise kernel with per-filter fan-in.

  Each of the `C * M` filters sees one input channel, so its fan-in is
  `prod(window)`, not `prod(window) * C` as a generic initializer would assume
  from the shape. The base initializer (default: `lecun_normal`, as
  `nnx.Conv`) draws the kernel as `(*window, 1, C * M)`, the grouped-conv
  layout, which has exactly that fan-in; it is then reshaped.

  Example:
    >>> import jax
    >>> from dw5d_jax.nn import depthwise_kernel_init
    >>> k = depthwise_kernel_init()(jax.random.key(0), (3, 3, 3, 8, 2))
    >>> k.shape, bool(0.05 < float(k.std()) < 0.4)   # std ~ 1 / sqrt(27)
    ((3, 3, 3, 8, 2), True)
  """
  base = nnx.initializers.lecun_normal() if base is None else base

  def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
    *window, c, m = shape
    return base(key, (*window, 1, c * m), dtype).reshape(shape)

  return init


class _DepthwiseConv(nnx.Module):
  """Shared parameter handling, call and streaming; subclasses say how to call the op."""

  _nconv: int
  _spatial: int  # spatial axes of the input (after the batch dims)
  _conv_axes: str
  _shape_doc: str

  def __init__(
      self,
      in_features: int,
      kernel_size: int | Sequence[int],
      *,
      depth_multiplier: int,
      strides: int | Sequence[int],
      padding: str | Sequence[str | tuple[int, int]],
      padding_mode: str | Sequence[str],
      dilations: int | Sequence[int],
      use_bias: bool,
      activation: Activation,
      kernel_init: Initializer | None,
      bias_init: Initializer,
      dtype: DTypeLike | None,
      param_dtype: DTypeLike,
      precision: lax.PrecisionLike,
      method: str,
      axes: str,
      rngs: nnx.Rngs,
  ):
    fn = type(self).__name__
    if not _args.is_int(in_features) or in_features < 1:
      raise ValueError(f"{fn}: `in_features` must be a positive int, got {in_features!r}.")
    if not _args.is_int(depth_multiplier) or depth_multiplier < 1:
      raise ValueError(f"{fn}: `depth_multiplier` must be a positive int, got "
                       f"{depth_multiplier!r}.")
    self.kernel_size = _args.int_tuple(fn, "kernel_size", kernel_size, self._nconv, axes)
    # Checked now so a bad layer fails when it is built, not at the first call.
    self.strides = _args.int_tuple(fn, "strides", strides, self._nconv, axes)
    self.dilations = _args.int_tuple(fn, "dilations", dilations, self._nconv, axes)
    self.padding = _args.check_padding(fn, padding, axes)
    self.padding_mode = _args.check_padding_mode(fn, padding_mode, self.padding, axes)
    self.method = _args.check_method(fn, method)
    self.activation = activation
    self._fused_activation, self._after = resolve_activation(fn, activation)
    self.precision = _args.check_precision(fn, precision)
    self.in_features = in_features
    self.depth_multiplier = depth_multiplier
    self.out_features = in_features * depth_multiplier
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    kernel_init = depthwise_kernel_init() if kernel_init is None else kernel_init
    shape = (*self.kernel_size, in_features, depth_multiplier)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to `(*batch, D, H, W, C)` (`(*batch, H, W, C)`: 2D, no `axes`)."""
    self._check_input(type(self).__name__, "x", x.shape)
    batch_shape, x = self._flatten(x)
    x, kernel, bias = self._promote(x)
    y = self._op(x, kernel, strides=self.strides, padding=self.padding,
                 padding_mode=self.padding_mode, dilations=self.dilations, method=self.method,
                 precision=self.precision, bias=bias, activation=self._fused_activation)
    return self._finish(y, None, batch_shape, fused=True)

  # -- streaming --------------------------------------------------------------

  def stream_init(self, chunk: Any, *, per_example: bool = False) -> StreamState:
    """The initial state for streaming chunks like `chunk` along the first spatial axis.

    The layer must be causal along that axis (the time `T` of a clip
    `(*batch, T, H, W, C)`; `H` for 2D layers without `axes`), e.g.
    `padding=("CAUSAL", "SAME", "SAME")`, or, for a 2D layer, carry it
    (`axes="HW"`: every frame on its own). See `dw5d_jax.stream_init`.

    Args:
      chunk: an array or `jax.ShapeDtypeStruct` shaped like the chunks
        (any length along time).
      per_example: every example a stream of its own (`valid` and `reset`
        per example; see `dw5d_jax.stream_init`). With several leading
        batch dims, examples are counted with them flattened.

    Returns:
      A `dw5d_jax.StreamState` (leading batch dims flattened into one).
    """
    fn = f"{type(self).__name__}.stream_init"
    if not hasattr(chunk, "shape") or not hasattr(chunk, "dtype"):
      raise TypeError(f"{fn}: `chunk` must be an array (or have .shape and .dtype), got "
                      f"{type(chunk).__name__}.")
    self._check_channels(fn, "chunk", chunk.shape)
    batch_shape, shape = self._flat_shape(fn, chunk.shape)
    del batch_shape
    bias = () if self.bias is None else (self.bias[...].dtype,)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(
        chunk.dtype, self.kernel[...].dtype, *bias)
    # The kernel as the steps will see it: promoted to the computation dtype.
    kernel = jax.ShapeDtypeStruct(self.kernel[...].shape, dtype)
    return _streaming._init(fn, jax.ShapeDtypeStruct(shape, dtype), kernel,
                            per_example=per_example, data_format=None, axis=None,
                            **self._stream_kwargs())

  def stream_step(self, state: StreamState, chunk: jax.Array, *, valid: Any = None,
                  reset: Any = None) -> tuple[StreamState, jax.Array]:
    """The next chunk of a stream: `(state, y)`, as `dw5d_jax.stream_step`.

    Concatenating the first `state.emitted` frames of every `y` along time
    gives `self(x)` on the whole sequence (all frames, with stride 1 along
    time). Runs under `nnx.jit` and inside `lax.scan` (split the layer with
    `nnx.split` and merge it in the scanned function).

    Args:
      state: from `stream_init` or the previous step.
      chunk: `(*batch, L, ...)`, `L >= 1` frames, the rest as in `stream_init`.
      valid: how many leading frames of `chunk` are real (see
        `dw5d_jax.stream_step`; per example for a per-example state); None:
        all.
      reset: for a per-example state, where a new stream starts (see
        `dw5d_jax.stream_step`).

    Raises:
      TypeError, ValueError: a state from another layer configuration or
        dtype, a chunk that does not fit it, a bad `valid` or `reset`.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from dw5d_jax.nn import DepthwiseConv3D
      >>> layer = DepthwiseConv3D(4, 3, padding=("CAUSAL", "SAME", "SAME"), rngs=nnx.Rngs(0))
      >>> clip = jnp.ones((1, 5, 8, 8, 4))                  # (N, T, H, W, C)
      >>> state = layer.stream_init(clip[:, :1])
      >>> state, y = layer.stream_step(state, clip[:, :2])  # two frames in, two out
      >>> y.shape
      (1, 2, 8, 8, 4)
    """
    fn = f"{type(self).__name__}.stream_step"
    _args.check_array(fn, "chunk", chunk)
    self._check_channels(fn, "chunk", chunk.shape)
    batch_shape, shape = self._flat_shape(fn, chunk.shape)
    x, kernel, bias = self._promote(chunk.reshape(shape))
    state, y = _streaming._checked_step(
        fn, state, x, kernel, method=self.method, precision=self.precision,
        preferred_element_type=None, valid=valid, reset=reset, data_format=None, axis=None,
        **self._stream_kwargs())
    return state, self._finish(y, bias, batch_shape, fused=False)

  # -- shared pieces ----------------------------------------------------------

  def _stream_kwargs(self) -> dict[str, Any]:
    return dict(strides=self.strides, padding=self.padding, padding_mode=self.padding_mode,
                dilations=self.dilations, axes=self._conv_axes)

  def _flat_shape(self, fn: str, shape: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """`(batch_shape, shape with the leading batch dims as one)`."""
    if len(shape) < self._spatial + 1:
      raise ValueError(f"{fn}: input must have shape (*batch, {self._shape_doc}), got "
                       f"shape {tuple(shape)}.")
    batch_shape = tuple(shape[:len(shape) - self._spatial - 1])
    return batch_shape, (math.prod(batch_shape), *shape[len(batch_shape):])

  def _check_channels(self, fn: str, name: str, shape: tuple[Any, ...]) -> None:
    if not _streaming._same_size(shape[-1], self.in_features):
      raise ValueError(f"{fn}: `{name}` must have in_features={self.in_features} channels (its "
                       f"last dim), got shape {tuple(shape)}.")

  def _check_input(self, fn: str, name: str, shape: tuple[Any, ...]) -> None:
    """The rank, the channels, and a window and padding that fit along every axis."""
    self._flat_shape(fn, shape)
    self._check_channels(fn, name, shape)
    spatial = "DHW"[-self._spatial:]
    sizes = shape[len(shape) - self._spatial - 1:-1]
    for i, a in enumerate(self._conv_axes):
      n = sizes[spatial.index(a)]
      k, s, r, padding = self.kernel_size[i], self.strides[i], self.dilations[i], self.padding[i]
      if not _geometry.is_static(n):
        continue  # symbolic sizes: the op's own checks (with declared constraints)
      lo, hi, out = _geometry.resolve(n, k, s, r, padding)
      if out < 1:
        raise _args.empty_output_error(f"{fn}: `{name}` of shape {tuple(shape)}", a, n, k, r,
                                       padding)
      _args.check_mode_fits(f"{fn}: `{name}` of shape {tuple(shape)}", a,
                            self.padding_mode[i], n, k, r, padding, lo, hi)

  def _flatten(self, x: jax.Array) -> tuple[tuple[Any, ...], jax.Array]:
    """Flattens leading batch dims into one (or adds one)."""
    batch_shape, shape = self._flat_shape(type(self).__name__, x.shape)
    return batch_shape, x.reshape(shape)

  def _promote(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    return nnx_dtypes.promote_dtype((x, kernel, bias), dtype=self.dtype)

  def _finish(self, y: jax.Array, bias: jax.Array | None, batch_shape: tuple[Any, ...], *,
              fused: bool) -> jax.Array:
    """The epilogue the op did not apply, and the leading batch dims restored.

    `fused` (`__call__`): the op applied the bias and the named activation;
    else (streaming, whose op has none) they are applied here. A callable
    activation that is not fused runs here in both cases.
    """
    if not fused:
      if bias is not None:
        y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
      if self._fused_activation is not None:
        y = _activations.ACTIVATIONS[self._fused_activation].fn(y)
    if self._after is not None:
      y = self._after(y)
    return y.reshape((*batch_shape, *y.shape[1:]))


class DepthwiseConv3D(_DepthwiseConv):
  """True 3D depthwise convolution: `Conv3d(groups=C)` in PyTorch terms.

  Follows `flax.nnx.Conv` conventions: channels-last input
  `(*batch, D, H, W, in_features)` (any number of leading batch dims, or
  none), output `(*batch, D', H', W', in_features * depth_multiplier)`.
  The kernel is stored as `(kd, kh, kw, in_features, depth_multiplier)`, the
  library's (and TF's depthwise) layout, so TF weights load as they are.

  Args:
    in_features: number of input channels `C`.
    kernel_size: an int or `(kd, kh, kw)`.
    depth_multiplier: filters per input channel `M`.
    strides, padding, padding_mode, dilations, method, precision: as in
      `dw5d_jax.depthwise_conv3d` (`padding_mode`: `"zeros"`, `"reflect"`,
      `"symmetric"`, `"edge"` or `"circular"`, or one per axis).
    use_bias: add a bias of shape `(C * M,)`.
    activation: None, a name the ops take (`"relu"`, `"relu6"`, `"gelu"`
      (exact), `"gelu_tanh"`, `"silu"`, `"sigmoid"`, `"tanh"`,
      `"hard_swish"`, or Keras's aliases), one of JAX's functions for them
      (`jax.nn.relu`, `jax.nn.gelu` (its default, the tanh approximation),
      ...), or any other callable. Names and JAX's functions are fused into
      the convolution with the bias (`y = act(conv(x) + bias)` in one pass on
      CPU); other callables are applied to the result.
    kernel_init: default `depthwise_kernel_init()` (lecun normal with the
      per-filter fan-in `kd * kh * kw`).
    bias_init: default zeros.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype.
    rngs: `nnx.Rngs` for initialisation.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from dw5d_jax.nn import DepthwiseConv3D
    >>> layer = DepthwiseConv3D(4, 3, depth_multiplier=2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8, 8, 8, 4))).shape
    (2, 8, 8, 8, 8)
    >>> block = DepthwiseConv3D(4, 3, activation="gelu", rngs=nnx.Rngs(0))  # fused
    >>> block(jnp.ones((2, 8, 8, 8, 4))).shape
    (2, 8, 8, 8, 4)
  """

  _nconv = 3
  _shape_doc = "D, H, W, C"

  def __init__(
      self,
      in_features: int,
      kernel_size: int | Sequence[int],
      *,
      depth_multiplier: int = 1,
      strides: int | Sequence[int] = 1,
      padding: str | Sequence[str | tuple[int, int]] = "SAME",
      padding_mode: str | Sequence[str] = "zeros",
      dilations: int | Sequence[int] = 1,
      use_bias: bool = True,
      activation: Activation = None,
      kernel_init: Initializer | None = None,
      bias_init: Initializer = _ZEROS,
      dtype: DTypeLike | None = None,
      param_dtype: DTypeLike = jnp.float32,
      precision: lax.PrecisionLike = None,
      method: str = "auto",
      rngs: nnx.Rngs,
  ):
    super().__init__(
        in_features, kernel_size, depth_multiplier=depth_multiplier, strides=strides,
        padding=padding, padding_mode=padding_mode, dilations=dilations, use_bias=use_bias,
        activation=activation, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
        param_dtype=param_dtype, precision=precision, method=method, axes="DHW", rngs=rngs)

  _spatial = 3
  _conv_axes = "DHW"

  def _op(self, x, kernel, **kwargs):
    return depthwise_conv3d(x, kernel, **kwargs)


class DepthwiseConv2D(_DepthwiseConv):
  """2D depthwise convolution, on 4D input or per slice of 5D input.

  Follows `flax.nnx.Conv` conventions (channels-last, any number of leading
  batch dims). With `axes=None` the input is `(*batch, H, W, C)`, like
  Keras's `DepthwiseConv2D`. With `axes` two letters of `D`, `H`, `W`, the
  input is `(*batch, D, H, W, C)` and every slice along the third axis is
  convolved over the two named axes (kernel dim i along `axes[i]`). The kernel
  is `(k0, k1, in_features, depth_multiplier)`, TF's depthwise layout.

  Args:
    in_features: number of input channels `C`.
    kernel_size: an int or `(k0, k1)`.
    depth_multiplier: filters per input channel `M`.
    axes: `None` for 4D input, or e.g. `"HW"`, `"DW"` for per-slice 5D input.
    strides, padding, padding_mode, dilations, method, precision: as in
      `dw5d_jax.depthwise_conv2d`.
    use_bias, activation, kernel_init, bias_init, dtype, param_dtype, rngs: as
      in `DepthwiseConv3D`.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from dw5d_jax.nn import DepthwiseConv2D
    >>> layer = DepthwiseConv2D(3, (3, 5), axes="DW", rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 6, 7, 8, 3))).shape
    (2, 6, 7, 8, 3)
  """

  _nconv = 2

  def __init__(
      self,
      in_features: int,
      kernel_size: int | Sequence[int],
      *,
      depth_multiplier: int = 1,
      strides: int | Sequence[int] = 1,
      padding: str | Sequence[str | tuple[int, int]] = "SAME",
      padding_mode: str | Sequence[str] = "zeros",
      dilations: int | Sequence[int] = 1,
      axes: str | None = None,
      use_bias: bool = True,
      activation: Activation = None,
      kernel_init: Initializer | None = None,
      bias_init: Initializer = _ZEROS,
      dtype: DTypeLike | None = None,
      param_dtype: DTypeLike = jnp.float32,
      precision: lax.PrecisionLike = None,
      method: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.axes = None if axes is None else _args.check_axes(type(self).__name__, axes)
    super().__init__(
        in_features, kernel_size, depth_multiplier=depth_multiplier, strides=strides,
        padding=padding, padding_mode=padding_mode, dilations=dilations, use_bias=use_bias,
        activation=activation, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
        param_dtype=param_dtype, precision=precision, method=method, axes=self.axes or "HW",
        rngs=rngs)

  @property
  def _shape_doc(self) -> str:
    return "H, W, C" if self.axes is None else "D, H, W, C"

  @property
  def _spatial(self) -> int:
    return 2 if self.axes is None else 3

  @property
  def _conv_axes(self) -> str:
    return self.axes or "HW"

  def _op(self, x, kernel, **kwargs):
    if self.axes is not None:
      kwargs["axes"] = self.axes
    return depthwise_conv2d(x, kernel, **kwargs)
