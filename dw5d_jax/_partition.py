"""Sharded depthwise convolutions: halo exchange and partition rules, in one place.

An op on sharded operands runs, on each device, `blockwise`: the same op
on the device's blocks, as a smaller problem (the layouts and the
shardings in the types are `_sharding.py`'s).

* **Batch** split: the local op on the local samples; no communication,
  except the kernel gradient's sum over the devices (`psum` of
  kernel-sized data).
* **Channels** split (the kernel's channels split alike): the local op on
  the local channels; no communication at all.
* **Spatial** axes split: each block receives from its neighbours the rows
  its windows reach past its own (its halo: `lax.ppermute` of exactly
  those rows, from several blocks when a halo is wider than one block).
  `_geometry.output_blocks` (the convolution and the kernel gradient,
  which exchange x) and `_geometry.input_blocks` (the input gradient,
  which exchanges the cotangent) say which rows, and how each block
  computes its share: as the op on its own rows plus small ops on the
  halos alone where the blocks line up with the stride (`Blocks.pieces`),
  else as a VALID problem on the block extended by its halo. Rows past the
  array's ends, and the padding of blocks that a size does not split
  evenly (their rows are masked), are zeros: the global zero padding.

Three routes lead there:

1. **`jit` with sharded arrays** (mesh axes `Auto` or `Explicit`): when the
   policy says an op lowered for several devices is partitioned
   (`_policy.Decision.partition`), `partitioned` wraps it in
   `jax.experimental.custom_partitioning`, with a Shardy sharding rule per
   op (`_rule`; GSPMD's callbacks too) and a partition callback that keeps
   the operands' batch, spatial and channel splits (`_layout`) and returns
   `blockwise`. XLA never partitions the convolution itself (its
   partitioner all-gathers the operands of custom calls, and computes a
   wrong kernel gradient of some batch- and depth-split grouped
   convolutions). A single-device lowering is untouched. The callbacks
   never raise (an exception there aborts XLA's compilation): what they
   cannot keep split, XLA gathers, with a warning.
2. **Explicit mesh axes**: the shardings in the types (`_sharding.py`),
   then route 1.
3. **Inside `jax.shard_map`** (`split_axes=` of the public ops): the
   operands are already the blocks; the primitive carries a `Layout` of
   the split spatial axes and its lowering is `blockwise` (the kernel
   gradient stays a per-block partial sum, which `shard_map` sums for a
   replicated kernel).

`jax.export` and jax2tf lowerings (an export target) keep the portable
single-program computation: an exported artifact cannot carry a
partitioning callback, so a sharded exported function is partitioned by
XLA's own rules when it is compiled. Because a lowering may partition, the
primitives need their devices while lowering (`_lowering.py`), so
exporting under an `AbstractMesh` (no devices) raises; a concrete mesh
works.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding

from dw5d_jax import _geometry, _primitive
from dw5d_jax._sharding import Axes, Layout, dims, pick, shardings
from dw5d_jax._spec import ConvSpec

# ----------------------------------------------------------------------------
# The op on one device's blocks.


def blockwise(op: str, a: jax.Array, b: jax.Array, *, spec: ConvSpec, impl: Any,
              out_dtype: Any, layout: Layout, reduce: bool) -> jax.Array:
  """`op` on the local blocks `a`, `b` of operands split as `layout` says.

  Runs inside a computation whose mesh axes are all manual (a partition
  callback, or `shard_map`). `reduce`: sum the kernel gradient over the
  batch and spatial axes (else each device returns its partial sum).

  Each split spatial axis extends the exchanged operand by its halo
  (`_window`), except the last one where the blocks line up with the
  stride: there the op runs on the block's own rows and, separately, on
  the halos (`_geometry.Blocks.pieces`), which saves a copy of the block.
  """
  def bind(a, b, local):
    return _primitive.dw5d_p.bind(a, b, op=op, spec=local, impl=impl, out_dtype=out_dtype,
                                  split=None)

  local = spec
  crops, pieces = [], None
  split = [(i, axes, layout.parts(axes)) for i, axes in enumerate(layout.spatial) if axes]
  for j, (i, axes, parts) in enumerate(split):
    args = (spec.in_spatial[i], spec.out_spatial[i], parts, spec.window[i], spec.strides[i],
            spec.dilations[i], spec.lo[i])
    blocks = (_geometry.input_blocks if op == "dx" else _geometry.output_blocks)(*args)
    ax, index = spec.spatial_axes[i], lax.axis_index(axes)
    if op == "dk":  # the cotangent's own rows, zero past the output's end
      b = _mask(b, ax, index, parts, spec.out_spatial[i])
    if j == len(split) - 1 and blocks.pieces:
      a = _mask(a, ax, index, parts, blocks.total)
      pieces = (i, ax, blocks, _halos(a, ax, axes, parts, *blocks.halo))
      continue
    a = _window(a, ax, axes, parts, index, blocks)
    if op == "dx":
      crops.append((ax, index, blocks))
    local = _along(local, i, blocks.local)
  if op == "dk" and layout.batch_axes:
    a = _mask(a, 0, lax.axis_index(layout.batch_axes), layout.parts(layout.batch_axes),
              layout.batch)
  local = local._replace(channels=b.shape[3] if op == "dx" else a.shape[spec.channel_axis])
  y = bind(a, b, local) if pieces is None else _by_pieces(op, a, b, local, bind, *pieces)
  for ax, index, blocks in crops:
    y = _slice(y, ax, blocks.crops, index, blocks.rows)
  if op == "dk" and reduce and layout.reduced:
    y = lax.psum(y, layout.reduced)
  return y


def _along(spec: ConvSpec, i: int, local: tuple[int, int, tuple[int, int]]) -> ConvSpec:
  """`spec` with the problem `(n, out, (lo, hi))` along spatial axis `i`."""
  n, out, pad = local
  return spec._replace(in_spatial=_put(spec.in_spatial, i, n),
                       out_spatial=_put(spec.out_spatial, i, out),
                       padding=_put(spec.padding, i, pad))


def _put(values: tuple[Any, ...], i: int, value: Any) -> tuple[Any, ...]:
  return (*values[:i], value, *values[i + 1:])


def _by_pieces(op, a, b, local, bind, i, ax, blocks, halos) -> jax.Array:
  """The op as the sum of `blocks.pieces`: own rows, then each halo added where it reaches."""
  y = None
  for piece in blocks.pieces:
    source = _rows((halos[0], a, halos[1])[piece.source + 1], ax, piece.rows)
    if op == "dk":
      term = bind(source, _rows(b, ax, piece.result), _along(local, i, piece.local))
      y = term if y is None else y + term
      continue
    term = bind(source, b, _along(local, i, piece.local))
    r0, r1 = piece.result
    if y is None:
      if (r0, r1) == (0, blocks.rows):
        y = term
        continue
      shape = list(term.shape)
      shape[ax] = blocks.rows
      y = jnp.zeros(shape, term.dtype)
    y = lax.dynamic_update_slice_in_dim(y, lax.slice_in_dim(y, r0, r1, axis=ax) + term, r0,
                                        axis=ax)
  return y


def _rows(v: jax.Array, axis: int, rows: tuple[int, int]) -> jax.Array:
  if rows == (0, v.shape[axis]):
    return v
  return lax.slice_in_dim(v, *rows, axis=axis)


def _window(v: jax.Array, axis: int, axes: Axes, parts: int, index: jax.Array,
            blocks: _geometry.Blocks) -> jax.Array:
  """This block's window: own rows, the halo from its neighbours, zeros past the ends."""
  v = _mask(v, axis, index, parts, blocks.total)
  before, after = _halos(v, axis, axes, parts, *blocks.halo)
  v = lax.concatenate([h for h in (before, v, after) if h is not None], axis)
  if blocks.pad != (0, 0):
    config = [(0, 0, 0)] * v.ndim
    config[axis] = (*blocks.pad, 0)
    v = lax.pad(v, jnp.zeros((), v.dtype), config)
  return _slice(v, axis, blocks.starts, index, blocks.window)


def _mask(v: jax.Array, axis: int, index: jax.Array, parts: int, total: int) -> jax.Array:
  """Zeros in the rows of block `index` of `parts` at or past `total` (padding)."""
  size = v.shape[axis]
  if size * parts <= total:
    return v
  rows = index * size + lax.broadcasted_iota(jnp.int32, (size,), 0)
  keep = lax.broadcast_in_dim(rows < total, v.shape, (axis,))
  return jnp.where(keep, v, jnp.zeros((), v.dtype))


def _ceil(a: int, b: int) -> int:
  return -(-a // b)


def _slice(v: jax.Array, axis: int, starts: tuple[int, ...], index: jax.Array,
           size: int) -> jax.Array:
  """Rows `[starts[index], + size)` along `axis` (a static slice when all starts agree)."""
  if len(set(starts)) == 1:
    return _rows(v, axis, (starts[0], starts[0] + size))
  start = jnp.asarray(np.array(starts, np.int32))[index]
  return lax.dynamic_slice_in_dim(v, start, size, axis=axis)


def _halos(v: jax.Array, axis: int, axes: Axes, parts: int, before: int,
           after: int) -> tuple[jax.Array | None, jax.Array | None]:
  """The `before` rows of the blocks below `v`'s and the `after` rows above (None if 0).

  A halo wider than a block comes from several blocks, one `ppermute` per
  distance; blocks past either end send nothing, so those rows are zeros.
  """
  size = v.shape[axis]
  low = []
  for hop in range(_ceil(before, size), 0, -1):  # farthest block first
    rows = min(size, before - (hop - 1) * size)
    low.append(_shift(lax.slice_in_dim(v, size - rows, size, axis=axis), axes, parts, hop))
  high = []
  for hop in range(1, _ceil(after, size) + 1):
    rows = min(size, after - (hop - 1) * size)
    high.append(_shift(lax.slice_in_dim(v, 0, rows, axis=axis), axes, parts, -hop))
  return tuple(lax.concatenate(h, axis) if len(h) > 1 else h[0] if h else None
               for h in (low, high))


def _shift(v: jax.Array, axes: Axes, parts: int, hop: int) -> jax.Array:
  """Block `i` receives block `i - hop`'s `v` (zeros where there is none)."""
  pairs = [(j, j + hop) for j in range(parts) if 0 <= j + hop < parts]
  if not pairs:
    return jnp.zeros_like(v)
  return lax.ppermute(v, axes, pairs)


# ----------------------------------------------------------------------------
# jit: the lowered op partitioned by its own rule.

# Shardy factors: n batch, d h w spatial (shared by an op's operands and
# result, so a split spatial axis stays split through the op; where their
# sizes differ, Shardy uses the smaller), c channels, m multiplier (the
# output channels are (c m); Shardy wants no factor of size 1 in a
# compound), i j k the kernel's taps (never split).
def _rule(op: str, spec: ConvSpec) -> str:
  def data(channels: str) -> str:
    return f"n d h w {channels}" if spec.channels_last else f"n {channels} d h w"

  cm = "(c m)" if spec.multiplier > 1 else "c"
  if op == "fwd":
    return f"{data('c')}, i j k c m -> {data(cm)}"
  if op == "dx":
    return f"{data(cm)}, i j k c m -> {data('c')}"
  return f"{data('c')}, {data(cm)} -> i j k c m"


def partitioned(fn, *, op: str, spec: ConvSpec, impl: Any, out_dtype: Any):
  """`fn` (the op on whole arrays) with its partitioning rule, lowered for several devices.

  The policy says where (`_policy.Decision.partition`): not for one
  device, inside `shard_map` (every axis manual) or for export.
  """
  rule = _rule(op, spec)
  # Shardy wants special factors in the order the rule first names them.
  order = functools.partial(rule.replace("(", " ").replace(")", " ").split().index)
  wrapped = custom_partitioning(fn)
  wrapped.def_partition(
      partition=functools.partial(_partition, op, spec, impl, out_dtype),
      infer_sharding_from_operands=functools.partial(_infer, op, spec),
      sharding_rule=rule,
      reduction_factors=("n", "d", "h", "w") if op == "dk" else (),
      need_replication_factors=tuple(sorted("ijkm", key=order)))
  return wrapped


def _partition(op, spec, impl, out_dtype, mesh, arg_shapes, result_shape):
  del result_shape
  layout = _layout(op, spec, mesh, arg_shapes)
  fn = functools.partial(blockwise, op, spec=spec, impl=impl, out_dtype=out_dtype,
                         layout=layout, reduce=True)
  *operands, result = shardings(op, spec, mesh, layout)
  return mesh, fn, result, tuple(operands)


def _infer(op, spec, mesh, arg_shapes, result_shape):
  del result_shape
  return shardings(op, spec, mesh, _layout(op, spec, mesh, arg_shapes))[-1]


def _layout(op: str, spec: ConvSpec, mesh, arg_shapes) -> Layout:
  """The split the operands arrive with, in a partition callback (see `pick`).

  Never raises (an exception in XLA's callback aborts the process): what it
  cannot keep split it leaves unsplit, with a warning, and XLA gathers it.
  """
  splits = []
  for s in arg_shapes:
    if s.sharding is None:  # not known yet (GSPMD's propagation)
      splits.append([()] * len(s.shape))
    elif isinstance(s.sharding, NamedSharding):
      splits.append(dims(s.sharding.spec, len(s.shape)))
    else:
      _warn(f"its operands' shardings are not over a named mesh ({s.sharding}); place the "
            f"arrays with jax.device_put(x, NamedSharding(mesh, spec)) or call it under "
            f"jax.set_mesh(mesh)")
      splits.append([()] * len(s.shape))
  batch = int(arg_shapes[0].shape[0])
  try:
    return pick(op, spec, *splits, mesh, batch)
  except ValueError as e:
    _warn(str(e))
    return pick(op, spec, *splits, mesh, batch, split_channels=False)


def _warn(what: str) -> None:
  warnings.warn(f"dw5d_jax: a sharded depthwise convolution is computed with gathered "
                f"operands: {what}", stacklevel=2)
