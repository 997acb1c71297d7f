"""Border modes (reflect, symmetric, edge, circular) for every lowering.

A mode pads x by a linear map `P`: padded position `p` holds
`x[source(p)]` (`_geometry.source`). So the three ops of the primitive stay
bilinear, and with `*_valid` the ops on the padded array (no padding along
the mode's axes):

    fwd(x, w)  = fwd_valid(P x, w)
    dx(ct, w)  = P^T dx_valid(ct, w)
    dk(x, ct)  = dk_valid(P x, ct)

They are the three partial derivatives of `<fwd_valid(P x, w), ct>`, so the
primitive's transposes (`_primitive.py`) hold as they are, to any order.
`_lowering.py` hands a spec with modes to `implementation` here (as
`_policy.decide` says: borders or padded),
which computes them by binding the primitive again with zero-padding specs
(so the policy picks a lowering for those), in one of two ways:

* **padded** (XLA's convolution and shift lowering, Pallas, and everything
  exported): pad by mode, one copy of x, then the zero-padding op; `dx`
  crops the padded gradient and folds each face of the padding back onto
  the input rows it copies (`unpad`).
* **borders** (the native CPU kernels, which read x without a padded copy;
  a copy of the whole input would cost as much as the convolution): split
  `P = Z + sum_b B_b`, `Z` the zero padding and `B_b` the mode's values on
  one face `b` of the padding: the positions whose first out-of-range axis
  is `i`, below 0 (`lo`) or past `n - 1` (`hi`), disjoint boxes. The
  kernels compute the `Z` term on the whole problem; each face adds a thin
  slab: `fwd_valid(B_b x, w)` is non-zero only on the output rows that read
  that side's padding (`_geometry.face`), and is one more convolution of
  the slab of positions those rows read (the face's padding filled by mode,
  along later mode axes padded by mode too, everything else zero). Its rows
  are added into the output in place; `dx` folds the slab's input gradient
  back onto the few input rows it came from; `dk` adds the slab's kernel
  gradient.

Worked example, one axis: n=6, k=3, pads (1, 1), reflect: the low face is
output 0 reading positions [-1, 2), of which -1 is padding (source 1); its
slab is the one row `x[1]`, convolved with zero padding (0, 2) into output
row 0 and added there. The high face is output 5 reading [4, 7), padding 6
(source 4): the row `x[4]` with zero padding (2, 0). In the gradient, face
rows of `dx` fold back: the low face's onto `dx[1]`, the high's onto `dx[4]`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dw5d_jax import _geometry, _primitive
from dw5d_jax._geometry import ZEROS, Face, is_static
from dw5d_jax._spec import ConvSpec, Impl

Fn = Callable[[jax.Array, jax.Array], jax.Array]


def implementation(op: str, spec: ConvSpec, impl: Impl, out_dtype: Any, *,
                   borders: bool) -> Fn:
  """`op` of a spec with modes as a function of its two operands (module docstring).

  It is traced inside the op's lowering, on whole arrays (one device) or
  on one device's blocks (`_partition.blockwise`, which fills the modes
  along split axes itself), outside any mesh.
  """
  run = functools.partial(_BORDERS[op] if borders else _PADDED[op], spec=spec, impl=impl,
                          out_dtype=np.dtype(out_dtype))

  def fn(a, b):
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
      return run(a, b)

  return fn


# ----------------------------------------------------------------------------
# Values at padded positions.


def take(x: jax.Array, axis: int, mode: str, n: Any, start: Any, stop: Any,
         offset: Any = 0) -> jax.Array:
  """x's values by `mode` at input positions `[start, stop)` along `axis`.

  `x` holds input positions `[offset, offset + x.shape[axis])` of an axis
  of size `n`; every position's source must be among them. With static
  sizes the sources are runs (ascending, descending or repeated rows), so
  the result is slices, reversals and broadcasts concatenated; with
  symbolic sizes, one gather.
  """
  if is_static(n, start, stop, offset):
    return take_rows(x, axis, _geometry.source(mode, np.arange(start, stop), n) - offset)
  positions = lax.iota(np.int32, stop - start) + start
  idx = _geometry.source(mode, positions, n) - offset
  return jnp.take(x, idx, axis=axis, mode="clip")


def take_rows(x: jax.Array, axis: int, idx: np.ndarray) -> jax.Array:
  """Rows `idx` (static) of x along `axis`: runs of slices, reversals and broadcasts."""
  pieces = []
  for first, length, step in runs(idx):
    if step == 1:
      pieces.append(lax.slice_in_dim(x, first, first + length, axis=axis))
    elif step == -1:
      pieces.append(lax.rev(lax.slice_in_dim(x, first - length + 1, first + 1, axis=axis),
                            (axis,)))
    else:  # one row repeated
      row = lax.slice_in_dim(x, first, first + 1, axis=axis)
      shape = (*x.shape[:axis], length, *x.shape[axis + 1:])
      pieces.append(jnp.broadcast_to(row, shape))
  return pieces[0] if len(pieces) == 1 else lax.concatenate(pieces, axis)


def runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
  """`idx` as `(first, length, step)` runs with steps 1, -1 or 0."""
  runs, i = [], 0
  while i < len(idx):
    step = int(idx[i + 1] - idx[i]) if i + 1 < len(idx) else 1
    step = step if step in (-1, 0, 1) else 1
    j = i + 1
    while j < len(idx) and idx[j] - idx[j - 1] == step:
      j += 1
    runs.append((int(idx[i]), j - i, step))
    i = j
  return runs


# ----------------------------------------------------------------------------
# Slabs: the mode's values on one face of the padding, and their transpose.


def slab(x: jax.Array, spec: ConvSpec, i: int, start: int, stop: int,
         offset: int = 0) -> jax.Array:
  """`B_b x` on positions `[start, stop)` (one side's padding) along axis `i`.

  Along `i` those positions filled by mode from x, whose rows along `i` are
  input rows `offset, offset + 1, ...`; along later mode axes padded by mode
  to their tight extent; along earlier ones x's rows as they are.
  """
  ax = spec.spatial_axes
  v = take(x, ax[i], spec.modes[i], spec.in_spatial[i], start, stop, offset)
  for j in range(i + 1, 3):
    if spec.modes[j] != "zeros":
      lo, hi = spec.tight_padding(j)
      n = spec.in_spatial[j]
      v = take(v, ax[j], spec.modes[j], n, -lo, n + hi)
  return v


def fold(g: jax.Array, spec: ConvSpec, i: int, start: int, stop: int) -> tuple[int, jax.Array]:
  """The transpose of `slab`: `(first, rows)`, `g` folded onto input rows `first, ...` of `i`."""
  src = _geometry.source(spec.modes[i], np.arange(start, stop), spec.in_spatial[i])
  first, last = int(src.min()), int(src.max())
  shape = list(g.shape)
  shape[spec.spatial_axes[i]] = last + 1 - first
  for j in range(i + 1, 3):
    if spec.modes[j] != "zeros":
      shape[spec.spatial_axes[j]] = spec.in_spatial[j]
  to_slab = functools.partial(slab, spec=spec, i=i, start=start, stop=stop, offset=first)
  (rows,) = jax.linear_transpose(to_slab, jax.ShapeDtypeStruct(tuple(shape), g.dtype))(g)
  return first, rows


def add_rows(y: jax.Array, rows: jax.Array, axis: int, start: int) -> jax.Array:
  """`y` with `rows` added in place (no copy of `y`): at `start` along `axis`, 0 elsewhere."""
  starts = [0] * y.ndim
  starts[axis] = start
  cur = lax.slice(y, starts, [s + d for s, d in zip(starts, rows.shape)])
  new = (cur.astype(rows.dtype) + rows).astype(y.dtype)
  return lax.dynamic_update_slice(y, new, starts)


# ----------------------------------------------------------------------------
# Padded: one padded copy, then the zero-padding ops.


def pad(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """`P x`: x padded by mode along every mode axis, to its tight extent.

  With static sizes: x zero-padded (one pass), then each face of the
  padding written in place (`slab`). Each face spans the padded array along
  every other axis (its corners written by both faces that meet there, with
  the same values), so along an axis split over devices it covers whole
  shards: XLA's partitioner gathered the faces of a D-split array whose
  faces started one row into D. With symbolic sizes: one gather per mode
  axis (`take`).
  """
  ax = spec.spatial_axes
  if not spec.is_static():
    for i in range(3):
      if spec.modes[i] != "zeros":
        lo, hi = spec.tight_padding(i)
        n = spec.in_spatial[i]
        x = take(x, ax[i], spec.modes[i], n, -lo, n + hi)
    return x
  cfg = [(0, 0, 0)] * x.ndim
  for i in range(3):
    if spec.modes[i] != "zeros":
      cfg[ax[i]] = (*spec.tight_padding(i), 0)
  xp = lax.pad(x, np.zeros((), x.dtype), cfg)
  for i, start, stop, box in _pad_faces(spec, xp.shape, whole=True):
    v = slab(x, spec, i, start, stop)
    for j in range(i):  # earlier mode axes: by mode too, to the padded extent
      if spec.modes[j] != "zeros":
        lo, hi = spec.tight_padding(j)
        n = spec.in_spatial[j]
        v = take(v, ax[j], spec.modes[j], n, -lo, n + hi)
    v = lax.slice(v, [0] * v.ndim, [b[1] - b[0] for b in box])  # as tightly cropped
    xp = lax.dynamic_update_slice(xp, v, [b[0] for b in box])
  return xp


def unpad(g: jax.Array, spec: ConvSpec) -> jax.Array:
  """`P^T g`: the padded array's gradient folded back onto x.

  With static sizes: the inside of `g` (one copy, cropped by negative
  padding) plus each face of the padding folded onto the input rows it
  copies (`fold`, added in place). With symbolic sizes, JAX's transpose of
  `pad` (a scatter-add).
  """
  if not spec.is_static():
    x = jax.ShapeDtypeStruct(_primitive.out_shape("dx", g.shape, spec), g.dtype)
    (dx,) = jax.linear_transpose(functools.partial(pad, spec=spec), x)(g)
    return dx
  ax, crop = spec.spatial_axes, [(0, 0, 0)] * g.ndim
  for i in range(3):
    if spec.modes[i] != "zeros":
      lo, hi = spec.tight_padding(i)
      crop[ax[i]] = (-lo, -hi, 0)
  dx = lax.pad(g, np.zeros((), g.dtype), crop)
  for i, start, stop, box in _pad_faces(spec, g.shape):
    first, rows = fold(lax.slice(g, *zip(*box)), spec, i, start, stop)
    dx = add_rows(dx, rows, ax[i], first)
  return dx


def _pad_faces(spec: ConvSpec, shape: tuple[int, ...],
               whole: bool = False) -> list[tuple[int, int, int, list]]:
  """`(axis, start, stop, box)` per face of the padding of `pad(x, spec)` (of `shape`).

  Face `(i, side)`: positions `[start, stop)` of that side's padding along
  `i`, inside along earlier mode axes (or, `whole`, anything: faces that
  overlap in the corners), anything along later ones; `box` holds its
  `(start, limit, stride)` per dimension of the padded array.
  """
  ax, out = spec.spatial_axes, []
  for i in range(3):
    if spec.modes[i] == "zeros":
      continue
    box = [(0, d, 1) for d in shape]
    for j in range(0 if whole else i):  # inside, or what the tight extent keeps of it
      if spec.modes[j] != "zeros":
        lo_j, hi_j = spec.tight_padding(j)
        box[ax[j]] = (lo_j, lo_j + spec.in_spatial[j] + min(hi_j, 0), 1)
    lo, hi = spec.tight_padding(i)
    n = spec.in_spatial[i]
    for start, stop in ((-lo, 0), (n, n + hi)):
      if stop > start:
        box[ax[i]] = (start + lo, stop + lo, 1)
        out.append((i, start, stop, list(box)))
  return out


def padded_spec(spec: ConvSpec) -> ConvSpec:
  """The spec of the zero-padding ops on `pad(x, spec)`."""
  padding, ins = list(spec.padding), list(spec.in_spatial)
  for i in range(3):
    if spec.modes[i] != "zeros":
      lo, hi = spec.tight_padding(i)
      padding[i], ins[i] = (0, 0), lo + ins[i] + hi
  return spec._replace(padding=tuple(padding), in_spatial=tuple(ins), modes=ZEROS)


def _padded_fwd(x, w, *, spec, impl, out_dtype):
  return _primitive.conv(pad(x, spec), w, padded_spec(spec), impl, out_dtype)


def _padded_dx(ct, w, *, spec, impl, out_dtype):
  return unpad(_primitive.input_grad(ct, w, padded_spec(spec), impl, out_dtype), spec)


def _padded_dk(x, ct, *, spec, impl, out_dtype):
  return _primitive.kernel_grad(pad(x, spec), ct, padded_spec(spec), impl, out_dtype)


_PADDED = {"fwd": _padded_fwd, "dx": _padded_dx, "dk": _padded_dk}


# ----------------------------------------------------------------------------
# Borders: the zero-padding ops on the whole problem, and one slab per face.


def faces(spec: ConvSpec) -> list[tuple[int, Face]]:
  """`(axis, face)` for each side of each mode axis whose padding some output reads."""
  out = []
  for i in range(3):
    if spec.modes[i] != "zeros":
      for side in ("lo", "hi"):
        f = _geometry.face(spec.in_spatial[i], spec.window[i], spec.strides[i],
                           spec.dilations[i], spec.padding[i][0], spec.out_spatial[i], side)
        if f is not None:
          out.append((i, f))
  return out


def face_spec(spec: ConvSpec, i: int, f: Face) -> ConvSpec:
  """The zero-padding convolution of face `f`'s slab into its output rows."""
  padding, ins, outs = list(spec.padding), list(spec.in_spatial), list(spec.out_spatial)
  padding[i], ins[i], outs[i] = f.pads, f.p_stop - f.p_start, f.o_stop - f.o_start
  for j in range(i + 1, 3):
    if spec.modes[j] != "zeros":
      lo, hi = spec.tight_padding(j)
      padding[j], ins[j] = (0, 0), lo + ins[j] + hi
  return spec._replace(padding=tuple(padding), in_spatial=tuple(ins),
                       out_spatial=tuple(outs), modes=ZEROS)


def _borders_fwd(x, w, *, spec, impl, out_dtype):
  zero = spec._replace(modes=ZEROS)
  y = _primitive.conv(x, w, zero, impl, out_dtype)
  acc = spec.acc_dtype
  for i, f in faces(spec):
    v = slab(x, spec, i, f.p_start, f.p_stop)
    rows = _primitive.conv(v, w, face_spec(spec, i, f), impl, acc)
    y = add_rows(y, rows, spec.spatial_axes[i], f.o_start)
  return y


def _borders_dx(ct, w, *, spec, impl, out_dtype):
  zero = spec._replace(modes=ZEROS)
  dx = _primitive.input_grad(ct, w, zero, impl, out_dtype)
  acc, ax = spec.acc_dtype, spec.spatial_axes
  for i, f in faces(spec):
    ct_rows = lax.slice_in_dim(ct, f.o_start, f.o_stop, axis=ax[i])
    g = _primitive.input_grad(ct_rows, w, face_spec(spec, i, f), impl, acc)
    first, rows = fold(g, spec, i, f.p_start, f.p_stop)
    dx = add_rows(dx, rows, ax[i], first)
  return dx


def _borders_dk(x, ct, *, spec, impl, out_dtype):
  zero = spec._replace(modes=ZEROS)
  acc, ax = spec.acc_dtype, spec.spatial_axes
  dk = _primitive.kernel_grad(x, ct, zero, impl, acc)
  for i, f in faces(spec):
    ct_rows = lax.slice_in_dim(ct, f.o_start, f.o_stop, axis=ax[i])
    v = slab(x, spec, i, f.p_start, f.p_stop)
    dk = dk + _primitive.kernel_grad(v, ct_rows, face_spec(spec, i, f), impl, acc)
  return dk.astype(out_dtype)


_BORDERS = {"fwd": _borders_fwd, "dx": _borders_dx, "dk": _borders_dk}
