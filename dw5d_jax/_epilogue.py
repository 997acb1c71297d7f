"""Bias and activation after the convolution: `y = activation(conv(x, k) + bias)`.

The ops take the epilogue as keywords (`bias=`, `activation=`); without
them nothing here runs and the op is the bilinear primitive `dw5d_p` alone.
With them, three primitives carry the computation, so that the native CPU
kernels can fuse it (`_policy.decide`, `_lowering.py`) while every other
path computes the same formula unfused:

* `epilogue_p(x, k, b) -> y`: the layer's forward. Native: the activation
  is applied to each output row in the tap-sum pass, before it is stored.
  Elsewhere `forward_formula`: `dw5d_p` with the accumulator dtype as its
  output, the bias, the activation (`jax.nn`), the cast.
* `epilogue_lin_p(*tangents, x, k, r) -> dy`: its JVP, linear in the
  tangents of x, k and b (those present, `present`). Evaluated (forward
  mode) by `lin_formula`; its transpose is the backward pass:
* `epilogue_grad_p(x, k, r, ct) -> (g, dk, db)`: `g = ct * act'(z)`, the
  cotangent of the pre-activation `z = conv(x, k) + b`, with `dk` and `db`.
  Native: one pass over x's windows and ct computes g, accumulates dk and
  db, and writes g once; the input gradient is then `dw5d_p`'s (`dx(g, k)`).

`r` is what `act'(z)` is computed from (`_activations.variant`). For relu, relu6,
sigmoid and tanh with a float32 output it is the output y (`act'(z)` is a
function of y, e.g. `y * (1 - y)` for the sigmoid), so the backward pass
reads y; for gelu, silu and hard_swish (and a bfloat16 y, too coarse near
the kinks) it is the bias, and the backward pass recomputes z: the native
pass already reads x's windows, and no pre-activation is stored. Without
an activation (bias only) `g = ct`.

Derivatives of `epilogue_lin_p` and `epilogue_grad_p` (second order and
beyond) differentiate `lin_formula` and `grad_formula`, which use only
`dw5d_p` and JAX's elementwise ops: correct to any order, unfused. All
three primitives batch (`vmap`) by folding the batch into N or into the
channels, like `dw5d_p`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from dw5d_jax import _primitive, _sharding
from dw5d_jax._activations import ACTIVATIONS, variant
from dw5d_jax._spec import ConvSpec, Impl

# ----------------------------------------------------------------------------
# The formulas: what every path computes, unfused here.


def _bias(b: jax.Array, spec: ConvSpec, dtype: Any) -> jax.Array:
  """`(C * M,)` as broadcastable to an output in the spec's layout."""
  shape = [1] * 5
  shape[spec.channel_axis] = b.shape[0]
  return b.astype(dtype).reshape(shape)


def _pre_activation(x, k, b, spec: ConvSpec, impl: Impl, split: Any = None) -> jax.Array:
  """`z = conv(x, k) + b` in the accumulator dtype."""
  acc = spec.acc_dtype
  return _primitive.conv(x, k, spec, impl, acc, split=split) + _bias(b, spec, acc)


def forward_formula(x, k, b, *, spec: ConvSpec, impl: Impl, activation: str | None,
                    split: Any = None):
  """`activation(conv(x, k) + b)`, computed in the accumulator dtype, cast to the output's.

  `split`: x is a block inside `shard_map` (`_primitive.conv`'s `split`).
  """
  z = _pre_activation(x, k, b, spec, impl, split)
  y = z if activation is None else ACTIVATIONS[activation].fn(z)
  return y.astype(spec.out_dtype)


def _slope(x, k, r, *, spec: ConvSpec, impl: Impl, activation: str | None):
  """`act'(z)` in the accumulator dtype (None without an activation)."""
  kind = variant(activation, spec.out_dtype)
  if kind == "none":
    return None
  if kind == "output":
    return ACTIVATIONS[activation].from_output(r.astype(spec.acc_dtype))
  z = _pre_activation(x, k, r, spec, impl)
  return jax.jvp(ACTIVATIONS[activation].fn, (z,), (jnp.ones_like(z),))[1]


def lin_formula(*args, present: tuple[bool, bool, bool], spec: ConvSpec, impl: Impl,
                activation: str | None):
  """`act'(z) * (conv(dx, k) + conv(x, dk) + db)` for the tangents `present` (x, k, b)."""
  n = sum(present)
  tangents, (x, k, r) = iter(args[:n]), args[n:]
  dx, dk, db = (next(tangents) if p else None for p in present)
  acc = spec.acc_dtype
  terms = []
  if dx is not None:
    terms.append(_primitive.conv(dx, k, spec, impl, acc))
  if dk is not None:
    terms.append(_primitive.conv(x, dk, spec, impl, acc))
  if db is not None:
    terms.append(_bias(db, spec, acc))
  d = functools.reduce(jnp.add, terms)
  s = _slope(x, k, r, spec=spec, impl=impl, activation=activation)
  return (d if s is None else d * s).astype(spec.out_dtype)


def grad_formula(x, k, r, ct, *, spec: ConvSpec, impl: Impl, activation: str | None):
  """`(g, dk, db)`: `g = ct * act'(z)`, `dk = dk(x, g)`, `db` the sum of g per channel."""
  s = _slope(x, k, r, spec=spec, impl=impl, activation=activation)
  g = ct if s is None else ct.astype(spec.acc_dtype) * s
  dk = _primitive.kernel_grad(x, g, spec, impl, k.dtype)
  axes = tuple(i for i in range(5) if i != spec.channel_axis)
  db = jnp.sum(g, axis=axes, dtype=spec.acc_dtype).astype(x.dtype)
  return g, dk, db


# ----------------------------------------------------------------------------
# The primitives.

epilogue_p = Primitive("dw5d_epilogue")
epilogue_lin_p = Primitive("dw5d_epilogue_lin")
epilogue_grad_p = Primitive("dw5d_epilogue_grad")
epilogue_grad_p.multiple_results = True


def apply(x, k, b, spec: ConvSpec, impl: Impl, activation: str | None,
          split: Any = None) -> jax.Array:
  """`activation(conv(x, k) + b)`, fused where the native kernels run.

  Blocks inside `shard_map` (`split`, or operands varying over manual mesh
  axes) take the formula at once: its `dw5d_p` exchanges the halos
  (`_partition.blockwise`), its bias and activation are elementwise. Arrays
  sharded under `jit` bind the epilogue ops, which partition themselves
  (`_partition.partitioned_epilogue`): each device runs them, fused, on its
  blocks.
  """
  if split is not None or any(jax.typeof(v).manual_axis_type.varying for v in (x, k, b)):
    return forward_formula(x, k, b, spec=spec, impl=impl, activation=activation, split=split)
  return epilogue_p.bind(x, k, b, spec=spec, impl=impl, activation=activation)


def _out_aval(x, k, spec: ConvSpec, dtype) -> jax.core.ShapedArray:
  shape = _primitive.out_shape("fwd", x.shape, spec)
  return jax.core.ShapedArray(shape, np.dtype(dtype),
                              sharding=_sharding.out_sharding("fwd", x, k, spec, shape))


def _forward_abstract(x, k, b, *, spec, **_):
  del b
  return _out_aval(x, k, spec, spec.out_dtype)


def _lin_abstract(*args, spec, **_):
  return _out_aval(args[-3], args[-2], spec, spec.out_dtype)


def _grad_abstract(x, k, r, ct, *, spec, activation, **_):
  del r
  g_dtype = ct.dtype if activation is None else spec.acc_dtype
  dk = _sharding.out_sharding("dk", x, ct, spec, k.shape)
  return (jax.core.ShapedArray(ct.shape, np.dtype(g_dtype),
                               sharding=None if dk is None else ct.sharding),
          jax.core.ShapedArray(k.shape, k.dtype, sharding=dk),
          jax.core.ShapedArray((spec.channels * spec.multiplier,), x.dtype,
                               sharding=_sharding.bias_sharding(dk)))


def _forward_jvp(primals, tangents, *, spec, impl, activation):
  x, k, b = primals
  y = epilogue_p.bind(x, k, b, spec=spec, impl=impl, activation=activation)
  present = tuple(type(t) is not ad.Zero for t in tangents)
  if not any(present):
    return y, ad.Zero.from_primal_value(y)
  r = y if variant(activation, spec.out_dtype) == "output" else b
  dy = epilogue_lin_p.bind(*(t for t in tangents if type(t) is not ad.Zero), x, k, r,
                           present=present, spec=spec, impl=impl, activation=activation)
  return y, dy


def _lin_transpose(ct, *args, present, spec, impl, activation):
  n = sum(present)
  tangents, (x, k, r) = args[:n], args[n:]
  if any(ad.is_undefined_primal(v) for v in (x, k, r)):
    raise NotImplementedError("dw5d_epilogue_lin is linear in its tangents only")
  wanted = [ad.is_undefined_primal(t) for t in tangents]
  if type(ct) is ad.Zero or not any(wanted):
    return [None] * len(args)
  g, dk, db = epilogue_grad_p.bind(x, k, r, ct, spec=spec, impl=impl, activation=activation)
  out = []
  kinds = iter(name for name, p in zip("xkb", present) if p)
  for t, want in zip(tangents, wanted):
    kind = next(kinds)
    if not want:
      out.append(None)
    elif kind == "x":
      out.append(_sharding.like(_primitive.input_grad(g, k, spec, impl, t.aval.dtype), t.aval))
    else:
      out.append(_sharding.like((dk if kind == "k" else db).astype(t.aval.dtype), t.aval))
  return [*out, None, None, None]


def _formula_jvp(formula, multiple_results: bool):
  """A JVP rule that differentiates the unfused `formula` (higher orders)."""

  def rule(primals, tangents, **params):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    out, dout = jax.jvp(functools.partial(formula, **params), tuple(primals), tuple(tangents))
    return (list(out), list(dout)) if multiple_results else (out, dout)

  return rule


# Operand and result roles, for batching (`_primitive.fold`): "data" arrays
# have the channels at the spec's channel axis, "kernel" and "bias" are
# small; a "data" result can fold the batch into N when no small operand is
# batched, a "kernel" or "bias" result never.
def _roles(prim: Primitive, params: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  r = "data" if variant(params["activation"], params["spec"].out_dtype) == "output" else "bias"
  if prim is epilogue_p:
    return ("data", "kernel", "bias"), ("data",)
  if prim is epilogue_lin_p:
    tangents = tuple(role for role, p in zip(("data", "kernel", "bias"), params["present"]) if p)
    return (*tangents, "data", "kernel", r), ("data",)
  return ("data", "kernel", r, "data"), ("data", "kernel", "bias")


def _batch_rule(prim: Primitive):
  def rule(args, dims, **params):
    roles, out_roles = _roles(prim, params)
    spec = params["spec"]
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    small_batched = any(d is not None for d, role in zip(dims, roles) if role != "data")
    if not small_batched and set(out_roles) == {"data"}:
      # Into N: every data operand (B, N, ...) -> (B * N, ...); kernel and bias shared.
      args = [_primitive.lead(a, d, size) if role == "data" else a
              for a, d, role in zip(args, dims, roles)]
      n = next(a.shape[1] for a, role in zip(args, roles) if role == "data")
      out = prim.bind(*(a.reshape(size * n, *a.shape[2:]) if role == "data" else a
                        for a, role in zip(args, roles)), **params)
      return out.reshape(size, n, *out.shape[1:]), 0
    # Into the channels: B problems of C channels are one of B * C.
    args = [_primitive.fold(_primitive.lead(a, d, size), role, spec)
            for a, d, role in zip(args, dims, roles)]
    out = prim.bind(*args, **{**params, "spec": spec._replace(channels=size * spec.channels)})
    if prim.multiple_results:
      return ([_primitive.unfold(o, role, spec, size) for o, role in zip(out, out_roles)],
              [0] * len(out))
    return _primitive.unfold(out, out_roles[0], spec, size), 0

  return rule


def _eager(prim: Primitive):
  @functools.cache
  def jitted(**params):
    return jax.jit(functools.partial(prim.bind, **params))

  # Through jit, so that eager calls take the same lowering rules as traced ones.
  return lambda *args, **params: jitted(**params)(*args)


def _register(prim: Primitive, abstract) -> None:
  prim.def_abstract_eval(abstract)
  prim.def_impl(_eager(prim))
  batching.primitive_batchers[prim] = _batch_rule(prim)


# The lowerings (fused where the policy says, else the formulas) are
# registered by `_lowering.py`.
_register(epilogue_p, _forward_abstract)
_register(epilogue_lin_p, _lin_abstract)
_register(epilogue_grad_p, _grad_abstract)
ad.primitive_jvps[epilogue_p] = _forward_jvp
ad.primitive_jvps[epilogue_lin_p] = _formula_jvp(lin_formula, False)
ad.primitive_jvps[epilogue_grad_p] = _formula_jvp(grad_formula, True)
ad.primitive_transposes[epilogue_lin_p] = _lin_transpose
