"""Sharded depthwise convolutions: the layouts and the shardings in the types.

Every method computes the three ops of `_primitive.dw5d_p` (`fwd`, `dx`,
`dk`), so one partitioning of each op covers every method, every order of
gradient and the layers. The rules that partition an op (halo exchange,
`custom_partitioning`) are `_partition.py`'s; this module holds what the
primitive itself needs, so that it imports no rule:

* `Layout`: which mesh axes split the batch, spatial and channel axes of
  the data operands, and `pick`, which layout an op keeps from its
  operands' splits (`shardings` turns one back into `NamedSharding`s);
* **inside `jax.shard_map`** (`split_axes=` of the public ops):
  `split_layout` reads the mesh axes the blocks are split over,
  `check_split` that the blocks can be computed there;
* **explicit mesh axes**: the shardings are part of the types, so
  `out_sharding` gives each op's result sharding at trace time (the output
  is split like x; the kernel gradient like the kernel's channels), and
  `like` gives every cotangent its primal's sharding. A result size that
  the mesh does not divide raises there;
* for the lowering: `vary` (operands varying over the same manual axes),
  `unsharded` (a lowering context whose types carry no sharding, to trace
  an implementation in) and `constrain` (the lowered result annotated with
  its sharding).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax._src.interpreters import mlir as _mlir  # lower_with_sharding_in_types
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dw5d_jax._geometry import SPATIAL
from dw5d_jax._spec import ConvSpec

Axes = tuple[str, ...]  # the mesh axes one array axis is split over (() if none)


class Layout(NamedTuple):
  """Which mesh axes split each axis of the data operands (x, y, cotangents).

  `sizes` holds `(name, size)` for every mesh axis named; `batch` is the
  global batch size (the last batch block is padded when the axes do not
  divide it).
  """

  batch_axes: Axes = ()
  spatial: tuple[Axes, Axes, Axes] = ((), (), ())
  channels: Axes = ()
  sizes: tuple[tuple[str, int], ...] = ()
  batch: int = 0

  def parts(self, axes: Axes) -> int:
    sizes = dict(self.sizes)
    return math.prod(sizes[a] for a in axes)

  @property
  def reduced(self) -> Axes:
    """The axes a kernel gradient is summed over: batch and spatial."""
    return (*self.batch_axes, *(a for axes in self.spatial for a in axes))


# ----------------------------------------------------------------------------
# shard_map: the public ops' `split_axes`.


def split_layout(fn: str, axes: tuple[Axes, Axes, Axes]) -> Layout:
  """The `Layout` that `split_axes` names, with the mesh axes' sizes (inside `shard_map`)."""
  sizes = {}
  for letter, names in zip(SPATIAL, axes):
    for name in names:
      try:
        sizes[name] = int(lax.axis_size(name))
      except NameError:
        raise ValueError(
            f"{fn}: `split_axes` splits axis {letter} over mesh axis {name!r}, which is not "
            f"bound here: call the op inside jax.shard_map over a mesh with that axis (manual), "
            f"on the blocks of x.") from None
  return Layout(spatial=axes, sizes=tuple(sorted(sizes.items())))


def check_split(fn: str, spec: ConvSpec, layout: Layout) -> None:
  """Raises unless every split axis's output splits into equal blocks (as `shard_map` needs)."""
  for letter, axes, n, out in zip(SPATIAL, layout.spatial, spec.in_spatial, spec.out_spatial):
    parts = layout.parts(axes)
    if axes and out % parts:
      raise ValueError(
          f"{fn}: along axis {letter}, x (size {n} in all, split over mesh axes {axes}: "
          f"{parts} blocks) gives an output of size {out}, which does not split into {parts} "
          f"equal blocks. Choose sizes, strides and padding whose output size along "
          f"{letter} is divisible by {parts}.")


# ----------------------------------------------------------------------------
# A layout as shardings: what the partition callbacks and the types say.


def pick(op: str, spec: ConvSpec, a: list[Axes], b: list[Axes], mesh, batch: int,
          split_channels: bool = True) -> Layout:
  """The split `blockwise` computes, from the operands' splits `a` and `b`.

  The data operand's (x or the cotangent) batch, spatial and channel axes
  stay split as they are (for the kernel gradient, where x's are not, the
  cotangent's); the kernel's channels follow. Its taps and multiplier are
  never split. Raises ValueError for channels that cannot be split so.
  """
  used: set[str] = set()

  def pick(*choices: Axes) -> Axes:
    for axes in choices:
      if axes and not used & set(axes):
        used.update(axes)
        return axes
    return ()

  second = b if op == "dk" else [()] * 5
  batch_axes = pick(a[0], second[0])
  spatial = tuple(pick(a[ax], second[ax]) for ax in spec.spatial_axes)
  channel = spec.channel_axis
  channels = pick(a[channel], second[channel] if op == "dk" else b[3]) if split_channels else ()
  sizes = tuple((name, int(mesh.shape[name])) for name in sorted(used))
  layout = Layout(batch_axes, spatial, channels, sizes, batch)
  parts = layout.parts(channels)
  if spec.multiplier > 1 and spec.channels % parts:
    raise ValueError(
        f"the channels (C={spec.channels}, depth multiplier {spec.multiplier}) are split over "
        f"mesh axes {channels} ({parts} devices), which do not divide C, so the output's "
        f"C*M channels would not split along the input's. Split the channels over a divisor "
        f"of {spec.channels}, or leave them unsplit.")
  return layout


def dims(pspec: P, ndim: int) -> list[Axes]:
  """A PartitionSpec as one tuple of mesh axis names per array axis."""
  entries = tuple(pspec) + (None,) * (ndim - len(pspec))
  return [tuple(e) if isinstance(e, tuple) else (e,) if isinstance(e, str) else ()
          for e in entries]


def _entry(axes: Axes) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _data_spec(spec: ConvSpec, layout: Layout) -> P:
  entries = [None] * 5
  entries[0] = _entry(layout.batch_axes)
  for ax, axes in zip(spec.spatial_axes, layout.spatial):
    entries[ax] = _entry(axes)
  entries[spec.channel_axis] = _entry(layout.channels)
  return P(*entries)


def shardings(op: str, spec: ConvSpec, mesh, layout: Layout) -> tuple[NamedSharding, ...]:
  """The operands' and the result's shardings for `layout`."""
  data = NamedSharding(mesh, _data_spec(spec, layout))
  kernel = NamedSharding(mesh, P(None, None, None, _entry(layout.channels), None))
  if op == "dk":
    return data, data, kernel
  return data, kernel, data


# ----------------------------------------------------------------------------
# Explicit mesh axes: shardings in the types.


def _explicit(mesh) -> bool:
  return not mesh.empty and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)


def out_sharding(op: str, a, b, spec: ConvSpec, shape: tuple[Any, ...],
                 fn: str = "dw5d_jax") -> Any:
  """The result's sharding in the types, from operand avals `a`, `b`.

  Split as `pick` says under explicit mesh axes; else unsplit on the
  operands' mesh (None without one). Raises where the result's size along
  a split axis is not divisible by the devices it is split over (a type
  cannot say how uneven blocks lie), or channels cannot be split.
  """
  mesh = a.sharding.mesh if not a.sharding.mesh.empty else b.sharding.mesh
  if mesh.empty:
    return None
  if not _explicit(mesh):
    return NamedSharding(mesh, P())
  try:
    layout = pick(op, spec, dims(a.sharding.spec, a.ndim), dims(b.sharding.spec, b.ndim),
                   mesh, int(a.shape[0]))
  except ValueError as e:
    raise ValueError(f"{fn}: with explicit mesh axes, {e}") from None
  if op == "dk":
    pspec, names = P(None, None, None, _entry(layout.channels), None), _KERNEL_AXES
  else:
    pspec, names = _data_spec(spec, layout), _DATA_AXES[spec.channels_last]
  for name, size, entry in zip(names, shape, tuple(pspec) + (None,) * 5):
    axes = dims(P(entry), 1)[0]
    if size % layout.parts(axes):
      i = SPATIAL.find(name)
      given = f" from an input of size {spec.in_spatial[i]}" if i >= 0 and op == "fwd" else ""
      raise ValueError(
          f"{fn}: with explicit mesh axes, the result's axis {name} (size {size}{given}) would "
          f"be split over mesh axes {axes} ({layout.parts(axes)} devices), which do not divide "
          f"it. Choose sizes, strides and padding that give a divisible size, or reshard x so "
          f"that axis {name} is not split (jax.sharding.reshard) before the call.")
  return NamedSharding(mesh, pspec)


_DATA_AXES = {True: ("N", "D", "H", "W", "C"), False: ("N", "C", "D", "H", "W")}
_KERNEL_AXES = ("kd", "kh", "kw", "C", "M")


def like(value: jax.Array, aval) -> jax.Array:
  """`value` resharded to `aval`'s explicit sharding (a cotangent to its primal's)."""
  target = aval.sharding
  if not _explicit(target.mesh) or jax.typeof(value).sharding.spec == target.spec:
    return value
  return jax.sharding.reshard(value, target.spec)


def vary(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Both operands varying over the same manual mesh axes (inside `shard_map`)."""
  va, vb = (jax.typeof(v).manual_axis_type.varying for v in (a, b))
  if va == vb:
    return a, b
  return (lax.pcast(a, tuple(sorted(vb - va)), to="varying") if vb - va else a,
          lax.pcast(b, tuple(sorted(va - vb)), to="varying") if va - vb else b)


def unsharded(ctx):
  """`ctx` with shardings and manual axes dropped from its types, to trace a lowering in.

  The implementations compute on whole arrays (or on one device's blocks):
  the partitioning is this module's, not the traced operations' own rules,
  and no transpose inside them may sum over manual axes (which it would
  for a value varying over them).
  """
  if all(v.sharding.mesh.empty for v in (*ctx.avals_in, *ctx.avals_out)):
    return ctx
  plain = lambda avals: [  # noqa: E731
      v.update(sharding=None, manual_axis_type=_NO_MANUAL_AXES) for v in avals]
  return ctx.replace(avals_in=plain(ctx.avals_in), avals_out=plain(ctx.avals_out))


_NO_MANUAL_AXES = jax.core.ShapedArray((), np.float32).manual_axis_type


def constrain(ctx, out, aval=None):
  """The lowered result annotated with its explicit sharding (as JAX's own ops are)."""
  return _mlir.lower_with_sharding_in_types(ctx, out, ctx.avals_out[0] if aval is None else aval)


def bias_sharding(kernel: Any) -> Any:
  """A bias's (or its gradient's) sharding from its kernel's: split with the channels."""
  if kernel is None:
    return None
  return NamedSharding(kernel.mesh, P(*tuple(kernel.spec)[3:4]))
