"""The `"conv2d"` lowering: a depthwise convolution as grouped 2D convolutions only.

For export targets whose converters know a 2D depthwise convolution but
no 3D one (LiteRT: `_policy.decide` picks it for the target `"litert"`).
`jax2tf` lowers the ops on CPU to the portable "shift" computation, which
the LiteRT converter turns into an elementwise graph (PAD, SLICE, MUL, ADD
per tap); XNNPACK runs it 5.5-8.3x slower than a DEPTHWISE_CONV_2D graph
on W1/W2-size ops (benchmarks/RESULTS.md, "LiteRT (TFLite) export"). This
lowering traces to grouped 2D convolutions that the converter legalises to
DEPTHWISE_CONV_2D:

* a convolution with a carried spatial axis (2D per slice, rank-4 input):
  the `"conv"` lowering (`_conv.py`), which folds the carried axis into
  batch;
* a true 3D convolution: one 2D convolution over (H, W) per depth tap `t`,
  on the strided depth slice `o * sd + t * rd` of the padded input (the
  depth axis folded into batch), the `kd` results added. XLA's 3D grouped
  convolution would become TensorFlow's `Conv3D`, which LiteRT has only
  without groups (a Flex op). Stacking the taps into channels for a single
  convolution, as `interop.tf_depthwise_conv3d` does, measured 1.4-2.1x
  slower under XNNPACK on W2 than adding per-tap results (it copies the
  input `kd` times).
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

from dw5d_jax import _conv, _modes
from dw5d_jax._spec import ConvSpec


def depthwise2d_lowering(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """Rank-5 `x` by `(kd, kh, kw, C, M)` `kernel` with 2D grouped convolutions only.

  Worked example, depth only: D=5, kd=3, sd=2, rd=1, SAME: out 3, pads (1, 1),
  padded size 7 (tight: exactly (3 - 1) * 2 + 3 = 7). Tap t reads padded
  depths t, t + 2, t + 4 (`spec.tap_slice(0, t)`): [0:5:2], [1:6:2], [2:7:2].
  Border modes (`padding_mode`) pad x by mode first (`_modes.pad`: a zero
  pad, slices and reversals written in place).
  """
  if spec.has_modes:
    x, spec = _modes.pad(x, spec), _modes.padded_spec(spec)
  if any(spec.carried(i) for i in range(3)):
    return _conv.conv(x, kernel, spec, spec.out_dtype)
  if not spec.channels_last:
    x = x.transpose(0, 2, 3, 4, 1)
  kd, od = spec.window[0], spec.out_spatial[0]
  lo, hi = spec.tight_padding(0)
  x = lax.pad(x, np.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0), (0, 0, 0), (0, 0, 0),
                                         (0, 0, 0)])
  # Each tap: a 2D depthwise convolution over (H, W) with the depth axis carried.
  per_tap = spec._replace(
      channels_last=True, window=(1, *spec.window[1:]), strides=(1, *spec.strides[1:]),
      dilations=(1, *spec.dilations[1:]), padding=((0, 0), *spec.padding[1:]),
      in_spatial=(od, *spec.in_spatial[1:]))
  y = None
  for t in range(kd):
    start, limit, stride = spec.tap_slice(0, t)
    part = _conv.conv(x[:, start:limit:stride], kernel[t:t + 1], per_tap, spec.acc_dtype)
    y = part if y is None else y + part
  y = y.astype(spec.out_dtype)
  return y if spec.channels_last else y.transpose(0, 4, 1, 2, 3)
