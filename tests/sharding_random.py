"""Random sharded configurations against one device, on 8 simulated CPU devices.

    python tests/sharding_random.py --seed 1 --count 500

draws `--count` configurations from `--seed` and, for each, compiles
`y, (dx, dk, db) = vjp(op)(x, kernel, bias)(ct)` under `jit` on a mesh and
on one device. A configuration is drawn over everything that must compose
with sharding: the op (`depthwise_conv3d`, or `depthwise_conv2d` per slice
over two random axes), sizes 8-24 (sometimes uneven: placed padded, cut
inside the jit, Auto axes only), kernels 1-4, strides and dilations 1-2,
SAME / VALID / CAUSAL / explicit padding per axis, a border mode
(`padding_mode`) per axis, a bias and an activation, the depth multiplier,
both layouts, the method (`auto`: the native kernels; `conv`), 1D meshes
of 2, 4, 8 devices and a 2x4 mesh, Auto or Explicit axes, and which of
batch, D, H, W, C each mesh axis splits.

It passes when:

* y, dx, dk and db equal one device's (float32, 2e-5 relative to the
  largest value);
* the compiled program has no all-gather, all-to-all, all-reduce or
  reduce-scatter of more elements than the kernel or the bias (the only
  sums a sharded step needs), and its collective-permutes move at most
  1.05x the analytic halo (`benchmarks/sharding.py`, from the definition,
  border modes included; 1.25x with several split spatial axes, whose
  later halos carry the earlier axes' windows with their padding rows);
* where one device fuses the epilogue into the native kernels, so does
  every device of the sharded program;
* or the call refuses with a ValueError that names the result's axis, its
  size and the devices it would be split over, for a split the types
  cannot hold (Explicit axes: a result size the devices do not divide).

It prints one JSON line per configuration and a last line
`N configs: P passed (R refused as expected), F failed`; the exit status
is 1 when any failed. tests/test_sharding.py runs a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import sys
import time
import traceback
import zlib
from typing import Any

if __name__ == "__main__":  # the device count is fixed when JAX starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("DW5D_JAX_NATIVE", "all")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from sharding import analytic_halo_bytes, collectives  # noqa: E402

MESHES = (((2,), ("a",)), ((4,), ("a",)), ((8,), ("a",)), ((2, 4), ("a", "b")))
MODES = ("zeros", "reflect", "symmetric", "edge", "circular")
ACTIVATIONS = ("relu", "relu6", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hard_swish")
TOLERANCE = 2e-5  # float32, relative to the largest value


# ----------------------------------------------------------------------------
# Drawing a configuration (plain JSON data, so a failure prints as it was drawn).


def draw(rng) -> dict[str, Any]:
  """One random configuration (see the module docstring)."""
  three = rng.random() < 0.5
  axes = "DHW" if three else "".join(sorted(rng.choice(list("DHW"), 2, replace=False),
                                            key="DHW".index))
  layout = "NDHWC" if rng.random() < 0.6 else "NCDHW"
  shape_mesh, names = MESHES[rng.integers(len(MESHES))]
  explicit = bool(rng.random() < 0.5)
  # Which array axis each mesh axis splits (N, D, H, W or C).
  targets = [str(rng.choice(list("NDHWC"), p=[0.2, 0.25, 0.2, 0.2, 0.15])) for _ in names]
  parts = {a: math.prod(s for s, t in zip(shape_mesh, targets) if t == a) for a in "NDHWC"}
  multiplier = int(rng.choice([1, 1, 2]))
  sizes, crop = {}, {}
  for a in "NDHWC":
    p = parts[a]
    if a == "N":
      n = p * int(rng.integers(1, 3)) if p > 1 else int(rng.integers(1, 4))
    elif a == "C":
      n = p * int(rng.integers(1, 3)) if p > 1 else int(rng.choice([1, 2, 3, 4, 8]))
    else:
      n = int(rng.integers(8, 25))
      n = -(-n // p) * p
      if p > 1 and not explicit and rng.random() < 0.2:
        crop[a] = n - int(rng.integers(1, p)) if n - p >= 8 else n
    sizes[a] = n
  window, strides, dilations, padding, modes = [], [], [], [], []
  for _ in axes:
    window.append(int(rng.integers(1, 5)))
    strides.append(int(rng.integers(1, 3)))
    dilations.append(int(rng.integers(1, 3)))
    kind = rng.integers(4)
    pad = ("SAME", "VALID", "CAUSAL", None)[kind]
    if pad is None:
      pad = [int(rng.integers(0, 4)), int(rng.integers(0, 4))]
    padding.append(pad)
    mode = "zeros" if pad == "VALID" or rng.random() < 0.4 else str(rng.choice(MODES[1:]))
    modes.append(mode)
  return {
      "axes": axes, "layout": layout, "mesh": [list(shape_mesh), list(names)],
      "explicit": explicit, "targets": targets, "sizes": sizes, "crop": crop,
      "multiplier": multiplier, "window": window, "strides": strides,
      "dilations": dilations, "padding": padding, "padding_mode": modes,
      "bias": bool(rng.random() < 0.5),
      "activation": str(rng.choice(ACTIVATIONS)) if rng.random() < 0.5 else None,
      "method": "conv" if rng.random() < 0.2 else "auto",
  }


def _shape(config: dict, sizes: dict) -> tuple[int, ...]:
  order = "NDHWC" if config["layout"] == "NDHWC" else "NCDHW"
  return tuple(sizes[a] for a in order)


def _x_spec(config: dict) -> tuple[Any, ...]:
  order = "NDHWC" if config["layout"] == "NDHWC" else "NCDHW"
  entries = []
  for a in order:
    axes = tuple(n for n, t in zip(config["mesh"][1], config["targets"]) if t == a)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return tuple(entries)


def _kwargs(config: dict) -> dict[str, Any]:
  kw = {"strides": tuple(config["strides"]), "dilations": tuple(config["dilations"]),
        "padding": tuple(p if isinstance(p, str) else tuple(p) for p in config["padding"]),
        "padding_mode": tuple(config["padding_mode"]), "data_format": config["layout"],
        "method": config["method"]}
  if config["activation"]:
    kw["activation"] = config["activation"]
  if len(config["axes"]) == 2:
    kw["axes"] = config["axes"]
  return kw


# ----------------------------------------------------------------------------
# Running one.


def run(config: dict, check_only: bool = False) -> dict[str, Any]:
  """`{"status": "passed" | "refused" | "invalid" | "failed", "errors": [...], ...}`.

  `check_only`: only whether the configuration is a valid problem ("invalid" or "passed").
  """
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import dw5d_jax as dw

  seed = zlib.crc32(json.dumps(config, sort_keys=True).encode())  # reproducible data
  rng = np.random.default_rng(seed)
  sizes = {**config["sizes"], **config["crop"]}
  shape, placed = _shape(config, sizes), _shape(config, config["sizes"])
  channels = sizes["C"]
  window = tuple(config["window"])
  kernel_shape = (*window, channels, config["multiplier"])
  op = dw.depthwise_conv3d if len(window) == 3 else dw.depthwise_conv2d
  kw = _kwargs(config)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal(kernel_shape).astype(np.float32)
  b = rng.standard_normal(channels * config["multiplier"]).astype(np.float32)

  def f(x, k, b):
    return op(x, k, bias=b if config["bias"] else None, **kw)

  try:
    y_shape = jax.eval_shape(f, x, k, b).shape
  except ValueError as e:  # not a valid problem on one device either: not drawn
    return {"status": "invalid", "errors": [], "why": str(e)[:200]}
  if check_only:
    return {"status": "passed", "errors": []}
  ct = rng.standard_normal(y_shape).astype(np.float32)

  mesh_shape, names = config["mesh"]
  types = (AxisType.Explicit if config["explicit"] else AxisType.Auto,) * len(names)
  mesh = jax.make_mesh(tuple(mesh_shape), tuple(names), axis_types=types)
  x_spec = P(*_x_spec(config))
  data = NamedSharding(mesh, x_spec)
  channel_axis = 4 if config["layout"] == "NDHWC" else 1
  c_entry = x_spec[channel_axis] if len(x_spec) > channel_axis else None
  small = NamedSharding(mesh, P(*(None,) * len(window), c_entry, None))
  bias_spec = NamedSharding(mesh, P(c_entry if config["multiplier"] == 1 else None))
  parts = [math.prod(mesh.shape[n] for n in ((e,) if isinstance(e, str) else e)) if e else 1
           for e in (*x_spec, *(None,) * 5)[:5]]

  one = (_pad(x, placed), k, b, _pad_to(ct, parts))
  single = jax.jit(_program(f, shape, y_shape, None, parts)).lower(*one).compile()
  expected = single(*one)
  errors = []
  try:
    with jax.set_mesh(mesh):
      args = (jax.device_put(_pad(x, placed), data), jax.device_put(k, small),
              jax.device_put(b, bias_spec), jax.device_put(_pad_to(ct, parts), data))
      compiled = jax.jit(_program(f, shape, y_shape, data, parts)).lower(*args).compile()
      got = compiled(*args)
  except ValueError as e:
    problem = _refusal_problem(str(e), config, y_shape, parts)
    if problem:
      return {"status": "failed", "errors": [problem, traceback.format_exc()[-2500:]]}
    return {"status": "refused", "errors": [], "why": str(e)[:300]}
  refusal = _expected_refusal(config, y_shape, parts)
  if refusal:
    errors.append(f"no refusal, but {refusal}")
  for what, a, w in zip(("y", "dx", "dk", "db"), got, expected):
    if what == "db" and not config["bias"]:
      continue
    a, w = np.asarray(a, np.float64), np.asarray(w, np.float64)
    err = float(np.abs(a - w).max()) / max(1.0, float(np.abs(w).max()))
    if not err <= TOLERANCE:
      errors.append(f"{what} differs from one device by {err:.2e} (relative)")
  found = collectives(compiled.as_text())
  limit = max(k.size, b.size)
  for kind, elems, _ in found:
    if kind != "collective-permute" and elems > limit:
      errors.append(f"{kind} of {elems} elements (kernel {k.size}, bias {b.size})")
  fused = _fused(single.as_text()) - _fused(compiled.as_text())
  if fused:
    errors.append(f"one device fuses the epilogue ({', '.join(sorted(fused))}), the sharded "
                  f"program does not")
  moved = sum(nbytes for kind, _, nbytes in found if kind == "collective-permute")
  spec = _spec(config, x, k, kw)
  halo = analytic_halo_bytes(spec, _pad(x, placed).shape, _pad_to(ct, parts).shape, parts, 4)
  # Over several split spatial axes, a later axis's halo spans the earlier axes' windows,
  # padding rows included (the analytic count spans only the rows read): up to 1.25x.
  slack = 1.05 if sum(parts[ax] > 1 for ax in spec.spatial_axes) <= 1 else 1.25
  if moved > slack * halo:
    errors.append(f"collective-permute of {moved} bytes, analytic halo {halo} bytes")
  return {"status": "failed" if errors else "passed", "errors": errors,
          "collectives": sorted({kind for kind, _, _ in found}), "permute_bytes": moved}


# The native kernels that fuse the epilogue (dw5d_jax/_native.py).
_EPILOGUE_TARGETS = ("dw5d_forward_epilogue", "dw5d_epilogue_grad", "dw5d_epilogue_grad_y",
                     "dw5d_bias_grad")


def _fused(hlo: str) -> set[str]:
  return {t for t in _EPILOGUE_TARGETS if f'custom_call_target="{t}"' in hlo}


def _pad(v, shape):
  import numpy as np

  return np.pad(v, [(0, e - d) for d, e in zip(v.shape, shape)])


def _pad_to(v, parts):
  return _pad(v, tuple(-(-d // p) * p for d, p in zip(v.shape, parts)))


def _program(f, x_shape, y_shape, data, parts):
  """`(x, k, b, ct) -> (y, dx, dk, db)` on arrays padded to sizes the mesh divides.

  Inside, x and ct are cut to the problem's sizes (split like x), and y and
  dx are padded back: the same blocks, no data moves.
  """
  import jax
  import jax.numpy as jnp

  def cut(v, shape):
    if v.shape == shape:
      return v
    v = v[tuple(slice(0, d) for d in shape)]
    return v if data is None else jax.lax.with_sharding_constraint(v, data)

  def grow(v):
    pads = [(0, -(-d // p) * p - d) for d, p in zip(v.shape, parts)]
    return v if not any(p for _, p in pads) else jnp.pad(v, pads)

  def step(x, k, b, ct):
    y, vjp = jax.vjp(f, cut(x, x_shape), k, b)
    dx, dk, db = vjp(cut(ct, y_shape))
    return grow(y), grow(dx), dk, db

  return step


def _spec(config, x, k, kw):
  """The configuration's `ConvSpec` (the library's normalisation, for the analytic halo)."""
  from dw5d_jax import _args

  axes, n = config["axes"], len(config["axes"])
  fn = "depthwise_conv3d" if n == 3 else "depthwise_conv2d"
  padding = _args.check_padding(fn, kw["padding"], axes)
  return _args.normalize(
      fn, x, k, conv_axes=axes, layout=config["layout"],
      strides=_args.int_tuple(fn, "strides", kw["strides"], n, axes),
      dilations=_args.int_tuple(fn, "dilations", kw["dilations"], n, axes),
      padding=padding, precision=None, preferred=None,
      padding_mode=_args.check_padding_mode(fn, kw["padding_mode"], padding, axes))[2]


def _indivisible(config, y_shape, parts) -> list[tuple[str, int, int]]:
  """`(axis, size, devices)` for each axis of y that Explicit types cannot split evenly."""
  order = "NDHWC" if config["layout"] == "NDHWC" else "NCDHW"
  return [(a, size, p) for a, size, p in zip(order, y_shape, parts) if size % p]


def _expected_refusal(config, y_shape, parts) -> str | None:
  if not config["explicit"]:
    return None
  bad = _indivisible(config, y_shape, parts)
  if bad:
    a, size, p = bad[0]
    return f"y's axis {a} (size {size}) does not split over {p} devices"
  return None


def _refusal_problem(message: str, config, y_shape, parts) -> str | None:
  """What is wrong with a refusal (None: a clear refusal of a split types cannot hold)."""
  bad = _indivisible(config, y_shape, parts)
  if not config["explicit"] or not bad:
    return f"refused a split that should work: {message[:600]}"
  for a, size, p in bad:
    if (f"axis {a} (size {size}" in message and f"({p} devices)" in message
        and message.startswith(("depthwise_conv3d:", "depthwise_conv2d:"))):
      return None
  return f"the refusal does not name the axis, its size and the devices ({bad}): {message[:600]}"


# ----------------------------------------------------------------------------
# The command.


class _Timeout(Exception):
  pass


def _alarm(signum, frame):
  raise _Timeout()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--count", type=int, default=20)
  parser.add_argument("--start", type=int, default=0, help="skip the first configurations")
  parser.add_argument("--per-config", type=int, default=300,
                      help="seconds one configuration may take")
  args = parser.parse_args(argv)

  import jax
  import numpy as np

  if jax.device_count() < 8:
    raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rng = np.random.default_rng(args.seed)
  signal.signal(signal.SIGALRM, _alarm)
  counts = {"passed": 0, "refused": 0, "failed": 0}
  done = 0
  while done < args.start + args.count:
    config = draw(rng)
    if done < args.start:
      done += run(config, check_only=True)["status"] != "invalid"
      continue
    start = time.perf_counter()
    signal.alarm(args.per_config)
    try:
      result = run(config)
    except _Timeout:
      result = {"status": "failed", "errors": [f"took over {args.per_config} s"]}
    except Exception:  # noqa: BLE001 - reported as this configuration's failure
      result = {"status": "failed", "errors": [traceback.format_exc()[-3000:]]}
    finally:
      signal.alarm(0)
    if result["status"] == "invalid":
      continue  # not a problem on one device either: draw another
    done += 1
    counts[result["status"]] += 1
    print(json.dumps({"index": done - 1, **result, "seconds": round(time.perf_counter() - start, 1),
                      "config": config}), flush=True)
  total = sum(counts.values())
  print(f"{total} configs: {counts['passed'] + counts['refused']} passed "
        f"({counts['refused']} refused as expected), {counts['failed']} failed", flush=True)
  return 1 if counts["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
