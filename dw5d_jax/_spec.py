"""What a call is, once checked: the `ConvSpec`, the `Impl`, the op names.

Leaf types that every other module shares (the primitives, the policy, the
lowerings, the sharding rules), so none of them imports another to name
them:

* `ConvSpec`: a checked, normalised depthwise convolution (the geometry
  of `_geometry.py` on three axes, the layout, channels and dtypes);
* `Impl`: which code the user asked for (`method`, Pallas options) and the
  export target the op was traced for (`_target.py`);
* `OPS`: the three bilinear ops of `_primitive.dw5d_p`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dw5d_jax._geometry import ZEROS, effective, is_static, tap_slice, tight_high, transpose_pads

OPS = ("fwd", "dx", "dk")


class Impl(NamedTuple):
  """Which code computes the ops: the user's `method`, Pallas options, the export target.

  `tiles` holds one `_pallas.Tiles` (or None, the default) per op in `OPS`
  order; `interpret` runs the Pallas kernels in interpret mode (any
  platform, for tests). `target` is the export target the op was traced
  for (`_target.TARGETS`; None: not for a named export target), which the
  policy reads as a fact (`_policy.Facts.target`).
  """

  method: str = "auto"
  interpret: bool = False
  tiles: tuple[Any, Any, Any] = (None, None, None)
  target: str | None = None


class ConvSpec(NamedTuple):
  """A checked, normalised depthwise convolution: what every lowering consumes.

  Always a 3D depthwise convolution of a rank-5 array: `x` is
  `(N, D, H, W, C)` (channels-last) or `(N, C, D, H, W)`, the kernel
  `(kd, kh, kw, C, M)`. A spatial axis that is not convolved (the slice
  axis of a per-slice 2D convolution, or the unit `D` of a rank-4 input) has
  window 1, stride 1, dilation 1 and padding `(0, 0)`: it is carried.
  Per-axis tuples are in `D, H, W` order; `padding` holds resolved
  `(lo, hi)` pairs (ints, or symbolic dimensions under `jax.export`), and
  `modes` what fills them (`MODES`; `"zeros"` wherever there is no padding,
  carried axes included).
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
  modes: tuple[str, str, str] = ZEROS

  @property
  def has_modes(self) -> bool:
    """Whether some padding is filled by a mode other than zeros."""
    return self.modes != ZEROS

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
