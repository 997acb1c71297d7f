"""Sharded cases on simulated CPU devices, run in a process of their own.

tests/test_sharding.py runs `python tests/sharding_worker.py GROUP` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (set before JAX is
imported: pytest's own process has one device) and reads one JSON line per
case. This file is not collected by pytest (its name does not start with
`test_`); `CASES` is also imported there to name the tests.

Each case places x (and, for channel splits, the kernel) on a mesh, compiles
`y, (dx, dk) = vjp(op)(x, k)(ct)` (the three ops of the primitive) under
`jit`, and checks:

* the values against the same function on one device (float32 tolerance);
* the result shardings (y and dx split like x);
* the compiled HLO's collectives: all-reduce, reduce-scatter, all-gather
  and all-to-all only of kernel-sized data; collective-permute only
  where a spatial axis is split, moving in all at most 1.05x the halo
  rows that `_geometry.input_span` says each op's blocks read beyond
  their own (`benchmarks/sharding.py`'s `analytic_halo_bytes`, from the
  definition, not from `_geometry.Blocks`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import traceback
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from sharding import analytic_halo_bytes, collectives, halo_rows  # noqa: E402, F401

AUTO, EXPLICIT = "auto", "explicit"
PALLAS = "pallas-interpret"  # method: the Pallas kernels in interpret mode (any platform)


@dataclasses.dataclass(frozen=True)
class Case:
  """One sharded problem: the op, shapes, how x is split, the methods to run."""

  name: str
  axis_types: str  # AUTO or EXPLICIT
  mesh: tuple[tuple[int, ...], tuple[str, ...]]
  x_spec: tuple[Any, ...]
  shape: tuple[int, ...]  # x, in its layout
  window: tuple[int, ...]
  multiplier: int = 1
  kwargs: tuple[tuple[str, Any], ...] = ()
  methods: tuple[str, ...] = ("auto", "conv")
  kernel_spec: tuple[Any, ...] = ()
  second_order: bool = False
  crop: tuple[int, ...] = ()  # x's shape inside the jit, cut from the placed `shape`
  shard_map: bool = False  # the op on the blocks inside jax.shard_map (split_axes=)

  @property
  def op(self) -> str:
    return "depthwise_conv3d" if len(self.window) == 3 else "depthwise_conv2d"


_2x4 = ((2, 4), ("data", "space"))
_8 = ((8,), ("d",))
_4 = ((4,), ("d",))

CASES = {
    "auto": [
        Case("batch", AUTO, _8, ("d",), (8, 8, 12, 10, 8), (3, 3, 3)),
        Case("depth", AUTO, _8, (None, "d"), (2, 16, 12, 10, 8), (3, 3, 3), second_order=True,
             methods=("auto", "shift", "conv")),
        Case("height_2d_strided", AUTO, _8, (None, None, "d"), (2, 4, 32, 12, 8), (3, 3),
             multiplier=2, kwargs=(("strides", 2), ("axes", "HW"))),
        Case("width_channels_first_dilated", AUTO, _4,
             (None, None, None, None, "d"), (2, 8, 6, 6, 32), (3, 3, 3),
             kwargs=(("dilations", 2), ("data_format", "NCDHW"))),
        # XLA's partitioner computed 4x the kernel gradient of these (per-slice 2D,
        # batch and depth/height split on a 2x4 mesh).
        Case("batch_depth_2x4_hw", AUTO, _2x4, ("data", "space"), (8, 16, 32, 24, 16), (3, 3),
             kwargs=(("axes", "HW"),)),
        Case("batch_height_2x4_dw", AUTO, _2x4, ("data", None, "space"), (8, 16, 32, 24, 16),
             (3, 3), kwargs=(("axes", "DW"),)),
        Case("depth_height_2x4", AUTO, _2x4, (None, "data", "space"), (2, 8, 16, 6, 8),
             (3, 3, 3), second_order=True),
        Case("channels", AUTO, _4, (None, None, None, None, "d"), (2, 6, 6, 6, 8), (3, 3, 3),
             multiplier=2, kernel_spec=(None, None, None, "d", None)),
        Case("batch_channels_2x4", AUTO, _2x4, ("data", None, None, None, "space"),
             (4, 6, 6, 6, 8), (3, 3, 3), kernel_spec=(None, None, None, "space", None)),
        # SAME, strided: 12 outputs over 8 blocks of 2 (the last two blocks have none).
        Case("depth_same_strided_uneven_out", AUTO, _8, (None, "d"), (2, 24, 6, 6, 8),
             (3, 3, 3), kwargs=(("strides", 2),)),
        # Sizes the mesh does not divide: 21 inputs in blocks of 3, 11 outputs in blocks of 2.
        Case("depth_uneven", AUTO, _8, (None, "d"), (2, 24, 6, 6, 8), (3, 3, 3),
             kwargs=(("strides", 2),), crop=(2, 21, 6, 6, 8)),
        # 30 rows in blocks of 8, the last half padding (blocks line up: the op in pieces).
        Case("height_uneven_pieces", AUTO, _4, (None, None, "d"), (2, 4, 32, 6, 8), (3, 3, 3),
             crop=(2, 4, 30, 6, 8)),
        # VALID: outputs 28 in blocks of 14 read inputs in blocks of 16 (moving offsets).
        Case("height_valid_offsets", AUTO, ((2,), ("d",)), (None, None, "d"), (2, 4, 32, 6, 8),
             (5, 5), kwargs=(("padding", "VALID"), ("axes", "HW"))),
        # A halo (4 rows each side) wider than a block (2 rows): two hops.
        Case("depth_multi_hop", AUTO, _8, (None, "d"), (2, 16, 6, 6, 8), (3, 3, 3),
             kwargs=(("dilations", (4, 1, 1)),), second_order=True),
        Case("batch_uneven_explicit_pads", AUTO, _4, ("d",), (8, 10, 6, 6, 8), (3, 2, 3),
             kwargs=(("padding", ((2, 0), (0, 1), "CAUSAL")),), crop=(6, 10, 6, 6, 8)),
        # The epilogue (bias + activation): its formula, the convolution partitioned.
        Case("depth_gelu", AUTO, _8, (None, "d"), (2, 16, 12, 10, 8), (3, 3, 3),
             kwargs=(("activation", "gelu"),), second_order=True),
    ],
    "explicit": [
        Case("batch", EXPLICIT, _8, ("d",), (8, 8, 12, 10, 8), (3, 3, 3), second_order=True),
        Case("depth", EXPLICIT, _8, (None, "d"), (2, 16, 12, 10, 8), (3, 3, 3),
             second_order=True),
        Case("height_2d_strided", EXPLICIT, _8, (None, None, "d"), (2, 4, 32, 12, 8), (3, 3),
             multiplier=2, kwargs=(("strides", 2), ("axes", "HW"))),
        Case("batch_depth_2x4_hw", EXPLICIT, _2x4, ("data", "space"), (8, 16, 32, 24, 16),
             (3, 3), kwargs=(("axes", "HW"),)),
        Case("batch_height_2x4_dw", EXPLICIT, _2x4, ("data", None, "space"),
             (8, 16, 32, 24, 16), (3, 3), kwargs=(("axes", "DW"),)),
        Case("depth_width_2x4_channels_first", EXPLICIT, _2x4, (None, None, "data", None, "space"),
             (2, 8, 8, 6, 16), (3, 3, 3), kwargs=(("data_format", "NCDHW"),)),
        Case("channels", EXPLICIT, _4, (None, None, None, None, "d"), (2, 6, 6, 6, 8), (3, 3, 3),
             multiplier=2, kernel_spec=(None, None, None, "d", None)),
        Case("batch_sigmoid", EXPLICIT, _8, ("d",), (8, 8, 12, 10, 8), (3, 3, 3),
             kwargs=(("activation", "sigmoid"),)),
        # x's channels split, the kernel's not: its gradient is resharded to match it.
        Case("channels_kernel_replicated", EXPLICIT, _4, (None, None, None, None, "d"),
             (2, 6, 6, 6, 8), (3, 3, 3), multiplier=2),
    ],
    # Slow (the Pallas interpreter): run by tests/test_sharding.py on request only.
    "pallas": [
        Case("depth", AUTO, _4, (None, "d"), (1, 8, 6, 6, 4), (3, 3, 3), methods=(PALLAS,)),
        Case("batch_height", EXPLICIT, ((2, 2), ("data", "space")), ("data", None, "space"),
             (2, 4, 8, 6, 4), (3, 3, 3), methods=(PALLAS,)),
    ],
    "shard_map": [
        Case("depth", EXPLICIT, _8, (None, "d"), (2, 16, 12, 10, 8), (3, 3, 3),
             shard_map=True, second_order=True),
        Case("depth_height_strided", AUTO, _2x4, (None, "data", "space"), (2, 8, 16, 6, 8),
             (3, 3, 3), multiplier=2, kwargs=(("strides", 2),), shard_map=True),
        Case("batch_width_2d_multi_hop", EXPLICIT, _2x4, ("data", None, None, "space"),
             (4, 4, 6, 8, 8), (3, 5), kwargs=(("axes", "HW"), ("dilations", 2)),
             shard_map=True, second_order=True),
        Case("depth_silu", AUTO, _8, (None, "d"), (2, 16, 12, 10, 8), (3, 3, 3),
             kwargs=(("activation", "silu"),), shard_map=True),
        # Border modes along split axes: end blocks fill their padding, circular wraps
        # between the first and last blocks; a pad wider than a block (reflect, 2 hops).
        Case("depth_height_modes", EXPLICIT, _2x4, (None, "data", "space"), (2, 8, 16, 6, 8),
             (3, 3, 3), kwargs=(("padding_mode", ("circular", "reflect", "edge")),),
             shard_map=True, second_order=True),
        Case("width_reflect_multi_hop", AUTO, _8, (None, None, None, "d"), (2, 4, 6, 16, 8),
             (3, 5), kwargs=(("axes", "HW"), ("dilations", 2), ("padding_mode", "reflect"),
                             ("activation", "relu")), shard_map=True),
    ],
}


# ----------------------------------------------------------------------------
# Collectives in the compiled HLO (the analytic halo and the HLO reading are the
# sharding benchmark's: benchmarks/sharding.py).


def check_collectives(found: list[tuple[str, int, int]], kernel_elems: int,
                      halo_bytes: int) -> list[str]:
  """What is wrong with the collectives `found` (empty: nothing)."""
  errors = []
  for kind, elems, _ in found:
    if kind != "collective-permute" and elems > kernel_elems:
      errors.append(f"{kind} of {elems} elements (kernel: {kernel_elems})")
  moved = sum(b for kind, _, b in found if kind == "collective-permute")
  if not halo_bytes and moved:
    errors.append(f"collective-permute of {moved} bytes where no halo is needed")
  if halo_bytes and not (0 < moved <= 1.05 * halo_bytes):
    errors.append(f"collective-permute of {moved} bytes, analytic halo {halo_bytes} bytes")
  return errors


# ----------------------------------------------------------------------------
# Running a case.


def _pspec(entries: tuple[Any, ...]):
  from jax.sharding import PartitionSpec as P

  return P(*entries)


def run_case(case: Case, method: str) -> dict[str, Any]:
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding

  import dw5d_jax as dw

  kw = dict(case.kwargs)
  rng = np.random.default_rng(0)
  shape = case.crop or case.shape
  channels = shape[1 if kw.get("data_format", "").startswith("NC") else -1]
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((*case.window, channels, case.multiplier)).astype(np.float32)
  op = getattr(dw, case.op) if method != PALLAS else _pallas_op
  plain = lambda x, k: op(x, k, method=method, **kw)  # noqa: E731
  y_shape = jax.eval_shape(plain, x, k).shape
  ct = rng.standard_normal(y_shape).astype(np.float32)

  types = {AUTO: AxisType.Auto, EXPLICIT: AxisType.Explicit}[case.axis_types]
  mesh = jax.make_mesh(*case.mesh, axis_types=(types,) * len(case.mesh[0]))
  data = NamedSharding(mesh, _pspec(case.x_spec))
  parts = [math.prod(mesh.shape[n] for n in _names(e)) if e else 1
           for e in (*case.x_spec, *(None,) * 5)[:5]]
  sharded = plain
  if case.shard_map:
    spatial = (2, 3, 4) if kw.get("data_format", "").startswith("NC") else (1, 2, 3)
    split = {a: case.x_spec[ax] for a, ax in zip("DHW", spatial)
             if ax < len(case.x_spec) and case.x_spec[ax]}
    sharded = jax.shard_map(lambda x, k: op(x, k, method=method, split_axes=split, **kw),
                            mesh=mesh, in_specs=(data.spec, _pspec(case.kernel_spec)),
                            out_specs=data.spec)

  xs, cts = _place(x, data, parts), _place(ct, data, parts)
  ks = jax.device_put(k, NamedSharding(mesh, _pspec(case.kernel_spec)))
  errors, summary, moved, halo = [], {}, 0, 0
  for name in ("step", "second order"):
    if name == "second order" and not case.second_order:
      continue
    expected = jax.jit(_program(name, plain, shape, y_shape, None, parts))(
        np.asarray(xs), k, np.asarray(cts))
    with jax.set_mesh(mesh):
      compiled = jax.jit(_program(name, sharded, shape, y_shape, data, parts)).lower(
          xs, ks, cts).compile()
      got = compiled(xs, ks, cts)
    for what, a, b in zip(("y", "dx", "dk") if name == "step" else ("d2x", "d2k"), got,
                          expected):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      scale = max(1.0, float(np.abs(b).max()))
      err = float(np.abs(a - b).max()) / scale
      if not err <= 2e-5:
        errors.append(f"{name}: {what} differs from one device by {err:.2e} (relative)")
    if name == "step":
      for what, a in (("y", got[0]), ("dx", got[1])):
        if _dims(a.sharding.spec) != _dims(data.spec):
          errors.append(f"{what} sharded {a.sharding.spec}, x {data.spec}")
      spec = _spec(case, x, k)
      halo = analytic_halo_bytes(spec, x.shape, y_shape, parts, 4)
      found = collectives(compiled.as_text())
      errors += check_collectives(found, k.size, halo)
      summary = {kind: sum(1 for c in found if c[0] == kind) for kind, _, _ in found}
      moved = sum(b for kind, _, b in found if kind == "collective-permute")
  return {"case": case.name, "method": method, "errors": errors, "collectives": summary,
          "permute_bytes": moved, "halo_bytes": halo}


def _pallas_op(x, k, *, method, **kw):
  """`depthwise_conv3d` (channels-last, SAME) through the Pallas kernels in interpret mode."""
  from dw5d_jax import _args, _pallas, _primitive

  del method
  assert not kw, kw
  x5, k5, spec = _args.normalize("pallas", x, k, conv_axes="DHW", layout="NDHWC",
                                 strides=(1, 1, 1), dilations=(1, 1, 1),
                                 padding=("SAME",) * 3, precision=None, preferred=None)
  return _primitive.conv(x5, k5, spec, _pallas.impl(interpret=True))


def _even(shape, parts):
  return tuple(-(-d // p) * p for d, p in zip(shape, parts))


def _place(v, sharding, parts):
  """`v` zero-padded to sizes the mesh divides, on the mesh."""
  import jax
  import numpy as np

  return jax.device_put(np.pad(v, [(0, e - d) for d, e in zip(v.shape, _even(v.shape, parts))]),
                        sharding)


def _program(name: str, f, x_shape, y_shape, data, parts):
  """`(x, k, ct) -> (y, dx, dk)` through `f` (or the second-order terms), on padded arrays.

  x and ct arrive padded to sizes the mesh divides; inside they are cut to
  the problem's (uneven) sizes, split like x, and y and dx are padded back
  (the same blocks: no data moves).
  """
  import jax
  import jax.numpy as jnp

  def cut(v, shape):
    if v.shape == shape:
      return v
    v = v[tuple(slice(0, d) for d in shape)]
    return v if data is None else jax.lax.with_sharding_constraint(v, data)

  def grow(v):
    pads = [(0, e - d) for d, e in zip(v.shape, _even(v.shape, parts))]
    return v if not any(p for _, p in pads) else jnp.pad(v, pads)

  def step(x, k, ct):
    y, vjp = jax.vjp(f, cut(x, x_shape), k)
    dx, dk = vjp(cut(ct, y_shape))
    return grow(y), grow(dx), dk

  def second(x, k, ct):  # d/dx |dk|^2 and d/dk |dx|^2: the transposes of dk and dx
    return (jax.grad(lambda x: (step(x, k, ct)[2] ** 2).sum())(x),
            jax.grad(lambda k: (step(x, k, ct)[1] ** 2).sum())(k))

  return step if name == "step" else second


def _dims(pspec) -> tuple[tuple[str, ...], ...]:
  entries = (*pspec, *(None,) * 5)[:5]
  return tuple(_names(e) if e else () for e in entries)


def _names(entry: Any) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(case: Case, x, k):
  """The case's `ConvSpec` (the library's normalisation, for the halo's shape)."""
  from dw5d_jax import _args

  kw = dict(case.kwargs)
  fn = case.op
  axes = kw.get("axes", "DHW" if len(case.window) == 3 else "HW")
  layout = kw.get("data_format", "NDHWC")
  n = len(axes)
  padding = _args.check_padding(fn, kw.get("padding", "SAME"), axes)
  return _args.normalize(
      fn, x, k, conv_axes=axes, layout=layout,
      strides=_args.int_tuple(fn, "strides", kw.get("strides", 1), n, axes),
      dilations=_args.int_tuple(fn, "dilations", kw.get("dilations", 1), n, axes),
      padding=padding, precision=None, preferred=None,
      padding_mode=_args.check_padding_mode(fn, kw.get("padding_mode", "zeros"), padding, axes))[2]


# ----------------------------------------------------------------------------
# Layers: a training step's gradients through a sharded jit.

LAYER_CASES = (("flax", AUTO), ("flax", EXPLICIT), ("keras", AUTO), ("keras", EXPLICIT))


def run_layers(library: str, axis_types: str) -> dict[str, Any]:
  """Loss and parameter gradients of two layers, x split over batch and depth (2x4)."""
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  x = np.random.default_rng(0).standard_normal((4, 8, 12, 10, 8)).astype(np.float32)
  if library == "flax":
    from flax import nnx

    from dw5d_jax.nn import DepthwiseConv2D, DepthwiseConv3D

    rngs = nnx.Rngs(0)
    model = nnx.Sequential(DepthwiseConv3D(8, 3, depth_multiplier=2, rngs=rngs),
                           DepthwiseConv2D(16, (3, 5), axes="HW", strides=(1, 2), rngs=rngs))
    graph, params = nnx.split(model)
    apply = lambda params, x: nnx.merge(graph, params)(x)  # noqa: E731
  else:
    import keras

    from interop.keras import DepthwiseConv3D

    layer = DepthwiseConv3D(kernel_size=3, depth_multiplier=2, padding="same")
    layer.build(x.shape)
    params = [v.value for v in layer.trainable_variables]
    apply = lambda params, x: layer.stateless_call(params, [], x)[0]  # noqa: E731
    del keras

  loss = lambda params, x: (apply(params, x) ** 2).mean()  # noqa: E731
  step = jax.value_and_grad(loss)
  expected = jax.jit(step)(params, x)
  types = {AUTO: AxisType.Auto, EXPLICIT: AxisType.Explicit}[axis_types]
  mesh = jax.make_mesh((2, 4), ("data", "space"), axis_types=(types,) * 2)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", "space")))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    compiled = jax.jit(step).lower(ps, xs).compile()
    got = compiled(ps, xs)
  errors = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.abs(a - b).max()) / max(1e-30, float(np.abs(b).max()))
    if not err <= 2e-5:
      errors.append(f"{jax.tree_util.keystr(path)} differs from one device by {err:.2e}")
  largest = max(np.size(p) for p in jax.tree.leaves(params))
  found = collectives(compiled.as_text())
  errors += [f"{kind} of {elems} elements" for kind, elems, _ in found
             if kind != "collective-permute" and elems > largest]
  if not any(kind == "collective-permute" for kind, _, _ in found):
    errors.append("no halo exchange")
  summary = {kind: sum(1 for c in found if c[0] == kind) for kind, _, _ in found}
  return {"case": f"{library}_{axis_types}", "method": "auto", "errors": errors,
          "collectives": summary}


# ----------------------------------------------------------------------------
# Streaming: a state split by batch or by a spatial axis other than time.

# (name, axis types, mesh, x's split (N, T, H, W, C), chunk length, strides, padding_mode)
STREAM_CASES = (
    ("batch", AUTO, _4, ("d",), 1, 1, "zeros"),
    ("height", EXPLICIT, _4, (None, None, "d"), 1, 1, ("zeros", "reflect", "circular")),
    ("batch_width_chunks_strided", AUTO, _2x4, ("data", None, None, "space"), 4, 2, "zeros"),
    ("height_chunks", EXPLICIT, ((2,), ("d",)), (None, None, "d"), 3, 1,
     ("zeros", "edge", "zeros")),
)


def run_streaming(name, axis_types, mesh_shape, split, length, stride, modes) -> dict[str, Any]:
  """Steps of a sharded stream under jit against the full op on one device.

  Checks the outputs, that the state stays split like the chunks, and the
  compiled step's collectives: halo exchanges only (no gather of the state
  or the chunk), at most 1.05x the analytic halo of the step's window.
  """
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding

  import dw5d_jax as dw
  from dw5d_jax import _args

  rng = np.random.default_rng(1)
  x = rng.standard_normal((8, 12, 16, 16, 8)).astype(np.float32)  # (N, T, H, W, C)
  k = rng.standard_normal((3, 3, 3, 8, 1)).astype(np.float32)
  kw = dict(strides=(stride, 1, 1), padding_mode=modes, padding=("CAUSAL", "SAME", "SAME"))
  full = dw.depthwise_conv3d(x, k, **kw)
  types = {AUTO: AxisType.Auto, EXPLICIT: AxisType.Explicit}[axis_types]
  mesh = jax.make_mesh(*mesh_shape, axis_types=(types,) * len(mesh_shape[0]))
  data = NamedSharding(mesh, _pspec(split))
  errors, outs = [], []
  step = jax.jit(lambda state, chunk: dw.stream_step(state, chunk, k, **kw))
  with jax.set_mesh(mesh):
    state = dw.stream_init(jax.device_put(x[:, :length], data), k, **kw)
    if _dims(state.buffer.sharding.spec) != _dims(data.spec):
      errors.append(f"the initial state is split {state.buffer.sharding.spec}, x {data.spec}")
    chunks = [jax.device_put(x[:, t:t + length], data) for t in range(0, 12, length)]
    compiled = step.lower(state, chunks[0]).compile()
    for chunk in chunks:
      state, y = compiled(state, chunk)
      outs.append(np.asarray(y)[:, :int(state.emitted)])
  if _dims(state.buffer.sharding.spec) != _dims(data.spec):
    errors.append(f"the state is split {state.buffer.sharding.spec}, x {data.spec}")
  got = np.concatenate(outs, axis=1)
  err = float(np.abs(got - np.asarray(full)).max() / np.abs(np.asarray(full)).max())
  if got.shape != full.shape or not err <= 2e-5:
    errors.append(f"outputs {got.shape} differ from the full op {full.shape} by {err:.2e}")
  # The step's window: the ring (1-frame steps) or history + chunk, VALID along time.
  window = state.config.ring if length == 1 else state.config.ring - 1 + length
  shape = (8, window, 16, 16, 8)
  spec = _args.normalize(
      "f", np.zeros(shape, np.float32), k, conv_axes="DHW", layout="NDHWC",
      strides=(stride, 1, 1), dilations=(1, 1, 1), padding=((0, 0), "SAME", "SAME"),
      precision=None, preferred=None,
      padding_mode=_args.check_padding_mode("f", modes, ((0, 0), "SAME", "SAME"), "DHW"))[2]
  parts = [math.prod(mesh.shape[n] for n in _names(e)) if e else 1
           for e in (*split, *(None,) * 5)[:5]]
  y_shape = (8, -(-length // stride), 16, 16, 8)
  halo = analytic_halo_bytes(spec, shape, y_shape, parts, 4, ("fwd",))
  errors += check_collectives(collectives(compiled.as_text()), k.size, halo)
  return {"case": f"stream_{name}", "method": "auto", "errors": errors}


# ----------------------------------------------------------------------------
# Errors, and export.


def run_misc() -> list[dict[str, Any]]:
  """Errors for splits a type cannot hold, and `jax.export` of a sharded function."""
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import dw5d_jax as dw

  results = []

  def expect_error(name, fn, *fragments):
    try:
      fn()
      errors = ["no error"]
    except ValueError as e:
      errors = [f"{f!r} not in {str(e)!r}" for f in fragments if f not in str(e)]
    results.append({"case": name, "method": "auto", "errors": errors})

  x = np.ones((2, 16, 6, 6, 8), np.float32)
  k = np.ones((3, 3, 3, 8, 1), np.float32)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "d")))
  expect_error("explicit_indivisible_output",
               lambda: dw.depthwise_conv3d(xs, k, padding="VALID"),
               "depthwise_conv3d: with explicit mesh axes", "axis D (size 14 from an input of "
               "size 16)", "mesh axes ('d',) (8 devices)", "jax.sharding.reshard")
  split = jax.shard_map(lambda x: dw.depthwise_conv2d(x, k[0], axes="HW", padding="VALID",
                                                      split_axes={"H": "d"}),
                        mesh=mesh, in_specs=P(None, None, "d"), out_specs=P(None, None, "d"))
  xh = jax.device_put(np.ones((2, 4, 16, 6, 8), np.float32), NamedSharding(mesh, P(None, None, "d")))
  expect_error("split_axes_indivisible_output", lambda: split(xh),
               "depthwise_conv2d: along axis H, x (size 16 in all, split over mesh axes ('d',): "
               "8 blocks) gives an output of size 14")

  # An exported artifact keeps the portable single-program computation.
  auto = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(auto, P(None, "d"))
  f = jax.jit(lambda x: dw.depthwise_conv3d(x, k), in_shardings=sharding, out_shardings=sharding)
  errors = []
  exported = jax.export.export(f)(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))
  if "CustomSPMDPartitioning" in exported.mlir_module():
    errors.append("the exported module names the partitioning callback")
  got = exported.call(jax.device_put(x, sharding))
  want = dw.depthwise_conv3d(x, k)
  if not np.allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5):
    errors.append("the exported function computes something else")
  results.append({"case": "export", "method": "auto", "errors": errors})

  # docs/scaling.md's code, on 8 devices (the docs test runs it on one).
  page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
  namespace: dict = {}
  errors = [] if len(blocks) >= 2 else ["docs/scaling.md has no scaling code"]
  for block in blocks:
    exec(compile(block, "docs/scaling.md", "exec"), namespace)
  y, xd, kernel = namespace["y"], namespace["xd"], namespace["kernel"]
  if tuple(y.sharding.spec)[:2] != (None, "dev"):
    errors.append(f"y split {y.sharding.spec}")
  want = dw.depthwise_conv3d(np.asarray(xd), np.asarray(kernel))
  if not np.allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5):
    errors.append("the shard_map example computes something else")
  results.append({"case": "readme", "method": "auto", "errors": errors})
  return results


def main(group: str) -> None:
  import jax

  assert jax.device_count() == 8, jax.devices()
  if group == "misc":
    for result in run_misc():
      print(json.dumps(result), flush=True)
    return
  if group == "streaming":
    for case in STREAM_CASES:
      try:
        result = run_streaming(*case)
      except Exception:  # noqa: BLE001 - reported to the parent as the case's failure
        result = {"case": f"stream_{case[0]}", "method": "auto",
                  "errors": [traceback.format_exc()]}
      print(json.dumps(result), flush=True)
    return
  if group == "layers":
    for library, axis_types in LAYER_CASES:
      try:
        result = run_layers(library, axis_types)
      except Exception:  # noqa: BLE001 - reported to the parent as the case's failure
        result = {"case": f"{library}_{axis_types}", "method": "auto",
                  "errors": [traceback.format_exc()]}
      print(json.dumps(result), flush=True)
    return
  for case in CASES[group]:
    for method in case.methods:
      try:
        result = run_case(case, method)
      except Exception:  # noqa: BLE001 - reported to the parent as the case's failure
        result = {"case": case.name, "method": method, "errors": [traceback.format_exc()]}
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("DW5D_JAX_NATIVE", "all")
  os.environ.setdefault("KERAS_BACKEND", "jax")
  main(sys.argv[1])
