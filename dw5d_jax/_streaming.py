"""Streaming: a depthwise convolution that is causal along one axis, chunk by chunk.

For a convolution with CAUSAL padding along one axis (time), `stream_init`
makes a state and `stream_step` takes the input in chunks of any number of
frames along that axis: concatenating the outputs of the steps gives the
full op's output on the whole sequence, for strides and dilations along time
too. The state is a pytree (`StreamState`), so steps run under `jit`,
`lax.scan`, `vmap` and export to TensorFlow (`interop.export_streaming_savedmodel`).

How a step works (the arithmetic and a worked example are in `_geometry`,
"Streaming along a causal axis"): the state holds the last `e - 1` input
frames (`e = (k - 1) * dilation + 1` along time; zeros at first, which is
the causal padding) and the phase. A step puts them before the chunk, reads
that from the phase on with VALID padding along time (the other axes keep
their padding) and keeps the last `e - 1` frames for the next step.

**Strides along time.** With stride `s`, a chunk of `L` frames holds
`floor(L / s)` or `ceil(L / s)` outputs, depending on where the previous
chunks ended. Under `jit` and `lax.scan` shapes must not depend on data, so
the phase is a traced int32 in the state (`StreamState.phase`) and a step
always returns `ceil(L / s)` output frames (slots); `StreamState.emitted`
of the new state says how many of them are real (all of them, except
possibly the last when `s` does not divide `L`). With `L` a multiple of `s`
(for `s == 1`, always) every slot is real and the outputs simply
concatenate. A step can also take a chunk of which only the first `valid`
frames are real (the output of a strided stream, `valid=state.emitted`), so
strided streams chain. A `valid` known when the step is traced (an int, or
an array outside `jit`) must lie in `[0, L]`; a traced one cannot be checked
then, and is clamped to `[0, L]` (what a step with that many real frames
would do at most: every frame or none).

**Per-example streams** (`stream_init(..., per_example=True)`): a server
batches independent streams, one per example, that start, pause and end at
different times. `phase` and `emitted` then hold one value per example
(shape `(N,)`), a step takes `valid` per example (shape `(N,)`) and a
`reset` per example (bool `(N,)`: that example's kept frames become the
causal zeros and its phase 0 before the chunk, a new stream in its slot).
Each example then computes what a stream of its own would. The ring keeps
one `head` for all examples: a step whose `valid` differs between examples
puts every ring back in order (the longer-chunk path), and 1-frame steps
with one `valid` for all take the ring path.

**The frames are kept in a ring** of `e` slots (`StreamState.buffer`;
`head` is the free slot, the other `e - 1` hold the history, oldest at
`head + 1`). A 1-frame step, the common streaming case, copies only the new
frame: it is one primitive (`_ring.py`) that writes the frame into the free
slot (in place under `jit` when the state is donated, and in `lax.scan`)
and convolves the ring's window. On CPU with the native kernels
(channels-last, streamed along D) that is one native call, which reads
each tap's frame where it lies in the ring; elsewhere (and in exports)
`lax.dynamic_update_slice` and the ring convolved as it lies, with the
kernel's time taps rotated into the ring's order (a rotation of the
kernel, not of the frames), or with a dilation `r > 1` along time, the `k`
frames the taps read gathered in order. Copying the frames into order for
the convolution made a 1-frame step about twice as slow at 64x64 frames
(benchmarks/RESULTS.md, "Streaming").
Longer chunks need the history and the chunk in one contiguous window; they
copy the `e - 1` history frames and put the ring back in order, and give
the full op bitwise. So does a float32 1-frame step through the native call
(the taps summed in the full op's order); rotated taps sum in another
order, so there 1-frame steps equal the full op within rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from dw5d_jax import _args, _depthwise, _frame_step, _geometry, _lowering, _ring, _target
from dw5d_jax._geometry import SPATIAL
from dw5d_jax._spec import Impl

_Ints = int | tuple[int, ...]
_Padding = str | tuple[str | tuple[int, int], ...] | None


class StreamConfig(NamedTuple):
  """What a stream computes, apart from the data: checked once, held by the state.

  `axes` are the convolved axes (`"DHW"`: `depthwise_conv3d`; two letters:
  `depthwise_conv2d` per slice), `axis` the streamed one (convolved with
  CAUSAL padding, or carried: then every frame is independent and the state
  holds no frames). Per-axis tuples follow `axes`.
  """

  axes: str
  axis: str
  layout: str
  window: tuple[int, ...]
  multiplier: int
  strides: tuple[int, ...]
  dilations: tuple[int, ...]
  padding: tuple[Any, ...]
  modes: tuple[str, ...] = ()  # padding_mode per convolved axis ("zeros" along time)

  @property
  def time(self) -> int | None:
    """The streamed axis's index in `axes`, or None where it is carried."""
    return self.axes.index(self.axis) if self.axis in self.axes else None

  @property
  def ring(self) -> int:
    """Slots of the ring buffer: `e`, or 0 where nothing is kept (`e == 1`)."""
    i = self.time
    return 0 if i is None else _geometry.stream_ring(self.window[i], self.dilations[i])


@dataclasses.dataclass(frozen=True)
class StreamState:
  """The state of a stream between chunks (a pytree: `buffer`, `head`, `phase`, `emitted`).

  Attributes:
    buffer: a ring of `e` frames along the streamed axis (none if `e == 1`)
      in the input's layout and dtype: `(N, e, H, W, C)` for a clip
      `(N, T, H, W, C)` streamed along `T`. It holds the last `e - 1` input
      frames (zeros before the first chunk) in every slot but `head`.
    head: int32 scalar, the ring's free slot; the oldest frame is in slot
      `(head + 1) % e`.
    phase: int32 scalar, frames of the next chunk before its first output's
      anchor frame (always 0 with stride 1 along time); shape `(N,)`, one
      per example, for a per-example stream.
    emitted: int32 scalar, how many leading frames of the last step's
      output are real (all of them unless the stride along time does not
      divide the chunk length, or `valid` said fewer frames were real; see
      the module docstring); shape `(N,)` for a per-example stream.
    config: the stream's `StreamConfig` (static: part of the tree structure).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import dw5d_jax as dw
    >>> k = jnp.ones((3, 3, 3, 4, 1))
    >>> state = dw.stream_init(jnp.zeros((1, 1, 8, 8, 4)), k, strides=(2, 1, 1))
    >>> state, y = dw.stream_step(state, jnp.ones((1, 3, 8, 8, 4)), k, strides=(2, 1, 1))
    >>> y.shape[1], int(state.emitted), int(state.phase)   # 2 slots, both real
    (2, 2, 1)
    >>> [leaf.shape for leaf in jax.tree.leaves(state)]   # buffer, head, phase, emitted
    [(1, 3, 8, 8, 4), (), (), ()]
  """

  buffer: jax.Array
  head: jax.Array
  phase: jax.Array
  emitted: jax.Array
  config: StreamConfig


jax.tree_util.register_dataclass(StreamState,
                                 data_fields=["buffer", "head", "phase", "emitted"],
                                 meta_fields=["config"])


def stream_init(
    chunk: Any,
    kernel: Any,
    *,
    strides: _Ints = 1,
    padding: _Padding = None,
    padding_mode: str | tuple[str, ...] = "zeros",
    dilations: _Ints = 1,
    axes: str | None = None,
    axis: str | None = None,
    data_format: str | None = None,
    per_example: bool = False,
) -> StreamState:
  """The initial state of a stream: no frames seen yet (the causal zeros).

  The stream computes `depthwise_conv3d(x, kernel, ...)` (a rank-5 kernel, or
  `axes="DHW"`) or `depthwise_conv2d(x, kernel, axes=axes, ...)` (a rank-4
  kernel) on a sequence `x` fed in chunks along `axis`.

  Args:
    chunk: an array, or anything with `.shape` and `.dtype` (e.g.
      `jax.ShapeDtypeStruct`), shaped like the chunks: their batch, channel
      and other spatial sizes and their dtype are the stream's. Its length
      along `axis` does not matter.
    kernel: the kernel, or anything with its `.shape`: `(kd, kh, kw, C, M)`,
      or `(k0, k1, C, M)` along `axes`.
    strides, dilations: as for the ops; along `axis` too.
    padding: as for the ops; along `axis` it must pad `(e - 1, 0)`
      (`"CAUSAL"`). `None` (default): `"CAUSAL"` along `axis` and `"SAME"`
      along the other convolved axes.
    padding_mode: as for the ops; along `axis` it must be `"zeros"` (the
      state starts from the causal zeros).
    axes: `"DHW"` for the 3D op, two letters of `D`, `H`, `W` for the
      per-slice 2D op; `None`: from the kernel's rank (`"DHW"` or `"HW"`).
    axis: the streamed axis, a letter of `D`, `H`, `W`; `None`: the first
      spatial axis (`D` for rank-5 input, `T` of a clip `(N, T, H, W, C)`;
      `H` for rank 4). It may be an axis the 2D op carries: then every frame
      is convolved on its own and the state holds no frames.
    data_format: as for the ops (`None`: channels-last).
    per_example: each example of the batch is a stream of its own:
      `stream_step` then takes `valid` and `reset` per example, and the
      state's `phase` and `emitted` have shape `(N,)`.

  Returns:
    A `StreamState` for `stream_step`.

  Raises:
    TypeError, ValueError: anything the op refuses, and a padding along
      `axis` that is not causal, or filled by a mode other than zeros.

  Example:
    >>> import jax.numpy as jnp
    >>> import dw5d_jax as dw
    >>> k = jnp.ones((3, 3, 3, 4, 1))                      # (kt, kh, kw, C, M)
    >>> state = dw.stream_init(jnp.zeros((1, 1, 8, 8, 4)), k)
    >>> state.buffer.shape                # a ring of kt frames: the last kt - 1 and the next
    (1, 3, 8, 8, 4)
    >>> dw.stream_init(jnp.zeros((3, 1, 8, 8, 4)), k, per_example=True).emitted.shape
    (3,)
  """
  return _init("stream_init", chunk, kernel, strides=strides, padding=padding,
               padding_mode=padding_mode, dilations=dilations, axes=axes, axis=axis,
               data_format=data_format, per_example=per_example)


def _init(fn: str, chunk: Any, kernel: Any, *, strides, padding, padding_mode, dilations, axes,
          axis, data_format, per_example) -> StreamState:
  """`stream_init`, its messages naming `fn` (a layer's method, or stream_init)."""
  if not isinstance(per_example, bool):
    raise TypeError(f"{fn}: `per_example` must be a bool, got {type(per_example).__name__} "
                    f"{per_example!r}.")
  config = _configure(fn, chunk, kernel, strides=strides, padding=padding,
                      padding_mode=padding_mode, dilations=dilations, axes=axes, axis=axis,
                      data_format=data_format)
  dtype = _check_float(fn, "chunk", chunk)
  t = config.layout.index(config.axis)
  shape = list(chunk.shape)
  _check_length(fn, shape[t], config)
  # Checks the rest (kernel shape and dtype, channels, a window that does not
  # fit along another axis) as the op would, on one frame, computing nothing.
  shape[t] = max(config.ring, 1)
  jax.eval_shape(functools.partial(_conv, config=config, fn=fn, method="auto",
                                   precision=None, preferred=None),
                 jax.ShapeDtypeStruct(tuple(shape), dtype),
                 jax.ShapeDtypeStruct(tuple(kernel.shape), _dtype_of(kernel)))
  shape[t] = config.ring
  # Separate arrays, so that a jitted step can donate the whole state. The
  # batch is the first axis in every layout.
  each = (shape[0],) if per_example else ()
  head = jnp.zeros((), jnp.int32)
  phase, emitted = (jnp.zeros(each, jnp.int32) for _ in range(2))
  return StreamState(buffer=_like(fn, jnp.zeros(shape, dtype), chunk, t, config.axis),
                     head=head, phase=phase, emitted=emitted, config=config)


def _like(fn: str, buffer: jax.Array, chunk: Any, t: int, axis: str) -> jax.Array:
  """`buffer` split over devices like `chunk` (a sharded state: each device keeps the
  history of its own block; `stream_step` under `jit` then exchanges only halos)."""
  if not isinstance(chunk, jax.Array):
    return buffer
  typed = jax.typeof(chunk).sharding
  explicit = not typed.mesh.empty and jax.sharding.AxisType.Explicit in typed.mesh.axis_types
  placed = None if isinstance(chunk, jax.core.Tracer) else chunk.sharding
  spec = (typed.spec if explicit
          else placed.spec if isinstance(placed, jax.sharding.NamedSharding) else None)
  if spec is None or not any(tuple(spec)):
    return buffer
  if t < len(spec) and spec[t] is not None:
    raise ValueError(
        f"{fn}: `chunk` is split along the streamed axis {axis} (mesh axes {spec[t]!r}); a "
        f"stream keeps its history whole along {axis}. Split the batch or another axis.")
  if explicit:  # the sharding is in the type
    return jax.sharding.reshard(buffer, spec)
  return jax.device_put(buffer, placed)


def stream_step(
    state: StreamState,
    chunk: ArrayLike,
    kernel: ArrayLike,
    *,
    strides: _Ints = 1,
    padding: _Padding = None,
    padding_mode: str | tuple[str, ...] = "zeros",
    dilations: _Ints = 1,
    axes: str | None = None,
    axis: str | None = None,
    data_format: str | None = None,
    method: str = "auto",
    precision: lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    valid: Any = None,
    reset: Any = None,
) -> tuple[StreamState, jax.Array]:
  """One chunk of a stream: the new state and the chunk's outputs.

  Call it with the arguments `stream_init` got (they are checked against the
  state), and the same kernel each time.

  Args:
    state: from `stream_init` or the previous step.
    chunk: the next `L >= 1` frames along the streamed axis, every other
      size, the layout and the dtype as in `stream_init`'s `chunk`.
    kernel: the kernel.
    strides, padding, padding_mode, dilations, axes, axis, data_format: as
      for `stream_init`.
    method, precision, preferred_element_type: as for the ops (they do not
      change the state).
    valid: `None` (every frame of `chunk` is real), or how many leading
      frames are (an int, or an integer scalar array such as the `emitted`
      of a strided stream feeding this one); the others are ignored. For a
      per-example stream also an integer array `(N,)`, one count per
      example. Known values must lie in `[0, L]`; traced ones (under
      `jit`) are clamped to `[0, L]`.
    reset: `None`, or for a per-example stream a bool array `(N,)` (or a
      bool for all): where true, that example's stream starts afresh with
      this chunk (its kept frames become the causal zeros, its phase 0).

  Returns:
    `(state, y)`: `y` has `ceil(L / s)` frames along the streamed axis (`s`
    its stride) and the op's sizes elsewhere; the first `state.emitted` of
    them are the full op's next outputs (all, when `s` divides `L` and every
    frame is real); per example for a per-example stream.

  Raises:
    TypeError: `state` is not a `StreamState`; a chunk dtype other than the
      state's; a `valid` or `reset` of the wrong type.
    ValueError: a state made for another configuration; a chunk whose rank,
      batch, channels or other sizes differ from the state's, or with no
      frame; a `valid` out of range or of the wrong shape; `valid` or
      `reset` per example for a state that is not per example.

  Example:
    >>> import numpy as np
    >>> import jax.numpy as jnp
    >>> import dw5d_jax as dw
    >>> x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 6, 6, 4)),
    ...                 jnp.float32)                        # (N, T, H, W, C)
    >>> k = jnp.ones((3, 3, 3, 4, 1))
    >>> full = dw.depthwise_conv3d(x, k, padding=("CAUSAL", "SAME", "SAME"))
    >>> state = dw.stream_init(x[:, :1], k)
    >>> outs = []
    >>> for t in range(5):                                  # one frame at a time
    ...   state, y = dw.stream_step(state, x[:, t:t + 1], k)
    ...   outs.append(y)
    >>> bool(jnp.allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5))
    True

    Two streams in one batch, the second starting afresh at the second step:

    >>> state = dw.stream_init(jnp.zeros((2, 1, 6, 6, 4)), k, per_example=True)
    >>> state, y = dw.stream_step(state, jnp.ones((2, 1, 6, 6, 4)), k,
    ...                           valid=jnp.array([1, 0]))
    >>> state, y = dw.stream_step(state, jnp.ones((2, 1, 6, 6, 4)), k,
    ...                           reset=jnp.array([False, True]))
    >>> state.emitted.tolist()
    [1, 1]
  """
  return _checked_step("stream_step", state, chunk, kernel, strides=strides, padding=padding,
                       padding_mode=padding_mode, dilations=dilations, axes=axes, axis=axis,
                       data_format=data_format, method=method, precision=precision,
                       preferred_element_type=preferred_element_type, valid=valid,
                       reset=reset)


def _checked_step(fn: str, state: Any, chunk: Any, kernel: Any, *, strides, padding,
                  padding_mode, dilations, axes, axis, data_format, method, precision,
                  preferred_element_type, valid, reset) -> tuple[StreamState, jax.Array]:
  """`stream_step`, its messages naming `fn` (a layer's method, or stream_step)."""
  if not isinstance(state, StreamState):
    raise TypeError(f"{fn}: `state` must be a StreamState from stream_init or stream_step, "
                    f"got {type(state).__name__}.")
  _args.check_array(fn, "chunk", chunk)
  _args.check_array(fn, "kernel", kernel)
  config = _configure(fn, chunk, kernel, strides=strides, padding=padding,
                      padding_mode=padding_mode, dilations=dilations, axes=axes, axis=axis,
                      data_format=data_format)
  check_same_config(fn, state.config, config)
  if _frame_step.active():  # an export's rank-4 step of one frame: ring (N, H, W, (e-1)C)
    return _frame_step.checked_step(fn, state, chunk, kernel, valid=valid, reset=reset,
                                  method=method, precision=precision,
                                  preferred=preferred_element_type)
  _check_chunk(fn, state, chunk)
  length = chunk.shape[config.layout.index(config.axis)]
  count, traced = _check_valid(fn, valid, length, state)
  reset = _check_reset(fn, reset, state)
  buffer, head, phase, emitted, y = _step(
      state.buffer, state.head, state.phase, chunk, kernel, traced, reset, count=count,
      config=config,
      method=_args.check_method(fn, method), precision=_args.check_precision(fn, precision),
      preferred=_args.check_preferred(fn, preferred_element_type))
  return StreamState(buffer, head, phase, emitted, config), y


@functools.partial(jax.jit, static_argnames=("count", "config", "method", "precision",
                                             "preferred"))
def _step(ring, head, phase, chunk, kernel, traced, reset, *, count: int | None,
          config: StreamConfig, method: str, precision: Any, preferred: Any):
  """The step's arithmetic: `traced` real frames if given, else `count` (None: all).

  `traced` and `phase` are scalars, or `(N,)` per example (`phase` for a
  per-example state); `reset` None, a bool scalar or `(N,)`. Returns the new
  ring, head, phase and emitted count, and the output slots.
  """
  t = config.layout.index(config.axis)
  length = chunk.shape[t]
  count = traced if traced is not None else length if count is None else count
  valid = jnp.asarray(count, jnp.int32)
  conv = functools.partial(_conv, config=config, fn="stream_step", method=method,
                           precision=precision, preferred=preferred)
  i = config.time
  if i is None:  # a carried axis: every frame on its own
    return ring, head, phase, jnp.broadcast_to(valid, phase.shape), conv(chunk, kernel)
  k, s, r = config.window[i], config.strides[i], config.dilations[i]
  size = config.ring
  if reset is not None:  # a new stream in these slots: the causal zeros, phase 0
    phase = jnp.where(reset, 0, phase)
    if size:
      ring = jnp.where(reset.reshape(reset.shape + (1,) * (ring.ndim - reset.ndim)),
                       jnp.zeros((), ring.dtype), ring)
  if s == 1:  # the phase is always 0: nothing to compute (fewer ops in a 1-frame step)
    emitted, phase_after = jnp.broadcast_to(valid, phase.shape), phase
  else:
    emitted = _geometry.stream_emitted(valid, phase, s)
    phase_after = _geometry.stream_phase(phase, valid, s)
  if size and _geometry.is_static(length) and length == 1 and valid.ndim == 0:
    # One frame into the free slot; a frame that is not real (valid 0) stays
    # there: `head` does not move.
    ring, y = _ring_step(ring, chunk, kernel, head, config=config, method=method,
                         precision=precision, preferred=preferred)
    return ring, (head + valid) % size, phase_after, emitted, y
  x = chunk
  if size:  # [history; chunk], the history in order: e - 1 slots from the oldest on
    ordered = jnp.roll(ring, -_geometry.stream_oldest(head, size), axis=t)
    x = lax.concatenate([lax.slice_in_dim(ordered, 0, size - 1, axis=t), chunk], t)
    if traced is not None:
      history = _slice_each(x, valid, size - 1, t)
    else:
      history = lax.slice_in_dim(x, count, count + size - 1, axis=t)
    pads = [(0, 0, 0)] * x.ndim
    pads[t] = (0, 1, 0)
    ring = lax.pad(history, jnp.zeros((), x.dtype), pads)  # in order, the free slot last
    head = jnp.asarray(size - 1, jnp.int32)
  if s > 1:
    pads = [(0, 0, 0)] * x.ndim
    pads[t] = (0, _geometry.stream_tail(length, s), 0)
    x = lax.pad(x, jnp.zeros((), x.dtype), pads)
    x = _slice_each(x, phase, _geometry.stream_window(length, k, s, r), t)
  return ring, head, phase_after, emitted, conv(x, kernel, window_padding=True)


def _ring_step(ring, chunk, kernel, head, *, config: StreamConfig, method: str, precision: Any,
               preferred: Any) -> tuple[jax.Array, jax.Array]:
  """One frame into the free slot `head` of the ring, and its output (`_ring.py`).

  The ring's window convolved (VALID along the streamed axis), on the
  operands normalised to rank 5 as the ops normalise them. Traced for an
  export target (`_target.py`), the step is `_ring.formula`'s ops
  themselves: an exporter sees only the ops it converts.
  """
  fn = "stream_step"
  # One output frame: no padding along the streamed axis, and its stride moves nothing.
  padding, strides = list(config.padding), list(config.strides)
  padding[config.time], strides[config.time] = (0, 0), 1
  x5, k5, spec = _args.normalize(
      fn, ring, kernel, conv_axes=config.axes, layout=config.layout, strides=tuple(strides),
      dilations=config.dilations, padding=tuple(padding), precision=precision,
      preferred=preferred, padding_mode=config.modes or None)
  unit = 1 if spec.channels_last else 2  # the unit D axis of a rank-4 layout
  frame = lax.expand_dims(chunk, (unit,)) if ring.ndim == 4 else chunk
  impl = Impl(method, target=_target.current())
  kw = dict(spec=spec, impl=impl, axis=SPATIAL.index(config.axis))
  if impl.target is not None:
    ring5, y = _ring.formula(x5, frame, k5, jnp.asarray(head, jnp.int32), **kw)
  else:
    _lowering.prepare(spec, impl, x5.shape[0])
    ring5, y = _ring.ring_step(x5, frame, k5, head, **kw)
  if ring.ndim == 4:
    return ring5.squeeze(unit), y.squeeze(unit)
  return ring5, y


def _slice_each(x: jax.Array, start: jax.Array, size: Any, t: int) -> jax.Array:
  """`size` frames along axis `t` from `start`: one start, or one per example (`(N,)`)."""
  if start.ndim == 0:
    return lax.dynamic_slice_in_dim(x, start, size, t)
  # The batch is axis 0 in every layout.
  return jax.vmap(lambda xi, si: lax.dynamic_slice_in_dim(xi, si, size, t - 1))(x, start)


def _conv(x, kernel, *, config: StreamConfig, fn: str, method: str, precision: Any,
          preferred: Any, window_padding: bool = False) -> jax.Array:
  """The op on `x`; with `window_padding`, VALID along the streamed axis."""
  padding = list(config.padding)
  if window_padding:
    padding[config.time] = (0, 0)
  return _depthwise._apply(
      x, kernel, fn=fn, conv_axes=config.axes, layout=config.layout, strides=config.strides,
      dilations=config.dilations, padding=tuple(padding), method=method, precision=precision,
      preferred=preferred, padding_mode=config.modes)


# ----------------------------------------------------------------------------
# Checks.


def _configure(fn: str, chunk: Any, kernel: Any, *, strides, padding, padding_mode, dilations,
               axes, axis, data_format) -> StreamConfig:
  """Checks the configuration arguments and returns the stream's config."""
  for name, a in (("chunk", chunk), ("kernel", kernel)):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      raise TypeError(f"{fn}: `{name}` must be an array (or have .shape and .dtype), got "
                      f"{type(a).__name__}.")
  if axes is None:
    axes = "DHW" if len(kernel.shape) == 5 else "HW"
  elif not (isinstance(axes, str) and axes.upper() == "DHW"):
    axes = _args.check_axes(fn, axes)
  axes = axes.upper()
  three_d = axes == "DHW"
  layout = _args.check_layout(fn, _Shaped(chunk), data_format, allowed_5d=True,
                              allowed_4d=not three_d, name="chunk")
  spatial = "".join(a for a in layout if a in SPATIAL)
  if len(layout) == 4 and axes != "HW":
    raise ValueError(f"{fn}: `axes` applies to rank-5 `chunk` only; rank-4 `chunk` "
                     f"({layout}) is always convolved over H and W, got axes={axes!r}.")
  if axis is None:
    axis = spatial[0]
  if not isinstance(axis, str) or axis.upper() not in spatial:
    raise ValueError(f"{fn}: `axis` must be None or one of the spatial axes "
                     f"{', '.join(map(repr, spatial))} of `chunk` ({layout}), got {axis!r}.")
  axis = axis.upper()
  n = len(axes)
  strides = _args.int_tuple(fn, "strides", strides, n, axes)
  dilations = _args.int_tuple(fn, "dilations", dilations, n, axes)
  if padding is None:
    padding = tuple("CAUSAL" if a == axis else "SAME" for a in axes)
  padding = _args.check_padding(fn, padding, axes)
  modes = _args.check_padding_mode(fn, padding_mode, padding, axes)
  if len(kernel.shape) != n + 2:
    names = ", ".join(f"k{a.lower()}" for a in axes)
    raise ValueError(f"{fn}: `kernel` must have rank {n + 2} ({names}, in_channels, "
                     f"multiplier) for axes={axes!r}, got shape {tuple(kernel.shape)}.")
  window = tuple(int(d) for d in kernel.shape[:n])
  channels = chunk.shape[layout.index("C")]
  if not _same_size(kernel.shape[-2], channels):
    raise ValueError(f"{fn}: `kernel` in_channels (dim {n}, size {kernel.shape[-2]}) must "
                     f"equal the channels of `chunk` ({channels}, layout {layout}); got chunk "
                     f"shape {tuple(chunk.shape)} and kernel shape {tuple(kernel.shape)}.")
  if axis in axes:
    i = axes.index(axis)
    if not _geometry.is_causal(window[i], dilations[i], padding[i]):
      e = _geometry.effective(window[i], dilations[i])
      raise ValueError(
          f"{fn}: `padding` along the streamed axis {axis} must be 'CAUSAL' (pads "
          f"(e - 1, 0) = ({e - 1}, 0) for kernel {window[i]}, dilation {dilations[i]}): a "
          f"stream's outputs may read only past and present frames; got {padding[i]!r}.")
    if modes[i] != "zeros":
      raise ValueError(
          f"{fn}: `padding_mode` along the streamed axis {axis} must be 'zeros' (the state "
          f"starts from the causal zeros), got {modes[i]!r}; other modes are fine along the "
          f"other axes.")
  return StreamConfig(axes=axes, axis=axis, layout=layout, window=window,
                      multiplier=int(kernel.shape[-1]), strides=strides, dilations=dilations,
                      padding=padding, modes=modes)


def _check_valid(fn: str, valid: Any, length: Any,
                 state: StreamState) -> tuple[int | None, jax.Array | None]:
  """`valid` as `(static count or None, int32 array or None)`.

  Checked against `[0, length]` where its value is known (an int, or an
  array outside `jit`); a traced value is clamped to `[0, length]`.
  """
  if valid is None:
    return None, None
  if _args.is_int(valid):
    if not (_geometry.is_static(length) and 0 <= valid <= length):
      raise ValueError(f"{fn}: `valid` must be between 0 and the chunk's {length} frames "
                       f"along the streamed axis, got {valid!r}.")
    return int(valid), None
  each = state.phase.shape
  if not hasattr(valid, "dtype") or not jnp.issubdtype(valid.dtype, jnp.integer):
    raise TypeError(f"{fn}: `valid` must be None, an int or an integer array, got "
                    f"{type(valid).__name__} {getattr(valid, 'dtype', '')} of shape "
                    f"{jnp.shape(valid)}.")
  if jnp.shape(valid) not in ((), each):
    per = (f"() or {each} (one per example)" if each else
           "() (an integer scalar: this state is not per example; make it with "
           "stream_init(..., per_example=True) for one count per example)")
    raise ValueError(f"{fn}: `valid` must have shape {per}, got shape {jnp.shape(valid)}.")
  value = _concrete(valid)
  if value is not None and _geometry.is_static(length) and not (
      (value >= 0).all() and (value <= length).all()):
    raise ValueError(f"{fn}: `valid` must be between 0 and the chunk's {length} frames along "
                     f"the streamed axis, got {value.tolist()!r}.")
  # Under jit the value is unknown until the step runs: clamped (documented).
  return None, jnp.clip(jnp.asarray(valid, jnp.int32), 0, length)


def _check_reset(fn: str, reset: Any, state: StreamState) -> jax.Array | None:
  """`reset` as a bool array (scalar, or `(N,)` for a per-example state), or None."""
  if reset is None:
    return None
  each = state.phase.shape
  if not each:
    raise ValueError(f"{fn}: `reset` needs a per-example state (stream_init(..., "
                     f"per_example=True)); for a state of one stream, make a new one with "
                     f"stream_init. Got reset={reset!r}.")
  if isinstance(reset, bool):
    reset = jnp.asarray(reset)
  if not hasattr(reset, "dtype") or jnp.dtype(reset.dtype) != jnp.bool_:
    raise TypeError(f"{fn}: `reset` must be None, a bool or a bool array, got "
                    f"{type(reset).__name__} {getattr(reset, 'dtype', '')}.")
  if jnp.shape(reset) not in ((), each):
    raise ValueError(f"{fn}: `reset` must have shape () or {each} (one per example), got "
                     f"shape {jnp.shape(reset)}.")
  return jnp.asarray(reset)


def _concrete(a: Any) -> Any:
  """`a`'s value as a NumPy array, or None where it is traced."""
  try:
    return np.asarray(a)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_length(fn: str, length: Any, config: StreamConfig) -> None:
  if _geometry.is_static(length) and length < 1:
    raise ValueError(f"{fn}: `chunk` must hold at least one frame along the streamed axis "
                     f"{config.axis}, got {length}.")


def check_same_config(fn: str, held: Any, given: Any,
                      hint: str = "Make it with stream_init and the same arguments as "
                                  "stream_step.") -> None:
  """Raises unless two configs (NamedTuples: a `StreamConfig`, a layer's) are equal."""
  if held == given:
    return
  diffs = "; ".join(f"{name} {getattr(given, name)!r} here, {getattr(held, name)!r} in the state"
                    for name in type(held)._fields if getattr(given, name) != getattr(held, name))
  raise ValueError(f"{fn}: `state` was made for another configuration: {diffs}. {hint}")


def _check_chunk(fn: str, state: StreamState, chunk: Any) -> None:
  config = state.config
  t = config.layout.index(config.axis)
  held = state.buffer
  dtype = _check_float(fn, "chunk", chunk)
  if dtype != held.dtype:
    raise TypeError(f"{fn}: `chunk` has dtype {dtype}, but the state holds {held.dtype} "
                    f"frames; cast the chunk or make the state from a {dtype} chunk.")
  want = tuple("L" if i == t else d for i, d in enumerate(held.shape))
  shown = ", ".join(f"{a}={d}" for a, d in zip(config.layout, want))
  if chunk.ndim != held.ndim or any(
      i != t and not _same_size(a, b) for i, (a, b) in enumerate(zip(chunk.shape, held.shape))):
    raise ValueError(f"{fn}: `chunk` has shape {tuple(chunk.shape)}, but the state was made "
                     f"for chunks ({shown}) ({config.layout}, L >= 1 frames along the streamed "
                     f"axis {config.axis}): batch, channels and the other sizes must stay.")
  _check_length(fn, chunk.shape[t], config)


def _same_size(a: Any, b: Any) -> bool:
  try:
    return bool(a == b)
  except Exception:  # symbolic sizes that the constraints do not decide
    return False


def _check_float(fn: str, name: str, a: Any) -> Any:
  dtype = _dtype_of(a)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: `{name}` must have a floating dtype (float16, bfloat16, "
                    f"float32, float64), got {dtype}.")
  return dtype


def _dtype_of(a: Any) -> Any:
  return jax.dtypes.canonicalize_dtype(a.dtype)


class _Shaped:
  """`.ndim` and `.shape` of an array or a shape-and-dtype struct, for `_args.check_layout`."""

  def __init__(self, a: Any):
    self.shape = tuple(a.shape)
    self.ndim = len(self.shape)
