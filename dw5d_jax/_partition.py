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
* **Border modes** (`padding_mode`): along an unsplit axis the local op
  pads its block by mode itself. Along a split axis each block's window
  gets the mode's values at the padding positions it reads (`_fill`):
  copies of rows that the end blocks hold themselves (reflect, symmetric,
  edge), or that another block sends (`circular`: the last block's rows
  to the first and back; pads wider than a block). The input gradient
  sends each window row's gradient back where it came from (`_window_t`).
* **The epilogue** (`_epilogue.epilogue_p`, `epilogue_grad_p`: bias and
  activation): each device runs the epilogue op itself on x's window and
  its blocks (`partitioned_epilogue`), so the native kernels fuse it as on
  one device; the bias is split with the channels, the kernel and bias
  gradients are summed over the batch and spatial splits.

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
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding

from dw5d_jax import _epilogue, _geometry, _modes, _primitive
from dw5d_jax._sharding import Axes, Layout, bias_sharding, dims, pick, shardings
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
  stride and no border mode fills it: there the op runs on the block's
  own rows and, separately, on the halos (`_geometry.Blocks.pieces`),
  which saves a copy of the block. A border mode along a split axis fills
  the window's padding rows from the rows they copy (`_fill`); the input
  gradient of such a split is the transpose of the convolution's
  blockwise computation (its halos sent back).
  """
  if op == "dx" and any(axes and mode != "zeros" for axes, mode in zip(layout.spatial,
                                                                        spec.modes)):
    return _transposed_dx(a, b, spec=spec, impl=impl, out_dtype=out_dtype, layout=layout)

  def bind(a, b, local):
    return _primitive.dw5d_p.bind(a, b, op=op, spec=local, impl=impl, out_dtype=out_dtype,
                                  split=None)

  a, b, local, y_crops = window_operands(op, a, b, spec, layout, pieces_ok=True)
  crops, pieces = y_crops
  y = bind(a, b, local) if pieces is None else _by_pieces(op, a, b, local, bind, *pieces)
  for ax, index, blocks in crops:
    y = _slice(y, ax, blocks.crops, index, blocks.rows)
  if op == "dk" and reduce and layout.reduced:
    y = lax.psum(y, layout.reduced)
  return y


def window_operands(op: str, a: jax.Array, b: jax.Array, spec: ConvSpec, layout: Layout,
                    pieces_ok: bool = False):
  """`(a, b, local, (crops, pieces))`: the operands extended by their halos, the local spec.

  `local` is the problem each device computes on the extended operands;
  `crops` what to cut from its result (the input gradient), `pieces` the
  last split axis computed in pieces (only where `pieces_ok`), else None.
  The kernel gradient's cotangent is masked past the output's end and
  past the batch (the padding of uneven blocks).
  """
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
    mode = spec.modes[i]
    if pieces_ok and j == len(split) - 1 and blocks.pieces and mode == "zeros":
      a = _mask(a, ax, index, parts, blocks.total)
      pieces = (i, ax, blocks, _halos(a, ax, axes, parts, *blocks.halo))
      continue
    a = _window(a, ax, axes, parts, index, blocks, mode=mode, spec=spec, i=i)
    if op == "dx":
      crops.append((ax, index, blocks))
    local = _along(local, i, blocks.local)
  if op == "dk" and layout.batch_axes:
    b = _mask(b, 0, lax.axis_index(layout.batch_axes), layout.parts(layout.batch_axes),
              layout.batch)
  local = local._replace(channels=b.shape[3] if op == "dx" else a.shape[spec.channel_axis])
  return a, b, local, (crops, pieces)


def _transposed_dx(ct, w, *, spec: ConvSpec, impl: Any, out_dtype: Any,
                   layout: Layout) -> jax.Array:
  """The input gradient as the transpose of the blockwise convolution (modes on split axes).

  The convolution's blocks read windows of x: their halos and the mode's
  copies of rows that other blocks own (`_window`). The input gradient
  computes the windows' gradient (the local op's `dx`) and sends each row
  back where it came from (`_window_t`, in the reverse order of the axes).
  The cotangent's padding rows (uneven blocks) are masked first, so they
  reach nothing.
  """
  shape = list(ct.shape)
  shape[spec.channel_axis] = w.shape[3]
  if layout.batch_axes:
    ct = _mask(ct, 0, lax.axis_index(layout.batch_axes), layout.parts(layout.batch_axes),
               layout.batch)
  for i, axes in enumerate(layout.spatial):
    ax = spec.spatial_axes[i]
    shape[ax] = _ceil(spec.in_spatial[i], layout.parts(axes)) if axes else spec.in_spatial[i]
  local, steps = spec, []
  for i, axes in enumerate(layout.spatial):
    if not axes:
      continue
    parts, ax = layout.parts(axes), spec.spatial_axes[i]
    blocks = _geometry.output_blocks(spec.in_spatial[i], spec.out_spatial[i], parts,
                                     spec.window[i], spec.strides[i], spec.dilations[i],
                                     spec.lo[i])
    ct = _mask(ct, ax, lax.axis_index(axes), parts, spec.out_spatial[i])
    steps.append((tuple(shape), ax, axes, parts, blocks, i))
    shape[ax] = blocks.window
    local = _along(local, i, blocks.local)
  local = local._replace(channels=w.shape[3])
  g = _primitive.dw5d_p.bind(ct, w, op="dx", spec=local, impl=impl, out_dtype=out_dtype,
                             split=None)
  for v_shape, ax, axes, parts, blocks, i in reversed(steps):
    g = _window_t(g, v_shape, ax, axes, parts, lax.axis_index(axes), blocks, spec.modes[i],
                  spec, i)
  return g


def _along(spec: ConvSpec, i: int, local: tuple[int, int, tuple[int, int]]) -> ConvSpec:
  """`spec` with the problem `(n, out, (lo, hi))` along spatial axis `i`."""
  n, out, pad = local
  return spec._replace(in_spatial=_put(spec.in_spatial, i, n),
                       out_spatial=_put(spec.out_spatial, i, out),
                       padding=_put(spec.padding, i, pad), modes=_put(spec.modes, i, "zeros"))


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
            blocks: _geometry.Blocks, mode: str = "zeros", spec: ConvSpec | None = None,
            i: int = 0) -> jax.Array:
  """This block's window: own rows, the halo from its neighbours, the padding past the ends.

  The padding is zeros, or filled by `mode` (`_fill`; `spec`'s axis `i`).
  """
  v = _mask(v, axis, index, parts, blocks.total)
  before, after = _halos(v, axis, axes, parts, *blocks.halo)
  w = lax.concatenate([h for h in (before, v, after) if h is not None], axis)
  if blocks.pad != (0, 0):
    config = [(0, 0, 0)] * w.ndim
    config[axis] = (*blocks.pad, 0)
    w = lax.pad(w, jnp.zeros((), w.dtype), config)
  w = _slice(w, axis, blocks.starts, index, blocks.window)
  if mode != "zeros":
    w = _fill(w, v, axis, axes, parts, index, blocks, mode, spec, i)
  return w


def _fill(w: jax.Array, v: jax.Array, axis: int, axes: Axes, parts: int, index: jax.Array,
          blocks: _geometry.Blocks, mode: str, spec: ConvSpec, i: int) -> jax.Array:
  """The windows `w` with their padding positions (outside `[0, n)`) filled by `mode`.

  Each block's window starts at input position `first` (`input_span` of
  its outputs); a padding position `p` it reads holds row `source(p)`,
  owned by block `source(p) // size`. End blocks copy their own rows (a
  reflection of the first rows, the edge row); other owners send them
  (`ppermute` from that block alone: the last block's rows to the first
  for `circular`, or wider pads than a block). Runs of positions with one
  owner are added into the window where they lie (zeros there before),
  on the receiving device only. Worked example: n=16 in 4 blocks of 4,
  k=3, SAME, reflect: block 0's window starts at -1, which holds row 1
  (its own); block 3's ends at 16, which holds row 14 (its own);
  circular: -1 holds 15 (block 3 sends it to block 0) and 16 holds 0.
  """
  for block, owner, offset, rows in _fill_runs(parts, blocks.size, mode, spec, i):
    rows_v = _take(v, axis, rows)
    if owner == block:
      part = jnp.where(index == block, rows_v, jnp.zeros((), rows_v.dtype))
    else:
      part = lax.ppermute(rows_v, axes, [(owner, block)])
    w = _add_rows(w, part, axis, offset)
  return w


def _fill_runs(parts: int, size: int, mode: str, spec: ConvSpec,
               i: int) -> list[tuple[int, int, int, list[int]]]:
  """`(block, owner, offset, rows)`: window rows `[offset, + len(rows))` of `block` are
  rows `rows` of block `owner` (`_fill`), for positions some output reads."""
  n, k, s, r, lo = (spec.in_spatial[i], spec.window[i], spec.strides[i], spec.dilations[i],
                    spec.lo[i])
  out = spec.out_spatial[i]
  bo = _ceil(out, parts)
  runs: list[tuple[int, int, int, list[int]]] = []
  for block in range(parts):
    if block * bo >= out:
      continue
    first, stop = _geometry.input_span(block * bo, min((block + 1) * bo, out), k, s, r, lo)
    for p in range(first, stop):
      if 0 <= p < n:
        continue
      src = int(_geometry.source(mode, p, n))
      owner = src // size
      last = runs[-1] if runs else None
      if last and last[:2] == (block, owner) and last[2] + len(last[3]) == p - first:
        last[3].append(src - owner * size)
      else:
        runs.append((block, owner, p - first, [src - owner * size]))
  return runs


def _window_t(g: jax.Array, v_shape: tuple[int, ...], axis: int, axes: Axes, parts: int,
              index: jax.Array, blocks: _geometry.Blocks, mode: str, spec: ConvSpec,
              i: int) -> jax.Array:
  """The transpose of `_window`: the windows' gradient `g` sent back to the rows it came from.

  Halo rows go back to the blocks that sent them (the reverse `ppermute`),
  the mode's copies to the rows they copy (folded where they were read,
  then sent); the own rows stay.
  """
  size, (before, after) = blocks.size, blocks.halo
  own = jnp.zeros(v_shape, g.dtype)
  if mode != "zeros":
    for block, owner, offset, rows in _fill_runs(parts, size, mode, spec, i):
      lo_row = min(rows)
      folded = _fold_rows(lax.slice_in_dim(g, offset, offset + len(rows), axis=axis), axis,
                          [q - lo_row for q in rows])
      if owner == block:
        folded = jnp.where(index == block, folded, jnp.zeros((), folded.dtype))
      else:
        folded = lax.ppermute(folded, axes, [(block, owner)])
      own = _add_rows(own, folded, axis, lo_row)
  # The window's rows in the extended block (pad, halos, own rows), then each part.
  extent = sum(blocks.pad) + before + size + after
  shape = list(g.shape)
  shape[axis] = extent
  e = _unslice(g, shape, axis, blocks.starts, index)
  e = lax.slice_in_dim(e, blocks.pad[0], blocks.pad[0] + before + size + after, axis=axis)
  own = own + lax.slice_in_dim(e, before, before + size, axis=axis)
  start = 0
  for hop in range(_ceil(before, size), 0, -1):  # as `_halos` received them
    rows = min(size, before - (hop - 1) * size)
    piece = _shift(lax.slice_in_dim(e, start, start + rows, axis=axis), axes, parts, -hop)
    own = _add_rows(own, piece, axis, size - rows)
    start += rows
  start = before + size
  for hop in range(1, _ceil(after, size) + 1):
    rows = min(size, after - (hop - 1) * size)
    piece = _shift(lax.slice_in_dim(e, start, start + rows, axis=axis), axes, parts, hop)
    own = _add_rows(own, piece, axis, 0)
    start += rows
  return _mask(own, axis, index, parts, blocks.total)


def _unslice(g: jax.Array, shape: list[int], axis: int, starts: tuple[int, ...],
             index: jax.Array) -> jax.Array:
  """The transpose of `_slice`: `g` placed at `starts[index]` in zeros of `shape`."""
  zeros = jnp.zeros(shape, g.dtype)
  if len(set(starts)) == 1:
    return _add_rows(zeros, g, axis, starts[0])
  at = [jnp.int32(0)] * len(shape)
  at[axis] = jnp.asarray(np.array(starts, np.int32))[index]
  return lax.dynamic_update_slice(zeros, g, at)


def _fold_rows(g: jax.Array, axis: int, rows: list[int]) -> jax.Array:
  """The transpose of `_take`: `g`'s rows added onto rows `rows` (static) of a new array."""
  shape = list(g.shape)
  shape[axis] = max(rows) + 1
  out, k = jnp.zeros(shape, g.dtype), 0
  for first, length, step in _modes.runs(np.asarray(rows)):
    piece = lax.slice_in_dim(g, k, k + length, axis=axis)
    k += length
    if step == -1:
      piece, first = lax.rev(piece, (axis,)), first - length + 1
    elif step == 0:
      piece = jnp.sum(piece, axis=axis, keepdims=True)
    out = _add_rows(out, piece, axis, first)
  return out


def _take(v: jax.Array, axis: int, rows: list[int]) -> jax.Array:
  """Rows `rows` of `v` along `axis` (static: slices, reversals, broadcasts)."""
  return _modes.take_rows(v, axis, np.asarray(rows))


def _add_rows(w: jax.Array, rows: jax.Array, axis: int, start: int) -> jax.Array:
  return _modes.add_rows(w, rows, axis, start)


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
  data, cm = _data_factors(spec), _cm(spec)
  if op == "fwd":
    return f"{data('c')}, i j k c m -> {data(cm)}"
  if op == "dx":
    return f"{data(cm)}, i j k c m -> {data('c')}"
  return f"{data('c')}, {data(cm)} -> i j k c m"


def _data_factors(spec: ConvSpec):
  def data(channels: str) -> str:
    return f"n d h w {channels}" if spec.channels_last else f"n {channels} d h w"

  return data


def _cm(spec: ConvSpec) -> str:
  """The output channels' factors (no factor of size 1 in a compound)."""
  return "c" if spec.multiplier == 1 else "m" if spec.channels == 1 else "(c m)"


def partitioned(fn, *, op: str, spec: ConvSpec, impl: Any, out_dtype: Any):
  """`fn` (the op on whole arrays) with its partitioning rule, lowered for several devices.

  The policy says where (`_policy.Decision.partition`): not for one
  device, inside `shard_map` (every axis manual) or for export.
  """
  return _custom(fn, _rule(op, spec), ("n", "d", "h", "w") if op == "dk" else (),
                 partition=functools.partial(_partition, op, spec, impl, out_dtype),
                 infer=functools.partial(_infer, op, spec))


def partitioned_epilogue(fn, *, op: str, spec: ConvSpec, impl: Any,
                         activation: str | None, from_output: bool):
  """`fn`, an epilogue op on whole arrays, with its partitioning rule (as `partitioned`).

  `op` is `"fwd"` (`_epilogue.epilogue_p`: x, kernel, bias -> y) or `"grad"`
  (`epilogue_grad_p`: x, kernel, r, ct -> g, dk, db; `from_output`: r is
  y, else the bias). Each device runs the epilogue op itself on its blocks
  (x extended by its halo, as for the convolution), so it stays fused
  where the native kernels run; the bias is split with the channels, and
  the kernel and bias gradients are summed over the batch and spatial
  splits. Where: as for `partitioned`.
  """
  data = _data_factors(spec)
  cm = _cm(spec)
  if op == "fwd":
    rule = f"{data('c')}, i j k c m, {cm} -> {data(cm)}"
  else:
    r = data(cm) if from_output else cm
    rule = f"{data('c')}, i j k c m, {r}, {data(cm)} -> {data(cm)}, i j k c m, {cm}"
  params = (op, spec, impl, activation, from_output)
  return _custom(lambda *args: fn(*args), rule, (), partition=functools.partial(_partition_epilogue, *params),
                 infer=functools.partial(_infer_epilogue, *params))


def _custom(fn, rule: str, reduction: tuple[str, ...], *, partition, infer):
  # Shardy wants special factors in the order the rule first names them.
  order = functools.partial(re.sub(r"[(),]", " ", rule).split().index)
  wrapped = custom_partitioning(fn)
  wrapped.def_partition(
      partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
      reduction_factors=reduction,
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


def _epilogue_shardings(op, spec, mesh, layout, from_output):
  """`(operands, results)` shardings of an epilogue op for `layout`."""
  data, kernel, _ = shardings("fwd", spec, mesh, layout)
  bias = bias_sharding(kernel)
  if op == "fwd":
    return (data, kernel, bias), data
  return (data, kernel, data if from_output else bias, data), (data, kernel, bias)


def _partition_epilogue(op, spec, impl, activation, from_output, mesh, arg_shapes,
                        result_shape):
  del result_shape
  layout = _layout("fwd" if op == "fwd" else "dk", spec, mesh, arg_shapes,
                   (0, 1) if op == "fwd" else (0, 3))
  fn = functools.partial(_blockwise_epilogue, op, spec=spec, impl=impl, activation=activation,
                         layout=layout)
  operands, results = _epilogue_shardings(op, spec, mesh, layout, from_output)
  return mesh, fn, results, operands


def _infer_epilogue(op, spec, impl, activation, from_output, mesh, arg_shapes, result_shape):
  del impl, activation, result_shape
  layout = _layout("fwd" if op == "fwd" else "dk", spec, mesh, arg_shapes,
                   (0, 1) if op == "fwd" else (0, 3))
  return _epilogue_shardings(op, spec, mesh, layout, from_output)[1]


def _blockwise_epilogue(op, *args, spec: ConvSpec, impl: Any, activation: str | None,
                        layout: Layout):
  """The epilogue op on one device's blocks: x extended by its halo, the local problem."""
  if op == "fwd":
    x, k, b = args
    x, _, local, _ = window_operands("fwd", x, k, spec, layout)
    return _epilogue.epilogue_p.bind(x, k, b, spec=local, impl=impl, activation=activation)
  x, k, r, ct = args
  # The cotangent masked past the output's end and the batch (no g, dk, db there).
  x, ct, local, _ = window_operands("dk", x, ct, spec, layout)
  g, dk, db = _epilogue.epilogue_grad_p.bind(x, k, r, ct, spec=local, impl=impl,
                                             activation=activation)
  if layout.reduced:
    dk, db = lax.psum((dk, db), layout.reduced)
  return g, dk, db


def _layout(op: str, spec: ConvSpec, mesh, arg_shapes, which=(0, 1)) -> Layout:
  """The split the operands `which` arrive with, in a partition callback (see `pick`).

  Never raises (an exception in XLA's callback aborts the process): what it
  cannot keep split it leaves unsplit, with a warning, and XLA gathers it.
  """
  splits = []
  for s in (arg_shapes[i] for i in which):
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
