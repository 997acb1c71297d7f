"""Picks a lowering for a normalised convolution.

`method="auto"` resolves per platform when the computation is lowered (with
`lax.platform_dependent`), so one traced function exported for several
platforms (`jax.export`, jax2tf) uses the right lowering on each:

* CPU: `"shift"`, for every configuration. XLA's CPU grouped convolution is
  a generic loop nest: on the issue's workloads (benchmarks/RESULTS.md, tuned
  allocator, 2 cores) `"shift"` was faster in every cell, forward and
  backward: W1 (2D 3x3) 8.6x / 5.5x, W2 (3D 3x3x3) 190x / 56x, W3 (5x5,
  M=2, stride 2) 3.1x / 38x, W4 (dilated) 11x / 4.2x, W5 (bfloat16 3D)
  90x / 9.7x (default allocator: 2.3x to 176x).
  No measured configuration favours `"conv"` on CPU, so there is no
  per-configuration rule.
* everything else (GPU, TPU): `"conv"`, which XLA hands to cuDNN / the TPU
  convolution emitter, until measurements there say otherwise.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from dw5d_jax._args import ConvSpec
from dw5d_jax._conv import conv_lowering
from dw5d_jax._shift_primitive import shift_lowering

LOWERINGS = {
    "conv": conv_lowering,
    "shift": shift_lowering,
}


def lower(x: jax.Array, kernel: jax.Array, spec: ConvSpec, method: str) -> jax.Array:
  """Runs the lowering that `method` names (`"auto"` decides per platform)."""
  if method != "auto":
    return LOWERINGS[method](x, kernel, spec)
  return lax.platform_dependent(
      x, kernel,
      cpu=functools.partial(LOWERINGS["shift"], spec=spec),
      default=functools.partial(LOWERINGS["conv"], spec=spec),
  )
