"""`dw5d_jax`'s primitives as ONNX nodes: jax2onnx plugins for `export_onnx`.

jax2onnx converts a jaxpr equation by equation, each primitive by a plugin
registered under its name. This module registers `dw5d_depthwise` (the
convolution, `op="fwd"`) and `dw5d_epilogue` (convolution, bias and
activation). Each becomes ONNX's own grouped convolution:

* `Transpose` to `(N, C, D, H, W)` for a channels-last op (and back after);
* the kernel `(kd, kh, kw, C, M)` -> `Transpose` -> `(C, M, kd, kh, kw)` ->
  `Reshape` -> `(C * M, 1, kd, kh, kw)`, ONNX's `Conv` weight for
  `group = C` (output channel `c * M + m`, the library's order). With the
  kernel a constant, onnxruntime folds both into the initializer;
* zero padding in `Conv`'s own `pads` (`auto_pad="SAME_UPPER"` where the
  pads depend on a symbolic size: TF's SAME rule, the odd pad at the end);
* a border mode (`padding_mode`): one `Pad` per axis before the `Conv`,
  mode `reflect`, `edge` or `wrap` (circular); `symmetric`, which ONNX's
  `Pad` lacks, as `Slice` (reversed, step -1) and `Concat`;
* the epilogue: `Conv`'s bias input, then the activation: `Relu`,
  `Clip(0, 6)`, `Gelu` (`approximate="none"`/`"tanh"`), `Sigmoid`, `Tanh`,
  `HardSwish`, or `x * Sigmoid(x)` (silu);
* `Cast` to the accumulator dtype and back for float16/bfloat16 inputs.

`export_onnx` traces the function for the export target `"onnx"`
(`dw5d_jax._target`, a fact in `_policy.decide`'s table): the primitives
carry it in `Impl.target`, and the plugins refuse an op traced for another
target (a stale trace). No lowering to StableHLO takes part.

`OPS` lists every ONNX op these plugins emit. The gradient ops (`dx`, `dk`,
the epilogue's JVP and VJP primitives) and blocks inside `shard_map`
(`split`) have no ONNX form here: converting them raises a ValueError that
names the primitive.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from dw5d_jax import _geometry
from dw5d_jax._spec import ConvSpec

# Every ONNX op the plugins below emit.
OPS = ("Cast", "Clip", "Concat", "Conv", "Gelu", "HardSwish", "Identity", "Mul", "Pad", "Relu",
       "Reshape", "Sigmoid", "Slice", "Tanh", "Transpose")
# The library's border modes -> ONNX Pad's modes (symmetric: Slice + Concat).
_PAD_MODES = {"reflect": "reflect", "edge": "edge", "circular": "wrap"}
_FN = "export_onnx"
_INT64_MIN = np.iinfo(np.int64).min


class _Emitter:
  """Adds nodes to jax2onnx's graph, with dtypes set on their outputs."""

  def __init__(self, ctx: Any):
    self.ctx = ctx

  def node(self, op: str, *inputs: Any, dtype: Any, name: str | None = None,
           **attrs: Any) -> Any:
    out = getattr(self.ctx.builder, op)(*inputs, _outputs=[name or self.ctx.fresh_name(op)],
                                        **attrs)
    out.type = ir.TensorType(_ir_dtype(dtype))
    return out

  def ints(self, values: Any) -> Any:
    return self.ctx.builder.add_initializer_from_array(
        name=self.ctx.fresh_name("dw5d_i64"), array=np.asarray(values, np.int64))

  def scalar(self, value: float, dtype: Any) -> Any:
    return self.ctx.builder.add_initializer_from_array(
        name=self.ctx.fresh_name("dw5d_c"), array=np.asarray(value, dtype))


def _ir_dtype(dtype: Any) -> Any:
  return ir.DataType.from_numpy(np.dtype(dtype))


def _unsupported(primitive: str, why: str) -> ValueError:
  return ValueError(f"{_FN}: the primitive `{primitive}` {why}; ONNX export covers the "
                    f"forward ops (dw5d_depthwise op='fwd', dw5d_epilogue). Export the "
                    f"inference function, outside shard_map and without jax.grad.")


def _check_static(primitive: str, spec: ConvSpec) -> None:
  """Pads must be ints, or SAME on every axis (Conv's auto_pad), without border modes."""
  if all(_geometry.is_static(*p) for p in spec.padding):
    return
  same = all(
      tuple(spec.padding[i]) == tuple(_geometry.pads(spec.in_spatial[i], spec.window[i],
                                                     spec.strides[i], spec.dilations[i],
                                                     "SAME"))
      for i in range(3))
  if not same or spec.has_modes:
    raise ValueError(
        f"{_FN}: `{primitive}` with padding {spec.padding} and padding_mode {spec.modes} "
        f"depends on a symbolic spatial size in a way ONNX's Conv cannot express (it has "
        f"SAME_UPPER only, and only with zero fill); give those spatial sizes as ints in "
        f"`input_shape`.")


def _check_target(primitive: str, impl: Any) -> None:
  if impl.target != "onnx":
    raise ValueError(f"{_FN}: `{primitive}` was traced for export target {impl.target!r}, "
                     f"not 'onnx'; trace the function inside "
                     f"dw5d_jax._target.export_target('onnx') (export_onnx does).")


def convolution(em: _Emitter, primitive: str, x: Any, kernel: Any, bias: Any,
                spec: ConvSpec, activation: str | None, in_dtype: Any, out_dtype: Any,
                out_name: str) -> Any:
  """The ONNX graph of `activation(conv(x, kernel) + bias)` on rank-5 `x`."""
  _check_static(primitive, spec)
  acc = np.dtype(spec.acc_dtype)
  if in_dtype != acc:
    x = em.node("Cast", x, dtype=acc, to=_ir_dtype(acc))
    kernel = em.node("Cast", kernel, dtype=acc, to=_ir_dtype(acc))
    if bias is not None:
      bias = em.node("Cast", bias, dtype=acc, to=_ir_dtype(acc))
  if spec.channels_last:
    x = em.node("Transpose", x, dtype=acc, perm=[0, 4, 1, 2, 3])
  pads_lo, pads_hi = [], []
  for i, mode in enumerate(spec.modes):
    lo, hi = spec.padding[i]
    if mode == "zeros":
      pads_lo.append(lo)
      pads_hi.append(hi)
      continue
    pads_lo.append(0)
    pads_hi.append(0)
    axis = 2 + i
    if mode in _PAD_MODES:
      x = em.node("Pad", x, em.ints([lo, hi]), None, em.ints([axis]), dtype=acc,
                  mode=_PAD_MODES[mode])
    else:  # symmetric: b a | a b c d | d c, the edge rows reversed
      parts = []
      if lo:  # rows lo-1, ..., 0
        parts.append(em.node("Slice", x, em.ints([lo - 1]), em.ints([_INT64_MIN]),
                             em.ints([axis]), em.ints([-1]), dtype=acc))
      parts.append(x)
      if hi:  # rows n-1, ..., n-hi
        parts.append(em.node("Slice", x, em.ints([-1]), em.ints([-hi - 1]), em.ints([axis]),
                             em.ints([-1]), dtype=acc))
      x = em.node("Concat", *parts, dtype=acc, axis=axis)
  c, m = spec.channels, spec.multiplier
  w = em.node("Transpose", kernel, dtype=acc, perm=[3, 4, 0, 1, 2])
  w = em.node("Reshape", w, em.ints([c * m, 1, *spec.window]), dtype=acc)
  conv = dict(group=c, kernel_shape=list(spec.window), strides=list(spec.strides),
              dilations=list(spec.dilations))
  if _geometry.is_static(*pads_lo, *pads_hi):
    conv["pads"] = [int(p) for p in (*pads_lo, *pads_hi)]
  else:
    conv["auto_pad"] = "SAME_UPPER"  # TF's SAME: lo = total // 2 (checked above)
  inputs = (x, w) if bias is None else (x, w, bias)
  y = em.node("Conv", *inputs, dtype=acc, **conv)
  y = _activation(em, y, activation, acc)
  if spec.channels_last:
    y = em.node("Transpose", y, dtype=acc, perm=[0, 2, 3, 4, 1])
  if np.dtype(out_dtype) != acc:
    y = em.node("Cast", y, dtype=out_dtype, to=_ir_dtype(out_dtype))
  return em.node("Identity", y, dtype=out_dtype, name=out_name)


def _activation(em: _Emitter, y: Any, activation: str | None, dtype: Any) -> Any:
  if activation is None:
    return y
  if activation in ("relu", "sigmoid", "tanh"):
    return em.node(activation.capitalize(), y, dtype=dtype)
  if activation == "relu6":
    return em.node("Clip", y, em.scalar(0, dtype), em.scalar(6, dtype), dtype=dtype)
  if activation in ("gelu", "gelu_tanh"):
    return em.node("Gelu", y, dtype=dtype,
                   approximate="tanh" if activation == "gelu_tanh" else "none")
  if activation == "hard_swish":
    return em.node("HardSwish", y, dtype=dtype)
  if activation == "silu":
    return em.node("Mul", y, em.node("Sigmoid", y, dtype=dtype), dtype=dtype)
  raise ValueError(f"{_FN}: the activation {activation!r} has no ONNX lowering here.")


def _bind_output(ctx: Any, eqn: Any, build: Any) -> None:
  out_var = eqn.outvars[0]
  spec_value = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("dw5d_out"))
  name = getattr(spec_value, "name", None) or ctx.fresh_name("dw5d_out")
  producer = getattr(spec_value, "producer", lambda: None)
  if callable(producer) and producer() is not None:
    name = ctx.fresh_name("dw5d_out")
  y = build(name)
  if getattr(spec_value, "shape", None) is not None:
    y.shape = spec_value.shape
  ctx.bind_value_for_var(out_var, y)


@register_primitive(jaxpr_primitive="dw5d_depthwise", context="primitives.dw5d",
                    component="dw5d_depthwise", since="0.17.0", testcases=[])
class DepthwisePlugin(PrimitiveLeafPlugin):
  """`dw5d_depthwise` (`op="fwd"`) as a grouped ONNX `Conv`."""

  def lower(self, ctx: Any, eqn: Any) -> None:
    p = eqn.params
    if p["op"] != "fwd":
      raise _unsupported("dw5d_depthwise", f"with op={p['op']!r} (a gradient) has no ONNX "
                         f"form")
    if p["split"] is not None:
      raise _unsupported("dw5d_depthwise", "on blocks inside shard_map (split_axes) has no "
                         "ONNX form")
    _check_target("dw5d_depthwise", p["impl"])
    x, k = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name("dw5d_in")) for v in eqn.invars)
    _bind_output(ctx, eqn, lambda name: convolution(
        _Emitter(ctx), "dw5d_depthwise", x, k, None, p["spec"], None, eqn.invars[0].aval.dtype,
        p["out_dtype"], name))


@register_primitive(jaxpr_primitive="dw5d_epilogue", context="primitives.dw5d",
                    component="dw5d_epilogue", since="0.17.0", testcases=[])
class EpiloguePlugin(PrimitiveLeafPlugin):
  """`dw5d_epilogue`: `Conv` with its bias input, then the activation."""

  def lower(self, ctx: Any, eqn: Any) -> None:
    p = eqn.params
    if p.get("split") is not None:
      raise _unsupported("dw5d_epilogue", "on blocks inside shard_map (split_axes) has no "
                         "ONNX form")
    _check_target("dw5d_epilogue", p["impl"])
    x, k, b = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name("dw5d_in"))
               for v in eqn.invars)
    out_dtype = eqn.outvars[0].aval.dtype
    _bind_output(ctx, eqn, lambda name: convolution(
        _Emitter(ctx), "dw5d_epilogue", x, k, b, p["spec"], p["activation"],
        eqn.invars[0].aval.dtype, out_dtype, name))


def _refuse(primitive: str) -> type[PrimitiveLeafPlugin]:
  class Refused(PrimitiveLeafPlugin):
    def lower(self, ctx: Any, eqn: Any) -> None:
      raise _unsupported(primitive, "(a derivative of the epilogue) has no ONNX form")

  return register_primitive(jaxpr_primitive=primitive, context="primitives.dw5d",
                            component=primitive, since="0.17.0", testcases=[])(Refused)


for _name in ("dw5d_epilogue_lin", "dw5d_epilogue_grad"):
  _refuse(_name)
