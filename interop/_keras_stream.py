"""A Keras model's stream as JAX functions, for the streaming exporters.

`stream_functions(model, input_shape)` turns a Keras 3 model (JAX backend)
built from `interop.keras` layers with stream methods and ordinary per-frame
Keras layers into `(init_fn, step_fn, params)`, the arguments of
`interop.export_streaming_litert`, `export_streaming_onnx` and
`export_streaming_savedmodel`. The model runs through `stateless_call`; while
it does, each `interop.keras` depthwise layer's `call` hands its input to
`Streams.visit` here, which calls `dw5d_jax.stream_init` or
`dw5d_jax.stream_step` with the layer's kernel and options (the layer's
`_dw5d_stream`). So the ring logic is `dw5d_jax`'s, and inside the exporters'
`dw5d_jax._frame_step.frames()` the step is their rank-4 frame step.

The state is a dict of `dw5d_jax.StreamState`s keyed by layer name (the
exported tensors are `state_<layer name>`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

_FN = "stream_functions"
_ACTIVE: contextvars.ContextVar[Streams | None] = contextvars.ContextVar(
    "dw5d_keras_streams", default=None)


def active() -> Streams | None:
  """The streams of the model being stepped, or None outside `stream_functions`' functions."""
  return _ACTIVE.get()


class Streams:
  """The states going into (None: being made) and coming out of one step of a model."""

  def __init__(self, before: dict[str, Any] | None):
    self.before = before
    self.after: dict[str, Any] = {}

  def visit(self, layer: Any, x: Any) -> Any:
    """A library layer's `call` inside a step: its stream's output (init: its plain call)."""
    if layer.name in self.after:
      raise ValueError(f"{_FN}: the layer `{layer.name}` is called twice in `model`; each call "
                       f"of a streaming layer needs its own state. Use one layer per call.")
    if self.before is None:
      self.after[layer.name], _ = layer._dw5d_stream(None, x)
      return layer._apply(x, layer._padding_entries())  # shapes for the layers after it
    self.after[layer.name], y = layer._dw5d_stream(self.before[layer.name], x)
    return y


@contextlib.contextmanager
def _stepping(before: dict[str, Any] | None) -> Iterator[Streams]:
  streams = Streams(before)
  token = _ACTIVE.set(streams)
  try:
    yield streams
  finally:
    _ACTIVE.reset(token)


def stream_functions(model: Any, input_shape: Sequence[int | None]
                     ) -> tuple[Callable[..., Any], Callable[..., Any], Any]:
  """A Keras model's stream as `(init_fn, step_fn, params)` for the streaming exporters.

  The model (Keras 3, JAX backend) takes clips `(N, T, H, W, C)`; its
  `interop.keras` layers with `padding="causal"` (or a `DepthwiseConv2D`
  whose `axes` carry time) stream along T through `dw5d_jax.stream_step`,
  and every other layer must compute each frame on its own (Dense,
  activations, normalization over channels, ...). Pass the result to
  `interop.export_streaming_litert`, `export_streaming_onnx` or
  `export_streaming_savedmodel`; the state is one `dw5d_jax.StreamState`
  per streaming layer, keyed by layer name (exported as `state_<name>`).

  Args:
    model: a Keras model on the JAX backend, one input, one output.
    input_shape: the chunks' shape `(N, T, H, W, C)`, as the exporter's
      (`None` for a symbolic size: checked at 1 for N and 8 for H, W).
      The model is checked here: a random clip of 3 frames, streamed one
      frame at a time, must give the model's own output on the whole clip.

  Returns:
    `(init_fn, step_fn, params)`: `init_fn(params, chunk) -> state`,
    `step_fn(params, state, chunk) -> (state, y)`, and `params` the model's
    weights (NumPy arrays).

  Raises:
    ValueError: a Keras backend other than JAX; `model` not a Keras model,
      or with other than one input and one output; a library layer that
      cannot stream (not causal along time, a border mode along time) or
      is called twice; a model whose frames, streamed, differ from its
      call on the whole clip (a layer that mixes frames along time).

  Example:
    >>> import keras, numpy as np, interop
    >>> from interop.keras import DepthwiseConv3D, stream_functions
    >>> model = keras.Sequential([keras.Input((None, 8, 8, 4)),
    ...                           DepthwiseConv3D(3, padding="causal", activation="relu",
    ...                                           name="temporal"),
    ...                           keras.layers.Dense(4)])
    >>> init_fn, step_fn, params = stream_functions(model, (1, 1, 8, 8, 4))
    >>> state = init_fn(params, np.zeros((1, 1, 8, 8, 4), np.float32))
    >>> sorted(state)
    ['temporal']
    >>> state, y = step_fn(params, state, np.ones((1, 1, 8, 8, 4), np.float32))
    >>> y.shape
    (1, 1, 8, 8, 4)
  """
  import jax
  import keras

  backend = keras.backend.backend()
  if backend != "jax":
    raise ValueError(f"{_FN}: `model` is on the {backend!r} Keras backend; its stream is "
                     f"traced on the JAX backend. Save the model (`model.save`) and load it "
                     f"in a process with KERAS_BACKEND=jax (after `import interop.keras`), then "
                     f"export that.")
  if not isinstance(model, keras.Model):
    raise ValueError(f"{_FN}: `model` must be a Keras model (keras.Model, keras.Sequential), "
                     f"got {type(model).__name__}.")
  if not model.built or len(model.inputs or ()) != 1 or len(model.outputs or ()) != 1:
    raise ValueError(f"{_FN}: `model` must be built with one input and one output "
                     f"(a functional model or a Sequential with `keras.Input`), got "
                     f"{len(getattr(model, 'inputs', None) or ())} input(s) and "
                     f"{len(getattr(model, 'outputs', None) or ())} output(s).")
  shape = tuple(input_shape)
  if len(shape) != 5 or any(d is not None and not isinstance(d, int) for d in shape):
    raise ValueError(f"{_FN}: `input_shape` must be the chunks' shape (N, T, H, W, C), ints "
                     f"or None, got {shape}.")
  for layer in model._flatten_layers(include_self=False, recursive=True):
    if hasattr(layer, "_dw5d_stream"):  # interop.keras's depthwise layers (which import this)
      try:
        layer._stream_axes(f"{type(layer).__name__}.stream_step")
      except ValueError as err:
        raise ValueError(f"{_FN}: the layer `{layer.name}` of `model` cannot stream: "
                         f"{err}") from None

  params = ([np.asarray(v.value) for v in model.trainable_variables],
            [np.asarray(v.value) for v in model.non_trainable_variables])

  def run(params, state, chunk):
    with _stepping(state) as streams, jax.numpy_rank_promotion("allow"):
      # (Keras's own layers broadcast by rank promotion, e.g. Dense's bias.)
      y = model.stateless_call(*params, chunk, training=False)[0]
    return streams.after, y

  def init_fn(params, chunk):
    # Only the chunk's shape and dtype matter (it may be a ShapeDtypeStruct).
    return run(params, None, jax.numpy.zeros(chunk.shape, chunk.dtype))[0]

  def step_fn(params, state, chunk):
    return run(params, state, chunk)

  _check_per_frame(model, params, init_fn, step_fn, shape)
  return init_fn, step_fn, params


def _check_per_frame(model: Any, params: Any, init_fn: Callable[..., Any],
                     step_fn: Callable[..., Any], shape: tuple[int | None, ...]) -> None:
  """Streams a random clip of 3 frames one at a time and compares with the model's call."""
  import jax

  n, _, h, w, c = (d if d is not None else s for d, s in zip(shape, (1, 3, 8, 8, None)))
  if c is None:
    raise ValueError(f"{_FN}: the channel size of `input_shape` must be an int, got {shape}.")
  clip = np.random.default_rng(0).standard_normal((n, 3, h, w, c)).astype(np.float32)
  try:
    with jax.numpy_rank_promotion("allow"):
      full = np.asarray(model.stateless_call(*params, clip, training=False)[0])
    state = init_fn(params, clip[:, :1])
    frames = []
    for t in range(clip.shape[1]):
      state, y = step_fn(params, state, clip[:, t:t + 1])
      frames.append(np.asarray(y))
  except ValueError as err:
    if str(err).startswith(_FN):
      raise
    raise ValueError(f"{_FN}: `model` fails on chunks of shape {(n, 1, h, w, c)} "
                     f"(`input_shape` {shape}): {type(err).__name__}: {err}") from err
  except Exception as err:  # the user's model
    raise ValueError(f"{_FN}: `model` fails on chunks of shape {(n, 1, h, w, c)} "
                     f"(`input_shape` {shape}): {type(err).__name__}: {err}") from err
  streamed = np.concatenate(frames, axis=1)
  if streamed.shape != full.shape:
    raise ValueError(f"{_FN}: `model` streamed one frame at a time gives {streamed.shape}, its "
                     f"call on the whole clip {full.shape}: it must keep the time axis T "
                     f"(axis 1) frame for frame.")
  error = float(np.max(np.abs(streamed - full)))
  scale = max(float(np.max(np.abs(full))), 1e-30)
  if error > 1e-4 * scale:
    raise ValueError(f"{_FN}: `model` streamed one frame at a time differs from its call on the "
                     f"whole clip (max error {error:.3g}, max |y| {scale:.3g}): a layer other "
                     f"than the interop.keras depthwise layers with padding='causal' mixes "
                     f"frames along time (e.g. Conv3D, pooling or normalization over T). Only "
                     f"per-frame layers can sit between the streaming ones.")
