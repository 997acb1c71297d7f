"""SavedModel export through jax2tf, with symbolic batch and spatial sizes.

`export_savedmodel` turns `apply_fn(params, x)` into a TensorFlow SavedModel
that loads and runs where only TensorFlow is installed: the JAX computation is
serialized as StableHLO inside `XlaCallModule` ops (jax2tf's native
serialization), lowered for every platform in `platforms`, and `params`
become `tf.Variable`s. Each `None` in `input_shape` becomes a symbolic
dimension, so one SavedModel serves every batch and spatial size.

TensorFlow and jax2tf are imported inside the functions, so `import interop`
and `dw5d demo` stay free of TensorFlow's start-up cost.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_FN = "export_savedmodel"
_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Size given to each symbolic dimension when `apply_fn` is traced at concrete
# sizes to tell a shape mismatch from a symbolic-shape failure. Only shapes are
# evaluated (jax.eval_shape), so the size costs nothing.
_SAMPLE_SIZE = 64


def dim_names(rank: int, channel_axis: int = -1) -> tuple[str | None, ...]:
  """The names `export_savedmodel` gives the symbolic dimensions, by axis.

  The channel axis gets `None`; the other axes, in order, are `b, d, h, w`
  (rank 5), `b, h, w` (rank 4), `b, w` (rank 3), `b` (rank 2), or
  `b, s1, s2, ...` for other ranks. Constraints refer to these names.

  Example:
    >>> dim_names(5)
    ('b', 'd', 'h', 'w', None)
    >>> dim_names(5, channel_axis=1)
    ('b', None, 'd', 'h', 'w')
  """
  channel_axis %= rank
  others = rank - 1
  letters = {1: ("b",), 2: ("b", "w"), 3: ("b", "h", "w"), 4: ("b", "d", "h", "w")}.get(
      others, ("b", *(f"s{i}" for i in range(1, others))))
  it = iter(letters)
  return tuple(None if i == channel_axis else next(it) for i in range(rank))


def poly_string(shape: Sequence[int | None], names: Sequence[str | None]) -> str:
  """`input_shape` with its symbolic names, e.g. `(b, d, h, w, 8)`."""
  return "(" + ", ".join(n if d is None else str(d) for d, n in zip(shape, names)) + ")"


def export_savedmodel(
    apply_fn: Callable[[Any, jax.Array], Any],
    params: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int | None],
    dtype: Any = "float32",
    platforms: Sequence[str] = ("cpu", "cuda"),
    with_gradient: bool = True,
    overwrite: bool = False,
    channel_axis: int = -1,
    constraints: Sequence[str] = (),
) -> str:
  """Exports `apply_fn(params, x)` as a TensorFlow SavedModel.

  The SavedModel has a `serve(x)` function (the object returned by
  `tf.saved_model.load` has it as an attribute; `tf.GradientTape` through it
  gives input and parameter gradients, computed by JAX's own VJP, saved as
  custom gradients) and a `serving_default` signature taking `x` and
  returning `{"output": y}` (`{"output_0": ..., ...}` for several outputs).
  It needs TensorFlow only to load and run: not JAX, not this project.

  Args:
    apply_fn: a JAX function `(params, x) -> y`, a single op or a whole model;
      `y` is an array or a pytree of arrays.
    params: a pytree of arrays, stored as `tf.Variable`s (in the order of
      `jax.tree_util.tree_leaves(params)`, as the loaded object's `params`).
    path: the directory to write. It must not exist or be empty unless
      `overwrite` is set.
    input_shape: the shape of `x`: an int per fixed dimension, `None` per
      symbolic one (any size >= 1 at serving time). The channel dimension
      (`channel_axis`) must be an int. Symbolic dimensions are named by axis:
      `b, d, h, w` for rank 5, `b, h, w` for rank 4 (see `dim_names`).
    dtype: the dtype of `x`. 64-bit dtypes need JAX's 64-bit mode
      (`with jax.enable_x64(True):` around the call).
    platforms: the platforms to lower for, a subset of `cpu`, `cuda`, `rocm`,
      `tpu`. The default serves on CPU and NVIDIA GPU machines alike, wherever
      the model was exported; functions using `lax.platform_dependent` (such
      as `dw5d_jax`'s `method="auto"`) get each platform's lowering.
    with_gradient: save JAX's VJP as the custom gradient of `serve` (first
      order: differentiating that gradient again raises); if false,
      differentiating `serve` raises and `params` are not trainable.
    overwrite: replace an existing SavedModel at `path`. A non-empty
      directory that is not a SavedModel is never deleted.
    channel_axis: the axis of `input_shape` holding the channels (-1 for
      channels-last, 1 for channels-first).
    constraints: bounds on the symbolic dimensions that `apply_fn` needs,
      e.g. `("h >= 3", "w >= 3")` for a 3x3 window with VALID padding
      (see `jax.export.symbolic_shape`). A SavedModel refuses inputs that
      break them.

  Returns:
    `path`, as a string.

  Raises:
    TypeError: `input_shape`, `dtype` or `params` of the wrong type.
    ValueError: a 64-bit `dtype` without 64-bit mode; `path` exists and is
      not empty (without `overwrite`), or is not a SavedModel (with it); the
      channel dimension of `input_shape` is `None`; bad `platforms` or
      `constraints`; `apply_fn` fails on `input_shape` (a mismatch with
      `params`) or only with symbolic sizes (the message names the
      dimensions and quotes the JAX error).

  Example:
    >>> import tempfile, numpy as np
    >>> import dw5d_jax as dw
    >>> k = np.random.default_rng(0).standard_normal((3, 3, 3, 4, 1), np.float32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_savedmodel(
    ...     lambda p, x: dw.depthwise_conv3d(x, p, strides=2), k, tmp.name + "/model",
    ...     input_shape=(None, None, None, None, 4))
    >>> model = load_savedmodel(path)
    >>> model.serve(np.ones((1, 5, 6, 7, 4), np.float32)).shape
    TensorShape([1, 3, 3, 4, 4])
  """
  shape, names = _check_input_shape(input_shape, channel_axis)
  x_dtype = _check_dtype(dtype)
  platforms = _check_platforms(platforms)
  constraints = _check_constraints(constraints)
  leaves, treedef = _param_leaves(params)
  path = os.fspath(path)
  _check_path(path, overwrite)

  def flat_fn(leaves: list[jax.Array], x: jax.Array) -> Any:
    return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), x)

  exported = _check_traceable(flat_fn, leaves, shape, names, x_dtype, platforms,
                              constraints, with_gradient)
  _save(flat_fn, leaves, path, shape, names, x_dtype, platforms, constraints,
        with_gradient, exported)
  return path


def load_savedmodel(path: str | os.PathLike) -> Any:
  """Loads a SavedModel written by `export_savedmodel` or `export_streaming_savedmodel`.

  Plain `tf.saved_model.load(path)` does the same (and is what a process
  without this project uses); this adds clear errors for a wrong `path`.

  Args:
    path: the SavedModel directory.

  Returns:
    The loaded object: `.serve(x)` (or, streaming, `.initial_state(chunk)`
    and `.step(state, chunk)`), `.signatures["serving_default"]`, `.params`
    (the `tf.Variable`s). Keep it referenced while calling its functions:
    TensorFlow frees the variables with it.

  Raises:
    ValueError: `path` does not exist, is not a SavedModel directory, cannot
      be loaded, or has no `serve` function.

  Example:
    >>> import tempfile, numpy as np
    >>> import dw5d_jax as dw
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_savedmodel(
    ...     lambda k, x: dw.depthwise_conv2d(x, k), np.ones((3, 3, 2, 1), np.float32),
    ...     tmp.name + "/m", input_shape=(None, None, None, 2), with_gradient=False)
    >>> model = load_savedmodel(path)   # keep it: its variables live with it
    >>> model.serve(np.ones((1, 4, 5, 2), np.float32)).shape
    TensorShape([1, 4, 5, 2])
    >>> load_savedmodel(tmp.name)
    Traceback (most recent call last):
    ...
    ValueError: load_savedmodel: `path` '...' is not a SavedModel directory (expected ...
  """
  fn = "load_savedmodel"
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"{fn}: `path` {path!r} does not exist.")
  if not os.path.isdir(path) or not any(
      os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
    raise ValueError(f"{fn}: `path` {path!r} is not a SavedModel directory (expected a "
                     f"directory with saved_model.pb, as written by export_savedmodel).")
  import tensorflow as tf

  try:
    model = tf.saved_model.load(path)
  except Exception as err:  # TF raises several types for damaged files.
    raise ValueError(f"{fn}: `path` {path!r} holds a SavedModel that TensorFlow cannot "
                     f"load: {type(err).__name__}: {err}") from err
  if not hasattr(model, "serve") and not hasattr(model, "step"):
    raise ValueError(f"{fn}: the SavedModel at {path!r} has no `serve` function (nor a "
                     f"streaming `step`); it was not written by export_savedmodel or "
                     f"export_streaming_savedmodel.")
  return model


# ----------------------------------------------------------------------------
# Argument checks.


def _check_input_shape(input_shape: Any, channel_axis: Any, fn: str = _FN
                       ) -> tuple[tuple[int | None, ...], tuple[str | None, ...]]:
  if (not isinstance(input_shape, Sequence) or isinstance(input_shape, str)
      or not all(d is None or _is_int(d) for d in input_shape)):
    raise TypeError(f"{fn}: `input_shape` must be a sequence of ints and None (one per "
                    f"dimension of x, None for a symbolic size), got {input_shape!r}.")
  shape = tuple(None if d is None else int(d) for d in input_shape)
  if not shape:
    raise ValueError(f"{fn}: `input_shape` must have at least one dimension, got "
                     f"{input_shape!r}.")
  if any(d is not None and d < 1 for d in shape):
    raise ValueError(f"{fn}: `input_shape` sizes must be positive ints or None, got "
                     f"{input_shape!r}.")
  if not _is_int(channel_axis) or not -len(shape) <= channel_axis < len(shape):
    raise ValueError(f"{fn}: `channel_axis` must be an int in [-{len(shape)}, "
                     f"{len(shape)}) for a rank-{len(shape)} `input_shape`, got "
                     f"{channel_axis!r}.")
  if shape[channel_axis] is None:
    raise ValueError(f"{fn}: the channel dimension of `input_shape` (axis {channel_axis}) "
                     f"must be an int: the params fix the number of channels, only batch "
                     f"and spatial sizes can be symbolic; got input_shape {input_shape!r}.")
  return shape, dim_names(len(shape), channel_axis)


def _check_dtype(dtype: Any, fn: str = _FN) -> np.dtype:
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"{fn}: `dtype` must be a dtype or its name (e.g. 'float32'), got "
                    f"{dtype!r}.") from None
  canonical = jax.dtypes.canonicalize_dtype(dtype)
  if canonical != dtype:
    raise ValueError(f"{fn}: `dtype` {dtype} needs JAX's 64-bit mode, which is off (JAX "
                     f"would compute in {canonical}); export inside "
                     f"`with jax.enable_x64(True):`, or use {canonical}.")
  return dtype


def _check_platforms(platforms: Any, fn: str = _FN) -> tuple[str, ...]:
  items = (platforms,) if isinstance(platforms, str) else tuple(platforms)
  if not items or any(p not in _PLATFORMS for p in items) or len(set(items)) != len(items):
    raise ValueError(f"{fn}: `platforms` must be a non-empty sequence of distinct names "
                     f"from {', '.join(map(repr, _PLATFORMS))}, got {platforms!r}.")
  return items


def _check_constraints(constraints: Any, fn: str = _FN) -> tuple[str, ...]:
  if isinstance(constraints, str) or not all(isinstance(c, str) for c in constraints):
    raise TypeError(f"{fn}: `constraints` must be a sequence of strings such as "
                    f"'h >= 3', got {constraints!r}.")
  return tuple(constraints)


def _param_leaves(params: Any, fn: str = _FN) -> tuple[list[np.ndarray], Any]:
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, leaf in with_paths:
    try:
      array = np.asarray(leaf)
    except Exception:  # anything NumPy cannot take
      array = np.asarray(None)
    if array.dtype.kind in "OUS" or array.dtype.names is not None:
      raise TypeError(f"{fn}: `params` must be a pytree of arrays, got "
                      f"{type(leaf).__name__} at {jax.tree_util.keystr(path) or 'the root'}.")
    # The dtype JAX computes in (float64 is float32 unless 64-bit mode is on).
    out.append(array.astype(jax.dtypes.canonicalize_dtype(array.dtype)))
  return out, treedef


def _check_path(path: str, overwrite: bool, fn: str = _FN) -> None:
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path):
    raise ValueError(f"{fn}: `path` {path!r} exists and is not a directory.")
  if not os.listdir(path):
    return
  if not overwrite:
    raise ValueError(f"{fn}: `path` {path!r} exists and is not empty; choose a new path "
                     f"or pass overwrite=True to replace the SavedModel there.")
  if not os.path.isfile(os.path.join(path, "saved_model.pb")):
    raise ValueError(f"{fn}: `path` {path!r} is a non-empty directory that is not a "
                     f"SavedModel (no saved_model.pb); overwrite=True replaces only a "
                     f"SavedModel, so nothing was deleted.")


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------
# Tracing with symbolic shapes, and explaining failures.


def _symbolic_spec(shape, names, dtype, constraints) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
      jax.export.symbolic_shape(poly_string(shape, names), constraints=constraints), dtype)


def _input_spec(shape, names, dtype, constraints, caller: str = _FN) -> jax.ShapeDtypeStruct:
  """The symbolic spec of x, or a ValueError naming bad `constraints`."""
  try:
    return _symbolic_spec(shape, names, dtype, constraints)
  except ValueError as err:
    raise ValueError(f"{caller}: `constraints` {constraints!r} are not valid for the symbolic "
                     f"dimensions {poly_string(shape, names)}: {err}") from None


def _check_traceable(flat_fn, leaves, shape, names, dtype, platforms, constraints,
                     with_gradient) -> jax.export.Exported:
  """Exports `flat_fn` (and its VJP) with jax.export, or raises a clear ValueError.

  Returns the forward export, whose output shapes and tree `_save` uses.
  """
  leaf_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
  x_spec = _input_spec(shape, names, dtype, constraints)
  exported = _export_or_explain("`apply_fn`", flat_fn, leaf_specs, x_spec, shape, names,
                                dtype, platforms, constraints)
  if not with_gradient:
    return exported
  bad = [a for a in exported.out_avals if not jnp.issubdtype(a.dtype, jnp.inexact)]
  if bad:
    raise ValueError(f"{_FN}: with_gradient=True needs floating outputs, but `apply_fn` "
                     f"returns {', '.join(str(a) for a in bad)}; pass with_gradient=False.")

  def with_vjp(leaves, x):
    y, pullback = jax.vjp(flat_fn, leaves, x)
    return y, pullback(jax.tree_util.tree_map(jnp.ones_like, y))

  _export_or_explain("the gradient of `apply_fn`", with_vjp, leaf_specs, x_spec, shape,
                     names, dtype, platforms, constraints)
  return exported


def _export_or_explain(what, fn, leaf_specs, x_spec, shape, names, dtype, platforms,
                       constraints, *, caller: str = _FN,
                       subject: str = "`apply_fn`") -> jax.export.Exported:
  """`jax.export` of `fn(leaf_specs, x_spec)`; a failure explained (`_explain`).

  `caller` and `subject` name the public function and the user's function(s)
  in the message.
  """
  try:
    return jax.export.export(jax.jit(fn), platforms=platforms)(leaf_specs, x_spec)
  except Exception as err:  # apply_fn is user code: any error is explained the same way.
    raise _explain(err, what, fn, leaf_specs, shape, names, dtype, constraints,
                   caller=caller, subject=subject) from err


def _eval_error(fn, leaf_specs, x_spec) -> Exception | None:
  try:
    jax.eval_shape(fn, leaf_specs, x_spec)
  except Exception as err:
    return err
  return None


def _explain(err, what, fn, leaf_specs, shape, names, dtype, constraints, *, caller: str,
             subject: str) -> ValueError:
  """Tells a mismatch (fails at concrete sizes too) from a symbolic-shape failure."""
  sample = tuple(_SAMPLE_SIZE if d is None else d for d in shape)
  concrete = _eval_error(fn, leaf_specs, jax.ShapeDtypeStruct(sample, dtype))
  if concrete is not None:
    return ValueError(
        f"{caller}: {what} fails on an input of shape {sample} (`input_shape` "
        f"{tuple(shape)} with each None set to {_SAMPLE_SIZE}), so `input_shape` does not "
        f"match {subject} and `params`: {type(concrete).__name__}: {concrete}")
  symbolic = [i for i, d in enumerate(shape) if d is None]
  # The dimensions that fail on their own, the others set to concrete sizes.
  culprits = [i for i in symbolic if _eval_error(fn, leaf_specs, _symbolic_spec(
      tuple(d if j == i else _SAMPLE_SIZE if d is None else d for j, d in enumerate(shape)),
      names, dtype, constraints)) is not None] or symbolic
  dims = ", ".join(f"{names[i]} (axis {i})" for i in culprits)
  return ValueError(
      f"{caller}: {what} works at concrete sizes but fails with the symbolic "
      f"dimension{'s' if len(culprits) > 1 else ''} {dims} of x "
      f"{poly_string(shape, names)}: {type(err).__name__}: {err}\n"
      f"Make {subject} work for any size there, fix the size with an int in "
      f"`input_shape`, or, where the size needs a bound, declare it with "
      f"`constraints=`, e.g. constraints=('{names[culprits[0]]} >= 3',).")


# ----------------------------------------------------------------------------
# Building and writing the SavedModel.


def _save(flat_fn, leaves, path, shape, names, dtype, platforms, constraints,
          with_gradient, exported) -> None:
  import tensorflow as tf
  from jax.experimental import jax2tf

  # jax2tf's own `with_gradient=True` converts the VJP without
  # `polymorphic_constraints` (JAX 0.10), so a function that needs them (VALID
  # padding) would fail when its gradient is saved. We convert the forward
  # function and its VJP ourselves, both with the constraints, and join them
  # with tf.custom_gradient. Outputs travel as a flat list of tensors.
  convert = functools.partial(
      jax2tf.convert, polymorphic_constraints=constraints,
      native_serialization_platforms=platforms, with_gradient=False)
  x_poly = poly_string(shape, names)
  out_tree = exported.out_tree
  forward = convert(lambda leaves, x: jax.tree_util.tree_leaves(flat_fn(leaves, x)),
                    polymorphic_shapes=[None, x_poly])
  # Gradients for floating params only (integer ones get None, as in TF).
  differentiable = [bool(jnp.issubdtype(a.dtype, jnp.inexact)) for a in leaves]

  def vjp(leaves, x, cts):
    def f(diff_leaves, x):
      it = iter(diff_leaves)
      full = [next(it) if d else a for a, d in zip(leaves, differentiable)]
      return jax.tree_util.tree_leaves(flat_fn(full, x))

    diff_leaves = [a for a, d in zip(leaves, differentiable) if d]
    return jax.vjp(f, diff_leaves, x)[1](list(cts))

  backward = convert(vjp, polymorphic_shapes=[
      None, x_poly, [str(a.shape) for a in exported.out_avals]])

  @tf.custom_gradient
  def call(x, *params):
    ys = forward(list(params), x)

    def grad(*cts):
      cts = [tf.zeros_like(y) if ct is None else ct for ct, y in zip(cts, ys)]
      d_params, dx = backward(list(params), x, cts)
      it = iter(d_params)
      return (dx, *(next(it) if d else None for d in differentiable))

    return ys, grad

  module = tf.Module()
  module.params = [tf.Variable(a, trainable=with_gradient, name=f"param_{i}")
                   for i, a in enumerate(leaves)]
  x_spec = tf.TensorSpec(shape, tf.as_dtype(dtype), name="x")

  @tf.function(autograph=False, input_signature=[x_spec])
  def serve(x):
    params = [tf.convert_to_tensor(v) for v in module.params]
    ys = call(x, *params) if with_gradient else forward(params, x)
    return jax.tree_util.tree_unflatten(out_tree, ys)

  @tf.function(autograph=False, input_signature=[x_spec])
  def serving_default(x):
    ys = jax.tree_util.tree_leaves(serve(x))
    if out_tree.num_leaves == 1 and out_tree.num_nodes == 1:
      return {"output": ys[0]}
    return {f"output_{i}": y for i, y in enumerate(ys)}

  module.serve = serve
  _write(module, path, {"serving_default": serving_default.get_concrete_function()},
         tf.saved_model.SaveOptions(experimental_custom_gradients=with_gradient))


def _write(module: Any, path: str, signatures: dict[str, Any], options: Any = None) -> None:
  """`tf.saved_model.save` next to `path`, then moved into place.

  So a failed export leaves an existing SavedModel untouched.
  """
  import tensorflow as tf

  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    tf.saved_model.save(module, tmp, signatures=signatures, options=options)
    if os.path.isdir(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
