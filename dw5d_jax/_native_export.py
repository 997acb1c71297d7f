"""Exported artifacts that keep the native CPU kernels, and loading them where they run.

`jax.export` lowers with `for_export` set, and the policy then keeps the
portable XLA lowering: the artifact names no custom call, so any process
with JAX can run it. `export_native` opts in to the native kernels instead,
for serving processes that import dw5d_jax: the artifact calls the FFI
targets `dw5d_forward`, ... (`_native_build.TARGETS`) that loading the
library registers.

How the lowering learns of the opt-in: the export traces inside
`_target.export_target("native")`, so the ops carry the export target
`"native"` (`Impl.target`) and `_policy.decide` keeps the native kernels
for them. The target is part of JAX's trace and jit cache keys, so a plain
`jax.export` of the same function, before or after, never gets the native
lowering, nor the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from jax import export

from dw5d_jax import _native_build, _target


def export_native(fun_jit: Callable, *, platforms: Sequence[str] | None = None,
                  disabled_checks: Sequence[export.DisabledSafetyCheck] = ()
                  ) -> Callable[..., export.Exported]:
  """`jax.export.export` keeping dw5d_jax's native CPU kernels in the artifact.

  A plain `jax.export` artifact computes the convolutions with XLA's
  portable lowering on CPU, so that any process with JAX can run it, but
  slower than `jax.jit` in the exporting process. This one calls the native
  kernels (XLA FFI custom calls) where `jax.jit` would, so it runs at the
  same speed, but only in a serving process that has them: one that imports
  dw5d_jax and loads the artifact with `deserialize_native`, which checks
  that the kernels are active there. Elsewhere, XLA refuses to compile it,
  naming the missing target (e.g. `dw5d_forward`). Other platforms in
  `platforms` (e.g. CUDA) get their usual lowering.

  Where the exporting process has no native kernels (`native_status()`),
  the artifact is the portable one.

  Args:
    fun_jit: the function to export, the result of `jax.jit`.
    platforms: as for `jax.export.export` (default: the default backend).
    disabled_checks: more safety checks to disable, as for
      `jax.export.export`; the native kernels' custom calls are added.

  Returns:
    A function that takes the arguments (arrays or `jax.ShapeDtypeStruct`s)
    and returns a `jax.export.Exported`.

  Example:
    >>> import jax, numpy as np
    >>> import dw5d_jax as dw
    >>> x = np.ones((1, 4, 5, 6, 8), np.float32)
    >>> k = np.ones((3, 3, 3, 8, 1), np.float32)
    >>> exp = dw.export_native(jax.jit(dw.depthwise_conv3d))(x, k)
    >>> blob = exp.serialize()  # in the serving process:
    >>> y = dw.deserialize_native(blob).call(x, k)
    >>> y.shape, float(y[0, 2, 2, 2, 0])
    ((1, 4, 5, 6, 8), 27.0)
  """
  checks = (*disabled_checks,
            *(export.DisabledSafetyCheck.custom_call(t) for t in _native_build.TARGETS))
  exporter = export.export(fun_jit, platforms=platforms, disabled_checks=checks)

  def do_export(*args, **kwargs) -> export.Exported:
    with _target.export_target("native"):
      return exporter(*args, **kwargs)

  return do_export


def deserialize_native(blob: bytes | bytearray) -> export.Exported:
  """`jax.export.deserialize`, with the native CPU kernels ready for an `export_native` artifact.

  Loads (or builds) the native kernels and registers them with XLA (as
  `native_status()` does), so the artifact's custom calls resolve. A
  portable artifact is returned as `jax.export.deserialize` returns it.

  Args:
    blob: the bytes of `Exported.serialize()`.

  Returns:
    The `jax.export.Exported`; call it with `.call(...)`.

  Raises:
    RuntimeError: the artifact calls native kernels and this process has
      none (`native_status().detail` says why).

  Example:
    >>> import jax, numpy as np
    >>> import dw5d_jax as dw
    >>> x = np.ones((1, 4, 5, 6, 8), np.float32)
    >>> k = np.ones((1, 3, 3, 8, 1), np.float32)
    >>> blob = dw.export_native(jax.jit(dw.depthwise_conv3d))(x, k).serialize()
    >>> dw.deserialize_native(blob).call(x, k).shape
    (1, 4, 5, 6, 8)
  """
  exp = export.deserialize(blob)
  needed = sorted(set(re.findall(r"custom_call @(dw5d_\w+)", exp.mlir_module()))
                  & set(_native_build.TARGETS))
  if needed:
    status = _native_build.status()
    if not status.active:
      raise RuntimeError(
          f"deserialize_native: the artifact calls dw5d_jax's native CPU kernels "
          f"({', '.join(needed)}), which this process lacks: {status.detail}. Run it where "
          f"`dw5d_jax.native_status().active` is True, or export it with `jax.export.export` "
          f"(the portable lowering).")
  return exp

