"""One frame of a stream over rank-4 tensors: the arithmetic, and `stream_step`'s hook.

A stream causal along the first spatial axis D of a channels-last clip
`(N, T, H, W, C)`, fed one frame `(N, H, W, C)` at a time, keeps a ring
`(N, H, W, (e - 1) * C)`: its last `e - 1` input frames side by side along
channels, oldest first (`e = (kt - 1) * dilation + 1`). A step shifts the
ring by one frame (a slice and a concatenation: no head, no phase) and
computes the output frame as a sum of 2D depthwise convolutions over
(H, W), one per time tap:

    y = sum_j conv2d(window[j * r], kernel[j]),   window = [ring frames..., frame]

(`r` the dilation along time). Under the export target `"litert"` each is a
DEPTHWISE_CONV_2D. The 2D op on a rank-5 clip streams too: with `axes`
holding D (`"DW"`, `"DH"`) each tap is a 1D convolution along the other
axis (a 2D one with a unit window); with `axes="HW"` every frame is
convolved on its own and there is no ring.

`frames()` is a JAX configuration state (part of the jit key, as
`_target`) that `dw5d_jax._streaming.stream_step` reads: inside it, a
`StreamState` whose `buffer` is such a ring goes to `checked_step` here
instead of the ring-and-head step. `dw5d_jax._stream4d.build` makes those
states and traces a user's step inside `frames()`. This module is a leaf
(it imports the ops, not the stream), so `_streaming` can import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _config

from dw5d_jax import _args, _depthwise

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


def checked_step(fn: str, state: Any, chunk: Any, kernel: Any, *, valid: Any, reset: Any,
                 method: str, precision: Any, preferred: Any) -> tuple[Any, jax.Array]:
  """`stream_step` inside `frames()`: `state.buffer` a ring from `build`, `chunk` one frame.

  Returns `(state, y)` as `stream_step` would: the state with the new ring,
  `y` `(N, 1, H', W', C')`.
  """
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
