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
   place;
5. loads it, runs its self-test (every code path against plain loops) and
   registers the FFI targets with XLA for the CPU platform.

Any failure (no compiler, a compile error, a failed self-test, an unwritable
cache) leaves the native kernels off, with the reason in `status().detail`
and a one-time `RuntimeWarning`; the convolutions then use the portable XLA
lowering, so the build can never cause a wrong result or a crash.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import NamedTuple

import jax
import jaxlib

TARGETS = {"dw5d_forward": "Dw5dForward", "dw5d_input_grad": "Dw5dInputGrad",
           "dw5d_kernel_grad": "Dw5dKernelGrad", "dw5d_forward_epilogue": "Dw5dForwardEpilogue",
           "dw5d_epilogue_grad": "Dw5dEpilogueGrad", "dw5d_epilogue_grad_y": "Dw5dEpilogueGradY",
           "dw5d_bias_grad": "Dw5dBiasGrad"}
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-ffp-contract=fast")
ARCH_FLAG = "-march=native"
_COMPILE_TIMEOUT_S = 600


class NativeStatus(NamedTuple):
  """Whether the native CPU kernels are in use (`dw5d_jax.native_status()`).

  Attributes:
    active: True when `method="auto"`/`"shift"` call the native kernels on CPU.
    detail: how the library was obtained (`"compiled"`, `"cached"`) or why
      the kernels are off.
    library: the path of the loaded shared library, or None.
  """

  active: bool
  detail: str
  library: str | None = None


_lock = threading.Lock()
_status: NativeStatus | None = None


def native_status() -> NativeStatus:
  """Whether the native CPU kernels are in use, and if not, why.

  `method="auto"` and `"shift"` on CPU call a C++ kernel (XLA FFI custom
  call) for float32/bfloat16 convolutions, channels-last or channels-first:
  forward, input and kernel gradients, several times faster than XLA's own
  lowering. It is
  compiled with the system C++ compiler at first use and cached (see
  docs/performance.md). Without it (no compiler, a failed build,
  or `DW5D_JAX_NATIVE=0`), results are the same, computed by XLA's lowering.

  The first call builds or loads the library if that has not happened yet
  (about 20 s the first time on a machine); later calls return the
  same answer.

  Returns:
    A `NativeStatus`: `active`, `detail` (`"compiled"`, `"cached"`, or the
    reason the kernels are off) and `library` (the shared library's path).

  Example:
    >>> import dw5d_jax as dw
    >>> st = dw.native_status()
    >>> st.active in (True, False) and isinstance(st.detail, str)
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
  """Compiles (or finds in the cache) and loads the library; registers nothing."""
  cxx = _compiler()
  if cxx is None:
    return NativeStatus(False, "no C++ compiler found (set CXX)"), None
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
        error = _compile(cxx, flags, include, sources, path)
        if error:
          return NativeStatus(False, error), None
        how = "compiled"
  return NativeStatus(True, how, path), ctypes.CDLL(path)


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
  root = importlib.resources.files("dw5d_jax").joinpath("_csrc")
  files = sorted((f for f in root.iterdir() if f.is_file()), key=lambda f: f.name)
  return {f.name: f.read_bytes() for f in files}


def _compile(cxx: str, flags: list[str], include: str, sources: dict[str, bytes],
             path: str) -> str | None:
  """Compiles `sources` to the library `path` (atomically); the error message, or None.

  Every `.cc` file is compiled to an object, in parallel (the largest
  first), then they are linked.
  """
  with tempfile.TemporaryDirectory(prefix=".build-", dir=os.path.dirname(path)) as build:
    for name, data in sources.items():
      with open(os.path.join(build, name), "wb") as f:
        f.write(data)
    units = sorted((n for n in sources if n.endswith(".cc")), key=lambda n: -len(sources[n]))
    objects = [os.path.join(build, n + ".o") for n in units]
    commands = [[cxx, *flags, "-isystem", include, "-c", os.path.join(build, n), "-o", o]
                for n, o in zip(units, objects)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      errors = list(pool.map(_run, commands))
    if any(errors):
      return next(e for e in errors if e)
    tmp_lib = os.path.join(build, "library" + os.path.splitext(path)[1])
    error = _run([cxx, *flags, "-shared", *objects, "-o", tmp_lib])
    if error:
      return error
    os.replace(tmp_lib, path)
    return None


def _run(cmd: list[str]) -> str | None:
  """Runs a compiler command; the error message, or None."""
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S,
                          check=False)
  except (OSError, subprocess.SubprocessError) as e:
    return f"compiling failed: {e}"
  if done.returncode != 0:
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return f"compiling with {' '.join(cmd)} failed (exit {done.returncode}): {tail}"
  return None


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
