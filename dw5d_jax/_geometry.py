"""The index arithmetic of a depthwise convolution, in one place.

Along one axis: input size `n`, window `k`, stride `s`, dilation `r`,
effective window `e = (k - 1) * r + 1`, padding `(lo, hi)`. Output position
`o` reads, at tap `t`, input position `o * s + t * r - lo`; positions outside
`[0, n)` are the padding. Every lowering, the TF ops, the layers and the
command line get their sizes, pads, tap slices and halos from here (the
float64 reference, `_reference.py`, re-derives them on purpose).

Padding rules (TensorFlow's for SAME and VALID):

* ``"SAME"``: `out = ceil(n / s)`; the total padding
  `max((out - 1) * s + e - n, 0)` is split with the smaller half low.
  Worked example: n=6, k=3, r=1, s=2: out=3, total=max(2*2+3-6, 0)=1, so
  pads (0, 1): outputs read padded positions 0, 2, 4 (+ taps 0..2).
* ``"VALID"``: no padding, `out = floor((n - e) / s) + 1`.
* ``"CAUSAL"``: the whole reach low, pads `(e - 1, 0)`, so output `o` reads
  only inputs at or before `o * s`; `out = ceil(n / s)`, as for SAME.
* explicit `(lo, hi)`: `out = floor((n + lo + hi - e) / s) + 1`.

Border modes (`padding_mode`, numpy.pad's meanings) say what the padding
holds: `source` maps a position outside `[0, n)` to the input position
whose value it takes. With n=4 (inputs a b c d) and pads (2, 2):

    zeros      0 0 | a b c d | 0 0
    reflect    c b | a b c d | c b     -p,      2(n-1) - p
    symmetric  b a | a b c d | d c     -1 - p,  2n - 1 - p
    edge       a a | a b c d | d d     0,       n - 1
    circular   c d | a b c d | a b     p mod n

A single reflection must suffice, so reflect pads at most `n - 1` per
side, symmetric and circular at most `n` (PyTorch's limits; numpy.pad
repeats the reflection instead). The native CPU kernels zero-pad, and a
mode is added there as a correction on the border only (`_modes.py`):
`face` gives the rows of outputs that read one side's padding along an
axis and the slab of padded positions they read.

Sizes may be Python ints, JAX symbolic dimensions (`jax.export` shape
polymorphism) or TensorFlow int32 scalars (sizes unknown while tracing a
`tf.function`): the arithmetic uses only `+ - * //` and `maximum`.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import core as jax_core

SPATIAL = "DHW"
PADDING_KINDS = ("SAME", "VALID", "CAUSAL")
MODES = ("zeros", "reflect", "symmetric", "edge", "circular")
ZEROS = ("zeros",) * 3

Size = Any  # an int, a JAX symbolic dimension or a TF int32 scalar
Pad = Any  # "SAME", "VALID", "CAUSAL" or a (lo, hi) pair


def is_static(*sizes: Size) -> bool:
  """Whether every size is a plain int (not symbolic, not a tensor)."""
  return all(isinstance(d, (numbers.Integral, np.integer)) for d in sizes)


def maximum(a: Size, b: Size) -> Size:
  """`max(a, b)` for ints, JAX symbolic dimensions and TF int32 scalars."""
  if is_static(a, b):
    return max(a, b)
  if jax.export.is_symbolic_dim(a) or jax.export.is_symbolic_dim(b):
    return jax_core.max_dim(a, b)
  return (a + b + abs(a - b)) // 2  # a TF scalar (this module never imports TF)


def effective(k: int, r: int) -> int:
  """The reach of a window of `k` taps with dilation `r`."""
  return (k - 1) * r + 1


def pads(n: Size, k: int, s: int, r: int, padding: Pad) -> tuple[Size, Size]:
  """`(lo, hi)` that `padding` means along an axis of size `n`."""
  e = effective(k, r)
  if padding == "SAME":
    total = maximum((same_size(n, s) - 1) * s + e - n, 0)
    return total // 2, total - total // 2
  if padding == "VALID":
    return 0, 0
  if padding == "CAUSAL":
    return e - 1, 0
  return padding[0], padding[1]


def same_size(n: Size, s: int) -> Size:
  """`ceil(n / s)`: the output size of SAME and CAUSAL padding."""
  return (n + s - 1) // s


def output_size(n: Size, k: int, s: int, r: int, padding: Pad) -> Size:
  """The output size along an axis (below 1: the window does not fit)."""
  if padding in ("SAME", "CAUSAL"):
    return same_size(n, s)
  lo, hi = pads(n, k, s, r, padding)
  return (n + lo + hi - effective(k, r)) // s + 1


def resolve(n: Size, k: int, s: int, r: int, padding: Pad) -> tuple[Size, Size, Size]:
  """`(lo, hi, out)` along an axis."""
  lo, hi = pads(n, k, s, r, padding)
  return lo, hi, output_size(n, k, s, r, padding)


def pad_bound(k: int, r: int, padding: Pad) -> tuple[int, int]:
  """Static upper bounds on `(lo, hi)` for any input size.

  SAME pads `max((ceil(n / s) - 1) * s + e - n, 0) <= e - 1` in total
  (`(ceil(n / s) - 1) * s <= n - 1`), the smaller half low.
  """
  e = effective(k, r)
  if padding == "SAME":
    return (e - 1) // 2, e - 1 - (e - 1) // 2
  if padding in ("VALID", "CAUSAL"):
    return pads(1, k, 1, r, padding)
  return padding[0], padding[1]


def min_input_size(k: int, r: int, padding: Pad) -> int:
  """The smallest input size with a non-empty output (any stride)."""
  if padding in ("SAME", "CAUSAL"):
    return 1
  lo, hi = (0, 0) if padding == "VALID" else padding
  return max(effective(k, r) - lo - hi, 1)


def tight_high(n: Size, k: int, s: int, r: int, lo: Size, out: Size) -> Size:
  """The high pad that makes the padded size exactly `(out - 1) * s + e`.

  Positions past that are never read, so it gives the same result as the
  full high pad; negative, it crops. With symbolic sizes it also lets JAX
  prove slice bounds, which `max(...)` in the SAME rule otherwise blocks.
  """
  return (out - 1) * s + effective(k, r) - n - lo


def transpose_pads(k: int, r: int, lo: Size, hi_tight: Size) -> tuple[Size, Size]:
  """Pads of the input gradient as a stride-1 convolution of the cotangent.

  The cotangent, dilated by the stride (`s - 1` zeros between entries),
  padded by `(e - 1 - lo, e - 1 - hi)` and convolved VALID with the flipped
  kernel gives the input gradient. Worked example: n=5, k=3, r=1, s=2,
  SAME: out=3, pads (1, 1), tight high pad 0. The cotangent `[c0, c1, c2]`
  dilates to `[c0, 0, c1, 0, c2]`, is padded by (1, 2) to length 8 =
  n + e - 1, and the VALID convolution gives the 5 input positions.
  """
  e = effective(k, r)
  return e - 1 - lo, e - 1 - hi_tight


def tap_slice(t: int, s: int, r: int, out: Size) -> tuple[Size, Size, int]:
  """`(start, limit, stride)` in padded coordinates of the positions tap `t` reads.

  Worked example: n=7, k=3, r=2, s=2, SAME: e=5, out=4, pads (2, 2). Tap 2
  reads padded positions 4, 6, 8, 10: `(4, 11, 2)`.
  """
  start = t * r
  return start, start + (out - 1) * s + 1, s


def input_span(o_start: Size, o_stop: Size, k: int, s: int, r: int,
               lo: Size) -> tuple[Size, Size]:
  """The input positions `[first, stop)` that outputs `[o_start, o_stop)` read.

  Positions may lie outside `[0, n)` (in the padding). A block of outputs
  that owns input rows `[a, b)` needs `a - first` rows before them and
  `stop - b` after: its halo. Worked example: k=3, r=1, s=1, lo=1: outputs
  [8, 16) read inputs [7, 17), one row each side of [8, 16).
  """
  return o_start * s - lo, (o_stop - 1) * s + effective(k, r) - lo


def _min(a: Any, b: Any) -> Any:
  return (a + b - abs(a - b)) // 2


def _max(a: Any, b: Any) -> Any:
  return (a + b + abs(a - b)) // 2


def source(mode: str, p: Any, n: Size) -> Any:
  """The input position whose value `mode` puts at position `p` (in `[0, n)`: `p`).

  `p` is an int or an integer array (NumPy, JAX or TF), `n` the axis size;
  only `+ - // % abs` are used, so it works on all of them. Positions must
  be within the mode's reach (`mode_limit`). Worked example, n=4, p=-2:
  reflect 2, symmetric 1, edge 0, circular 2; p=5: reflect 1, symmetric 2,
  edge 3, circular 1. For `"zeros"` (which reads no input outside `[0, n)`)
  it returns `p`.
  """
  if mode == "reflect":
    return (n - 1) - abs((n - 1) - abs(p))
  if mode == "symmetric":
    q = _max(p, -1 - p)
    return _min(q, 2 * n - 1 - q)
  if mode == "edge":
    return _min(_max(p, 0), n - 1)
  if mode == "circular":
    return p % n
  return p


def mode_limit(mode: str, n: Size) -> Size | None:
  """The widest padding per side that `mode` fills along an axis of size `n` (None: any)."""
  if mode == "reflect":
    return n - 1
  if mode in ("symmetric", "circular"):
    return n
  return None


def min_size_for_mode(mode: str, pad: int) -> int:
  """The smallest axis size on which `mode` can fill `pad` positions per side."""
  return pad + 1 if mode == "reflect" else pad if mode in ("symmetric", "circular") else 1


class Face(NamedTuple):
  """The outputs reading one side's padding along an axis, and what they read.

  Outputs `[o_start, o_stop)` read padded positions `[p_start - pads[0],
  p_stop + pads[1])` (input coordinates): the padding positions `[p_start,
  p_stop)` of that side, and `pads` other positions next to them (inputs,
  or the other side's padding) that the face leaves to other terms.
  """

  o_start: int
  o_stop: int
  p_start: int
  p_stop: int
  pads: tuple[int, int]


def face(n: int, k: int, s: int, r: int, lo: int, out: int, side: str) -> Face | None:
  """The low (`side="lo"`) or high padding's `Face` along an axis; None if never read.

  Output `o` reads `o * s + t * r - lo`: below 0 at tap 0 exactly when
  `o * s < lo`, at or past `n` at its last tap exactly when
  `o * s + e - 1 - lo >= n`. Worked example: n=5, k=3, r=1, s=2, pads
  (1, 1), out=3: the low face is output 0 reading [-1, 2), padding [-1, 0)
  and pads (0, 2); the high face is output 2 reading [3, 6), padding
  [5, 6) and pads (2, 0).
  """
  e = effective(k, r)
  if side == "lo":
    o_start, o_stop = 0, min(-(-lo // s), out)
  else:
    o_start, o_stop = min(max(-(-(n + lo - e + 1) // s), 0), out), out
  if o_stop <= o_start:
    return None
  first, stop = input_span(o_start, o_stop, k, s, r, lo)
  p_start, p_stop = (first, min(stop, 0)) if side == "lo" else (max(first, n), stop)
  if p_stop <= p_start:
    return None
  return Face(o_start, o_stop, p_start, p_stop, (p_start - first, stop - p_stop))




class Blocks(NamedTuple):
  """One spatial axis split into `parts` blocks: what each block reads from its neighbours.

  An op on a split axis exchanges one operand (x for the convolution and the
  kernel gradient, the cotangent for the input gradient), whose block `i`
  owns rows `[i * size, (i + 1) * size)` of `total` (the last blocks padded
  when `parts` does not divide `total`: rows from `total` on are zeros).
  Each block receives `halo = (before, after)` rows from the blocks below
  and above it (from several blocks when a halo is wider than one): the
  most any block's own results need from existing rows. `pad = (lo, hi)`
  zero rows go around that (padding past the array's ends, never sent).
  The op reads `window` rows of this extended block from row `starts[i]`,
  as the local problem `local = (n, out, (lo, hi))` along this axis; its
  result holds the block's own `rows` rows of the op's result from row
  `crops[i]` (0 but for the input gradient with a stride that does not
  divide the block). Blocks past the end of the result compute padding,
  which is never read.

  Where every block is the same problem (`rows * s == size` for the
  convolution, `size * s == rows` for the input gradient: the splits line
  up with the stride), `pieces` gives the same result without the
  extended block (a copy of the block): the op on the block's own rows,
  with its global padding, plus small ops on the halos alone added to the
  rows they reach (the ops are linear). Else `pieces` is empty.
  """

  size: int
  total: int
  rows: int
  halo: tuple[int, int]
  pad: tuple[int, int]
  starts: tuple[int, ...]
  window: int
  local: tuple[int, int, tuple[int, int]]
  crops: tuple[int, ...]
  pieces: tuple[Piece, ...] = ()


class Piece(NamedTuple):
  """One term of a split op (`Blocks.pieces`): the op on some rows, added to some rows.

  It reads rows `rows` of its `source` (-1: the halo before the block, 0:
  the block's own rows, 1: the halo after it; rows counted from the
  source's first) and adds the local problem `local = (n, out, (lo, hi))`
  to rows `result` of the block's result (for the kernel gradient: it
  reads those rows of the block's cotangent).
  """

  source: int
  rows: tuple[int, int]
  result: tuple[int, int]
  local: tuple[int, int, tuple[int, int]]


def output_blocks(n: int, out: int, parts: int, k: int, s: int, r: int, lo: int) -> Blocks:
  """The convolution (and kernel gradient) with its outputs split into `parts` blocks.

  Output block `i` is `[i * bo, (i + 1) * bo)`, `bo = ceil(out / parts)`,
  the way XLA tiles the result; it reads the input rows `input_span` gives
  (outside `[0, n)`: the padding, zeros) from the input blocks of
  `ceil(n / parts)` rows, and computes them as a VALID convolution of
  `(bo - 1) * s + e` rows. Worked example: n=16, k=3, s=1, r=1, SAME (lo=1),
  4 parts: blocks of 4 rows, each reads one row from either neighbour:
  halo (1, 1), window 6 from row 0 of the extended block of 6.
  """
  b, bo, e = -(-n // parts), -(-out // parts), effective(k, r)
  window = (bo - 1) * s + e
  firsts = [input_span(i * bo, 0, k, s, r, lo)[0] for i in range(parts)]
  needs = {i: input_span(i * bo, min((i + 1) * bo, out), k, s, r, lo)
           for i in range(parts) if i * bo < out}
  blocks = _blocks(b, n, bo, parts, firsts, window, needs, (window, bo, (0, 0)), (0,) * parts)
  if parts == 1 or b != bo * s:
    return blocks
  before, after = blocks.halo
  pieces = (_piece(0, 0, (0, b), (0, bo), s, e, lo, False),
            _piece(-1, -before, (-before, 0), (0, min(bo, -(-lo // s))), s, e, lo, False),
            _piece(1, b, (b, b + after), (max(0, -(-(b - e + 1 + lo) // s)), bo), s, e, lo,
                   False))
  return blocks._replace(pieces=tuple(p for p in pieces if p is not None))


def input_blocks(n: int, out: int, parts: int, k: int, s: int, r: int, lo: int) -> Blocks:
  """The input gradient with its rows split into `parts` blocks of `ceil(n / parts)`.

  Block `i` computes the input-gradient rows from `a = floor(i * b / s) * s`
  (its first row, moved down to a multiple of the stride so that every
  block is the same local problem) from the cotangent rows that reach them:
  a transposed convolution of `m` cotangent rows with low pad `lo'` (the
  smallest `>= e - s` congruent to `lo` modulo `s`, so that no earlier
  cotangent row reaches row `a`). Worked example: n=8, k=3, s=2, SAME
  (pads (0, 1), out=4), 2 parts: input blocks of 4, cotangent blocks of 2;
  block 1 (rows 4..7) needs cotangent rows 1..3: halo (1, 0), local problem
  n=4, out=3, pads (2, 1).
  """
  b, bo, e = -(-n // parts), -(-out // parts), effective(k, r)
  n_loc = b if b % s == 0 else b + s - 1
  base = max(e - s, 0)
  lo_loc = base + (lo - base) % s
  m = (n_loc - 1 + lo_loc) // s + 1
  hi_loc = max((m - 1) * s + e - n_loc - lo_loc, 0)
  firsts_in = [i * b // s * s for i in range(parts)]
  firsts = [(a + lo - lo_loc) // s for a in firsts_in]
  # Cotangent rows o reach input rows [p0, p1) when p0 <= o*s + t*r - lo < p1.
  needs = {i: (-((e - 1 - i * b - lo) // s), (min((i + 1) * b, n) - 1 + lo) // s + 1)
           for i in range(parts) if i * b < n}
  crops = _clamped([i * b - a for i, a in enumerate(firsts_in)], n_loc - b)
  blocks = _blocks(bo, out, b, parts, firsts, m, needs, (n_loc, m, (lo_loc, hi_loc)), crops)
  if parts == 1 or b != bo * s:
    return blocks
  before, after = blocks.halo
  pieces = (_piece(0, 0, (0, b), (0, bo), s, e, lo, True),
            _piece(-1, -before, (0, b), (-before, 0), s, e, lo, True),
            _piece(1, bo, (0, b), (bo, bo + after), s, e, lo, True))
  return blocks._replace(pieces=tuple(p for p in pieces if p is not None))


def _piece(source: int, first: int, inputs: tuple[int, int], outputs: tuple[int, int], s: int,
           e: int, lo: int, transposed: bool) -> Piece | None:
  """The `Piece` relating input rows `inputs` and output rows `outputs` (block frame).

  Output `o` reads input `o*s + t*r - lo`; the inputs are cut to those the
  outputs read. The source is the inputs (convolution) or, `transposed`,
  the outputs (the input gradient's cotangent); `first`: the source's
  first row in the block's frame.
  """
  (p0, p1), (o0, o1) = inputs, outputs
  p0, p1 = max(p0, o0 * s - lo), min(p1, (o1 - 1) * s + e - lo)
  if o1 <= o0 or p1 <= p0:
    return None
  lo_p = lo + p0 - o0 * s
  local = (p1 - p0, o1 - o0, (lo_p, (o1 - o0 - 1) * s + e - (p1 - p0) - lo_p))
  if transposed:
    return Piece(source, (o0 - first, o1 - first), (p0, p1), local)
  return Piece(source, (p0 - first, p1 - first), (o0, o1), local)


def _blocks(size: int, total: int, rows: int, parts: int, firsts: list[int], window: int,
            needs: dict[int, tuple[int, int]], local, crops) -> Blocks:
  """`Blocks` from each block's window start and the rows its own results need."""
  needs = {i: (max(a, 0), min(z, total)) for i, (a, z) in needs.items()}
  before = max([0, *(i * size - a for i, (a, z) in needs.items() if z > a)])
  after = max([0, *(z - (i + 1) * size for i, (a, z) in needs.items() if z > a)])
  low = [i * size - before for i in range(parts)]  # first row of the exchanged rows
  pad_lo = max([0, *(low[i] - firsts[i] for i in needs)])
  pad_hi = max([0, *(firsts[i] + window - (low[i] + before + size + after) for i in needs)])
  extent = pad_lo + before + size + after + pad_hi
  starts = _clamped([firsts[i] - low[i] + pad_lo for i in range(parts)], extent - window)
  return Blocks(size, total, rows, (before, after), (pad_lo, pad_hi), starts, window, local,
                crops)


def _clamped(values: list[int], top: int) -> tuple[int, ...]:
  return tuple(min(max(v, 0), top) for v in values)

def is_causal(k: int, r: int, padding: Pad) -> bool:
  """Whether `padding` pads `(e - 1, 0)` along an axis of any size.

  That is `"CAUSAL"`, the pair `(e - 1, 0)`, or, for a window of one frame
  (`e == 1`, nothing to pad), `"SAME"` and `"VALID"` too.
  """
  e = effective(k, r)
  if isinstance(padding, str):
    return padding == "CAUSAL" or e == 1
  return tuple(padding) == (e - 1, 0)


# ----------------------------------------------------------------------------
# Streaming along a causal axis (`_streaming.py`).
#
# With CAUSAL padding along an axis (time), output `o` reads input frames
# `o * s + t * r - (e - 1)`, t = 0..k-1: frames `o*s - (e - 1) .. o*s`. It can
# be computed as soon as frame `o * s`, its *anchor*, arrives, from that frame
# and the `e - 1` before it. A stream therefore keeps the last `e - 1` frames
# (the history; zeros before the first chunk, which is the causal padding) and
# the *phase*: how many frames of the next chunk come before the next anchor,
# `(-p) mod s` after `p` frames. A step reads `[history; chunk]` from the
# phase on and returns a fixed number of output *slots*, `ceil(L / s)` for a
# chunk of `L` frames; `emitted` of them (all but possibly the last) are real.
#
# Worked example: k=3, r=1 (e=3), s=2, chunks of L=3 frames. Anchors are the
# frames 0, 2, 4, 6, ... Step 1 (frames 0-2, phase 0): 2 slots, anchors 0 and
# 2, both real; phase (0 - 3) mod 2 = 1. Step 2 (frames 3-5, phase 1): anchor
# 4 only, so 1 real slot of 2; phase (1 - 3) mod 2 = 0. Concatenating the real
# slots gives outputs 0, 1, 2: the full op's ceil(6 / 2) = 3 outputs.
#
# These work on ints and on traced integer scalars alike (`+ - * // %` only).


def stream_ring(k: int, r: int) -> int:
  """Slots of a stream's ring buffer: the `e - 1` kept frames and a free one.

  None (0) when nothing is kept, `e == 1`.
  """
  e = effective(k, r)
  return e if e > 1 else 0


def stream_oldest(head: Size, size: int) -> Size:
  """The ring slot of the oldest kept frame, the one after the free slot `head`.

  Worked example: e=3, slots [f4, f2, f3] after frames f2, f3, f4 with head
  0 (f4 just written there): the window in order is f2, f3, f4 = slots 1, 2,
  0, from slot `oldest = 1`; slot j meets tap `(j - 1) mod 3`, i.e. the
  taps rotated by 1.
  """
  return (head + 1) % size


def stream_slots(length: Size, s: int) -> Size:
  """Output frames a step of `length` frames returns: `ceil(length / s)`."""
  return same_size(length, s)


def stream_window(length: Size, k: int, s: int, r: int) -> Size:
  """Frames of `[history; chunk]`, from the phase on, that the slots read."""
  return (stream_slots(length, s) - 1) * s + effective(k, r)


def stream_tail(length: Size, s: int) -> Size:
  """Zero frames appended to `[history; chunk]` so the window fits at any phase.

  The window ends at `phase + (slots - 1) * s + e <= slots * s + e - 1`, and
  `[history; chunk]` has `e - 1 + length` frames; a last slot whose anchor
  lies past the chunk reads these zeros (and is not emitted).
  """
  return stream_slots(length, s) * s - length


def stream_emitted(valid: Size, phase: Size, s: int) -> Size:
  """Anchors among the first `valid` frames of a chunk: the real output slots.

  `ceil((valid - phase) / s)`, never negative because `phase < s`.
  """
  return (valid - phase + s - 1) // s


def stream_phase(phase: Size, valid: Size, s: int) -> Size:
  """The phase after a chunk of `valid` frames: `(phase - valid) mod s`."""
  return (phase - valid) % s
