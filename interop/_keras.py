"""Keras 3 layers over the library's ops (public through `interop.keras`).

Keras has no `DepthwiseConv3D` (keras-team/keras#14670, #15148), and TF's
grouped `conv3d`, what a `Conv3D(groups=C)` becomes on the TensorFlow
backend, has no CPU kernel. These layers compute with `dw5d_jax` on the JAX
backend and with `interop`'s TensorFlow ops on the TensorFlow backend, so both
run anywhere, and a model saved on one backend loads on the other.

Arguments follow Keras's `DepthwiseConv2D`, and so do their defaults and
meanings; where the library's own names differ, the mapping is:

=====================  =======================================================
Keras (these layers)   dw5d_jax / interop ops
=====================  =======================================================
`padding="valid"`      `padding="VALID"`; `"same"` is `"SAME"`, TF's rule
                       (output `ceil(n / s)`, the smaller half of the padding
                       before), which is what Keras's `"same"` does on the JAX
                       and TensorFlow backends. Keras's default is `"valid"`;
                       the ops and the Flax layers default to `"SAME"`.
                       `"causal"` is `"CAUSAL"` along the first spatial axis
                       (as Keras's Conv1D along its only one) and `"SAME"`
                       along the others, e.g. `("CAUSAL", "SAME", "SAME")`.
`padding_mode`         the same argument of the ops (no Keras counterpart):
                       `"zeros"` (default), `"reflect"`, `"symmetric"`,
                       `"edge"` or `"circular"`, or one per convolved axis;
                       a mode other than `"zeros"` needs `padding="same"`
                       or `"causal"` (streaming: `"zeros"` along time).
`data_format=None`     `keras.config.image_data_format()`, then
                       `"channels_last"` is `"NDHWC"` (`"NHWC"` for rank-4
                       input) and `"channels_first"` is `"NCDHW"` (`"NCHW"`).
`dilation_rate`        `dilations`; any combination with `strides` works
                       (Keras's own `DepthwiseConv2D` refuses strides with
                       dilations on the TensorFlow backend).
`kernel_size`          the kernel's spatial dims: the weight `kernel` is
                       `(*kernel_size, C, depth_multiplier)`, Keras's and TF's
                       depthwise layout, output channel `c * M + m`.
`depthwise_*`          the kernel's initializer, regularizer and constraint
                       (default `"glorot_uniform"`, as in Keras, which takes
                       its fan-in from the whole kernel shape).
=====================  =======================================================

Importing this module imports Keras (which picks its backend then), never
TensorFlow by itself: the TF ops are imported on the first call on the
TensorFlow backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import keras

from dw5d_jax import _activations, _args, _geometry, _streaming
from interop import _keras_stream

_PACKAGE = "dw5d"
_BACKENDS = ("jax", "tensorflow")
_LAYOUTS = {(5, True): "NDHWC", (5, False): "NCDHW", (4, True): "NHWC", (4, False): "NCHW"}


def backend_op(fn: str, backend: str, rank: int) -> Callable[..., Any]:
  """The depthwise op for a Keras backend: `rank` 2 (per slice or 4D) or 3.

  Raises:
    ValueError: a backend other than JAX or TensorFlow.
  """
  if backend == "jax":
    import dw5d_jax

    return dw5d_jax.depthwise_conv2d if rank == 2 else dw5d_jax.depthwise_conv3d
  if backend == "tensorflow":
    from interop import _tf_ops

    return _tf_ops.tf_depthwise_conv2d if rank == 2 else _tf_ops.tf_depthwise_conv3d
  raise ValueError(f"{fn}: the Keras backend must be one of {', '.join(map(repr, _BACKENDS))} "
                   f"(set KERAS_BACKEND before importing keras), got {backend!r}.")


class StreamSettings(NamedTuple):
  """What a layer's stream computes apart from the data, in the layer's own argument names."""

  layer: str
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  dilation_rate: tuple[int, ...]
  padding: str
  padding_mode: tuple[str, ...]
  depth_multiplier: int
  data_format: str
  axes: str
  dtype: str


@dataclasses.dataclass(frozen=True)
class StreamState:
  """The state of a Keras layer's stream between chunks.

  `buffer` (the last `e - 1` frames along time, zeros at first: the causal
  padding), `phase` and `emitted` (int32 scalars, as in
  `dw5d_jax.StreamState`) are backend tensors, also readable as
  `state["buffer"]`, ...; `settings` (static) are the layer's, which
  `stream_step` checks. A pytree on the JAX backend and a nested structure
  for `tf.function` and `tf.nest` on the TensorFlow backend (the settings
  static in both), so steps run under `jax.jit` and `tf.function`.
  """

  buffer: Any
  phase: Any
  emitted: Any
  settings: StreamSettings

  _FIELDS = ("buffer", "phase", "emitted")

  def __getitem__(self, key: str) -> Any:
    if key not in self._FIELDS:
      raise KeyError(f"StreamState: the tensors are {', '.join(map(repr, self._FIELDS))}; "
                     f"got {key!r}.")
    return getattr(self, key)

  # TensorFlow's nest protocol (tf.nest, tf.function): the tensors are the
  # components, the settings the (hashable) metadata.
  def __tf_flatten__(self) -> tuple[StreamSettings, tuple[Any, ...]]:
    return self.settings, (self.buffer, self.phase, self.emitted)

  @classmethod
  def __tf_unflatten__(cls, settings: StreamSettings, components: Sequence[Any]) -> StreamState:
    return cls(*components, settings)


jax.tree_util.register_dataclass(StreamState, data_fields=list(StreamState._FIELDS),
                                 meta_fields=["settings"])


class _DepthwiseConv(keras.layers.Layer):
  """Shared arguments, weights, shapes and config; subclasses set the axes."""

  _rank: int  # convolved axes: 2 or 3

  def __init__(
      self,
      kernel_size: int | Sequence[int],
      *,
      strides: int | Sequence[int] = 1,
      padding: str = "valid",
      padding_mode: str | Sequence[str] = "zeros",
      depth_multiplier: int = 1,
      data_format: str | None = None,
      dilation_rate: int | Sequence[int] = 1,
      activation: Any = None,
      use_bias: bool = True,
      depthwise_initializer: Any = "glorot_uniform",
      bias_initializer: Any = "zeros",
      depthwise_regularizer: Any = None,
      bias_regularizer: Any = None,
      activity_regularizer: Any = None,
      depthwise_constraint: Any = None,
      bias_constraint: Any = None,
      **kwargs: Any,
  ):
    fn = type(self).__name__
    axes = self._conv_axes()  # for messages
    backend_op(fn, keras.backend.backend(), self._rank)  # fail early on other backends
    super().__init__(activity_regularizer=keras.regularizers.get(activity_regularizer),
                     **kwargs)
    self.kernel_size = _args.int_tuple(fn, "kernel_size", kernel_size, self._rank, axes)
    self.strides = _args.int_tuple(fn, "strides", strides, self._rank, axes)
    self.dilation_rate = _args.int_tuple(fn, "dilation_rate", dilation_rate, self._rank, axes)
    if not isinstance(padding, str) or padding.lower() not in ("valid", "same", "causal"):
      raise ValueError(f"{fn}: `padding` must be 'valid', 'same' or 'causal' (any case), got "
                       f"{padding!r}.")
    self.padding = padding.lower()
    # 'causal' on a carried axis fails in _padding_entries.
    modes = _args.check_padding_mode(fn, padding_mode, self._padding_entries(), axes)
    self.padding_mode = modes[0] if len(set(modes)) == 1 else modes
    if not _args.is_int(depth_multiplier) or depth_multiplier < 1:
      raise ValueError(f"{fn}: `depth_multiplier` must be a positive int, got "
                       f"{depth_multiplier!r}.")
    self.depth_multiplier = int(depth_multiplier)
    data_format = keras.config.image_data_format() if data_format is None else data_format
    if (not isinstance(data_format, str)
        or data_format.lower() not in ("channels_last", "channels_first")):
      raise ValueError(f"{fn}: `data_format` must be None, 'channels_last' or "
                       f"'channels_first', got {data_format!r}.")
    self.data_format = data_format.lower()
    try:
      self.activation = keras.activations.get(activation)
    except (ValueError, TypeError) as err:
      raise ValueError(f"{fn}: `activation` must be None, a Keras activation name (e.g. "
                       f"'relu', 'gelu') or a callable, got {activation!r} ({err}).") from None
    self.use_bias = bool(use_bias)
    self.depthwise_initializer = keras.initializers.get(depthwise_initializer)
    self.bias_initializer = keras.initializers.get(bias_initializer)
    self.depthwise_regularizer = keras.regularizers.get(depthwise_regularizer)
    self.bias_regularizer = keras.regularizers.get(bias_regularizer)
    self.depthwise_constraint = keras.constraints.get(depthwise_constraint)
    self.bias_constraint = keras.constraints.get(bias_constraint)

  # -- subclass hooks ---------------------------------------------------------

  @property
  def _input_rank(self) -> int:
    return 5

  def _conv_axes(self) -> str:
    """The convolved axes in kernel order, as letters of `D`, `H`, `W`."""
    raise NotImplementedError

  def _op_kwargs(self) -> dict[str, Any]:
    return {}

  def _modes(self) -> tuple[str, ...]:
    """`padding_mode` per convolved axis."""
    mode = self.padding_mode
    return (mode,) * self._rank if isinstance(mode, str) else tuple(mode)

  def _padding_entries(self) -> tuple[str, ...]:
    """The ops' padding, one entry per convolved axis (kernel order).

    `"causal"` is CAUSAL along the first spatial axis (`D` of 5D input, the
    time `T` of a clip `(N, T, H, W, C)`; `H` of 4D input), as Keras's
    Conv1D along its only one, and SAME along the others.
    """
    axes = self._conv_axes()
    if self.padding != "causal":
      return (self.padding.upper(),) * len(axes)
    first = "DHW"[-(self._input_rank - 2)]
    if first not in axes:
      raise ValueError(
          f"{type(self).__name__}: padding='causal' is causal along the first spatial axis, "
          f"{first}, which axes={axes!r} carries (convolves {axes[0]} and {axes[1]} only): "
          f"CAUSAL on a carried axis means nothing. Use axes that include {first!r}, or "
          f"padding 'same' or 'valid'.")
    return tuple("CAUSAL" if a == first else "SAME" for a in axes)

  # -- shapes -----------------------------------------------------------------

  @property
  def _channels_last(self) -> bool:
    return self.data_format == "channels_last"

  def _check_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
    fn = type(self).__name__
    shape = tuple(input_shape)
    rank = self._input_rank
    spatial = "DHW"[-(rank - 2):]
    layout = f"(N, {', '.join(spatial)}, C)" if self._channels_last else \
        f"(N, C, {', '.join(spatial)})"
    if len(shape) != rank:
      raise ValueError(f"{fn}: input must have rank {rank}, {layout} for data_format "
                       f"{self.data_format!r}, got shape {shape}.")
    channels = shape[-1 if self._channels_last else 1]
    if channels is None:
      raise ValueError(f"{fn}: the channel dimension of the input must be known, got shape "
                       f"{shape} (data_format {self.data_format!r}).")
    if self.built and channels != self.kernel.shape[-2]:
      raise ValueError(f"{fn}: the layer was built for {self.kernel.shape[-2]} input "
                       f"channels, got an input of shape {shape} (data_format "
                       f"{self.data_format!r}).")
    return shape

  def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
    """Output sizes by TF's rules (Keras's on the JAX and TF backends); None stays None."""
    fn = type(self).__name__
    shape = list(self._check_shape(input_shape))
    spatial = "DHW"[-(len(shape) - 2):]
    first = 1 if self._channels_last else 2
    for i, (a, padding) in enumerate(zip(self._conv_axes(), self._padding_entries())):
      pos = first + spatial.index(a)
      n = shape[pos]
      if n is None:
        continue
      k, s, r = self.kernel_size[i], self.strides[i], self.dilation_rate[i]
      lo, hi, out = _geometry.resolve(n, k, s, r, padding)
      if out < 1:
        raise _args.empty_output_error(fn, a, n, k, r, padding)
      _args.check_mode_fits(fn, a, self._modes()[i], n, k, r, padding, lo, hi)
      shape[pos] = out
    c = -1 if self._channels_last else 1
    shape[c] = shape[c] * self.depth_multiplier
    return tuple(shape)

  # -- weights and call -------------------------------------------------------

  def build(self, input_shape: Sequence[int | None]) -> None:
    shape = self._check_shape(input_shape)
    self.compute_output_shape(shape)  # an empty output fails here, not at the first call
    channels = shape[-1 if self._channels_last else 1]
    self.kernel = self.add_weight(
        name="kernel", shape=(*self.kernel_size, channels, self.depth_multiplier),
        initializer=self.depthwise_initializer, regularizer=self.depthwise_regularizer,
        constraint=self.depthwise_constraint, trainable=True, dtype=self.dtype)
    if self.use_bias:
      self.bias = self.add_weight(
          name="bias", shape=(channels * self.depth_multiplier,),
          initializer=self.bias_initializer, regularizer=self.bias_regularizer,
          constraint=self.bias_constraint, trainable=True, dtype=self.dtype)
    else:
      self.bias = None

  def call(self, inputs: Any) -> Any:
    self._check_shape(inputs.shape)
    streams = _keras_stream.active()
    if streams is not None:  # inside interop.keras.stream_functions' init or step
      return streams.visit(self, inputs)
    return self._apply(inputs, self._padding_entries())

  def _apply(self, inputs: Any, padding: tuple[Any, ...]) -> Any:
    """The op with `padding` (one entry per convolved axis), bias, activation."""
    op = backend_op(type(self).__name__, keras.backend.backend(), self._rank)
    # `.value` is the backend array (a tf.Variable on TensorFlow, so tapes see
    # it), cast to the compute dtype under a mixed-precision policy.
    kernel = self.kernel.value
    kwargs = dict(strides=self.strides, padding=padding, padding_mode=self.padding_mode,
                  dilations=self.dilation_rate,
                  data_format=_LAYOUTS[self._input_rank, self._channels_last],
                  **self._op_kwargs())
    fused = self._fused_activation() if keras.backend.backend() == "jax" else None
    if fused is not None:  # bias and activation in the op: one pass on CPU
      bias = self.bias.value if self.use_bias else None
      return op(inputs, kernel, bias=bias, activation=fused or None, **kwargs)
    return self._epilogue(op(inputs, kernel, **kwargs))

  def _epilogue(self, y: Any) -> Any:
    """The bias and the activation, after the op (when the op does not fuse them)."""
    if self.use_bias:
      shape = [1] * self._input_rank
      shape[-1 if self._channels_last else 1] = -1
      y = keras.ops.add(y, keras.ops.reshape(self.bias, shape))
    if self.activation is not None:
      y = self.activation(y)
    return y

  def _fused_activation(self) -> str | None:
    """The op's name for the layer's activation ("" for none), or None if the op cannot apply it.

    Keras's built-in activations serialise to their names (`"gelu"`, exact,
    is `keras.activations.gelu`'s default); a custom function or one with
    other arguments does not, and runs after the op.
    """
    if self.activation is None:
      return ""
    name = keras.activations.serialize(self.activation)
    if not isinstance(name, str):
      return None
    if name == "linear":
      return ""
    return name if name in _activations.ACTIVATIONS or name in _activations.ALIASES else None

  # -- streaming --------------------------------------------------------------

  def stream_init(self, input_shape: Sequence[int]) -> StreamState:
    """The state before the first chunk of a stream along the first spatial axis.

    The layer must be causal along that axis (`padding="causal"`; the time
    `T` of a clip `(N, T, H, W, C)`, `H` of 4D input) or, a `DepthwiseConv2D`
    with `axes`, carry it (every frame on its own). The state (a
    `StreamState`) holds backend tensors, `state["buffer"]`, the last
    `e - 1` frames (zeros at first: the causal padding), `state["phase"]`
    and `state["emitted"]` (int32 scalars, as in `dw5d_jax.StreamState`),
    and the layer's settings, so that a state goes only to a layer that
    computes the same. Builds the layer if needed.

    Args:
      input_shape: the shape of the chunks, their length along time aside
        (any value there).

    Raises:
      ValueError: a padding along time that is not causal; a bad shape.

    Example:
      >>> import numpy as np
      >>> from interop.keras import DepthwiseConv3D
      >>> layer = DepthwiseConv3D(3, padding="causal")
      >>> state = layer.stream_init((1, 1, 8, 8, 4))
      >>> tuple(state["buffer"].shape)       # the last kd - 1 = 2 frames
      (1, 2, 8, 8, 4)
      >>> state, y = layer.stream_step(state, np.ones((1, 2, 8, 8, 4), np.float32))
      >>> tuple(y.shape), int(state["emitted"])
      ((1, 2, 8, 8, 4), 2)
    """
    fn = f"{type(self).__name__}.stream_init"
    shape = list(self._check_shape(input_shape))
    if any(d is None for d in shape):
      raise ValueError(f"{fn}: `input_shape` must be fully known, got {tuple(shape)}.")
    t = 1 if self._channels_last else 2
    if any(not _args.is_int(d) or (d < 1 and j != t) for j, d in enumerate(shape)):
      raise ValueError(f"{fn}: `input_shape` must hold positive ints (any int along time, "
                       f"axis {t}), got {tuple(shape)}.")
    if not self.built:
      self.build(shape)
    i, t = self._stream_axes(fn)
    shape[t] = 0 if i is None else _geometry.effective(self.kernel_size[i],
                                                        self.dilation_rate[i]) - 1
    return StreamState(buffer=keras.ops.zeros(shape, self.compute_dtype),
                       phase=keras.ops.convert_to_tensor(0, "int32"),
                       emitted=keras.ops.convert_to_tensor(0, "int32"),
                       settings=self._stream_settings())

  def stream_step(self, state: StreamState, chunk: Any) -> tuple[StreamState, Any]:
    """The next chunk of a stream: `(state, y)`, as `dw5d_jax.stream_step`.

    `y` has `ceil(L / s)` frames along time for a chunk of `L` frames (`s`
    the stride along time); the first `state["emitted"]` are the layer's
    next outputs on the whole sequence (all of them when `s` divides `L`).
    Runs on both backends, eagerly and under `jax.jit`/`tf.function`. The
    chunk is cast to the layer's compute dtype, as a call casts its input.

    Raises:
      TypeError: `state` is not a `StreamState` from `stream_init`.
      ValueError: a state made for a layer with other settings (kernel size,
        strides, dilations, padding, multiplier, layout, axes or dtype); a
        chunk whose shape differs from the state's apart from its length
        along time, or with no frame.
    """
    fn = f"{type(self).__name__}.stream_step"
    if not isinstance(state, StreamState):
      raise TypeError(f"{fn}: `state` must be the StreamState of a stream_init or stream_step "
                      f"of a layer with this one's settings, got {type(state).__name__}.")
    _streaming.check_same_config(
        fn, state.settings, self._stream_settings(),
        hint="Make it with this layer's stream_init (or one with the same settings).")
    i, t = self._stream_axes(fn)
    buffer, phase = state.buffer, state.phase
    want, got = tuple(buffer.shape), tuple(chunk.shape)
    length = got[t] if len(got) == len(want) else None
    if (length is None or length < 1
        or any(a != b for j, (a, b) in enumerate(zip(got, want)) if j != t)):
      shown = tuple("L" if j == t else d for j, d in enumerate(want))
      raise ValueError(f"{fn}: `chunk` has shape {got}, but the state was made for chunks "
                       f"{shown} (L >= 1 frames along time, axis {t}).")
    chunk = keras.ops.cast(chunk, self.compute_dtype)
    padding = list(self._padding_entries())
    if i is None:
      return dataclasses.replace(state, emitted=keras.ops.convert_to_tensor(length, "int32")), \
          self._apply(chunk, tuple(padding))
    k, s, r = self.kernel_size[i], self.strides[i], self.dilation_rate[i]
    history = want[t]
    x = keras.ops.concatenate([buffer, chunk], axis=t) if history else chunk
    after = x[(slice(None),) * t + (slice(length, length + history),)]
    if s > 1:  # the slots' window from the phase on (see dw5d_jax._streaming)
      pads = [(0, 0)] * len(want)
      pads[t] = (0, _geometry.stream_tail(length, s))
      x = keras.ops.pad(x, pads)
      start = [0] * len(want)
      start[t] = phase
      size = list(x.shape)
      size[t] = _geometry.stream_window(length, k, s, r)
      x = keras.ops.slice(x, start, size)
    padding[i] = (0, 0)
    y = self._apply(x, tuple(padding))
    return StreamState(buffer=after, phase=_geometry.stream_phase(phase, length, s),
                       emitted=_geometry.stream_emitted(length, phase, s),
                       settings=state.settings), y

  def _dw5d_stream(self, state: Any, chunk: Any) -> tuple[Any, Any]:
    """The layer's stream as `dw5d_jax.stream_init`/`stream_step` (JAX backend).

    With `state` None, `(stream_init's state, None)`; else `stream_step`'s
    `(state, y)` with the bias and activation applied to `y`. Under
    `dw5d_jax._frame_step.frames()` the step is the rank-4 frame step the
    streaming exporters build.
    """
    import dw5d_jax

    kwargs = dict(strides=self.strides, padding=self._padding_entries(),
                  padding_mode=self._modes(), dilations=self.dilation_rate,
                  data_format=_LAYOUTS[self._input_rank, self._channels_last],
                  **self._op_kwargs())
    kernel = self.kernel.value
    if state is None:
      return dw5d_jax.stream_init(chunk, kernel, **kwargs), None
    state, y = dw5d_jax.stream_step(state, keras.ops.cast(chunk, self.compute_dtype), kernel,
                                    **kwargs)
    return state, self._epilogue(y)

  def _stream_settings(self) -> StreamSettings:
    return StreamSettings(
        layer=type(self).__name__, kernel_size=self.kernel_size, strides=self.strides,
        dilation_rate=self.dilation_rate, padding=self.padding, padding_mode=self._modes(),
        depth_multiplier=self.depth_multiplier, data_format=self.data_format,
        axes=self._conv_axes(), dtype=str(self.compute_dtype))

  def _stream_axes(self, fn: str) -> tuple[int | None, int]:
    """`(index of the time axis in the convolved axes or None, its position in x)`."""
    rank = self._input_rank
    first = "DHW"[-(rank - 2)]
    axes = self._conv_axes()
    t = 1 if self._channels_last else 2
    if first not in axes:
      return None, t
    i = axes.index(first)
    if not _geometry.is_causal(self.kernel_size[i], self.dilation_rate[i],
                               self._padding_entries()[i]):
      raise ValueError(f"{fn}: streaming needs the layer causal along {first} (the first "
                       f"spatial axis): padding='causal', got padding={self.padding!r}.")
    if self._modes()[i] != "zeros":
      raise ValueError(f"{fn}: streaming needs `padding_mode` 'zeros' along {first} (the "
                       f"state starts from the causal zeros), got {self._modes()[i]!r}; "
                       f"other modes are fine along the other axes.")
    return i, t

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update(
        kernel_size=self.kernel_size,
        strides=self.strides,
        padding=self.padding,
        padding_mode=self.padding_mode,
        depth_multiplier=self.depth_multiplier,
        data_format=self.data_format,
        dilation_rate=self.dilation_rate,
        activation=keras.activations.serialize(self.activation),
        use_bias=self.use_bias,
        depthwise_initializer=keras.initializers.serialize(self.depthwise_initializer),
        bias_initializer=keras.initializers.serialize(self.bias_initializer),
        depthwise_regularizer=keras.regularizers.serialize(self.depthwise_regularizer),
        bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        activity_regularizer=keras.regularizers.serialize(self.activity_regularizer),
        depthwise_constraint=keras.constraints.serialize(self.depthwise_constraint),
        bias_constraint=keras.constraints.serialize(self.bias_constraint),
    )
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DepthwiseConv3D(_DepthwiseConv):
  """True 3D depthwise convolution, the `DepthwiseConv2D` Keras lacks.

  Each input channel is convolved with its own `depth_multiplier` filters of
  size `kernel_size`; `Conv3D(groups=C)` in Keras terms, which TensorFlow
  cannot run on CPU. On the JAX backend the layer calls
  `dw5d_jax.depthwise_conv3d`, on the TensorFlow backend
  `interop.tf_depthwise_conv3d`; both run on CPU and GPU. Argument names,
  defaults and meanings are Keras's (see the module docstring for how they
  map to the ops').

  Input `(N, D, H, W, C)` (`"channels_last"`) or `(N, C, D, H, W)`
  (`"channels_first"`); output the same layout with `C * depth_multiplier`
  channels, ordered `c * depth_multiplier + m`. Batch and spatial sizes may be
  unknown (`None`) in a functional model.

  Args:
    kernel_size: an int or `(kd, kh, kw)`.
    strides: an int or three.
    padding: `"valid"` (default, as Keras), `"same"` (TF's rule) or
      `"causal"` (CAUSAL along `D`, the time of a clip `(N, T, H, W, C)`:
      outputs see no later frame; SAME along `H` and `W`), any case.
    padding_mode: what fills the `"same"` or `"causal"` padding: `"zeros"`
      (default), `"reflect"`, `"symmetric"`, `"edge"` or `"circular"`
      (numpy.pad's meanings), or one per convolved axis. Along a causal
      time axis only `"zeros"` and `"edge"` keep outputs causal.
    depth_multiplier: filters per input channel.
    data_format: `"channels_last"`, `"channels_first"`, or None for
      `keras.config.image_data_format()`.
    dilation_rate: an int or three; any combination with `strides` works.
    activation: applied to the output (after the bias); None for none. On the
      JAX backend Keras's `"relu"`, `"relu6"`, `"gelu"`, `"silu"`/`"swish"`,
      `"sigmoid"`, `"tanh"` and `"hard_silu"`/`"hard_swish"` are fused with
      the bias into the convolution (one pass on CPU, forward and backward);
      other activations, and the TensorFlow backend, apply it after the op.
    use_bias: add a bias of shape `(C * depth_multiplier,)`.
    depthwise_initializer, bias_initializer: as Keras's (defaults
      `"glorot_uniform"` and `"zeros"`).
    depthwise_regularizer, bias_regularizer, activity_regularizer: Keras
      regularizers or None.
    depthwise_constraint, bias_constraint: Keras constraints or None.
    **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`,
      `trainable`).

  Raises:
    ValueError: a backend other than JAX or TensorFlow; bad `kernel_size`,
      `strides`, `dilation_rate`, `padding`, `padding_mode`,
      `depth_multiplier` or `data_format`; when built or called, an input of
      the wrong rank, an unknown or changed channel size, an empty output, or
      padding wider than the mode fills.
    TypeError: non-int sizes.

  Example:
    >>> import numpy as np
    >>> from interop.keras import DepthwiseConv3D
    >>> layer = DepthwiseConv3D(3, depth_multiplier=2, strides=(1, 2, 2), padding="same")
    >>> tuple(layer(np.ones((2, 5, 8, 8, 4), np.float32)).shape)
    (2, 5, 4, 4, 8)
    >>> tuple(layer.kernel.shape)
    (3, 3, 3, 4, 2)
  """

  _rank = 3

  def _conv_axes(self) -> str:
    return "DHW"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DepthwiseConv2D(_DepthwiseConv):
  """2D depthwise convolution on 4D input, or per slice of 5D input.

  With `axes=None` this is Keras's `DepthwiseConv2D`: input `(N, H, W, C)`
  (`"channels_last"`) or `(N, C, H, W)`, kernel `(kh, kw, C, M)`. With `axes`
  two letters of `D`, `H`, `W` (e.g. `"HW"`, `"DW"`), the input is
  `(N, D, H, W, C)` (or `(N, C, D, H, W)`) and every slice along the third
  axis is convolved independently over the two named axes, kernel dim `i`
  along `axes[i]`: the classic fold-into-batch recipe, done without mixing
  slices. On the JAX backend the layer calls `dw5d_jax.depthwise_conv2d`, on
  the TensorFlow backend `interop.tf_depthwise_conv2d`.

  Args:
    kernel_size: an int or `(k0, k1)` (along `axes`, default `H, W`).
    axes: None (4D input) or two distinct letters of `D`, `H`, `W` (5D).
      With `padding="causal"` they must include the first spatial axis
      (`D`, or `H` of 4D input), the causal one.
    strides, dilation_rate: an int or two, along the convolved axes.
    padding, padding_mode, depth_multiplier, data_format, activation,
      use_bias, the initializers, regularizers and constraints, **kwargs: as
      in `DepthwiseConv3D`.

  Raises:
    ValueError, TypeError: as `DepthwiseConv3D`, and bad `axes`.

  Example:
    >>> import numpy as np
    >>> from interop.keras import DepthwiseConv2D
    >>> layer = DepthwiseConv2D((3, 5), axes="DW", padding="same")
    >>> tuple(layer(np.ones((2, 6, 7, 8, 3), np.float32)).shape)
    (2, 6, 7, 8, 3)
  """

  _rank = 2

  def __init__(self, kernel_size: int | Sequence[int], *, axes: str | None = None,
               **kwargs: Any):
    # Set before Layer.__init__ (a plain string, which Keras does not track) so
    # that the shared argument checks can name the convolved axes.
    self.axes = None if axes is None else _args.check_axes(type(self).__name__, axes)
    super().__init__(kernel_size, **kwargs)

  @property
  def _input_rank(self) -> int:
    return 4 if self.axes is None else 5

  def _conv_axes(self) -> str:
    return self.axes or "HW"

  def _op_kwargs(self) -> dict[str, Any]:
    return {} if self.axes is None else {"axes": self.axes}

  def get_config(self) -> dict[str, Any]:
    return {**super().get_config(), "axes": self.axes}
