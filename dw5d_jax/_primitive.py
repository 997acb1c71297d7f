"""The convolution and its two gradients as one JAX primitive, whatever computes them.

Three bilinear ops on rank-5 arrays in the spec's layout make up the
depthwise convolution and its derivatives (tap `t`, output position `o`,
input position `p`, per axis `p = o * s + t * r - lo`):

* `fwd(x, w)`: `y[n, o, c*M + m] = sum_t x[n, o*s + t*r - lo, c] * w[t, c, m]`;
* `dx(ct, w)`: `dx[n, p, c] = sum_{t, m, o} ct[n, o, c*M + m] * w[t, c, m]`;
* `dk(x, ct)`: `dw[t, c, m] = sum_{n, o} x[n, o*s + t*r - lo, c] * ct[n, o, c*M + m]`.

They are the three partial derivatives of the trilinear form
`<fwd(x, w), ct>`, so each op's transposes are two of the others, e.g.
`<dx(ct, w), g> = <ct, fwd(g, w)> = <w, dk(g, ct)>`. One primitive,
`dw5d_p`, carries all three (parameter `op`), with `ad.defbilinear`
(forward mode, and by transposition reverse mode, to any order) and a
batching rule. JAX therefore never differentiates a lowering: whichever
code computes an op (`_policy.decide` chooses, `_lowering.py` builds it:
XLA's grouped convolution, the shift lowering, the native CPU kernels,
Pallas), its gradient is again this primitive, and a sharding rule or a
lowering added for one op holds for the gradients too. This module defines
the primitive (shapes, batching, transposes) and imports no
implementation; its lowering rules are `_lowering.py`'s.

Parameters: `op`, `spec` (a `ConvSpec`, the same for all three ops),
`impl` (an `Impl`: the user's method, Pallas options and the export
target, `_spec.py`), `out_dtype`
(the result's dtype: the spec's output dtype for the convolution, the
dtype of the operand being differentiated for the gradients) and `split`
(None, or inside `shard_map` the `_sharding.Layout` of the spatial axes
the operands are blocks of; `spec` then describes the whole arrays).

Sharding (`_sharding.py`): the abstract evaluation gives results their
sharding under explicit mesh axes, the transposes give cotangents their
primal's, and a lowering for several devices partitions the op by its own
rule (`_partition.py`), so XLA never partitions the convolution.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from dw5d_jax import _sharding
from dw5d_jax._sharding import Layout
from dw5d_jax._spec import ConvSpec, Impl

dw5d_p = Primitive("dw5d_depthwise")


def conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec, impl: Impl,
         out_dtype: Any = None, split: Layout | None = None) -> jax.Array:
  """`fwd(x, kernel)`: the depthwise convolution, `spec.out_dtype` by default.

  `split`: x is one block of an array split along spatial axes inside
  `shard_map` (`_sharding.Layout`); `spec` describes the whole array.
  """
  out_dtype = spec.out_dtype if out_dtype is None else out_dtype
  return _bind(x, kernel, op="fwd", spec=spec, impl=impl, out_dtype=out_dtype, split=split)


def input_grad(ct: jax.Array, kernel: jax.Array, spec: ConvSpec, impl: Impl,
               out_dtype: Any, split: Layout | None = None) -> jax.Array:
  """`dx(ct, kernel)`: `d <fwd(x, kernel), ct> / dx`."""
  return _bind(ct, kernel, op="dx", spec=spec, impl=impl, out_dtype=out_dtype, split=split)


def kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec, impl: Impl,
                out_dtype: Any, split: Layout | None = None) -> jax.Array:
  """`dk(x, ct)`: `d <fwd(x, kernel), ct> / dkernel`."""
  return _bind(x, ct, op="dk", spec=spec, impl=impl, out_dtype=out_dtype, split=split)


def _bind(a, b, *, out_dtype, **params):
  a, b = _sharding.vary(a, b)
  return dw5d_p.bind(a, b, out_dtype=np.dtype(out_dtype), **params)


def out_shape(op: str, a_shape: tuple[Any, ...], spec: ConvSpec,
              split: Layout | None = None) -> tuple[Any, ...]:
  """The result's shape for `op` with first operand of shape `a_shape`.

  With `split`, the shape of one block (split spatial axes divided evenly).
  """
  c, m = spec.channels, spec.multiplier
  if op == "dk":
    return (*spec.window, c, m)
  spatial, channels = (spec.out_spatial, c * m) if op == "fwd" else (spec.in_spatial, c)
  if split is not None:
    spatial = tuple(d // split.parts(axes) for d, axes in zip(spatial, split.spatial))
  if spec.channels_last:
    return (a_shape[0], *spatial, channels)
  return (a_shape[0], channels, *spatial)


def abstract_eval(a, b, *, op, spec, out_dtype, split, **_):
  """The result's aval: its shape, dtype and sharding."""
  shape = out_shape(op, a.shape, spec, split)
  return jax.core.ShapedArray(shape, out_dtype,
                              sharding=_sharding.out_sharding(op, a, b, spec, shape),
                              manual_axis_type=a.manual_axis_type)


@functools.cache
def _jitted_bind(**params):
  return jax.jit(functools.partial(dw5d_p.bind, **params))


def _eager_impl(a, b, **params):
  # Through jit, so an eager call (e.g. a gradient outside jit) takes the
  # same lowering rules as a traced one.
  return _jitted_bind(**params)(a, b)


# Transposes from the trilinear form (module docstring): (op, the undefined
# operand: 0 for a, 1 for b) -> the op computing its cotangent, on operands
# named g (the output's cotangent), a and b. E.g. fwd(x, w) in x: dx(g, w).
_TRANSPOSES = {
    ("fwd", 0): ("dx", "gb"), ("dx", 0): ("fwd", "gb"), ("dk", 0): ("dx", "bg"),
    ("fwd", 1): ("dk", "ag"), ("dx", 1): ("dk", "ga"), ("dk", 1): ("fwd", "ag"),
}


def _transpose(undefined: int, g, a, b, *, op, out_dtype, **params):
  """The cotangent of operand `undefined`, in its aval's dtype and (explicit) sharding."""
  del out_dtype
  aval = (a, b)[undefined].aval
  new_op, names = _TRANSPOSES[op, undefined]
  values = {"g": g, "a": a, "b": b}
  out = _bind(*(values[n] for n in names), op=new_op, out_dtype=aval.dtype, **params)
  return _sharding.like(out, aval)


def _batch_rule(args, dims, *, op, spec: ConvSpec, **params):
  """vmap: into the batch axis where the kernel is shared, else into the channels.

  A depthwise convolution treats channels independently, so B problems with
  their own kernels are one problem with B*C channels: channel b*C + c, and
  output channel (b*C + c)*M + m = b*(C*M) + (c*M + m), so B splits off the
  channel axis of every operand and result without reordering.
  """
  a, b = args
  da, db = dims
  if op in ("fwd", "dx") and db is None:
    a = jnp.moveaxis(a, da, 0)
    size, n = a.shape[0], a.shape[1]
    out = dw5d_p.bind(a.reshape(size * n, *a.shape[2:]), b, op=op, spec=spec, **params)
    return out.reshape(size, n, *out.shape[1:]), 0
  size = a.shape[da] if da is not None else b.shape[db]
  a, b = (lead(v, d, size) for v, d in ((a, da), (b, db)))
  folded = spec._replace(channels=size * spec.channels)
  roles = ("data", "data") if op == "dk" else ("data", "kernel")
  out = dw5d_p.bind(*(fold(v, r, spec) for v, r in zip((a, b), roles)), op=op, spec=folded,
                    **params)
  return unfold(out, "kernel" if op == "dk" else "data", spec, size), 0


def lead(v: jax.Array, d: int | None, size: int) -> jax.Array:
  """`v` with its batch axis `d` first (broadcast to `size` when it has none)."""
  if d is None:
    return jnp.broadcast_to(v[None], (size, *v.shape))
  return jnp.moveaxis(v, d, 0)


def fold(v: jax.Array, role: str, spec: ConvSpec) -> jax.Array:
  """A batched operand `(B, ...)` with B merged into its channels (see `_batch_rule`).

  `role`: "data" (channels at `spec.channel_axis`, C or C*M of them),
  "kernel" (`(kd, kh, kw, C, M)` -> `(kd, kh, kw, B*C, M)`) or "bias"
  (`(C*M,)` -> `(B*C*M,)`).
  """
  size = v.shape[0]
  if role == "bias":
    return v.reshape(size * v.shape[1])
  if role == "kernel":
    v = jnp.moveaxis(v, 0, 3)
    return v.reshape(*v.shape[:3], size * v.shape[4], v.shape[5])
  ch = spec.channel_axis
  v = jnp.moveaxis(v, 0, ch)
  return v.reshape(*v.shape[:ch], size * v.shape[ch + 1], *v.shape[ch + 2:])


def unfold(v: jax.Array, role: str, spec: ConvSpec, size: int) -> jax.Array:
  """The inverse of `fold` for a result: `(B, ...)`."""
  if role == "bias":
    return v.reshape(size, v.shape[0] // size)
  if role == "kernel":
    v = v.reshape(*v.shape[:3], size, v.shape[3] // size, v.shape[4])
    return jnp.moveaxis(v, 3, 0)
  ch = spec.channel_axis
  v = v.reshape(*v.shape[:ch], size, v.shape[ch] // size, *v.shape[ch + 1:])
  return jnp.moveaxis(v, ch, 0)


dw5d_p.def_abstract_eval(abstract_eval)
dw5d_p.def_impl(_eager_impl)
ad.defbilinear(dw5d_p, functools.partial(_transpose, 0), functools.partial(_transpose, 1))
batching.primitive_batchers[dw5d_p] = _batch_rule
# The lowerings (`_policy.decide` picks one) are registered by `_lowering.py`.
