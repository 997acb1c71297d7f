"""Every lowering rule of the package's primitives, in one module.

The primitives' own modules (`_primitive.py`: `dw5d_p`; `_epilogue.py`:
`epilogue_p`, `epilogue_lin_p`, `epilogue_grad_p`; `_ring.py`: a streaming
step's `ring_step_p`) define shapes, batching,
JVPs and transposes, and import no implementation; the implementations
(`_conv`, `_shift`, `_native`, `_pallas`, `_conv2d`, `_modes`,
`_partition`) know nothing of the policy. This module is the only one that
imports both. When XLA lowers a primitive, its rule here:

1. reads the lowering context into `_policy.Facts` (`facts`);
2. asks `_policy.decide` for a `Decision` (a pure function: tested as a
   table in tests/test_policy.py);
3. builds the function that decision names (`_build`, `_epilogue_fn`),
   transposing at the boundary where the decision says `"transposed"`
   (`_channels_last`), and partitioning it where it says `partition`;
4. lowers that function (`mlir.lower_fun`).

`prepare` is the trace-time half (the public ops call it): it checks
Pallas limits and builds or loads the native library, so that lowering
only asks whether it is loaded.

Rules are registered for `"cpu"` and `"cuda"` and one for every other
platform (`platform=None`), so one traced function exported for several
platforms takes each platform's lowering. Because a lowering may partition
its op, the primitives need their devices while lowering (JAX passes them
only for primitives in `dispatch.prim_requires_devices_during_lowering`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import mlir

from dw5d_jax import (
    _activations,
    _conv,
    _conv2d,
    _epilogue,
    _modes,
    _native,
    _native_build,
    _pallas,
    _partition,
    _policy,
    _primitive,
    _ring,
    _sharding,
    _shift,
)
from dw5d_jax._geometry import is_static
from dw5d_jax._policy import Decision, Facts
from dw5d_jax._spec import ConvSpec, Impl

Fn = Callable[[jax.Array, jax.Array], jax.Array]

PLATFORMS = ("cpu", "cuda")  # platforms with their own rule; None: every other


def prepare(spec: ConvSpec, impl: Impl, batch: Any) -> None:
  """Trace-time work for a call: checks Pallas limits, builds the native library."""
  if impl.method == "pallas":
    _pallas.check(spec, batch)
  if (impl.method in ("auto", "shift") and _native_build.mode() != "off"
      and jax.default_backend() == "cpu"):
    _native_build.status()  # builds or loads once per process; warns if it fails


def facts(ctx, platform: str | None, impl: Impl, split: bool = False) -> Facts:
  """What the lowering context `ctx` knows, for the rule of `platform`."""
  module = ctx.module_context
  avals = (*ctx.avals_in, *ctx.avals_out)
  status = _native_build.loaded()
  for_export = module.lowering_parameters.for_export
  return Facts(
      platform=platform,
      platforms=(platform,) if platform else tuple(ctx.platforms or module.platforms),
      static=all(is_static(*a.shape) for a in ctx.avals_in),
      dtypes=tuple(a.dtype for a in avals),
      devices=getattr(module.axis_context, "num_devices", 1),
      manual=bool(getattr(module.axis_context, "manual_axes", None)),
      split=split,
      native_mode=_native_build.mode(),
      native_loaded=status is not None and status.active,
      target=impl.target or ("stablehlo" if for_export else None))


def _decide(op: str, spec: ConvSpec, impl: Impl, found: Facts) -> Decision:
  """`_policy.decide`; says once per process when an export leaves the native kernels out."""
  decision = _policy.decide(op, spec, impl, found)
  if (found.target not in (None, "native") and decision.lowering != "native"
      and _policy.decide(op, spec, impl, found._replace(target=None)).lowering == "native"):
    _native_build.note_portable_export()
  return decision


# ----------------------------------------------------------------------------
# dw5d_p: the convolution and its two gradients.


def _dw5d_lowering(ctx, a, b, *, platform: str | None, split, **params):
  decision = _decide(params["op"], params["spec"], params["impl"],
                     facts(ctx, platform, params["impl"], split is not None))
  fn = _build(decision, split=split, **params)
  (out,) = mlir.lower_fun(fn, multiple_results=False)(_sharding.unsharded(ctx), a, b)
  return [_sharding.constrain(ctx, out)]


def _build(decision: Decision, *, op: str, spec: ConvSpec, impl: Impl, out_dtype: Any,
           split: Any) -> Fn:
  """The function of the two operands that `decision` names for `op`."""
  if decision.lowering == "blockwise":  # blocks inside shard_map: halo exchange, the local op
    return functools.partial(_partition.blockwise, op, spec=spec, impl=impl,
                             out_dtype=out_dtype, layout=split, reduce=False)
  if decision.modes is not None:
    # Border modes bind zero-padding ops, which come back to `decide`.
    fn = _modes.implementation(op, spec, impl, out_dtype, borders=decision.modes == "borders")
  else:
    fn = _implementation(decision, op, spec, impl, out_dtype)
  if decision.partition:
    fn = _partition.partitioned(fn, op=op, spec=spec, impl=impl, out_dtype=out_dtype)
  return fn


def _implementation(decision: Decision, op: str, spec: ConvSpec, impl: Impl,
                    out_dtype: Any) -> Fn:
  """The lowering `decision` names, in its layout, on whole arrays."""
  if decision.lowering == "pallas":
    run = functools.partial(_pallas.run, op, out_dtype=out_dtype, interpret=impl.interpret,
                            tiles=impl.tiles)
  elif decision.lowering == "native":
    run = functools.partial(_native_op, op, out_dtype=out_dtype)
  elif decision.lowering == "conv2d":
    run = functools.partial(_conv2d_op, op, out_dtype=out_dtype)
  else:
    module = {"conv": _conv, "shift": _shift}[decision.lowering]
    run = functools.partial(getattr(module, _XLA_NAMES[op]), out_dtype=out_dtype)
  return _channels_last(run, op, spec) if decision.layout == "transposed" else _bound(run, spec)


_XLA_NAMES = {"fwd": "conv", "dx": "input_grad", "dk": "kernel_grad"}


def _native_op(op: str, a: jax.Array, b: jax.Array, spec: ConvSpec, out_dtype: Any):
  if op == "fwd":
    return _native.forward(a, b, spec._replace(out_dtype=out_dtype))
  if op == "dx":
    return _native.input_grad(a, b, spec).astype(out_dtype)
  return _native.kernel_grad(a, b, spec).astype(out_dtype)


def _conv2d_op(op: str, a: jax.Array, b: jax.Array, spec: ConvSpec, out_dtype: Any):
  del op  # the forward only (`_policy.decide`)
  return _conv2d.depthwise2d_lowering(a, b, spec).astype(out_dtype)


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


# ----------------------------------------------------------------------------
# The epilogue's primitives: fused into the native kernels, or the formula.


def _epilogue_lowering(op: str, formula, multiple_results: bool):
  def lower(ctx, *args, platform: str | None, **params):
    decision = _decide(op, params["spec"], params["impl"], facts(ctx, platform, params["impl"]))
    fn = _epilogue_fn(op, decision, **params) if decision.fused else None
    if fn is None:
      fn = functools.partial(formula, **params)
    if decision.partition:  # each device runs this op on its blocks
      from_output = _activations.variant(params["activation"], params["spec"].out_dtype)
      fn = _partition.partitioned_epilogue(
          fn, op="fwd" if op == "epilogue" else "grad", from_output=from_output == "output",
          **params)
    outs = mlir.lower_fun(fn, multiple_results=multiple_results)(_sharding.unsharded(ctx),
                                                                 *args)
    return [_sharding.constrain(ctx, o, aval) for o, aval in zip(outs, ctx.avals_out)]

  return lower


def _epilogue_fn(op: str, decision: Decision, *, spec: ConvSpec, impl: Impl,
                 activation: str | None) -> Callable[..., Any]:
  """The fused native computation of `op`: `"epilogue"` (x, kernel, bias -> y) or
  `"epilogue_grad"` (x, kernel, r, ct -> g, dk, db), in `decision.layout`."""
  del impl
  transposed = decision.layout == "transposed"
  native = spec._replace(channels_last=True) if transposed else spec
  if op == "epilogue":
    def run(x, k, b):
      return _native.forward_epilogue(x, k, b, native, activation)

    data_in, data_out = (True, False, False), (True,)
  else:
    from_output = _activations.variant(activation, spec.out_dtype) == "output"

    def run(x, k, r, ct):
      return _native.epilogue_grad(x, k, r, ct, native, activation, from_output)

    data_in, data_out = (True, False, from_output, True), (True, False, False)
  if not transposed:
    return run

  def transposed_run(*args):  # channels-first data operands and results, moved
    args = [jnp.moveaxis(a, 1, -1) if d else a for a, d in zip(args, data_in)]
    outs = run(*args)
    if op == "epilogue":
      return jnp.moveaxis(outs, -1, 1)
    return tuple(jnp.moveaxis(o, -1, 1) if d else o for o, d in zip(outs, data_out))

  return transposed_run


# ----------------------------------------------------------------------------
# A 1-frame streaming step: one native call, or the formula.


def _ring_step_lowering(ctx, *args, platform: str | None, spec: ConvSpec, impl: Impl,
                        axis: int):
  decision = _policy.decide_ring_step(spec, impl, facts(ctx, platform, impl), axis)
  if decision.lowering == "native":
    fn = functools.partial(_native.stream_step, spec=spec)
  else:
    fn = functools.partial(_ring.formula, spec=spec, impl=impl, axis=axis)
  return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


# ----------------------------------------------------------------------------
# Registration.


def _register(prim: Primitive, lower) -> None:
  dispatch.prim_requires_devices_during_lowering.add(prim)
  mlir.register_lowering(prim, functools.partial(lower, platform=None))
  for platform in PLATFORMS:
    mlir.register_lowering(prim, functools.partial(lower, platform=platform),
                           platform=platform)


_register(_primitive.dw5d_p, _dw5d_lowering)
_register(_epilogue.epilogue_p, _epilogue_lowering("epilogue", _epilogue.forward_formula, False))
_register(_epilogue.epilogue_lin_p,
          _epilogue_lowering("epilogue_lin", _epilogue.lin_formula, False))
_register(_epilogue.epilogue_grad_p,
          _epilogue_lowering("epilogue_grad", _epilogue.grad_formula, True))
_register(_ring.ring_step_p, _ring_step_lowering)
