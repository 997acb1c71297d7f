"""Which code computes a depthwise convolution: the whole decision, top to bottom.

A public op checks its arguments (`_args`) into a `ConvSpec` and binds the
primitive `_primitive.dw5d_p`; the gradients are the same primitive with
`op="dx"` or `"dk"`. When XLA lowers it for a platform, `implementation`
decides, in this order:

1. **Method -> lowering** (`lowering`). `"conv"`, `"shift"` and `"pallas"`
   are taken as named. `"auto"` depends on the platform being lowered for,
   so one traced function exported for several platforms (`jax.export`,
   jax2tf) uses the right lowering on each:

   * CPU: `"shift"`, for every configuration: XLA's CPU grouped convolution
     was 14-690x slower in every measured cell, forward and backward
     (benchmarks/RESULTS.md, "Method choice on CPU").
   * CUDA GPUs: `_GPU_CHOICE` per configuration class, `"conv"` (cuDNN)
     until GPU measurements fill it.
   * anything else (TPU, ROCm): `"conv"`, XLA's own convolution.

   `"pallas"` lowers for CUDA only, or anywhere in interpret mode (tests).
2. **Native or XLA** (`native_layout`): the shift lowering on CPU calls the
   native C++ kernels (`_native.py`) for float32/bfloat16 problems with
   static shapes, where they were measured faster (`worthwhile`), unless
   the lowering is for export (an exported artifact must not name a custom
   call that only this process knows). Everything else uses XLA's shift
   lowering (`_shift.py`), with the same results.
   A spec with border modes (`padding_mode`) is computed by `_modes.py`
   from zero-padding ops, which come back here: on the border alone where
   the native kernels run, from a padded copy elsewhere.
3. **Layout.** XLA's convolution and shift lowering take both layouts as
   they are (dimension numbers, axis positions); so do the native kernels
   (channels-first ones are vectorised along W), except where `transposed`
   says that transposing to channels-last around them is faster; Pallas
   kernels are channels-last only. Where an implementation does not take
   the spec's layout, its operands and result are transposed at the
   boundary (`_channels_last`), here and nowhere else.

A bias or activation (`bias=`, `activation=`) makes the op bind
`_epilogue.epilogue_p` instead; its forward and backward pass are fused
into the native kernels exactly where the convolution and its kernel
gradient would use them (`epilogue_implementation`) without border modes,
and everywhere else computed by the unfused formula over `dw5d_p`, which
takes the steps above.

The native library is built (or loaded from its cache) at trace time, by
`prepare`, the first time an op that may use it is traced with CPU as the
default backend; lowering only asks whether it is loaded. So the ~25 s
compile of a fresh machine happens at the user's first call, with its
warning if it fails, and never in the middle of XLA's lowering.
`DW5D_JAX_NATIVE` (`_native_build.mode`) switches the native kernels off
(`0`) or forces them wherever they apply (`all`, what the tests use).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dw5d_jax import _conv, _epilogue, _modes, _native, _native_build, _pallas, _shift
from dw5d_jax._geometry import ConvSpec, is_static
from dw5d_jax._primitive import Impl

NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))

# --- method="auto" on CUDA GPUs ---------------------------------------------
# Each configuration class maps to the method that measured fastest on a GPU
# (benchmarks/gpu.py, numbers cited from benchmarks/RESULTS.md). Keys: ("2d"
# when a spatial axis is carried, else "3d"; output dtype). No GPU has been
# measured yet, so it is empty and every class uses "conv" (cuDNN).
_GPU_CHOICE: dict[tuple[str, str], str] = {}

# Channels-first problems use the channels-first kernels (vectorised along
# the output width) from this output width on, for each op; narrower ones
# are transposed to channels-last where C % 4 == 0 (see `worthwhile`).
_CF_MIN_WIDTH = {"fwd": 12, "dx": 6, "dk": 6}

Fn = Callable[[jax.Array, jax.Array], jax.Array]


def prepare(spec: ConvSpec, impl: Impl, batch: Any) -> None:
  """Trace-time work for a call: checks Pallas limits, builds the native library."""
  if impl.method == "pallas":
    _pallas.check(spec, batch)
  if (impl.method in ("auto", "shift") and _native_build.mode() != "off"
      and jax.default_backend() == "cpu"):
    _native_build.status()  # builds or loads once per process; warns if it fails


def lowering(method: str, platform: str | None, spec: ConvSpec) -> str:
  """Step 1: the lowering that `method` means on `platform`."""
  if method != "auto":
    return method
  if platform == "cpu":
    return "shift"
  if platform == "cuda":
    return gpu_choice(spec)
  return "conv"


def gpu_choice(spec: ConvSpec) -> str:
  """The lowering `method="auto"` uses for `spec` on a CUDA GPU."""
  if not spec.is_static():  # "pallas" needs static shapes
    return "conv"
  kind = "2d" if any(spec.carried(i) for i in range(3)) else "3d"
  return _GPU_CHOICE.get((kind, np.dtype(spec.out_dtype).name), "conv")


def native_layout(ctx, spec: ConvSpec, op: str) -> str | None:
  """Step 2: `"as-is"` or `"transposed"` to use the native kernels for `op`, else None."""
  if ctx.module_context.lowering_parameters.for_export:
    return None
  if not spec.is_static() or not all(is_static(*a.shape) for a in ctx.avals_in):
    return None
  mode = _native_build.mode()
  if mode == "off" or (mode == "on" and not worthwhile(spec, op)):
    return None
  if not (all(np.dtype(a.dtype) in NATIVE_DTYPES for a in (*ctx.avals_in, *ctx.avals_out))
          and np.dtype(spec.acc_dtype) == np.float32):
    return None
  status = _native_build.loaded()
  if status is None or not status.active:
    return None
  return "transposed" if transposed(spec, op) else "as-is"


def worthwhile(spec: ConvSpec, op: str) -> bool:
  """Whether the native kernels beat XLA's shift lowering for `op` on `spec`.

  Measured (benchmarks/RESULTS.md, "Native kernel policy"). Channels-last:
  with every channel in a vector packet (`C % 4 == 0`) they were faster in
  every case; with channels left over, XLA's lowering (vectorised along
  `W * C`) won for `C <= 3` and in some backward passes. Channels-first:
  the channels-first kernels win from an output width of 12 (forward) or 6
  (gradients); narrower forward passes keep the earlier rule (transposed
  kernels where `C % 4 == 0` and the problem is strided or has more than 27
  taps, else XLA).
  """
  if spec.channels_last:
    return spec.channels % 4 == 0
  if op != "fwd" or spec.out_spatial[2] >= _CF_MIN_WIDTH[op]:
    return True
  return spec.channels % 4 == 0 and (
      any(s > 1 for s in spec.strides) or math.prod(spec.window) > 27)


def transposed(spec: ConvSpec, op: str) -> bool:
  """Step 3 for the native kernels: channels-first `op` transposed to channels-last.

  Only for outputs narrower than `_CF_MIN_WIDTH[op]` with `C % 4 == 0`,
  where that was measured faster (see `worthwhile`).
  """
  return (not spec.channels_last and spec.channels % 4 == 0
          and spec.out_spatial[2] < _CF_MIN_WIDTH[op])


def implementation(ctx, *, platform: str | None, op: str, spec: ConvSpec, impl: Impl,
                   out_dtype: Any) -> Fn:
  """The function computing `op` in the lowering `ctx` for `platform` (None: any other)."""
  platforms = (platform,) if platform else tuple(ctx.platforms or ctx.module_context.platforms)
  method = lowering(impl.method, platforms[0] if platform else None, spec)
  if spec.has_modes:
    # Border modes bind zero-padding ops, which come back here (`_modes.py`):
    # the native kernels get corrections on the border, the rest a padded copy.
    borders = (method == "shift" and platform == "cpu"
               and native_layout(ctx, spec, op) is not None)
    return _modes.implementation(op, spec, impl, out_dtype, borders=borders)
  if method == "pallas":
    bad = [p for p in platforms if p != "cuda"]
    if bad and not impl.interpret:
      raise ValueError(
          f"method='pallas' runs on CUDA GPUs only (a Pallas Triton kernel), but this "
          f"computation is being lowered for platform {bad[0]!r}. Use method='auto', "
          f"'conv' or 'shift' there.")
    run = functools.partial(_pallas.run, op, out_dtype=out_dtype, interpret=impl.interpret,
                            tiles=impl.tiles)
    return _channels_last(run, op, spec)
  if method == "shift" and platform == "cpu":
    layout = native_layout(ctx, spec, op)
    if layout is not None:
      run = functools.partial(_native_op, op, out_dtype=out_dtype)
      return _channels_last(run, op, spec) if layout == "transposed" else _bound(run, spec)
  module = _conv if method == "conv" else _shift
  run = functools.partial(getattr(module, _XLA_NAMES[op]), out_dtype=out_dtype)
  return _bound(run, spec)


_XLA_NAMES = {"fwd": "conv", "dx": "input_grad", "dk": "kernel_grad"}


def epilogue_implementation(ctx, *, platform: str | None, op: str, spec: ConvSpec, impl: Impl,
                            activation: str | None) -> Callable[..., Any] | None:
  """The fused native computation of an epilogue op where it runs, else None.

  `op` is `"fwd"` (`_epilogue.epilogue_p`: x, kernel, bias -> y) or
  `"grad"` (`_epilogue.epilogue_grad_p`: x, kernel, r, ct -> g, dk, db).
  None means the unfused formula (`_epilogue.forward_formula`,
  `grad_formula`), whose `dw5d_p` takes the steps above. So the epilogue is
  fused exactly where the convolution (`"fwd"`) or its kernel gradient
  (`"grad"`) would use the native kernels, in the same layout (transposed
  to channels-last around them where `transposed` says); on several
  devices, on each device's blocks (`_sharding.partitioned_epilogue`).
  """
  method = lowering(impl.method, platform, spec)
  if method != "shift" or platform != "cpu" or spec.has_modes:
    return None  # border modes: the formula's dw5d_p corrects the borders (`_modes`)
  layout = native_layout(ctx, spec, "fwd" if op == "fwd" else "dk")
  if layout is None:
    return None
  native = spec._replace(channels_last=True) if layout == "transposed" else spec
  if op == "fwd":
    def run(x, k, b):
      return _native.forward_epilogue(x, k, b, native, activation)

    data_in, data_out = (True, False, False), (True,)
  else:
    from_output = _epilogue.variant(activation, spec.out_dtype) == "output"

    def run(x, k, r, ct):
      return _native.epilogue_grad(x, k, r, ct, native, activation, from_output)

    data_in, data_out = (True, False, from_output, True), (True, False, False)
  if layout == "as-is":
    return run

  def transposed_run(*args):  # channels-first data operands and results, moved
    args = [jnp.moveaxis(a, 1, -1) if d else a for a, d in zip(args, data_in)]
    outs = run(*args)
    if op == "fwd":
      return jnp.moveaxis(outs, -1, 1)
    return tuple(jnp.moveaxis(o, -1, 1) if d else o for o, d in zip(outs, data_out))

  return transposed_run


def _native_op(op: str, a: jax.Array, b: jax.Array, spec: ConvSpec, out_dtype: Any):
  if op == "fwd":
    return _native.forward(a, b, spec._replace(out_dtype=out_dtype))
  if op == "dx":
    return _native.input_grad(a, b, spec).astype(out_dtype)
  return _native.kernel_grad(a, b, spec).astype(out_dtype)


def _bound(run: Callable[..., jax.Array], spec: ConvSpec) -> Fn:
  return lambda a, b: run(a, b, spec)


def _channels_last(run: Callable[..., jax.Array], op: str, spec: ConvSpec) -> Fn:
  """`run(a, b, spec)` for channels-last operands, applied in `spec`'s layout.

  Channels-first data operands (everything but a kernel) are transposed to
  channels-last before the call and the result back after it.
  """
  if spec.channels_last:
    return _bound(run, spec)
  last = spec._replace(channels_last=True)

  def fn(a, b):
    b = jnp.moveaxis(b, 1, -1) if op == "dk" else b
    out = run(jnp.moveaxis(a, 1, -1), b, last)
    return out if op == "dk" else jnp.moveaxis(out, -1, 1)

  return fn
