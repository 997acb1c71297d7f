"""One frame of a stream over rank-4 tensors: the step that exporters trace.

GPU delegates of LiteRT (and many other runtimes) refuse 5D tensors, and a
deployed stream wants its state as plain named tensors, with no counters.
This module turns a stream written with `dw5d_jax.stream_init` /
`stream_step` (or layers' `stream_init` / `stream_step` methods, which call
them) into a JAX function over rank-4 tensors only:

    step = build(init_fn, step_fn, params, chunk_shape, fn="export_streaming_litert")
    y, *states = step.fn(step.leaves, frame, *states)       # every array rank 4

* `frame`: the next frame `(N, H, W, C)` of a clip `(N, T, H, W, C)`;
* `states`: one ring per stream whose window reaches back in time
  (`e = (kt - 1) * dilation + 1 > 1`), `(N, H, W, (e - 1) * C)`: its last
  `e - 1` input frames side by side along channels, oldest first (zeros
  before the first frame: the causal padding). `step.state_names`,
  `step.state_shapes` and `step.initial_states()` describe them;
* `y`: the model's output frame `(N, H', W', C')`.

A step shifts each ring by one frame (a slice and a concatenation: no head,
no phase, no counter, so the graph is stateless apart from the named
tensors) and computes the op's output frame as a sum of 2D depthwise
convolutions over (H, W), one per time tap, on the ring's frames:

    y = sum_j conv2d(window[j * r], kernel[j]),   window = [ring frames..., frame]

(`r` the dilation along time). Under the export target `"litert"` each is a
DEPTHWISE_CONV_2D. The 2D op on a rank-5 clip streams too: with `axes`
holding the time axis (`"DW"`, `"DH"`) each tap is a 1D convolution along
the other axis (a 2D one with a unit window); with `axes="HW"` every frame
is convolved on its own and the stream has no ring.

How it reaches a user's `step_fn`: `build` traces it inside `frames()`, a
JAX configuration state (part of the jit key, as `_target`) that
`dw5d_jax._streaming` reads: there a `StreamState` whose `buffer` is such a
ring goes to `frame_step` here instead of the ring-and-head step. The rest
of the user's step (bias, activations, pointwise layers) runs on the
`(N, 1, H, W, C)` chunk it gets, as it would in JAX.

Limits (each refused with a message naming `fn` and the argument): chunks of
one frame; channels-last rank-5 clips streamed along their first spatial
axis; stride 1 along time (a strided stream emits an output every `s`
frames: a data-dependent count); streams that are not per example (no
`valid` or `reset` per example); states made of `StreamState`s only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _config

_FRAMES = _config.bool_state(
    name="dw5d_jax_stream_frames", default=False,
    help="dw5d_jax: stream_step takes rank-4 rings (an export of one frame per step).",
    include_in_jit_key=True, include_in_trace_context=True)


@contextlib.contextmanager
def frames() -> Iterator[None]:
  """A context in which `stream_step` calls on ring states go to `frame_step`."""
  with _FRAMES(True):
    yield


def active() -> bool:
  """Whether `frames()` is on (read by `dw5d_jax._streaming` at trace time)."""
  return bool(_FRAMES.value)


# ----------------------------------------------------------------------------
# The arithmetic of one frame.


def history(config: Any) -> int:
  """Frames a stream keeps, `e - 1` (0 for a carried time axis or `e == 1`)."""
  return max(config.ring - 1, 0)


def ring_shape(config: Any, chunk_shape: Sequence[int]) -> tuple[int, ...] | None:
  """The ring of a stream fed chunks of `chunk_shape` `(N, 1, H, W, C)`, or None."""
  n, _, h, w, c = chunk_shape
  kept = history(config)
  return (n, h, w, kept * c) if kept else None


def frame_step(config: Any, ring: jax.Array | None, frame: jax.Array, kernel: jax.Array, *,
               fn: str, method: str = "auto", precision: Any = None,
               preferred: Any = None) -> tuple[jax.Array | None, jax.Array]:
  """One frame of a stream over rank-4 tensors: `(new ring, output frame)`.

  Args:
    config: the stream's `dw5d_jax._streaming.StreamConfig`, checked by
      `check_config` (channels-last rank 5, streamed along D, stride 1 there).
    ring: `(N, H, W, (e - 1) * C)`, the last `e - 1` frames oldest first, or
      None when the stream keeps none.
    frame: `(N, H, W, C)`.
    kernel: the op's kernel, `(kd, kh, kw, C, M)` or `(k0, k1, C, M)` along
      `config.axes`.
    fn: the name errors carry.
    method, precision, preferred: as for the ops.

  Returns:
    The new ring (None if none) and the output frame `(N, H', W', C * M)`.
  """
  from dw5d_jax import _depthwise

  taps, strides, dilations, padding, modes = _frame_conv(config, kernel)
  c = frame.shape[-1]
  kept = history(config)
  r = config.dilations[config.time] if config.time is not None else 1
  window = [ring[..., p * c:(p + 1) * c] for p in range(kept)] + [frame]
  y = None
  for j, tap in enumerate(taps):
    part = _depthwise._apply(
        window[j * r], tap, fn=fn, conv_axes="HW", layout="NHWC", strides=strides,
        dilations=dilations, padding=padding, method=method, precision=precision,
        preferred=preferred, padding_mode=modes)
    y = part if y is None else y + part
  if not kept:
    return None, y
  new = frame if kept == 1 else jnp.concatenate([ring[..., c:], frame], axis=-1)
  return new, y


def _frame_conv(config: Any, kernel: jax.Array) -> tuple[list[jax.Array], ...]:
  """Per time tap a `(kh, kw, C, M)` kernel, and the (H, W) op's arguments.

  An axis the op does not convolve gets a unit window (stride 1, no
  padding): the 2D op over (D, W) is, per tap along D, a 1D op along W.
  """
  dims = {a: i for i, a in enumerate(config.axes)}
  k3 = kernel
  for a in "DHW":  # (k for each of config.axes, C, M) -> (kd, kh, kw, C, M)
    if a not in dims:
      k3 = k3[None]
      dims = {b: i + 1 for b, i in dims.items()}
      dims[a] = 0
  k3 = jnp.transpose(k3, (dims["D"], dims["H"], dims["W"], 3, 4))

  def along(a, values, default):
    return tuple(values[config.axes.index(b)] if b in config.axes else default for b in a)

  modes = config.modes or ("zeros",) * len(config.axes)
  return ([k3[j] for j in range(k3.shape[0])], along("HW", config.strides, 1),
          along("HW", config.dilations, 1), along("HW", config.padding, (0, 0)),
          along("HW", modes, "zeros"))


# ----------------------------------------------------------------------------
# Checks.


def check_config(fn: str, config: Any, where: str) -> None:
  """Raises unless a stream can run one frame at a time over rank-4 tensors.

  `where` names the stream in messages (e.g. "the state's leaf `state_1`").
  """
  if config.layout != "NDHWC":
    raise ValueError(
        f"{fn}: {where} streams a {config.layout} input; a rank-4 step takes channels-last "
        f"rank-5 clips (N, T, H, W, C) (data_format NDHWC, the default): its frames are "
        f"(N, H, W, C), as LiteRT and its GPU delegates expect.")
  if config.axis != "D":
    raise ValueError(
        f"{fn}: {where} streams along axis {config.axis}; a rank-4 step streams along the "
        f"first spatial axis D (time T of a clip (N, T, H, W, C)): `axis` None or 'D'.")
  i = config.time
  if i is not None and config.strides[i] != 1:
    raise ValueError(
        f"{fn}: {where} has stride {config.strides[i]} along the streamed axis D; a rank-4 "
        f"step of one frame supports stride 1 there only (a strided stream emits an output "
        f"every {config.strides[i]} frames, a count that depends on the data; stride "
        f"along H and W is fine). Export with export_streaming_savedmodel, or stride "
        f"after the stream.")


def check_step_args(fn: str, valid: Any, reset: Any) -> None:
  """A frame step takes every frame: `valid` None or 1, no `reset`."""
  if reset is not None:
    raise ValueError(f"{fn}: `reset` is not supported in a rank-4 step of one frame (its "
                     f"state is not per example); got reset={reset!r}.")
  if valid is None:
    return
  try:
    value = np.asarray(valid)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"{fn}: `valid` must be None or 1 in a rank-4 step of one frame (every "
                     f"frame is real); got a traced value.") from None
  if value.shape != () or int(value) != 1:
    raise ValueError(f"{fn}: `valid` must be None or 1 in a rank-4 step of one frame (every "
                     f"frame is real); got {value.tolist()!r}.")


# ----------------------------------------------------------------------------
# A user's stream as a function over rank-4 tensors.


class Step4D(NamedTuple):
  """A stream's step over rank-4 tensors, as `build` makes it.

  Attributes:
    fn: `fn(leaves, frame, *states) -> (y, *states)`, a JAX function; every
      argument and result has rank 4 (`leaves` are the params' arrays).
    leaves: the params' leaves (NumPy arrays).
    frame_shape: `(N, H, W, C)`.
    dtype: the frames' dtype.
    state_names: one name per ring, `state` for a single stream, else
      `state_` and the ring's path in the state's tree (`state_0`,
      `state_1_conv`, ...).
    state_shapes: `(N, H, W, (e - 1) * C)` per ring.
    output_shape: the output frame's shape `(N, H', W', C')`.
  """

  fn: Callable[..., tuple[jax.Array, ...]]
  leaves: list[np.ndarray]
  frame_shape: tuple[int, ...]
  dtype: np.dtype
  state_names: tuple[str, ...]
  state_shapes: tuple[tuple[int, ...], ...]
  output_shape: tuple[int, ...]

  def initial_states(self) -> list[np.ndarray]:
    """The rings before the first frame: zeros (the causal padding)."""
    return [np.zeros(s, self.dtype) for s in self.state_shapes]

  def run(self, clip: Any) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Streams `clip` `(N, T, H, W, C)` through `fn` in JAX, frame by frame.

    Returns the output frames and, per frame, the states the step took
    (the real step inputs an int8 calibration wants).
    """
    step = jax.jit(self.fn)
    states = self.initial_states()
    ys, taken = [], []
    for t in range(np.shape(clip)[1]):
      taken.append(states)
      y, *states = step(self.leaves, np.asarray(clip[:, t], self.dtype), *states)
      ys.append(np.asarray(y))
      states = [np.asarray(s) for s in states]
    return ys, taken


def build(init_fn: Callable[[Any, Any], Any],
          step_fn: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]],
          params: Any, chunk_shape: Sequence[int], dtype: Any = np.float32, *,
          fn: str) -> Step4D:
  """A stream (`init_fn`, `step_fn`, as for `export_streaming_savedmodel`) over rank-4 tensors.

  Args:
    init_fn: `(params, chunk) -> state`, a pytree of `dw5d_jax.StreamState`s.
    step_fn: `(params, state, chunk) -> (state, y)`, `y` `(N, 1, H', W', C')`.
    params: a pytree of arrays.
    chunk_shape: `(N, 1, H, W, C)`, ints: one frame of a channels-last clip.
    dtype: the frames' dtype.
    fn: the exporter's name, for errors.

  Returns:
    A `Step4D`.

  Raises:
    ValueError: a chunk of other than one frame or rank 5; a state leaf that
      is not a `StreamState`; a stream `check_config` refuses; a `step_fn`
      that fails, uses `valid`/`reset`, or returns no `(N, 1, ...)` output.
  """
  from dw5d_jax._streaming import StreamState

  shape = tuple(chunk_shape)
  one_frame = ValueError(f"{fn}: `input_shape` must be one frame of a channels-last clip, "
                         f"(N, 1, H, W, C) (a rank-4 step takes one frame at a time), got "
                         f"{shape}.")
  if len(shape) != 5:
    raise one_frame
  dtype = np.dtype(dtype)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  leaves = [np.asarray(a) for a in leaves]
  chunk = jax.ShapeDtypeStruct(shape, dtype)
  try:
    state = jax.eval_shape(lambda leaves: init_fn(treedef.unflatten(leaves), chunk), leaves)
  except Exception as err:  # user code
    raise ValueError(f"{fn}: `init_fn` fails on a chunk of shape {shape} (`input_shape`): "
                     f"{type(err).__name__}: {err}") from err
  is_state = lambda s: isinstance(s, StreamState)  # noqa: E731
  paths, state_tree = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_state)
  single = len(paths) == 1 and not paths[0][0]
  names, shapes, configs = [], [], []
  for path, leaf in paths:
    name = "state" if single else _state_name(path)
    if not is_state(leaf):
      raise ValueError(f"{fn}: the state's leaf `{name}` is a {type(leaf).__name__}; a rank-4 "
                       f"step carries states of dw5d_jax.stream_init (StreamState) only.")
    check_config(fn, leaf.config, f"the stream of `{name}`")
    if leaf.phase.shape != ():
      raise ValueError(f"{fn}: the stream of `{name}` is per example (stream_init(..., "
                       f"per_example=True)); a rank-4 step of one frame takes every frame of "
                       f"every example: make it without `per_example`.")
    configs.append(leaf.config)
    ring = ring_shape(leaf.config, leaf.buffer.shape[:1] + (1,) + leaf.buffer.shape[2:])
    if ring is not None:
      names.append(name)
      shapes.append(ring)
  if shape[1] != 1:  # after the streams' checks, which say why for other layouts and axes
    raise one_frame

  def rebuild(rings):
    rings = iter(rings)
    one, zero = jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)
    leaves = [StreamState(next(rings) if history(c) else jnp.zeros((0,), dtype), zero, zero,
                          one, c) for c in configs]
    return state_tree.unflatten(leaves)

  def step4d(leaves, frame, *rings):
    with frames():
      new, y = step_fn(treedef.unflatten(leaves), rebuild(rings), frame[:, None])
    out = [s.buffer for s, c in zip(jax.tree_util.tree_leaves(new, is_leaf=is_state), configs)
           if history(c)]
    return (y[:, 0], *out)

  specs = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  try:
    out = jax.eval_shape(step4d, leaves, jax.ShapeDtypeStruct(shape[:1] + shape[2:], dtype),
                         *specs)
  except ValueError as err:
    if str(err).startswith(fn) or "rank-4 step" in str(err):
      raise
    raise ValueError(f"{fn}: `step_fn` fails on one frame of shape {shape}: "
                     f"{type(err).__name__}: {err}") from err
  except Exception as err:  # user code
    raise ValueError(f"{fn}: `step_fn` fails on one frame of shape {shape}: "
                     f"{type(err).__name__}: {err}") from err
  if [tuple(o.shape) for o in out[1:]] != shapes:
    raise ValueError(f"{fn}: `step_fn` must return the state `init_fn` gives, stepped; its "
                     f"rings came back as {[tuple(o.shape) for o in out[1:]]}, not {shapes}.")
  return Step4D(step4d, leaves, shape[:1] + shape[2:], dtype, tuple(names), tuple(shapes),
                tuple(out[0].shape))


def _state_name(path: tuple[Any, ...]) -> str:
  """`state_` and a leaf's path in the state's tree, e.g. `state_0_buffer`."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "_".join(["state", *("".join(c if c.isalnum() else "_" for c in p) for p in parts)])



def checked_step(fn: str, state: Any, chunk: Any, kernel: Any, *, valid: Any, reset: Any,
                 method: str, precision: Any, preferred: Any) -> tuple[Any, jax.Array]:
  """`stream_step` inside `frames()`: `state.buffer` a ring from `build`, `chunk` one frame.

  Returns `(state, y)` as `stream_step` would: the state with the new ring,
  `y` `(N, 1, H', W', C')`.
  """
  from dw5d_jax import _args

  config = state.config
  check_config(fn, config, "the stream")
  check_step_args(fn, valid, reset)
  if chunk.ndim != 5 or chunk.shape[1] != 1:
    raise ValueError(f"{fn}: a rank-4 step takes chunks of one frame, (N, 1, H, W, C); got "
                     f"`chunk` of shape {tuple(chunk.shape)}.")
  kept = history(config)
  ring, y = frame_step(config, state.buffer if kept else None, chunk[:, 0], kernel, fn=fn,
                       method=_args.check_method(fn, method),
                       precision=_args.check_precision(fn, precision),
                       preferred=_args.check_preferred(fn, preferred))
  return dataclasses.replace(state, buffer=state.buffer if ring is None else ring), y[:, None]
