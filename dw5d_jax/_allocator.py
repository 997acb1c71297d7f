"""glibc malloc settings for large CPU arrays: applied on import, with an opt-out.

XLA on CPU allocates every output buffer with malloc. glibc serves requests
above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
`mmap`, and returns them with `munmap`, so a 32 MiB output is page-faulted
into existing again on every call: W1's forward (32 MiB out) took 8193
page faults per call, and was 3-7x slower than with the buffer reused
(benchmarks/RESULTS.md, "Default allocator"). Raising the mmap threshold
keeps such buffers on the heap, and raising the trim threshold stops glibc
from handing the freed heap top back to the kernel, so the pages are reused.

Buffers allocated by other threads than the main one (XLA's worker threads)
come from per-thread arenas whose heaps hold at most 64 MiB, so a larger
buffer there is mmap'd on every call whatever the threshold says;
`arena_max=1` sends every thread to the main heap (W2's backward: 16389
faults per call with the thresholds alone, 0 with one arena).

JAX has no CPU allocator option of its own (XLA's CPU client mallocs each
buffer), so the library sets these once, when `dw5d_jax` is imported
(`_tune_at_import`): thresholds 1 GiB and 2**31 - 1, one arena. The price:
freed memory stays with the process (its resident size stays at its peak),
and it applies to every library in the process. It is skipped when
`DW5D_JAX_TUNE_ALLOCATOR=0`, when the environment already sets glibc's malloc
(`MALLOC_*_` variables or `glibc.malloc` tunables: the user's choice stands),
and off glibc. `tune_cpu_allocator()` applies it explicitly (e.g. after
opting out, or with other values).
"""


from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

# mallopt() parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int

# The environment-variable form of the defaults (read by glibc at start-up).
ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX)}

# The opt-out: DW5D_JAX_TUNE_ALLOCATOR=0 leaves glibc's malloc as it is.
OPT_OUT = "DW5D_JAX_TUNE_ALLOCATOR"
# glibc's own malloc variables: if the user set any, the library sets nothing.
_GLIBC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
               "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_ARENA_TEST")

# What `_tune_at_import` did in this process (benchmarks record it).
AT_IMPORT = "not run"


def tune_cpu_allocator(*, mmap_threshold: int = 2**30, trim_threshold: int = _INT_MAX,
                       arena_max: int | None = None) -> bool:
  """Raises glibc malloc's mmap and trim thresholds for this process.

  Calls glibc's `mallopt(M_MMAP_THRESHOLD, mmap_threshold)` and
  `mallopt(M_TRIM_THRESHOLD, trim_threshold)` through `ctypes`. Buffers
  smaller than `mmap_threshold` then come from the heap and are reused
  instead of being mapped and page-faulted afresh on every call, which is
  what makes large XLA (and PyTorch) CPU computations several times slower
  than their memory traffic allows. The cost: freed memory stays with the
  process (its resident size stays at its peak) and setting a threshold
  disables glibc's adaptive threshold. It affects every library in the
  process. Importing `dw5d_jax` already applies the defaults with
  `arena_max=1` unless `DW5D_JAX_TUNE_ALLOCATOR=0` or a `MALLOC_*_`
  variable is set; call this after opting out, or for other values.

  Not glibc (macOS, Windows, musl-based Linux): nothing is changed, a
  `RuntimeWarning` says so, and the result is `False`.

  Args:
    mmap_threshold: bytes; requests at least this large are still mmap'd.
      Default 1 GiB.
    trim_threshold: bytes of free heap top kept before trimming. Default
      2**31 - 1 (the largest value mallopt takes).
    arena_max: None (default: unchanged), or the most malloc arenas
      (`mallopt(M_ARENA_MAX, arena_max)`); `1` makes threads that start
      allocating afterwards (call it before the first JAX computation, which
      starts XLA's threads) use the main heap, where buffers over 64 MiB are
      reused too. The cost: threads that allocate at once wait for each
      other's lock.

  Returns:
    `True` if every setting was applied, `False` otherwise.

  Raises:
    TypeError: a threshold or `arena_max` is not an int.
    ValueError: a threshold is outside `[0, 2**31 - 1]`, or `arena_max`
      outside `[1, 2**31 - 1]`.

  Example:
    >>> import dw5d_jax as dw
    >>> dw.tune_cpu_allocator() in (True, False)
    True
  """
  fn = "tune_cpu_allocator"
  for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{fn}: `{name}` must be an int (bytes), got "
                      f"{type(value).__name__} {value!r}.")
    if not 0 <= value <= _INT_MAX:
      raise ValueError(f"{fn}: `{name}` must be in [0, 2**31 - 1] (mallopt takes a C int), "
                       f"got {value}.")
  if arena_max is not None:
    if isinstance(arena_max, bool) or not isinstance(arena_max, int):
      raise TypeError(f"{fn}: `arena_max` must be None or an int (arenas), got "
                      f"{type(arena_max).__name__} {arena_max!r}.")
    if not 1 <= arena_max <= _INT_MAX:
      raise ValueError(f"{fn}: `arena_max` must be in [1, 2**31 - 1], got {arena_max}.")
  libc = _glibc()
  if libc is None:
    warnings.warn(f"{fn}: this process does not use glibc's malloc (platform "
                  f"{sys.platform}); nothing was changed.", RuntimeWarning, stacklevel=2)
    return False
  settings = [(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)]
  if arena_max is not None:
    settings.append((_M_ARENA_MAX, arena_max))
  ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
  if not ok:
    warnings.warn(f"{fn}: glibc's mallopt rejected the setting; the allocator may be "
                  f"unchanged.", RuntimeWarning, stacklevel=2)
  return ok


def _glibc() -> ctypes.CDLL | None:
  """This process's C library if it is glibc (has `gnu_get_libc_version`)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  return libc


def _tune_at_import() -> str:
  """Applies the defaults with one arena, unless opted out; says what it did.

  Silent: nothing the user asked for can fail here (off glibc it does
  nothing). An unknown `DW5D_JAX_TUNE_ALLOCATOR` value changes nothing and
  warns, naming the variable.
  """
  global AT_IMPORT
  flag = os.environ.get(OPT_OUT, "1").strip()
  if flag not in ("0", "1", ""):
    warnings.warn(f"dw5d_jax: `{OPT_OUT}` must be 0 (leave glibc's malloc alone) or 1 "
                  f"(tune it, the default), got {flag!r}; glibc's malloc was left alone.",
                  RuntimeWarning, stacklevel=3)
    AT_IMPORT = f"left alone ({OPT_OUT}={flag!r} is not 0 or 1)"
  elif flag == "0":
    AT_IMPORT = f"left alone ({OPT_OUT}=0)"
  elif any(v in os.environ for v in _GLIBC_VARS) or "glibc.malloc" in os.environ.get(
      "GLIBC_TUNABLES", ""):
    AT_IMPORT = "left to the environment (glibc malloc variables set)"
  elif (libc := _glibc()) is None:
    AT_IMPORT = "left alone (not glibc)"
  else:
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 2**30), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_ARENA_MAX, 1)))
    AT_IMPORT = "tuned" if ok else "partly tuned (mallopt refused a setting)"
  return AT_IMPORT
