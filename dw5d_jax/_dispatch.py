"""Picks a lowering for a normalised convolution.

`method="auto"` resolves per platform when the computation is lowered (with
`lax.platform_dependent`), so one traced function exported for several
platforms (`jax.export`, jax2tf) uses the right lowering on each:

* CPU: `"shift"`, for every configuration. Its lowering calls the native
  C++ kernels (`_native.py`) for float32/bfloat16 input where
  they were measured faster (`_native.worthwhile`), XLA's shift lowering
  elsewhere. XLA's CPU grouped convolution is a generic loop nest: on the
  issue's workloads (benchmarks/RESULTS.md, tuned allocator, 2 cores,
  native kernels) `"shift"` was faster in every cell, forward and
  backward: W1 (2D 3x3) 48x / 47x, W2 (3D 3x3x3) 379x / 259x, W3 (5x5,
  M=2, stride 2) 14x / 509x, W4 (dilated) 47x / 46x, W5 (bfloat16 3D)
  305x / 213x (the last run of 2026-11-25; two more that day: 16-691x). No measured configuration favours `"conv"` on CPU, so
  there is no per-configuration rule.
* CUDA GPUs: `gpu_choice(spec)`, a per-configuration table that is empty
  (so `"conv"`) until H100 measurements fill it (see `_GPU_CHOICE`).
* everything else (TPU, ROCm): `"conv"`, XLA's own convolution there, until
  measurements say otherwise.

`"pallas"` (dw5d_jax._pallas) is only ever used when named or when the GPU
table picks it: it lowers for CUDA alone.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

from dw5d_jax._args import ConvSpec
from dw5d_jax._conv import conv_lowering
from dw5d_jax._pallas import pallas_lowering
from dw5d_jax._shift_primitive import shift_lowering

LOWERINGS = {
    "conv": conv_lowering,
    "shift": shift_lowering,
    "pallas": pallas_lowering,
}

# --- method="auto" on CUDA GPUs: PENDING H100 MEASUREMENTS (issue 6) ---------
# benchmarks/gpu.py times conv, shift and pallas (and PyTorch) per workload on
# the H100. Once benchmarks/RESULTS.md has those numbers, map each
# configuration class to the method that won, citing the numbers, e.g.
#   ("3d", "float32"): "pallas",  # W2 fwd 0.31 ms vs conv 0.52 ms (RESULTS.md)
# Until then it is empty and every class keeps "conv", the pre-measurement
# choice. Keys: ("2d" when a spatial axis is carried, else "3d"; output dtype).
# Symbolic shapes (jax.export) always get "conv": "pallas" needs static ones.
_GPU_CHOICE: dict[tuple[str, str], str] = {}


def gpu_choice(spec: ConvSpec) -> str:
  """The lowering `method="auto"` uses for `spec` on a CUDA GPU."""
  if any(jax.export.is_symbolic_dim(d) for d in (*spec.in_spatial, *spec.out_spatial)):
    return "conv"
  kind = "2d" if any(spec.carried(i) for i in range(3)) else "3d"
  return _GPU_CHOICE.get((kind, np.dtype(spec.out_dtype).name), "conv")


def lower(x: jax.Array, kernel: jax.Array, spec: ConvSpec, method: str) -> jax.Array:
  """Runs the lowering that `method` names (`"auto"` decides per platform)."""
  if method != "auto":
    return LOWERINGS[method](x, kernel, spec)
  return lax.platform_dependent(
      x, kernel,
      cpu=functools.partial(LOWERINGS["shift"], spec=spec),
      cuda=functools.partial(LOWERINGS[gpu_choice(spec)], spec=spec),
      default=functools.partial(LOWERINGS["conv"], spec=spec),
  )
