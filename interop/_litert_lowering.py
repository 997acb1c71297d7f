"""`dw5d_jax` ops as LiteRT's DEPTHWISE_CONV_2D, for `export_litert`'s default route.

`jax2tf` lowers `dw5d_jax`'s ops on CPU to the portable "shift" computation,
which the LiteRT converter turns into an elementwise graph (PAD, SLICE, MUL,
ADD per tap); XNNPACK runs it 5.5-8.3x slower than a DEPTHWISE_CONV_2D graph
on W1/W2-size ops (benchmarks/RESULTS.md, "LiteRT (TFLite) export"). Inside `depthwise_conv2d_graph()` every
`dw5d_jax.depthwise_conv2d/3d` call traces instead to grouped 2D convolutions
that the converter legalises to DEPTHWISE_CONV_2D:

* a convolution with a carried spatial axis (2D per slice, rank-4 input):
  the `"conv"` lowering, which folds the carried axis into batch;
* a true 3D convolution: one 2D convolution over (H, W) per depth tap `t`,
  on the strided depth slice `o * sd + t * rd` of the padded input (the
  depth axis folded into batch), the `kd` results added. XLA's 3D grouped
  convolution would become TensorFlow's `Conv3D`, which LiteRT has only
  without groups (a Flex op). Stacking the taps into channels for a single
  convolution, as `interop.tf_depthwise_conv3d` does, measured 1.4-2.1x
  slower under XNNPACK on W2 than adding per-tap results (it copies the
  input `kd` times).

The substitution replaces the op's entry point `dw5d_jax._depthwise._apply`
(a `jax.jit` whose trace cache would otherwise replay the primitive) with its
unjitted body, in which the primitive's forward (`_primitive.conv`) is this
lowering, and a bias or activation (`_epilogue.apply`) its unfused formula
(LiteRT's converter fuses them into the convolution itself where it can),
for the duration of the context. The result is traced for export
only: no primitive is left to differentiate or batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import jax
import jax.extend.core
import numpy as np
from jax import lax

from dw5d_jax import _conv, _depthwise, _modes, _primitive
from dw5d_jax import _epilogue as _epilogue_module
from dw5d_jax._geometry import ConvSpec

# The jitted entry point the context replaces. A jit equation of it (its
# jaxpr's source, "_apply at .../dw5d_jax/_depthwise.py:174") marks an op
# traced without the substitution (see `unsubstituted`).
_APPLY = _depthwise._apply
_APPLY_SOURCE = f"{_APPLY.__wrapped__.__name__} at {_APPLY.__wrapped__.__code__.co_filename}:"


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


def _whole(split: Any) -> None:
  if split is not None:
    raise ValueError("LiteRT export: `split_axes` (blocks inside jax.shard_map) cannot be "
                     "exported; export the function on whole arrays.")


def _forward(x: jax.Array, kernel: jax.Array, spec: ConvSpec, impl: Any,
             out_dtype: Any = None, split: Any = None) -> jax.Array:
  """`_primitive.conv`'s signature, computed by `depthwise2d_lowering` (whole arrays only)."""
  _whole(split)
  y = depthwise2d_lowering(x, kernel, spec)
  return y if out_dtype is None else y.astype(out_dtype)


def _epilogue(x: jax.Array, kernel: jax.Array, bias: jax.Array, spec: ConvSpec, impl: Any,
              activation: str | None, split: Any = None) -> jax.Array:
  """`_epilogue.apply`'s signature: the unfused formula, its convolution `_forward`."""
  _whole(split)
  return _epilogue_module.forward_formula(x, kernel, bias, spec=spec, impl=impl,
                                          activation=activation)


def _substitute(x: jax.Array, kernel: jax.Array, **kwargs: Any) -> jax.Array:
  with (mock.patch.object(_primitive, "conv", _forward),
        mock.patch.object(_epilogue_module, "apply", _epilogue)):
    return _APPLY.__wrapped__(x, kernel, **kwargs)


@contextlib.contextmanager
def depthwise_conv2d_graph() -> Iterator[None]:
  """Within the context, `dw5d_jax` ops trace to 2D grouped convolutions.

  Meant for tracing only (one thread: it patches a module attribute).
  """
  with mock.patch.object(_depthwise, "_apply", _substitute):
    yield


def unsubstituted(jaxpr: jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr) -> bool:
  """Whether `jaxpr` holds a `dw5d_jax` op traced without the substitution.

  That happens when a function jitted before (its trace cached) is traced
  again inside `depthwise_conv2d_graph()`.
  """
  inner = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in inner.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      info = getattr(getattr(sub, "jaxpr", sub), "debug_info", None)
      source = getattr(info, "func_src_info", None) or ""
      if source.startswith(_APPLY_SOURCE):
        return True
      if unsubstituted(sub):
        return True
  return False
