"""A 1-frame streaming step as one primitive: the frame into the ring, the ring's window convolved.

`stream_step` (`_streaming.py`) keeps a stream's frames in a ring of `e`
slots along the streamed axis (`e = (k - 1) * r + 1`, kernel `k` and
dilation `r` along it): `head` is the free slot, the oldest kept frame is at
`head + 1`. A step of one frame writes the frame into slot `head`; the `e`
frames from the oldest on are then the window of the frame's output.
`ring_step_p(ring, frame, kernel, head) -> (ring, y)` is that step on
normalised rank-5 operands (`ConvSpec`: `spec` is the convolution of the
window, `e` frames in and one out along spatial axis `axis`).

Two implementations, `_policy.decide_ring_step`'s choice at lowering time
(`_lowering.py`):

* **native** (`_native.stream_step`): one call that writes the frame into
  the ring in place (the result aliases the ring: no copy when the state is
  donated or carried by `lax.scan`) and convolves the window reading each
  tap's frame where it lies in the ring, summing the taps in the full op's
  order;
* **formula** (`formula`): the same with XLA's ops, which every export and
  every other platform lowers: `lax.dynamic_update_slice` of the frame, and
  the ring convolved as it lies with the kernel's taps along `axis` rotated
  into the ring's order (a rotation of the kernel, not of the frames), or,
  with a dilation `r > 1`, the `k` frames the taps read gathered in order and
  convolved without dilation. Its convolutions are `dw5d_p`, which takes
  `_policy.decide`'s steps.

Derivatives and `vmap` are the formula's (`jax.jvp`, `jax.vmap` of it), so
they hold whichever implementation runs the step itself.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from dw5d_jax import _geometry, _primitive
from dw5d_jax._spec import ConvSpec, Impl

ring_step_p = Primitive("dw5d_ring_step")
ring_step_p.multiple_results = True


def ring_step(ring: jax.Array, frame: jax.Array, kernel: jax.Array, head: jax.Array, *,
              spec: ConvSpec, impl: Impl, axis: int) -> tuple[jax.Array, jax.Array]:
  """`(ring, y)` for normalised rank-5 `ring`, `frame` (one frame along `axis`) and
  `kernel`; `head` an int32 scalar in `[0, e)`."""
  ring, y = ring_step_p.bind(ring, frame, kernel, jnp.asarray(head, jnp.int32), spec=spec,
                             impl=impl, axis=axis)
  return ring, y


def formula(ring: jax.Array, frame: jax.Array, kernel: jax.Array, head: jax.Array, *,
            spec: ConvSpec, impl: Impl, axis: int) -> tuple[jax.Array, jax.Array]:
  """The step with XLA's ops (module docstring): what every implementation computes."""
  t = spec.spatial_axes[axis]
  size, k, r = spec.in_spatial[axis], spec.window[axis], spec.dilations[axis]
  ring = lax.dynamic_update_slice_in_dim(ring, frame, head, t)
  oldest = _geometry.stream_oldest(head, size)
  if r == 1:
    # Slot j meets tap (j - oldest) mod e: the taps rotated by `oldest`.
    return ring, _primitive.conv(ring, jnp.roll(kernel, oldest, axis=axis), spec, impl)
  # Tap a reads slot (oldest + a * r) mod e: those k frames, in order, undilated.
  taps = [lax.dynamic_index_in_dim(ring, (oldest + a * r) % size, t) for a in range(k)]
  undilated = spec._replace(in_spatial=_at(spec.in_spatial, axis, k),
                            dilations=_at(spec.dilations, axis, 1))
  return ring, _primitive.conv(lax.concatenate(taps, t), kernel, undilated, impl)


def _at(values: tuple[Any, ...], i: int, value: Any) -> tuple[Any, ...]:
  return (*values[:i], value, *values[i + 1:])


def _abstract_eval(ring, frame, kernel, head, *, spec: ConvSpec, impl: Impl, axis: int):
  del frame, head, impl, axis
  return [ring, _primitive.abstract_eval(ring, kernel, op="fwd", spec=spec,
                                         out_dtype=np.dtype(spec.out_dtype), split=None)]


def _jvp(primals, tangents, **params):
  """The formula's JVP (`head`, an index, has none)."""
  *data, head = primals
  tangents = [ad.instantiate_zeros(t) for t in tangents[:3]]
  out, out_tangents = jax.jvp(lambda *a: formula(*a, head, **params), tuple(data),
                              tuple(tangents))
  return list(out), list(out_tangents)


def _batch_rule(args, dims, **params):
  out = jax.vmap(functools.partial(formula, **params), in_axes=tuple(dims))(*args)
  return list(out), [0, 0]


@functools.cache
def _jitted_bind(**params):
  return jax.jit(functools.partial(ring_step_p.bind, **params))


def _eager_impl(*args, **params):
  # Through jit, so that an eager step takes the same lowering rules as a traced one.
  return _jitted_bind(**params)(*args)


ring_step_p.def_abstract_eval(_abstract_eval)
ring_step_p.def_impl(_eager_impl)
ad.primitive_jvps[ring_step_p] = _jvp
batching.primitive_batchers[ring_step_p] = _batch_rule
# The lowering (`_policy.decide_ring_step` picks one) is registered by `_lowering.py`.
