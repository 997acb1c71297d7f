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
* the compiled HLO's collectives: no all-gather or all-to-all; all-reduce
  and reduce-scatter only of kernel-sized data; collective-permute only
  where a spatial axis is split, moving in all at most 1.05x the halo
  rows that `_geometry.input_span` says each op's blocks read beyond
  their own (computed here from the definition, not from `Blocks`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import traceback
from typing import Any

AUTO, EXPLICIT = "auto", "explicit"


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
        # VALID: outputs 28 in blocks of 14 read inputs in blocks of 16 (moving offsets).
        Case("height_valid_offsets", AUTO, ((2,), ("d",)), (None, None, "d"), (2, 4, 32, 6, 8),
             (5, 5), kwargs=(("padding", "VALID"), ("axes", "HW"))),
        # A halo (4 rows each side) wider than a block (2 rows): two hops.
        Case("depth_multi_hop", AUTO, _8, (None, "d"), (2, 16, 6, 6, 8), (3, 3, 3),
             kwargs=(("dilations", (4, 1, 1)),), second_order=True),
        Case("batch_uneven_explicit_pads", AUTO, _4, ("d",), (8, 10, 6, 6, 8), (3, 2, 3),
             kwargs=(("padding", ((2, 0), (0, 1), "CAUSAL")),), crop=(6, 10, 6, 6, 8)),
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
    ],
}


# ----------------------------------------------------------------------------
# Analytic halo rows, from the definition (`input_span`), per op and split axis.


def halo_rows(op: str, n: int, out: int, parts: int, k: int, s: int, r: int, lo: int) -> int:
  """The most rows any block of the op's exchanged operand needs from other blocks."""
  from dw5d_jax import _geometry as g

  b, bo, e = -(-n // parts), -(-out // parts), g.effective(k, r)
  before = after = 0
  for i in range(parts):
    if op == "dx":  # cotangent rows o with o*s + t*r - lo in the block's input rows
      p0, p1 = i * b, min((i + 1) * b, n)
      if p0 >= p1:
        continue
      first, stop = -((e - 1 - p0 - lo) // s), (p1 - 1 + lo) // s + 1
      own0, own1, total = i * bo, (i + 1) * bo, out
    else:
      o0, o1 = i * bo, min((i + 1) * bo, out)
      if o0 >= o1:
        continue
      first, stop = g.input_span(o0, o1, k, s, r, lo)
      own0, own1, total = i * b, (i + 1) * b, n
    first, stop = max(first, 0), min(stop, total)
    before, after = max(before, own0 - first), max(after, stop - own1)
  return before + after


def analytic_halo_bytes(spec, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
                        split: list[tuple[int, int]], itemsize: int) -> int:
  """Bytes each device sends for fwd, dx and dk: halo rows times the rest of the block.

  `split`: (spatial index, parts) of the split spatial axes, in D, H, W order;
  a later axis's halo rows span the earlier axes' extended blocks.
  """
  total = 0
  for op, shape in (("fwd", x_shape), ("dx", y_shape), ("dk", x_shape)):
    block = list(shape)
    for i, parts in split:
      ax = spec.spatial_axes[i]
      block[ax] = -(-block[ax] // parts)
    for i, parts in split:
      ax = spec.spatial_axes[i]
      rows = halo_rows(op, spec.in_spatial[i], spec.out_spatial[i], parts, spec.window[i],
                       spec.strides[i], spec.dilations[i], spec.lo[i])
      total += rows * math.prod(block) // block[ax] * itemsize
      block[ax] += rows
  return total


# ----------------------------------------------------------------------------
# Collectives in the compiled HLO.

_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) (all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)"
    r"(-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


def collectives(hlo: str) -> list[tuple[str, int, int]]:
  """`(kind, elements, bytes)` of every collective in compiled HLO text."""
  out = []
  for m in _COLLECTIVE.finditer(hlo):
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):  # async start: (operand, result[, ...]); count the result
      shapes = shapes[1:2]
    elems = sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in shapes)
    nbytes = sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(t, 4)
                 for t, dims in shapes)
    out.append((m.group(2), elems, nbytes))
  return out


def check_collectives(found: list[tuple[str, int, int]], kernel_elems: int,
                      halo_bytes: int) -> list[str]:
  """What is wrong with the collectives `found` (empty: nothing)."""
  errors = []
  for kind, elems, _ in found:
    if kind in ("all-gather", "all-to-all"):
      errors.append(f"{kind} of {elems} elements")
    if kind in ("all-reduce", "reduce-scatter") and elems > kernel_elems:
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
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, NamedSharding

  import dw5d_jax as dw

  kw = dict(case.kwargs)
  rng = np.random.default_rng(0)
  shape = case.crop or case.shape
  channels = shape[1 if kw.get("data_format", "").startswith("NC") else -1]
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((*case.window, channels, case.multiplier)).astype(np.float32)
  op = getattr(dw, case.op)
  f = lambda x, k: op(x, k, method=method, **kw)  # noqa: E731
  y_shape = jax.eval_shape(f, x, k).shape
  ct = rng.standard_normal(y_shape).astype(np.float32)

  types = {AUTO: AxisType.Auto, EXPLICIT: AxisType.Explicit}[case.axis_types]
  mesh = jax.make_mesh(*case.mesh, axis_types=(types,) * len(case.mesh[0]))
  data = NamedSharding(mesh, _pspec(case.x_spec))
  parts = [math.prod(mesh.shape[n] for n in _names(e)) if e else 1
           for e in (*case.x_spec, *(None,) * 5)[:5]]
  even = lambda shape: tuple(-(-d // p) * p for d, p in zip(shape, parts))  # noqa: E731

  def cut(v, shape):  # the uneven array inside the jit, split like x
    if v.shape == shape:
      return v
    return jax.lax.with_sharding_constraint(v[tuple(slice(0, d) for d in shape)], data)

  def grow(v):  # back to a size the mesh divides, with the same blocks: no data moves
    pads = [(0, e - d) for d, e in zip(v.shape, even(v.shape))]
    return v if not any(p for _, p in pads) else jnp.pad(v, pads)

  def step(x, k, ct):
    y, vjp = jax.vjp(f, cut(x, shape), k)
    dx, dk = vjp(cut(ct, y_shape))
    return grow(y), grow(dx), dk

  def second(x, k, ct):  # d/dx |dk|^2 and d/dk |dx|^2: the transposes of dk and dx
    return (jax.grad(lambda x: (step(x, k, ct)[2] ** 2).sum())(x),
            jax.grad(lambda k: (step(x, k, ct)[1] ** 2).sum())(k))

  def place(v, sharding):
    v = np.pad(v, [(0, e - d) for d, e in zip(v.shape, even(v.shape))])
    return jax.device_put(v, sharding)

  xs, cts = place(x, data), place(ct, data)
  ks = jax.device_put(k, NamedSharding(mesh, _pspec(case.kernel_spec)))
  errors, summary, moved, halo = [], {}, 0, 0
  for name, fn in (("step", step), ("second order", second)):
    if name == "second order" and not case.second_order:
      continue
    expected = jax.jit(fn)(np.asarray(xs), k, np.asarray(cts))
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(xs, ks, cts).compile()
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
      split = [(i, parts[ax]) for i, ax in enumerate(spec.spatial_axes) if parts[ax] > 1]
      halo = analytic_halo_bytes(spec, x.shape, y_shape, split, 4)
      found = collectives(compiled.as_text())
      errors += check_collectives(found, k.size, halo)
      summary = {kind: sum(1 for c in found if c[0] == kind) for kind, _, _ in found}
      moved = sum(b for kind, _, b in found if kind == "collective-permute")
  return {"case": case.name, "method": method, "errors": errors, "collectives": summary,
          "permute_bytes": moved, "halo_bytes": halo}


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
  return _args.normalize(
      fn, x, k, conv_axes=axes, layout=layout,
      strides=_args.int_tuple(fn, "strides", kw.get("strides", 1), n, axes),
      dilations=_args.int_tuple(fn, "dilations", kw.get("dilations", 1), n, axes),
      padding=_args.check_padding(fn, kw.get("padding", "SAME"), axes),
      precision=None, preferred=None)[2]


def main(group: str) -> None:
  import jax

  assert jax.device_count() == 8, jax.devices()
  for case in CASES[group]:
    for method in case.methods:
      try:
        result = run_case(case, method)
      except Exception:  # noqa: BLE001 - reported to the parent as the case's failure
        result = {"case": case.name, "method": method, "errors": [traceback.format_exc()]}
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("DW5D_JAX_NATIVE", "all")
  main(sys.argv[1])
