"""The export target: what an op is traced for, as a fact the policy reads.

An export route that wants its own lowering of the ops (LiteRT's
DEPTHWISE_CONV_2D graphs today; ONNX and native-kernel exports are more
values of the same fact) traces the user's function inside
`export_target(name)`:

    with _target.export_target("litert"):
      closed = jax.make_jaxpr(fn)(*args)

The public ops read the target when they trace (`current`) and carry it in
their primitives' `Impl.target`, so the lowering, whenever it runs (later,
inside jax2tf, outside the context), knows it, and `_policy.decide` picks
the target's lowering. The target is a JAX configuration state included in
the jit and trace cache keys: a function jitted (and traced) before is traced again
inside the context, so no stale trace is replayed, and afterwards its
earlier trace is used again.

Targets (`TARGETS`): `"stablehlo"` (`jax.export`; also what any lowering
for export without a named target is), `"tf"` (jax2tf, SavedModel),
`"litert"` (the LiteRT converter), `"onnx"` (`interop.export_onnx`,
whose jax2onnx plugins turn the primitives into ONNX nodes) and `"native"`
(`jax.export` keeping the native CPU kernels, `_native_export.export_native`);
see `_policy.decide` for what each one chooses.
"""

from __future__ import annotations

from jax._src import config as _config

TARGETS = ("stablehlo", "tf", "litert", "onnx", "native")

_STATE = _config.optional_enum_state(
    name="dw5d_jax_export_target", enum_values=TARGETS, default=None,
    help="dw5d_jax: the export target the ops are traced for (None: none named).",
    include_in_jit_key=True, include_in_trace_context=True)


def export_target(target: str | None):
  """A context in which `dw5d_jax` ops trace for export `target` (one of `TARGETS`).

  Raises:
    ValueError: `target` is not None or one of `TARGETS`.
  """
  if target is not None and target not in TARGETS:
    raise ValueError(f"export_target: `target` must be None or one of {TARGETS}, "
                     f"got {target!r}.")
  return _STATE(target)


def current() -> str | None:
  """The export target the ops trace for now (None: none named)."""
  return _STATE.value
