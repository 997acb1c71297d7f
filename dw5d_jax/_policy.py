"""Which code computes a depthwise convolution: the whole decision, top to bottom.

A public op checks its arguments (`_args`) into a `ConvSpec` and binds the
primitive `_primitive.dw5d_p`; the gradients are the same primitive with
`op="dx"` or `"dk"`. When XLA lowers it, `_lowering.py` gathers what the
lowering context knows into `Facts` and asks `decide`, a pure function of
the op, the spec, the user's `Impl` and the facts, for a `Decision`;
`_lowering.py` then builds what the decision names and nothing else. The
order:

0. **Blocks or export route.** Inside `shard_map` (`split_axes`) the op is
   computed on its blocks (`"blockwise"`, `_partition.py`), whose local
   ops come back here. An export target (`Facts.target`, `_target.py`)
   with its own lowering takes it: for `"litert"` the convolution is
   `"conv2d"` (`_conv2d.py`: grouped 2D convolutions, which the LiteRT
   converter turns into DEPTHWISE_CONV_2D), border modes from a padded
   copy; its gradients, and every other target (`"stablehlo"`, `"tf"`),
   take the steps below, as exported (no native kernels, no partitioning),
   except `"native"` (`export_native`), which keeps the native kernels (no
   partitioning). For `"onnx"` the primitives become ONNX nodes themselves
   (interop/_onnx_lowering.py: one grouped `Conv` per op); should such an
   op be lowered all the same, it takes the steps below, as exported.
   LiteRT export of blocks raises.
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

   `"pallas"` lowers for CUDA only, or anywhere in interpret mode (tests);
   elsewhere it raises.
2. **Native or XLA** (`native_layout`): the shift lowering on CPU calls the
   native C++ kernels (`_native.py`) for float32/bfloat16 problems with
   static shapes, where they were measured faster (`worthwhile`), unless
   the lowering is for export (an exported artifact must not name a custom
   call that only this process knows). Everything else uses XLA's shift
   lowering (`_shift.py`), with the same results.
   A spec with border modes (`padding_mode`) is computed by `_modes.py`
   from zero-padding ops, which come back here: on the border alone
   (`Decision.modes == "borders"`) where the native kernels run, from a
   padded copy (`"padded"`) elsewhere.
3. **Layout** (`Decision.layout`). XLA's convolution and shift lowering
   take both layouts as they are (dimension numbers, axis positions); so
   do the native kernels (channels-first ones are vectorised along W),
   except where `transposed` says that transposing to channels-last around
   them is faster; Pallas kernels are channels-last only. Where an
   implementation does not take the spec's layout (`"transposed"`), its
   operands and result are transposed at the boundary (`_lowering.py`).
4. **Partitioning** (`Decision.partition`): lowered for several devices,
   outside `shard_map` and not for export, the op is partitioned by its
   own rule (`_partition.partitioned`); border modes are not (their
   zero-padding ops partition themselves).

A bias or activation (`bias=`, `activation=`) makes the op bind
`_epilogue.epilogue_p` instead (ops `"epilogue"`, `"epilogue_lin"`,
`"epilogue_grad"` here); its forward and backward pass are fused into the
native kernels (`Decision.fused`) exactly where the convolution and its
kernel gradient would use them, on one device, without border modes, and
everywhere else computed by the unfused formula over `dw5d_p`, which takes
the steps above. A streaming step of one frame binds `_ring.ring_step_p`:
one native call that writes the frame into the ring and convolves it
(`decide_ring_step`) exactly where its window's convolution would take the
native kernels as they are, channels-last along D, not for export;
elsewhere its formula over `dw5d_p`.

The native library is built (or loaded from its cache) at trace time, by
`_lowering.prepare`, the first time an op that may use it is traced with
CPU as the default backend; lowering only asks whether it is loaded
(`Facts.native_loaded`). So the ~25 s compile of a fresh machine happens
at the user's first call, with its warning if it fails, and never in the
middle of XLA's lowering. `DW5D_JAX_NATIVE` (`_native_build.mode`,
`Facts.native_mode`) switches the native kernels off (`off`) or forces
them wherever they apply (`all`, what the tests use).

This module imports no implementation: its table tests
(tests/test_policy.py) cover every branch, CUDA's included, without a GPU
and without compiling.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from dw5d_jax._spec import OPS, ConvSpec, Impl

NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))

# The epilogue's primitives (`_epilogue.py`): forward, its JVP, its backward pass.
EPILOGUE_OPS = ("epilogue", "epilogue_lin", "epilogue_grad")

# --- method="auto" on CUDA GPUs ---------------------------------------------
# Each configuration class maps to the method that measured fastest on a GPU
# (benchmarks/gpu.py, numbers cited from benchmarks/RESULTS.md). Keys: ("2d"
# when a spatial axis is carried, else "3d"; output dtype). No GPU has been
# measured yet, so it is empty and every class uses "conv" (cuDNN).
_GPU_CHOICE: dict[tuple[str, str], str] = {}

# Channels-first problems, per op (`_channels_first`; benchmarks/RESULTS.md,
# "NCDHW on the real networks' layers"): the channels-first kernels from this
# input width on (rows of fewer values leave their per-plane and per-row
# work unpaid: MViT-v2-S's (4, 96, 8, 14, 14) forward 2.8 ms vs 1.7 ms for
# XLA; its (1, 96, 8, 56, 56) stride-8 pooling 1.1 vs 6.2 ms), narrower ones
# on XLA's lowering, except as `_CF_FEW_OUTPUTS` says.
_CF_MIN_IN_WIDTH = {"fwd": 32, "dx": 28}
# Outputs per row below which the gradients are transposed around the
# channels-last kernels (C >= 4, strides of at most 2: a larger stride makes
# x, which the transposes move, large against the output; MViT's stride-8
# kernel gradient 3.7 ms transposed vs 1.5 channels-first): X3D-S's
# (1, 432, 13, 10, 10) stride 2 kernel gradient 2.4 vs 4.0 ms channels-first,
# CSN-50's (1, 512, 8, 14, 14) stride 2 input gradient 1.8 vs 2.2 ms (XLA)
# and 4.9 (channels-first).
_CF_FEW_OUTPUTS = 8
class Facts(NamedTuple):
  """What a lowering context knows, as plain values (`_lowering.facts` reads them).

  Attributes:
    platform: the platform of the lowering rule running (`"cpu"`, `"cuda"`),
      or None for the rule of every other platform.
    platforms: every platform the computation is lowered for (several in
      a multi-platform export); `(platform,)` for a platform's own rule.
    static: whether every operand and result shape is static.
    dtypes: the operands' and results' dtypes.
    devices: how many devices the computation is lowered for.
    manual: inside `shard_map` (every mesh axis manual).
    split: the op is one block of an array split inside `shard_map`
      (`split_axes`: the primitive's `split`).
    native_mode: `_native_build.mode()`: `"off"`, `"on"` or `"all"`.
    native_loaded: whether the native library is loaded and active.
    target: the export target (`_target.TARGETS`): the op's own
      (`Impl.target`), else `"stablehlo"` for any lowering for export,
      else None.
  """

  platform: str | None = "cpu"
  platforms: tuple[str, ...] = ("cpu",)
  static: bool = True
  dtypes: tuple[Any, ...] = ()
  devices: int = 1
  manual: bool = False
  split: bool = False
  native_mode: str = "on"
  native_loaded: bool = True
  target: str | None = None


class Decision(NamedTuple):
  """What computes an op: `_lowering.py` builds exactly this.

  Attributes:
    lowering: `"conv"` (`_conv.py`), `"shift"` (`_shift.py`), `"native"`
      (`_native.py`), `"pallas"` (`_pallas.py`), `"conv2d"` (`_conv2d.py`),
      `"blockwise"` (`_partition.blockwise`, blocks inside `shard_map`) or
      `"formula"` (an epilogue op unfused, `_epilogue.py`).
    layout: `"as-is"`, or `"transposed"` to channels-last around it.
    modes: for a spec with border modes, `"borders"` (zero-padding ops plus
      corrections on the border) or `"padded"` (a padded copy), `_modes.py`;
      else None.
    fused: an epilogue op fused into the native kernels.
    partition: partitioned by its own rule (`_partition.partitioned`).
  """

  lowering: str
  layout: str = "as-is"
  modes: str | None = None
  fused: bool = False
  partition: bool = False


def decide(op: str, spec: ConvSpec, impl: Impl, facts: Facts) -> Decision:
  """The decision for `op` (`OPS` or `EPILOGUE_OPS`) on `spec` (module docstring).

  Raises:
    ValueError: `method="pallas"` lowered for a platform other than CUDA
      (without interpret mode); blocks (`split_axes`) exported to LiteRT.
  """
  if op in EPILOGUE_OPS:
    return _epilogue(op, spec, impl, facts)
  if op not in OPS:
    raise ValueError(f"decide: `op` must be one of {OPS + EPILOGUE_OPS}, got {op!r}.")
  if facts.split:
    if facts.target == "litert":
      raise ValueError("LiteRT export: `split_axes` (blocks inside jax.shard_map) cannot be "
                       "exported; export the function on whole arrays.")
    return Decision("blockwise")
  if facts.target == "litert" and op == "fwd":
    return Decision("conv2d", modes="padded" if spec.has_modes else None)
  method = lowering(impl.method, facts.platform, spec)
  partition = _partition(facts)
  if spec.has_modes:
    # Border modes bind zero-padding ops, which come back here (`_modes.py`):
    # the native kernels get corrections on the border, the rest a padded copy.
    # Partitioned, each device computes them on its blocks (`_partition.blockwise`).
    borders = (method == "shift" and facts.platform == "cpu"
               and native_layout(spec, op, facts) is not None)
    return Decision(method, modes="borders" if borders else "padded", partition=partition)
  if method == "pallas":
    bad = [p for p in facts.platforms if p != "cuda"]
    if bad and not impl.interpret:
      raise ValueError(
          f"method='pallas' runs on CUDA GPUs only (a Pallas Triton kernel), but this "
          f"computation is being lowered for platform {bad[0]!r}. Use method='auto', "
          f"'conv' or 'shift' there.")
    return Decision("pallas", _layout(not spec.channels_last), partition=partition)
  if method == "shift" and facts.platform == "cpu":
    layout = native_layout(spec, op, facts)
    if layout is not None:
      return Decision("native", layout, partition=partition)
  return Decision(method, partition=partition)


def decide_ring_step(spec: ConvSpec, impl: Impl, facts: Facts, axis: int) -> Decision:
  """A 1-frame streaming step (`_ring.py`): `"native"` or `"formula"`.

  `"native"` (one call: the frame written into the ring in place, the
  window convolved where its frames lie, `_native.stream_step`) exactly
  where the window's convolution would take the native kernels as they are
  (`decide` gives `Decision("native")` for `"fwd"`: channels-last here, no
  border modes, on one device) and the ring lies along D (`axis` 0), not
  for export (the call's ring aliasing is this process's); everywhere else
  `"formula"`, whose convolution takes `decide`'s steps. `head`, an int32
  index among the operands, is not data: only the float dtypes count.
  """
  data = facts._replace(dtypes=tuple(d for d in facts.dtypes
                                     if not np.issubdtype(np.dtype(d), np.integer)))
  native = (axis == 0 and facts.target is None and spec.channels_last
            and decide("fwd", spec, impl, data) == Decision("native"))
  return Decision("native" if native else "formula")


def _partition(facts: Facts) -> bool:
  """Whether an op lowered with `facts` partitions itself (several devices, not manual,
  not exported)."""
  return facts.target is None and not facts.manual and facts.devices > 1


def _epilogue(op: str, spec: ConvSpec, impl: Impl, facts: Facts) -> Decision:
  """Fused exactly where the convolution (`"epilogue"`) or its kernel gradient
  (`"epilogue_grad"`) would use the native kernels, in the same layout; the JVP
  (`"epilogue_lin"`) and everything else: the formula, whose `dw5d_p` takes the
  steps of `decide`. Lowered for several devices, the forward and the backward
  pass partition themselves: each device runs them, fused or not, on its blocks
  (`_partition.partitioned_epilogue`).
  """
  if op == "epilogue_lin":
    return Decision("formula")
  formula = Decision("formula", partition=_partition(facts))
  method = lowering(impl.method, facts.platform, spec)
  if method != "shift" or facts.platform != "cpu" or spec.has_modes:
    return formula  # border modes: the formula's dw5d_p corrects the borders (`_modes`)
  layout = native_layout(spec, "fwd" if op == "epilogue" else "dk", facts)
  if layout is None:
    return formula
  return Decision("native", layout, fused=True, partition=formula.partition)


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


def native_layout(spec: ConvSpec, op: str, facts: Facts) -> str | None:
  """Step 2: `"as-is"` or `"transposed"` to use the native kernels for `op`, else None."""
  if facts.target not in (None, "native"):
    return None  # an artifact must not call kernels the serving process may lack
  if not spec.is_static() or not facts.static:
    return None
  mode = facts.native_mode
  if mode == "off" or (mode == "on" and not worthwhile(spec, op)):
    return None
  if not (all(np.dtype(d) in NATIVE_DTYPES for d in facts.dtypes)
          and np.dtype(spec.acc_dtype) == np.float32):
    return None
  if not facts.native_loaded:
    return None
  return _layout(transposed(spec, op))


def _layout(transpose: bool) -> str:
  return "transposed" if transpose else "as-is"


def worthwhile(spec: ConvSpec, op: str) -> bool:
  """Whether the native kernels beat XLA's shift lowering for `op` on `spec`.

  Measured (benchmarks/RESULTS.md, "Native kernel policy", "NCDHW on the
  real networks' layers"). Channels-last: from 4 channels on, where the
  channels left over after whole packets take one packet overlapping the
  one before (X3D's C = 54, x (1, 13, 40, 40, 54): forward + backward 9.8
  vs 34.6 ms for XLA's lowering, the same time as C = 56); with `C <= 3`
  only the kernel gradient (masked lanes: C = 2, x (2, 8, 32, 32, 2), 0.50
  vs 1.22 ms; the forward pass and the input gradient, 0.38 vs 0.22 and
  0.39 vs 0.24 ms, stay with XLA, vectorised along `W * C`).
  Channels-first: see `_channels_first`.
  """
  if spec.channels_last:
    return spec.channels >= 4 or op == "dk"
  return _channels_first(spec, op) is not None


def transposed(spec: ConvSpec, op: str) -> bool:
  """Step 3 for the native kernels: channels-first `op` transposed to channels-last.

  Where `_channels_first` says so: gradients with fewer than
  `_CF_FEW_OUTPUTS` outputs per row, `C >= 4`, strides up to 2.
  """
  return not spec.channels_last and _channels_first(spec, op) == "transposed"


def _channels_first(spec: ConvSpec, op: str) -> str | None:
  """The native kernels for channels-first `op`: `"as-is"` (the channels-first
  kernels, vectorised along W), `"transposed"`, or None (XLA's lowering).

  Measured on the real networks' layers (benchmarks/ncdhw.py): the kernel
  gradient always native (XLA's is 4-20x slower); the forward pass and
  the input gradient channels-first from an input width of
  `_CF_MIN_IN_WIDTH`, else XLA, except the strided input gradient of few
  outputs per row, which is transposed like the kernel gradient. Any C.
  """
  few = (spec.channels >= 4 and spec.out_spatial[2] < _CF_FEW_OUTPUTS
         and max(spec.strides[1:]) <= 2)
  if op == "dk":
    return "transposed" if few else "as-is"
  if spec.in_spatial[2] >= _CF_MIN_IN_WIDTH[op]:
    return "as-is"
  if op == "dx" and few and max(spec.strides[1:]) > 1:
    return "transposed"
  return None
