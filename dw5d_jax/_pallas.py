"""The `"pallas"` lowering: Pallas kernels (Triton backend, CUDA GPUs) for all three ops.

One kernel per op of `_primitive` (`fwd`, `dx`, `dk`), on channels-last
rank-5 arrays (`_policy` transposes channels-first ones at the boundary):

* `fwd`: x is zero outside `[0, n)`: the padding is never materialised.
* `dx`: the depthwise convolution of the stride-dilated cotangent with the
  flipped kernel, computed as a gather (no zeros are ever stored).
* `dk`: a per-tap reduction: each program walks a few output tiles with one
  accumulator per tap, reduces each to `(c, M)` once, and writes one row of
  partial sums, which XLA adds up.

Kernel design (Triton): a program owns a power-of-two tile `(d, h, w, c)` of
positions and channels (`Tiles`) and accumulates in float32 (float64 for
float64 inputs). Channels are the innermost, contiguous axis, so every load
and store is a run of `c` consecutive elements. Halos are not staged by
hand: Triton has no shared-memory slicing, so each tap is one masked load of
the shifted tile from global memory, which the L1/L2 caches serve after the
first tap touches the window. The offsets of tap `t` are the offsets of tap 0
plus a compile-time constant, so a tap costs one load, one mask and one FMA
per element. Worked example, one axis: n=7, k=3, r=2, s=2, SAME (lo=2,
O=4): output tile o=0..3 reads p = 2*o - 2 + 2*t, i.e. tap 0 reads -2, 0, 2,
4 (the first masked to zero), tap 2 reads 2, 4, 6, 8 (the last masked).

No BlockSpecs: halo windows overlap, so every operand is passed whole (on
the Triton backend a ref is then a pointer into global memory) and each
program computes its own offsets. They are integer-array offsets into flat
per-sample views rather than strided `pl.ds` slices, because Pallas'
interpret mode supports only unit-stride slices and clamps out-of-range
slice starts, which would shift a halo load. Offsets are int32: one sample
must have fewer than 2**31 elements.

Interpret mode (`interpret=True`) runs the same kernels on any backend, for
tests; the public `method="pallas"` lowers for CUDA only and raises a
`ValueError` naming the platform anywhere else.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dw5d_jax._geometry import is_static
from dw5d_jax._primitive import out_shape
from dw5d_jax._spec import OPS, ConvSpec, Impl

_MAX_ELEMENTS = 2**31


class Tiles(NamedTuple):
  """Block sizes of one kernel's launch (powers of two) and Triton options.

  `d, h, w` tile output positions (`fwd`, `dk`) or input positions (`dx`);
  `c` tiles channels. `steps` (`dk` only) is how many `h`-tiles one program
  walks, keeping one accumulator per tap in registers, so the per-tap
  reductions and partial-sum rows are amortised over `steps` tiles.
  Defaults come from `default_tiles`, pending tuning on a GPU
  (`benchmarks/gpu.py --tune`).
  """

  d: int
  h: int
  w: int
  c: int
  steps: int = 1
  num_warps: int = 4
  num_stages: int = 1


def impl(*, interpret: bool = False, tiles: Mapping[str, Tiles] | None = None) -> Impl:
  """`method="pallas"` with options: `Impl` for `_primitive.conv` (tests, benchmarks).

  Args:
    interpret: run the kernels in Pallas interpret mode (any backend; slow;
      for tests). Otherwise the computation can only be lowered for CUDA.
    tiles: block sizes per kernel, `{"fwd": Tiles(...), "dx": ..., "dk": ...}`;
      a kernel left out gets `default_tiles`.

  Raises:
    ValueError: an unknown `tiles` key or bad tile sizes.
    TypeError: a `tiles` value that is not a `Tiles`.
  """
  tiles = dict(tiles or {})
  if set(tiles) - set(OPS):
    raise ValueError(f"method='pallas': `tiles` keys must be among {OPS}, got "
                     f"{sorted(tiles)}.")
  for t in tiles.values():
    _check_tiles(t)
  return Impl("pallas", bool(interpret), tuple(tiles.get(op) for op in OPS))


def check(spec: ConvSpec, batch: Any) -> None:
  """Rejects what the kernels cannot run: symbolic shapes, oversized samples."""
  if not spec.is_static() or not is_static(batch):
    raise ValueError(
        "method='pallas' needs static shapes, got symbolic sizes (input "
        f"{spec.in_spatial}, output {spec.out_spatial}); use method='conv' or 'shift' "
        "with jax.export shape polymorphism.")
  _check_size(spec)


def run(op: str, a: jax.Array, b: jax.Array, spec: ConvSpec, out_dtype: Any, *,
        interpret: bool, tiles: tuple[Any, Any, Any]) -> jax.Array:
  """Kernel `op` on channels-last operands (the module docstring has the three ops)."""
  check(spec, a.shape[0])
  t = tiles[OPS.index(op)] or default_tiles(spec, op)
  n = a.shape[0]
  c, m = spec.channels, spec.multiplier
  extent = spec.in_spatial if op == "dx" else spec.out_spatial
  blocks = [pl.cdiv(e, s) for e, s in zip(extent, (t.d, t.h, t.w))]
  body = {"fwd": _fwd_kernel, "dx": _dx_kernel, "dk": _dk_kernel}[op]
  body = functools.partial(body, g=spec, t=t, acc_dtype=np.dtype(spec.acc_dtype))
  result = out_shape(op, a.shape, spec)
  if op == "dk":  # one row of per-tap partial sums per program
    blocks[1] = pl.cdiv(blocks[1], t.steps)
    body = functools.partial(body, blocks=tuple(blocks))
    flat = (n * math.prod(blocks), math.prod(spec.window) * c * m)
    flat_type = spec.acc_dtype
  else:
    flat, flat_type = (n, math.prod(result[1:])), out_dtype
  out = pl.pallas_call(
      body, out_shape=jax.ShapeDtypeStruct(flat, flat_type),
      grid=(n, *blocks, pl.cdiv(c, t.c)), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      name=f"dw5d_{op}")(a.reshape(n, -1), b.reshape(n, -1) if op == "dk" else b.reshape(-1))
  if op == "dk":
    return out.sum(0).reshape(result).astype(out_dtype)
  return out.reshape(result)


def default_tiles(spec: ConvSpec, op: str) -> Tiles:
  """Block sizes for `op`, pending tuning on a GPU (see the module docstring).

  `fwd`, `dx`: up to 32 channels (128 bytes of float32 per position) times
  8x8 positions in H and W, one in D. `dk`: one row of up to 16 positions,
  walking up to 16 rows, with a tap count's worth of accumulators kept under
  about 8192 values per program. Tiles shrink to the extent so small
  problems do not launch mostly-masked programs.
  """
  extent = spec.in_spatial if op == "dx" else spec.out_spatial
  mp = _next_pow2(spec.multiplier)
  c = min(_next_pow2(spec.channels), max(32 // mp, 1))
  if op != "dk":
    return Tiles(d=1, h=min(_next_pow2(extent[1]), 8), w=min(_next_pow2(extent[2]), 8), c=c)
  taps = math.prod(spec.window)
  w = min(_next_pow2(extent[2]), 16)
  while w > 1 and taps * w * c * mp > 8192:
    w //= 2
  while c > 1 and taps * w * c * mp > 8192:
    c //= 2
  return Tiles(d=1, h=1, w=w, c=c, steps=min(extent[1], 16))


# ----------------------------------------------------------------------------
# The kernels.


def _fwd_kernel(x_ref, w_ref, y_ref, *, g: ConvSpec, t: Tiles, acc_dtype):
  tile = _Tile(g, t, g.out_spatial)
  base = [tile.pos[i] * g.strides[i] - g.lo[i] for i in range(3)]
  x_strides = _strides(g.in_spatial, g.channels)
  x_off = tile.offsets(base, x_strides, tile.chan, rank=4)
  acc = jnp.zeros(tile.shape, acc_dtype)
  for tap_index, tap in enumerate(itertools.product(*map(range, g.window))):
    xv = _load_tap(x_ref, tile, x_off, base, x_strides, tap, g)
    acc = acc + tile.spread(xv.astype(acc_dtype)) * tile.weights(w_ref, tap_index, acc_dtype)
  y_off = tile.offsets(tile.pos, _strides(g.out_spatial, g.channels * g.multiplier),
                       tile.chan * g.multiplier, rank=tile.rank, m=tile.m)
  plgpu.store(y_ref.at[tile.n, y_off], acc.astype(y_ref.dtype), mask=tile.out_mask())


def _dx_kernel(ct_ref, w_ref, dx_ref, *, g: ConvSpec, t: Tiles, acc_dtype):
  tile = _Tile(g, t, g.in_spatial)
  cm = g.channels * g.multiplier
  ct_strides = _strides(g.out_spatial, cm)
  acc = jnp.zeros(tile.shape, acc_dtype)
  for tap_index, tap in enumerate(itertools.product(*map(range, g.window))):
    # Input p receives output o at this tap iff o*s = p + lo - tap*r.
    outs, valid = [], []
    for i in range(3):
      q = tile.pos[i] + (g.lo[i] - tap[i] * g.dilations[i])
      s = g.strides[i]
      if s == 1:
        outs.append(q)
        valid.append((q >= 0) & (q < g.out_spatial[i]))
      else:
        qc = jnp.maximum(q, 0)  # non-negative, so div and rem are floor div and mod
        o = lax.div(qc, np.int32(s))
        outs.append(o)
        valid.append((q >= 0) & (lax.rem(qc, np.int32(s)) == 0) & (o < g.out_spatial[i]))
    off = tile.offsets(outs, ct_strides, tile.chan * g.multiplier, rank=tile.rank, m=tile.m)
    mask = tile.mask(valid, rank=tile.rank)
    ctv = plgpu.load(ct_ref.at[tile.n, off], mask=mask, other=0)
    acc = acc + ctv.astype(acc_dtype) * tile.weights(w_ref, tap_index, acc_dtype)
  if tile.m is not None:
    acc = acc.sum(-1)
  dx_off = tile.offsets(tile.pos, _strides(g.in_spatial, g.channels), tile.chan, rank=4)
  mask = tile.mask([tile.pos[i] < g.in_spatial[i] for i in range(3)], rank=4)
  plgpu.store(dx_ref.at[tile.n, dx_off], acc.astype(dx_ref.dtype), mask=mask)


def _dk_kernel(x_ref, ct_ref, part_ref, *, g: ConvSpec, t: Tiles, acc_dtype, blocks):
  taps = list(itertools.product(*map(range, g.window)))
  x_strides = _strides(g.in_spatial, g.channels)
  ct_strides = _strides(g.out_spatial, g.channels * g.multiplier)

  ids = _program_ids()

  def step(i, accs):  # the i-th of this program's `steps` h-tiles
    tile = _Tile(g, t, g.out_spatial, ids=(*ids[:2], ids[2] * t.steps + i, *ids[3:]))
    ct_off = tile.offsets(tile.pos, ct_strides, tile.chan * g.multiplier, rank=tile.rank,
                          m=tile.m)
    # Zero outside the output, so those positions add nothing whatever x holds.
    ctv = plgpu.load(ct_ref.at[tile.n, ct_off], mask=tile.out_mask(), other=0)
    ctv = ctv.astype(acc_dtype)
    base = [tile.pos[j] * g.strides[j] - g.lo[j] for j in range(3)]
    x_off = tile.offsets(base, x_strides, tile.chan, rank=4)
    return tuple(
        acc + tile.spread(_load_tap(x_ref, tile, x_off, base, x_strides, tap, g)
                          .astype(acc_dtype)) * ctv
        for acc, tap in zip(accs, taps))

  tile = _Tile(g, t, g.out_spatial, ids=ids)
  accs = tuple(jnp.zeros(tile.shape, acc_dtype) for _ in taps)
  accs = lax.fori_loop(0, t.steps, step, accs) if t.steps > 1 else step(0, accs)
  row = ((ids[0] * blocks[0] + ids[1]) * blocks[1] + ids[2]) * blocks[2] + ids[3]
  col = tile.chan * g.multiplier
  if tile.m is not None:
    col = _bcast(col, tile.shape[3:], 0) + _bcast(tile.m, tile.shape[3:], 1)
  cm = g.channels * g.multiplier
  for tap_index, acc in enumerate(accs):
    plgpu.store(part_ref.at[row, col + tap_index * cm], jnp.sum(acc, axis=(0, 1, 2)),
                mask=tile.chan_mask())


class _Tile:
  """Index vectors and masks of one program's tile (all shapes powers of two).

  `shape` is `(d, h, w, c)`, or `(d, h, w, c, mp)` with the multiplier padded
  to a power of two `mp` when M > 1; `m` is then the multiplier index vector.
  """

  def __init__(self, g: ConvSpec, t: Tiles, extent: tuple[int, int, int], ids=None):
    # `ids`: (n, d, h, w, c) block indices; the program's own by default. (A
    # kernel reads program ids outside loops: interpret mode needs that.)
    self.g, self.extent = g, extent
    ids = ids or _program_ids()
    self.n = ids[0]
    sizes = (t.d, t.h, t.w)
    self.pos = [ids[1 + i] * sizes[i] + lax.iota(jnp.int32, sizes[i]) for i in range(3)]
    self.chan = ids[4] * t.c + lax.iota(jnp.int32, t.c)
    self.has_chan_mask = g.channels % t.c != 0
    if g.multiplier == 1:
      self.m, self.shape = None, (*sizes, t.c)
    else:
      mp = _next_pow2(g.multiplier)
      self.m, self.shape = lax.iota(jnp.int32, mp), (*sizes, t.c, mp)
    self.rank = len(self.shape)

  def offsets(self, pos, strides, chan, *, rank, m=None):
    """Element offsets: sum_i pos[i] * strides[i] + chan (+ m), broadcast."""
    shape = self.shape[:rank]
    off = sum(_bcast(pos[i] * strides[i], shape, i) for i in range(3))
    off = off + _bcast(chan, shape, 3)
    if m is not None:
      off = off + _bcast(m, shape, 4)
    return off

  def mask(self, spatial, *, rank):
    """AND of per-axis 1D masks, the channel mask and (rank 5) the M mask."""
    shape = self.shape[:rank]
    mask = functools.reduce(jnp.logical_and, (_bcast(v, shape, i) for i, v in
                                              enumerate(spatial)))
    if self.has_chan_mask:
      mask = mask & _bcast(self.chan < self.g.channels, shape, 3)
    if rank == 5 and self.shape[4] != self.g.multiplier:
      mask = mask & _bcast(self.m < self.g.multiplier, shape, 4)
    return mask

  def out_mask(self):
    return self.mask([self.pos[i] < self.extent[i] for i in range(3)], rank=self.rank)

  def chan_mask(self):
    """Mask of a `(c,)` or `(c, mp)` per-channel vector."""
    shape = self.shape[3:]
    mask = _bcast(self.chan < self.g.channels, shape, 0)
    if self.m is not None:
      mask = mask & _bcast(self.m < self.g.multiplier, shape, 1)
    return mask

  def spread(self, v):
    """A rank-4 `(d, h, w, c)` value broadcast over the multiplier axis."""
    return v if self.m is None else lax.broadcast_in_dim(v, self.shape, (0, 1, 2, 3))

  def weights(self, w_ref, tap_index, acc_dtype):
    """Tap `tap_index` of the flat `(T*C*M,)` kernel, broadcast to the tile."""
    cm = self.g.channels * self.g.multiplier
    if self.m is None:
      w = plgpu.load(w_ref.at[tap_index * cm + self.chan], mask=self.chan_mask(), other=0)
      return _bcast(w.astype(acc_dtype), self.shape, 3)
    off = (tap_index * cm + _bcast(self.chan * self.g.multiplier, self.shape[3:], 0)
           + _bcast(self.m, self.shape[3:], 1))
    w = plgpu.load(w_ref.at[off], mask=self.chan_mask(), other=0).astype(acc_dtype)
    return lax.broadcast_in_dim(w, self.shape, (3, 4))


def _load_tap(x_ref, tile: _Tile, x_off, base, x_strides, tap, g: ConvSpec):
  """The `(d, h, w, c)` input tile that tap `tap` reads, zero outside the input."""
  delta = sum(tap[i] * g.dilations[i] * x_strides[i] for i in range(3))
  pos = [base[i] + tap[i] * g.dilations[i] for i in range(3)]
  mask = tile.mask([(p >= 0) & (p < g.in_spatial[i]) for i, p in enumerate(pos)], rank=4)
  return plgpu.load(x_ref.at[tile.n, x_off + delta], mask=mask, other=0)


def _program_ids():
  return tuple(pl.program_id(i) for i in range(5))


def _bcast(v, shape, axis):
  return lax.broadcast_in_dim(v, shape, (axis,))


def _strides(spatial, channels):
  """Element strides of D, H, W in a flat channels-last sample."""
  return (spatial[1] * spatial[2] * channels, spatial[2] * channels, channels)


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _check_tiles(t: Any) -> None:
  if not isinstance(t, Tiles):
    raise TypeError(f"method='pallas': `tiles` values must be Tiles, got {t!r}.")
  for name, v in zip(("d", "h", "w", "c"), t[:4]):
    if not isinstance(v, int) or v < 1 or v & (v - 1):
      raise ValueError(f"method='pallas': tile size `{name}` must be a power of two "
                       f"(Triton block shapes), got {v!r} in {t}.")
  if t.steps < 1:
    raise ValueError(f"method='pallas': `steps` must be positive, got {t.steps!r} in {t}.")


def _check_size(g: ConvSpec) -> None:
  c, m = g.channels, g.multiplier
  sizes = {"input": math.prod(g.in_spatial) * c, "output": math.prod(g.out_spatial) * c * m}
  for what, size in sizes.items():
    if size >= _MAX_ELEMENTS:
      raise ValueError(
          f"method='pallas': one sample of the {what} has {size} elements; the kernels "
          f"index a sample with int32 offsets, so it must have fewer than 2**31. Use "
          f"method='conv'.")
