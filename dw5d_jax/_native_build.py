"""Builds, caches and loads the native CPU kernels (the C++ sources in `dw5d_jax/_csrc/`).

The first trace of an op that could use them, with CPU as the default
backend, calls `status()` (`_lowering.prepare`), which:

1. returns at once if `DW5D_JAX_NATIVE=0` (or `false`/`no`/`off`; see `mode`);
2. finds a C++ compiler (`$CXX`, else `c++`, `g++`, `clang++`) and asks it
   which instruction set `-march=native` means here;
3. looks for a library in the cache directory (`$DW5D_JAX_CACHE_DIR`, else
   `$XDG_CACHE_HOME/dw5d_jax`, else `~/.cache/dw5d_jax`) whose name is a hash
   of everything the binary depends on: every file of `_csrc/` (sources and
   headers, with their names), the compiler and its version, the flags, that
   instruction set, jaxlib's version and its FFI headers. A cache shared
   between machines therefore never hands a binary to a CPU it was not
   built for;
4. otherwise compiles it under a file lock, so parallel processes (pytest
   workers) compile once: each `.cc` file to an object (`-O3 -march=native
   -fPIC`, in parallel on up to one process per CPU; about 20 s on 2
   cores), linked with `-shared` into a temporary file that is renamed into
   place (`_native_compile`);
5. without a compiler, or if that build fails, takes the best prebuilt
   library the installed wheel carries for this CPU (`_native_compile.VARIANTS`:
   x86-64-v4 with AVX-512 BF16, x86-64-v4, x86-64-v3), if its FFI headers
   are not newer than this jaxlib's;
6. loads it, runs its self-test (every code path against plain loops) and
   registers the FFI targets with XLA for the CPU platform.

Any failure (no compiler and no prebuilt library for this CPU, a compile
error, a failed self-test, an unwritable cache) leaves the native kernels
off, with the reason in `status().detail` and a one-time `RuntimeWarning`;
the convolutions then use the portable XLA lowering, so the build can never
cause a wrong result or a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.resources
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from typing import NamedTuple

import jax
import jaxlib

from dw5d_jax import _native_compile

TARGETS = {"dw5d_forward": "Dw5dForward", "dw5d_input_grad": "Dw5dInputGrad",
           "dw5d_kernel_grad": "Dw5dKernelGrad", "dw5d_forward_epilogue": "Dw5dForwardEpilogue",
           "dw5d_epilogue_grad": "Dw5dEpilogueGrad", "dw5d_epilogue_grad_y": "Dw5dEpilogueGradY",
           "dw5d_bias_grad": "Dw5dBiasGrad", "dw5d_stream_step": "Dw5dStreamStep"}
FLAGS = _native_compile.FLAGS
ARCH_FLAG = "-march=native"


class NativeStatus(NamedTuple):
  """Whether the native CPU kernels are in use (`dw5d_jax.native_status()`).

  Attributes:
    active: True when `method="auto"`/`"shift"` call the native kernels on CPU.
    detail: how the library was obtained (`"compiled"`, `"cached"`,
      `"prebuilt x86-64-v4: no C++ compiler found (set CXX)"`) or why the kernels are
      off.
    library: the path of the loaded shared library, or None.
    speed: the expected speed class: `"native"` (compiled here for this
      CPU, `-march=native`: the fastest), `"prebuilt"` (a library from the
      wheel compiled for this CPU's x86-64 level) or `"portable"` (the
      kernels are off: XLA's lowering, several times slower on CPU).
  """

  active: bool
  detail: str
  library: str | None = None
  speed: str = "portable"


_lock = threading.Lock()
_status: NativeStatus | None = None
_export_noted = False


def native_status() -> NativeStatus:
  """Whether the native CPU kernels are in use, and if not, why.

  `method="auto"` and `"shift"` on CPU call a C++ kernel (XLA FFI custom
  call) for float32/bfloat16 convolutions, channels-last or channels-first:
  forward, input and kernel gradients, several times faster than XLA's own
  lowering. It is compiled with the system C++ compiler at first use and
  cached; without a compiler, the wheel's prebuilt library for the CPU's
  x86-64 level is used (see docs/performance.md). Without either (an
  unsupported CPU, a failed build, or `DW5D_JAX_NATIVE=0`), results are
  the same, computed by XLA's lowering. Exports (`jax.export`, SavedModel,
  LiteRT) always use XLA's lowering, except `dw5d_jax.export_native`.

  The first call builds or loads the library if that has not happened yet
  (about 20 s the first time on a machine); later calls return the
  same answer.

  Returns:
    A `NativeStatus`: `active`, `detail` (`"compiled"`, `"cached"`,
    `"prebuilt <level>: <why>"`, or the reason the kernels are off),
    `library` (the shared library's path) and `speed` (`"native"`,
    `"prebuilt"` or `"portable"`).

  Example:
    >>> import dw5d_jax as dw
    >>> st = dw.native_status()
    >>> st.active == (st.speed != "portable") and isinstance(st.detail, str)
    True
  """
  return status()


def status() -> NativeStatus:
  """Builds or loads the kernels on the first call; the same answer afterwards."""
  global _status
  with _lock:
    if _status is None:
      _status = _load_and_register()
      if not _status.active and not _disabled():
        warnings.warn(f"dw5d_jax: native CPU kernels unavailable ({_status.detail}); using the "
                      f"XLA lowering instead (slower). Set DW5D_JAX_NATIVE=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
    return _status


def note_portable_export() -> None:
  """Says once per process that an export computes without the (active) native kernels."""
  global _export_noted
  if not _export_noted:
    _export_noted = True
    warnings.warn("dw5d_jax: exported computations use XLA's portable lowering, not the native "
                  "CPU kernels (an artifact must not call custom calls that the serving process "
                  "may lack), so they run slower than under jax.jit here; dw5d_jax.export_native "
                  "keeps the kernels for serving processes that import dw5d_jax.",
                  RuntimeWarning, stacklevel=2)


def loaded() -> NativeStatus | None:
  """The status if `status()` has run (the library built or failed), else None; never builds."""
  return _status


def mode() -> str:
  """`DW5D_JAX_NATIVE`: `"off"` (0/false/no/off), `"all"`, or `"on"` (anything else).

  `"on"` uses the native kernels where they were measured faster than XLA's
  lowering (`_policy.worthwhile`), `"all"` wherever they apply (the test
  suite uses it to run them on every configuration).
  """
  value = os.environ.get("DW5D_JAX_NATIVE", "1").strip().lower()
  if value in ("0", "false", "no", "off"):
    return "off"
  return "all" if value == "all" else "on"


def _disabled() -> bool:
  return mode() == "off"


def cache_dir() -> str:
  """Where built libraries are kept (see the module docstring)."""
  if os.environ.get("DW5D_JAX_CACHE_DIR"):
    return os.environ["DW5D_JAX_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dw5d_jax")


def _load_and_register() -> NativeStatus:
  if _disabled():
    return NativeStatus(False, "disabled by DW5D_JAX_NATIVE=0")
  try:
    st, lib = build()
    if lib is None:
      return st
    failed = lib.Dw5dSelfTest()
    if failed:
      return NativeStatus(False, f"self-test of {st.library} failed (case {failed})")
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return st
  except Exception as e:  # noqa: BLE001 - any failure means: use the XLA lowering
    return NativeStatus(False, f"{type(e).__name__}: {e}")


def build() -> tuple[NativeStatus, ctypes.CDLL | None]:
  """Compiles (or finds in the cache) or picks a prebuilt library and loads it; registers nothing.

  The `-march=native` build first; the prebuilt library for this CPU where
  there is no compiler or that build fails.
  """
  cxx = _compiler()
  if cxx is None:
    why = "no C++ compiler found (set CXX)"
  else:
    st, lib = _build_here(cxx)
    if lib is not None:
      return st, lib
    why = st.detail
  return _prebuilt(why)


def _build_here(cxx: str) -> tuple[NativeStatus, ctypes.CDLL | None]:
  """The `-march=native` library, compiled with `cxx` or found in the cache."""
  sources = _sources()
  include = jax.ffi.include_dir()
  flags = [*FLAGS, ARCH_FLAG]
  target = _probe(cxx, flags)
  if target is None:  # the compiler does not know -march=native: a portable build
    flags = list(FLAGS)
    target = _probe(cxx, flags)
    if target is None:
      return NativeStatus(False, f"the C++ compiler {cxx} does not run"), None
  key = hashlib.sha256()
  for name, data in sources.items():
    key.update(name.encode() + b"\0" + data + b"\0")
  for part in (cxx.encode(), target, " ".join(flags).encode(),
               jaxlib.__version__.encode(), sys.platform.encode()):
    key.update(part)
    key.update(b"\0")
  for header in ("api.h", "c_api.h", "ffi.h"):
    with open(os.path.join(include, "xla", "ffi", "api", header), "rb") as f:
      key.update(f.read())
  suffix = ".dll" if sys.platform == "win32" else ".so"
  directory = cache_dir()
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    return NativeStatus(False, f"cannot create the cache directory {directory}: {e}"), None
  path = os.path.join(directory, f"depthwise-{key.hexdigest()[:20]}{suffix}")
  how = "cached"
  if not os.path.exists(path):
    with _file_lock(path + ".lock"):
      if not os.path.exists(path):  # another process may have built it meanwhile
        error = _native_compile.compile_libraries(cxx, {path: flags}, include, sources)
        if error:
          return NativeStatus(False, error), None
        how = "compiled"
  return NativeStatus(True, how, path, "native"), ctypes.CDLL(path)


def _prebuilt(why: str) -> tuple[NativeStatus, ctypes.CDLL | None]:
  """The best prebuilt library for this CPU, used because of `why`; or the reason there is none."""
  root = importlib.resources.files("dw5d_jax").joinpath("_prebuilt")
  machine = platform.machine().lower()
  if machine not in ("x86_64", "amd64"):
    return NativeStatus(False, f"{why}, and the prebuilt kernels are for x86-64, "
                               f"not {machine}"), None
  try:
    manifest = json.loads(root.joinpath(_native_compile.MANIFEST).read_text())
  except OSError:
    return NativeStatus(False, f"{why}, and this installation has no prebuilt kernels "
                               f"(an editable or source install)"), None
  built = tuple(manifest["ffi_api"])
  here = _native_compile.ffi_api_version(jax.ffi.include_dir())
  if built[0] != here[0] or built[1] > here[1]:
    return NativeStatus(False, f"{why}, and the prebuilt kernels use XLA FFI API "
                               f"{built[0]}.{built[1]}, newer than this jaxlib's "
                               f"{here[0]}.{here[1]}"), None
  flags = _native_compile.cpu_flags()
  if flags is None:
    return NativeStatus(False, f"{why}, and the CPU's features are unknown "
                               f"(no /proc/cpuinfo)"), None
  variant = _native_compile.choose(flags, manifest["variants"])
  if variant is None:
    lowest = _native_compile.VARIANTS[-1]
    missing = " ".join(sorted(lowest.cpu_flags - flags))
    return NativeStatus(False, f"{why}, and this CPU lacks {missing}, which the prebuilt "
                               f"kernels need ({lowest.name} at least)"), None
  path = str(root.joinpath(_native_compile.library_name(variant.name)))
  return (NativeStatus(True, f"prebuilt {variant.name}: {why}", path, "prebuilt"),
          ctypes.CDLL(path))


def _compiler() -> str | None:
  for name in ([os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]):
    found = shutil.which(name)
    if found:
      return found
  return None


def _probe(cxx: str, flags: list[str]) -> bytes | None:
  """The compiler's version and predefined macros for `flags` (the target ISA)."""
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, timeout=60, check=True)
    macros = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, timeout=60, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return version.stdout + b"\0" + macros.stdout


def _sources() -> dict[str, bytes]:
  """Every file of `_csrc/` (the `.cc` files and the headers they share), by name, sorted."""
  return _native_compile.read_sources(importlib.resources.files("dw5d_jax").joinpath("_csrc"))


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive lock between processes (none where `fcntl` is missing)."""
  try:
    import fcntl
  except ImportError:  # the temporary file and rename still keep the result whole
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
