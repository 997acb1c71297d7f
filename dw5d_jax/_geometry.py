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


class ConvSpec(NamedTuple):
  """A checked, normalised depthwise convolution: what every lowering consumes.

  Always a 3D depthwise convolution of a rank-5 array: `x` is
  `(N, D, H, W, C)` (channels-last) or `(N, C, D, H, W)`, the kernel
  `(kd, kh, kw, C, M)`. A spatial axis that is not convolved (the slice
  axis of a per-slice 2D convolution, or the unit `D` of a rank-4 input) has
  window 1, stride 1, dilation 1 and padding `(0, 0)`: it is carried.
  Per-axis tuples are in `D, H, W` order; `padding` holds resolved
  `(lo, hi)` pairs (ints, or symbolic dimensions under `jax.export`).
  """

  channels_last: bool
  window: tuple[int, int, int]
  strides: tuple[int, int, int]
  dilations: tuple[int, int, int]
  padding: tuple[tuple[Any, Any], ...]
  in_spatial: tuple[Any, Any, Any]
  out_spatial: tuple[Any, Any, Any]
  channels: int
  multiplier: int
  acc_dtype: Any
  out_dtype: Any
  precision: Any

  @property
  def spatial_axes(self) -> tuple[int, int, int]:
    """Positions of `D, H, W` in the rank-5 array."""
    return (1, 2, 3) if self.channels_last else (2, 3, 4)

  @property
  def channel_axis(self) -> int:
    return 4 if self.channels_last else 1

  @property
  def lo(self) -> tuple[Any, Any, Any]:
    """The low pads: output 0 reads input `-lo` at tap 0."""
    return tuple(p[0] for p in self.padding)

  def effective(self, i: int) -> int:
    return effective(self.window[i], self.dilations[i])

  def tight_padding(self, i: int) -> tuple[Any, Any]:
    """`(lo, hi')` along spatial axis `i`, `hi'` from `tight_high`."""
    lo = self.padding[i][0]
    return lo, tight_high(self.in_spatial[i], self.window[i], self.strides[i],
                          self.dilations[i], lo, self.out_spatial[i])

  def transpose_padding(self, i: int) -> tuple[Any, Any]:
    """The input gradient's pads along axis `i` (see `transpose_pads`)."""
    return transpose_pads(self.window[i], self.dilations[i], *self.tight_padding(i))

  def tap_slice(self, i: int, t: int) -> tuple[Any, Any, int]:
    """Tap `t`'s slice of the tightly padded input along axis `i`."""
    return tap_slice(t, self.strides[i], self.dilations[i], self.out_spatial[i])

  def carried(self, i: int) -> bool:
    """Whether spatial axis `i` is passed through untouched."""
    return (self.window[i] == 1 and self.strides[i] == 1 and self.dilations[i] == 1
            and all(is_static(p) and p == 0 for p in self.padding[i]))

  def is_static(self) -> bool:
    """Whether every size and pad is a plain int (no symbolic dimension)."""
    return is_static(*self.in_spatial, *self.out_spatial,
                     *(p for pair in self.padding for p in pair))
