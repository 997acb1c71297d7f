"""Picks a lowering for a normalised convolution.

`method="auto"` resolves per platform when the computation is lowered (with
`lax.platform_dependent`), so one traced function exported for several
platforms (`jax.export`, jax2tf) uses the right lowering on each:

* CPU: `"shift"`. XLA's CPU grouped convolution is a generic loop nest; the
  fused shift-and-add pass is 10-70x faster (see benchmarks/RESULTS.md).
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
