"""An explicit, opt-in tweak of glibc's malloc for large CPU arrays.

XLA on CPU allocates every output buffer with malloc. glibc serves requests
above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
`mmap`, and returns them with `munmap`, so a 32 MiB output is page-faulted
into existing again on every call: on the 2-core benchmark machine an
elementwise pass over 32 MiB took about 10 ms instead of 1.2 ms, and every
convolution paid the same tax (benchmarks/RESULTS.md). Raising the mmap
threshold keeps such buffers on the heap, and raising the trim threshold
stops glibc from handing the freed heap top back to the kernel, so the pages
are reused.

Buffers allocated by other threads than the main one (XLA's worker threads)
come from per-thread arenas whose heaps hold at most 64 MiB, so a larger
buffer there is mmap'd on every call whatever the threshold says;
`arena_max=1` sends every thread to the main heap (measured for the border
modes in benchmarks/RESULTS.md, "glibc arenas").

This is a process-wide change to the C allocator, so the library never does
it on import; call `tune_cpu_allocator()` once, early, or set the equivalent
environment variables before Python starts:
`MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`
(and `MALLOC_ARENA_MAX=1`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings

# mallopt() parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int

# The environment-variable form of the defaults (read by glibc at start-up).
ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX)}


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
  process, which is why it is opt-in and never done on import.

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
