"""The policy (dw5d_jax/_policy.py): `method="auto"` per platform, and `decide` as a table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dw5d_jax as dw
from dw5d_jax import _policy, _primitive, _target
from dw5d_jax._geometry import ZEROS
from dw5d_jax._policy import Decision, Facts, decide
from dw5d_jax._spec import ConvSpec, Impl


def _hlo(method: str) -> str:
  x = jnp.zeros((1, 4, 8, 8, 3), jnp.float32)
  k = jnp.zeros((3, 3, 3, 3, 1), jnp.float32)
  return jax.jit(lambda a, b: dw.depthwise_conv3d(a, b, method=method)).lower(x, k).as_text(
      dialect="hlo")


def test_auto_uses_shift_on_cpu():
  assert jax.default_backend() == "cpu"
  assert "convolution(" not in _hlo("auto")
  assert "convolution(" not in _hlo("shift")
  assert "convolution(" in _hlo("conv")


def test_auto_lowering_has_no_runtime_switch_on_one_platform():
  """platform_dependent is resolved while lowering for a single platform."""
  text = _hlo("auto")
  assert "conditional(" not in text, text[:2000]


def test_auto_result_equals_shift_on_cpu():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6, 7, 3)).astype(np.float32)
  k = rng.standard_normal((3, 2, 3, 3, 2)).astype(np.float32)
  a = dw.depthwise_conv3d(x, k, strides=(1, 2, 1))
  b = dw.depthwise_conv3d(x, k, strides=(1, 2, 1), method="shift")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# The decision as a table: pure calls, no GPU, no compile (`_policy.decide`).

CPU = Facts()  # one CPU device, static shapes, float32, the native library loaded
CUDA = Facts(platform="cuda", platforms=("cuda",))
OTHER = Facts(platform=None, platforms=("tpu",))


def _spec(*, last: bool = True, c: int = 4, m: int = 1, window=(3, 3, 3), strides=(1, 1, 1),
          spatial=(6, 8, 16), modes=ZEROS, dtype=np.float32, acc=np.float32) -> ConvSpec:
  """A SAME-padded spec (odd windows); `spatial` may hold symbolic sizes."""
  pads = tuple(((k - 1) // 2, (k - 1) // 2) for k in window)
  out = tuple(-(-n // s) for n, s in zip(spatial, strides))
  return ConvSpec(channels_last=last, window=tuple(window), strides=tuple(strides),
                  dilations=(1, 1, 1), padding=pads, in_spatial=tuple(spatial),
                  out_spatial=out, channels=c, multiplier=m, acc_dtype=np.dtype(acc),
                  out_dtype=np.dtype(dtype), precision=None, modes=tuple(modes))


AUTO, SHIFT, CONV, PALLAS = Impl(), Impl("shift"), Impl("conv"), Impl("pallas")
REFLECT = ("reflect",) * 3
N = jax.export.symbolic_shape("n")[0]

# (name, op, spec, impl, facts, expected decision): the choices as they are.
TABLE = [
    # CPU, channels-last: native from C = 4 (measured), else XLA's shift.
    ("cpu auto native", "fwd", _spec(), AUTO, CPU, Decision("native")),
    ("cpu shift native", "dk", _spec(), SHIFT, CPU, Decision("native")),
    ("cpu C=3 xla", "fwd", _spec(c=3), AUTO, CPU, Decision("shift")),
    ("cpu C=54 native", "dk", _spec(c=54), AUTO, CPU, Decision("native")),
    ("cpu C=5 native", "fwd", _spec(c=5), AUTO, CPU, Decision("native")),
    ("cpu C=3 all", "dx", _spec(c=3), AUTO, CPU._replace(native_mode="all"), Decision("native")),
    ("cpu native off", "fwd", _spec(), AUTO, CPU._replace(native_mode="off"), Decision("shift")),
    ("cpu not loaded", "fwd", _spec(), AUTO, CPU._replace(native_loaded=False),
     Decision("shift")),
    ("cpu conv", "fwd", _spec(), CONV, CPU, Decision("conv")),
    ("cpu C=3 dk native", "dk", _spec(c=3), AUTO, CPU, Decision("native")),
    ("cpu C=1 dx xla", "dx", _spec(c=1), AUTO, CPU, Decision("shift")),
    # Channels-first (RESULTS.md, "NCDHW on the real networks' layers"): the
    # forward pass and the input gradient as-is from an input width of 32 / 28,
    # else XLA; the gradients of fewer than 8 outputs per row with C >= 4 and
    # strides <= 2 transposed (dx: strided only); the kernel gradient native.
    ("cf wide", "fwd", _spec(last=False, spatial=(6, 8, 32)), AUTO, CPU, Decision("native")),
    ("cf wide C=3", "fwd", _spec(last=False, c=3, spatial=(6, 8, 32)), AUTO, CPU,
     Decision("native")),
    ("cf narrow fwd", "fwd", _spec(last=False), AUTO, CPU, Decision("shift")),
    ("cf narrow strided fwd", "fwd", _spec(last=False, c=64, strides=(1, 2, 2)), AUTO, CPU,
     Decision("shift")),
    ("cf narrow fwd all", "fwd", _spec(last=False), AUTO, CPU._replace(native_mode="all"),
     Decision("native")),
    *((f"cf mvit pooling {op}", op, _spec(last=False, c=96, spatial=(8, 56, 56),
                                          strides=(1, 8, 8)), AUTO, CPU, Decision("native"))
      for op in ("fwd", "dx", "dk")),
    ("cf dx W=28", "dx", _spec(last=False, c=64, spatial=(6, 8, 28), strides=(1, 4, 4)), AUTO,
     CPU, Decision("native")),
    ("cf dx narrow unstrided", "dx", _spec(last=False, c=64, spatial=(6, 8, 7)), AUTO, CPU,
     Decision("shift")),
    ("cf dx few strided", "dx", _spec(last=False, c=64, spatial=(6, 14, 14), strides=(1, 2, 2)),
     AUTO, CPU, Decision("native", "transposed")),
    ("cf dx few strided C=3", "dx", _spec(last=False, c=3, spatial=(6, 14, 14),
                                          strides=(1, 2, 2)), AUTO, CPU, Decision("shift")),
    ("cf dx few strided all", "dx", _spec(last=False, c=64, spatial=(6, 14, 14),
                                          strides=(1, 2, 2)), AUTO,
     CPU._replace(native_mode="all"), Decision("native", "transposed")),
    ("cf dk few", "dk", _spec(last=False, c=8, spatial=(6, 8, 7)), AUTO, CPU,
     Decision("native", "transposed")),
    ("cf dk few C=3", "dk", _spec(last=False, c=3, spatial=(6, 8, 7)), AUTO, CPU,
     Decision("native")),
    ("cf dk few stride 4", "dk", _spec(last=False, c=96, spatial=(8, 28, 28), strides=(1, 4, 4)),
     AUTO, CPU, Decision("native")),
    ("cf dk w=8", "dk", _spec(last=False, spatial=(6, 8, 8)), AUTO, CPU, Decision("native")),
    # Dtypes and shapes the native kernels do not take.
    ("float16", "fwd", _spec(dtype=np.float16), AUTO,
     CPU._replace(dtypes=(np.dtype(np.float16),) * 3), Decision("shift")),
    ("bfloat16", "fwd", _spec(dtype=jnp.bfloat16), AUTO,
     CPU._replace(dtypes=(np.dtype(jnp.bfloat16),) * 3), Decision("native")),
    ("float64 acc", "fwd", _spec(acc=np.float64), AUTO, CPU, Decision("shift")),
    ("dynamic operands", "fwd", _spec(), AUTO, CPU._replace(static=False), Decision("shift")),
    ("symbolic spec", "fwd", _spec(spatial=(N, 8, 16)), AUTO, CPU, Decision("shift")),
    # CUDA: _GPU_CHOICE (empty: XLA's conv); other platforms: conv.
    ("cuda auto", "fwd", _spec(), AUTO, CUDA, Decision("conv")),
    ("cuda shift", "dx", _spec(), SHIFT, CUDA, Decision("shift")),
    ("cuda pallas cl", "fwd", _spec(), PALLAS, CUDA, Decision("pallas")),
    ("cuda pallas cf", "dk", _spec(last=False), PALLAS, CUDA, Decision("pallas", "transposed")),
    ("other auto", "fwd", _spec(), AUTO, OTHER, Decision("conv")),
    ("other shift", "fwd", _spec(), SHIFT, OTHER, Decision("shift")),
    ("interpret pallas on cpu", "fwd", _spec(), Impl("pallas", interpret=True), CPU,
     Decision("pallas")),
    # Export targets: portable (no native kernels, no partitioning); LiteRT's forward conv2d.
    *((f"export {t}", "fwd", _spec(), AUTO, CPU._replace(target=t, devices=2),
       Decision("shift")) for t in ("stablehlo", "tf", "onnx")),
    ("export stablehlo conv", "fwd", _spec(), CONV, CPU._replace(target="stablehlo"),
     Decision("conv")),
    ("litert fwd", "fwd", _spec(), AUTO, CPU._replace(target="litert"), Decision("conv2d")),
    ("litert any method", "fwd", _spec(), SHIFT, CPU._replace(target="litert"),
     Decision("conv2d")),
    ("litert modes", "fwd", _spec(modes=REFLECT), AUTO, CPU._replace(target="litert"),
     Decision("conv2d", modes="padded")),
    ("litert dk", "dk", _spec(), AUTO, CPU._replace(target="litert"), Decision("shift")),
    # export_native: the native kernels kept, not partitioned; off where they are not loaded.
    ("export native", "dk", _spec(), AUTO, CPU._replace(target="native", devices=2),
     Decision("native")),
    ("export native modes", "fwd", _spec(modes=REFLECT), AUTO, CPU._replace(target="native"),
     Decision("shift", modes="borders")),
    ("export native unloaded", "fwd", _spec(), AUTO,
     CPU._replace(target="native", native_loaded=False), Decision("shift")),
    ("export native cuda", "fwd", _spec(), AUTO, CUDA._replace(target="native"),
     Decision("conv")),
    # Border modes: on the borders where the native kernels run, else a padded copy.
    ("modes native", "fwd", _spec(modes=REFLECT), AUTO, CPU,
     Decision("shift", modes="borders")),
    ("modes native off", "dx", _spec(modes=REFLECT), AUTO, CPU._replace(native_mode="off"),
     Decision("shift", modes="padded")),
    ("modes conv", "fwd", _spec(modes=REFLECT), CONV, CPU, Decision("conv", modes="padded")),
    ("modes cuda", "dk", _spec(modes=REFLECT), AUTO, CUDA, Decision("conv", modes="padded")),
    ("modes export", "fwd", _spec(modes=REFLECT), AUTO, CPU._replace(target="stablehlo"),
     Decision("shift", modes="padded")),
    ("modes several devices", "fwd", _spec(modes=REFLECT), AUTO, CPU._replace(devices=4),
     Decision("shift", modes="borders", partition=True)),
    ("modes devices manual", "dx", _spec(modes=REFLECT), AUTO,
     CPU._replace(devices=4, manual=True), Decision("shift", modes="borders")),
    ("modes pallas on cpu", "fwd", _spec(modes=REFLECT), PALLAS, CPU,
     Decision("pallas", modes="padded")),
    # Partitioning: several devices, outside shard_map, not exported.
    ("devices", "fwd", _spec(), AUTO, CPU._replace(devices=2), Decision("native", partition=True)),
    ("devices cuda", "dk", _spec(), AUTO, CUDA._replace(devices=8),
     Decision("conv", partition=True)),
    ("devices manual", "fwd", _spec(), AUTO, CPU._replace(devices=2, manual=True),
     Decision("native")),
    ("blocks", "dx", _spec(), AUTO, CPU._replace(split=True, manual=True, devices=2),
     Decision("blockwise")),
    # The epilogue: fused where the convolution / its kernel gradient runs native.
    ("epilogue fused", "epilogue", _spec(), AUTO, CPU, Decision("native", fused=True)),
    ("epilogue cf wide", "epilogue", _spec(last=False, spatial=(6, 8, 32)), AUTO, CPU,
     Decision("native", fused=True)),
    ("epilogue cf narrow", "epilogue", _spec(last=False, strides=(1, 1, 2)), AUTO, CPU,
     Decision("formula")),
    ("epilogue grad cf", "epilogue_grad", _spec(last=False, spatial=(6, 8, 4)), AUTO, CPU,
     Decision("native", "transposed", fused=True)),
    ("epilogue lin", "epilogue_lin", _spec(), AUTO, CPU, Decision("formula")),
    ("epilogue C=3", "epilogue", _spec(c=3), AUTO, CPU, Decision("formula")),
    ("epilogue grad C=3", "epilogue_grad", _spec(c=3), AUTO, CPU, Decision("native", fused=True)),
    ("epilogue conv", "epilogue", _spec(), CONV, CPU, Decision("formula")),
    ("epilogue modes", "epilogue_grad", _spec(modes=REFLECT), AUTO, CPU, Decision("formula")),
    # Several devices: each runs the epilogue op on its blocks, fused as on one device.
    ("epilogue devices", "epilogue", _spec(), AUTO, CPU._replace(devices=2),
     Decision("native", fused=True, partition=True)),
    ("epilogue grad devices conv", "epilogue_grad", _spec(), CONV, CPU._replace(devices=2),
     Decision("formula", partition=True)),
    ("epilogue lin devices", "epilogue_lin", _spec(), AUTO, CPU._replace(devices=2),
     Decision("formula")),
    ("epilogue devices manual", "epilogue", _spec(), AUTO,
     CPU._replace(devices=2, manual=True), Decision("native", fused=True)),
    ("epilogue devices export", "epilogue", _spec(), AUTO,
     CPU._replace(devices=2, target="stablehlo"), Decision("formula")),
    ("epilogue cuda", "epilogue", _spec(), AUTO, CUDA, Decision("formula")),
    ("epilogue other", "epilogue", _spec(), SHIFT, OTHER, Decision("formula")),
    ("epilogue litert", "epilogue", _spec(), AUTO, CPU._replace(target="litert"),
     Decision("formula")),
    ("epilogue off", "epilogue_grad", _spec(), AUTO, CPU._replace(native_mode="off"),
     Decision("formula")),
    ("epilogue export", "epilogue", _spec(), AUTO, CPU._replace(target="stablehlo"),
     Decision("formula")),
    ("epilogue export native", "epilogue_grad", _spec(), AUTO, CPU._replace(target="native"),
     Decision("native", fused=True)),
]


@pytest.mark.parametrize("name, op, spec, impl, facts, expected", TABLE,
                         ids=[row[0] for row in TABLE])
def test_decision_table(name, op, spec, impl, facts, expected):
  assert decide(op, spec, impl, facts) == expected


# A 1-frame streaming step (`_policy.decide_ring_step`): the spec is the ring's
# window (3 frames in along D, one out); (name, spec, impl, facts, axis, expected).
WINDOW = _spec(spatial=(3, 8, 16))._replace(padding=((0, 0), (1, 1), (1, 1)),
                                            out_spatial=(1, 8, 16))
INDEX = Facts(dtypes=(np.dtype(np.float32),) * 3 + (np.dtype(np.int32),) * 1
              + (np.dtype(np.float32),) * 2)  # ring, frame, kernel, head; ring, y
RING_TABLE = [
    ("native", WINDOW, AUTO, INDEX, 0, "native"),
    ("bfloat16", WINDOW._replace(out_dtype=np.dtype(jnp.bfloat16)), AUTO,
     INDEX._replace(dtypes=(np.dtype(jnp.bfloat16), np.dtype(np.int32))), 0, "native"),
    ("along H", WINDOW, AUTO, INDEX, 1, "formula"),
    ("channels-first", WINDOW._replace(channels_last=False), AUTO, INDEX, 0, "formula"),
    ("C=3 on", WINDOW._replace(channels=3), AUTO, INDEX, 0, "formula"),
    ("C=3 all", WINDOW._replace(channels=3), AUTO, INDEX._replace(native_mode="all"), 0,
     "native"),
    ("border modes", WINDOW._replace(modes=("zeros", "reflect", "reflect")), AUTO, INDEX, 0,
     "formula"),
    ("method conv", WINDOW, CONV, INDEX, 0, "formula"),
    ("export", WINDOW, AUTO, INDEX._replace(target="stablehlo"), 0, "formula"),
    ("export native", WINDOW, AUTO, INDEX._replace(target="native"), 0, "formula"),
    ("two devices", WINDOW, AUTO, INDEX._replace(devices=2), 0, "formula"),
    ("not loaded", WINDOW, AUTO, INDEX._replace(native_loaded=False), 0, "formula"),
    ("float64", WINDOW, AUTO, INDEX._replace(dtypes=(np.dtype(np.float64),)), 0, "formula"),
]


@pytest.mark.parametrize("name, spec, impl, facts, axis, expected", RING_TABLE,
                         ids=[row[0] for row in RING_TABLE])
def test_ring_step_table(name, spec, impl, facts, axis, expected):
  assert _policy.decide_ring_step(spec, impl, facts, axis) == Decision(expected)


def test_gpu_choice_classes(monkeypatch):
  """`_GPU_CHOICE` keyed by ("2d" with a carried axis, else "3d"; output dtype); static only."""
  monkeypatch.setattr(_policy, "_GPU_CHOICE",
                      {("3d", "float32"): "pallas", ("2d", "bfloat16"): "shift"})
  carried = _spec(window=(1, 3, 3), dtype=jnp.bfloat16)
  assert decide("fwd", _spec(last=False), AUTO, CUDA) == Decision("pallas", "transposed")
  assert decide("fwd", carried, AUTO, CUDA) == Decision("shift")
  assert decide("fwd", _spec(dtype=jnp.bfloat16), AUTO, CUDA) == Decision("conv")
  assert decide("fwd", _spec(spatial=(N, 8, 16)), AUTO, CUDA) == Decision("conv")
  assert decide("fwd", _spec(), AUTO, CPU) == Decision("native")  # CPU never asks


@pytest.mark.parametrize("platforms", [("cpu",), ("cuda", "cpu"), ("rocm",)])
def test_pallas_refused_off_cuda(platforms):
  facts = Facts(platform=None if len(platforms) > 1 else platforms[0], platforms=platforms)
  bad = next(p for p in platforms if p != "cuda")
  with pytest.raises(ValueError, match=rf"method='pallas' runs on CUDA GPUs only.*"
                     rf"platform {bad!r}\. Use method='auto'"):
    decide("dx", _spec(), PALLAS, facts)


def test_litert_blocks_raise():
  with pytest.raises(ValueError, match=r"LiteRT export: `split_axes` \(blocks inside "
                     r"jax.shard_map\) cannot be exported"):
    decide("fwd", _spec(), AUTO, CPU._replace(split=True, target="litert"))


def test_unknown_op_raises():
  with pytest.raises(ValueError, match=r"decide: `op` must be one of .*got 'conv'"):
    decide("conv", _spec(), AUTO, CPU)


def test_export_target_context_reaches_the_primitive():
  """`_target.export_target` is read when the op traces, into `Impl.target`."""
  x, k = jnp.zeros((1, 4, 5, 6, 4)), jnp.zeros((3, 3, 3, 4, 1))
  fn = jax.jit(lambda a, b: dw.depthwise_conv3d(a, b))

  def targets():
    jaxpr = jax.make_jaxpr(fn)(x, k)
    found = []

    def walk(j):
      for e in j.eqns:
        if e.primitive is _primitive.dw5d_p:
          found.append(e.params["impl"].target)
        for sub in jax.extend.core.jaxprs_in_params(e.params):
          walk(getattr(sub, "jaxpr", sub))

    walk(jaxpr.jaxpr)
    return found

  assert targets() == [None]
  with _target.export_target("litert"):
    assert targets() == ["litert"]  # traced again: the jit cache is keyed on the target
  assert targets() == [None]
  with pytest.raises(ValueError, match=r"export_target: `target` must be None or one of"):
    _target.export_target("tflite")
