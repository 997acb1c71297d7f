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
tensors) and sums one 2D depthwise convolution per time tap over the ring's
frames (`_frame_step` has the arithmetic; under the export target
`"litert"` each is a DEPTHWISE_CONV_2D). The 2D op per slice streams too.

How it reaches a user's `step_fn`: `build` traces it inside
`_frame_step.frames()`, a JAX configuration state (part of the jit key)
that `dw5d_jax._streaming` reads: there a `StreamState` whose `buffer` is
such a ring goes to `_frame_step` (the arithmetic) instead of the
ring-and-head step. The rest of the user's step (bias, activations,
pointwise layers) runs on the `(N, 1, H, W, C)` chunk it gets, as it would
in JAX.

Limits (each refused with a message naming `fn` and the argument): chunks of
one frame; channels-last rank-5 clips streamed along their first spatial
axis; stride 1 along time (a strided stream emits an output every `s`
frames: a data-dependent count); streams that are not per example (no
`valid` or `reset` per example); states made of `StreamState`s only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dw5d_jax._frame_step import check_config, frames, history, ring_shape
from dw5d_jax._streaming import StreamState

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
  shape = tuple(chunk_shape)
  one_frame = ValueError(f"{fn}: `input_shape` must be one frame of a channels-last clip, "
                         f"(N, 1, H, W, C) (a rank-4 step takes one frame at a time), got "
                         f"{shape}.")
  if len(shape) != 5:
    raise one_frame
  keras = sys.modules.get("keras")  # never imported here: a model passed in has loaded it
  if keras is not None and isinstance(init_fn, keras.layers.Layer):
    raise TypeError(f"{fn}: `init_fn` is a Keras model ({type(init_fn).__name__}); pass its "
                    f"stream's functions instead: `{fn}(*interop.keras.stream_functions(model, "
                    f"input_shape), path, input_shape=input_shape)`.")
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
    name = "state" if single else state_name(path)
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


def state_name(path: tuple[Any, ...]) -> str:
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
