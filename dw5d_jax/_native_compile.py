"""Compiling the native kernels (`_csrc/`) into a shared library, and the prebuilt variants.

A leaf that imports neither JAX nor the rest of the package: the wheel build
(`setup.py`, which loads this file by path, with only setuptools and jaxlib's
headers at hand) and the build at first use (`_native_build`) compile with
the same functions and flags.

Prebuilt variants. A wheel carries the library compiled for the common
x86-64 levels (`VARIANTS`, best first); at run time `choose` takes the best
one whose instruction sets the CPU has, read from `/proc/cpuinfo`'s flags
(the kernel lists only those the OS also enables). Loading a library with
instructions the CPU lacks would crash at the first one (static initialisers
included), so the choice is made before the library is opened. A
`manifest.json` beside them records the FFI API version of the headers they
were compiled against.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import tempfile
from typing import NamedTuple

FLAGS = ("-O3", "-std=c++17", "-fPIC", "-ffp-contract=fast")
COMPILE_TIMEOUT_S = 600
MANIFEST = "manifest.json"


class Variant(NamedTuple):
  """A prebuilt library: its name, the compiler's target flags, the CPU flags it needs."""

  name: str
  flags: tuple[str, ...]
  cpu_flags: frozenset[str]


# x86-64-v3 is AVX2 + FMA (+ BMI1/2, F16C, LZCNT, MOVBE), v4 adds AVX-512
# F/BW/CD/DQ/VL; the kernels use AVX-512 BF16 (`vdpbf16ps`) where it is there.
_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
VARIANTS = (
    Variant("x86-64-v4-bf16", ("-march=x86-64-v4", "-mavx512bf16"), _V4 | {"avx512_bf16"}),
    Variant("x86-64-v4", ("-march=x86-64-v4",), _V4),
    Variant("x86-64-v3", ("-march=x86-64-v3",), _V3),
)


def library_name(variant: str) -> str:
  return f"depthwise-{variant}.so"


def choose(cpu_flags: frozenset[str], available) -> Variant | None:
  """The best variant in `available` (names) that runs on a CPU with `cpu_flags`."""
  for v in VARIANTS:
    if v.name in available and v.cpu_flags <= cpu_flags:
      return v
  return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
  """The CPU's feature flags (Linux), or None where `/proc/cpuinfo` has none."""
  try:
    text = pathlib.Path(cpuinfo).read_text()
  except OSError:
    return None
  found = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
  return frozenset(found.group(1).split()) if found else None


def ffi_api_version(include: str) -> tuple[int, int]:
  """`(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR)` of the FFI headers under `include`."""
  text = pathlib.Path(include, "xla", "ffi", "api", "c_api.h").read_text()
  return tuple(int(re.search(rf"#define XLA_FFI_API_{part}\s+(\d+)", text).group(1))
               for part in ("MAJOR", "MINOR"))


def read_sources(root) -> dict[str, bytes]:
  """Every file of `root` (`_csrc/`: the `.cc` files and the headers they share), by name."""
  files = sorted((f for f in root.iterdir() if f.is_file()), key=lambda f: f.name)
  return {f.name: f.read_bytes() for f in files}


def compile_libraries(cxx: str, jobs: dict[str, list[str]], include: str,
                      sources: dict[str, bytes]) -> str | None:
  """Compiles `sources` once per `{library path: flags}` of `jobs`; the error, or None.

  Every `.cc` file of every library is one object, all compiled in parallel
  (the largest first, one process per CPU), then each library is linked
  into a temporary file that is renamed into place, so a reader never sees
  a partial library.
  """
  with tempfile.TemporaryDirectory(prefix=".build-",
                                   dir=os.path.dirname(next(iter(jobs)))) as build:
    for name, data in sources.items():
      with open(os.path.join(build, name), "wb") as f:
        f.write(data)
    units = [n for n in sources if n.endswith(".cc")]
    objects = {path: [os.path.join(build, f"{i}-{n}.o") for n in units]
               for i, path in enumerate(jobs)}
    commands = sorted(
        ([cxx, *flags, "-isystem", include, "-c", os.path.join(build, n), "-o", o]
         for path, flags in jobs.items() for n, o in zip(units, objects[path])),
        key=lambda cmd: -len(sources[os.path.basename(cmd[-3])]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      errors = list(pool.map(run, commands))
    if any(errors):
      return next(e for e in errors if e)
    for i, (path, flags) in enumerate(jobs.items()):
      tmp_lib = os.path.join(build, f"library-{i}{os.path.splitext(path)[1]}")
      error = run([cxx, *flags, "-shared", *objects[path], "-o", tmp_lib])
      if error:
        return error
      os.replace(tmp_lib, path)
  return None


def build_prebuilt(cxx: str, dest: str, include: str, sources: dict[str, bytes],
                   names=None) -> None:
  """Compiles the `VARIANTS` (those in `names`, default all) into `dest`, with the manifest."""
  chosen = [v for v in VARIANTS if names is None or v.name in names]
  unknown = set(names or ()) - {v.name for v in VARIANTS}
  if unknown or not chosen:
    raise ValueError(f"prebuilt kernel variants: expected some of "
                     f"{[v.name for v in VARIANTS]}, got {sorted(names or ())}")
  os.makedirs(dest, exist_ok=True)
  jobs = {os.path.join(dest, library_name(v.name)): [*FLAGS, *v.flags] for v in chosen}
  error = compile_libraries(cxx, jobs, include, sources)
  if error:
    raise RuntimeError(f"building the prebuilt native kernels failed: {error}")
  major, minor = ffi_api_version(include)
  manifest = dict(ffi_api=[major, minor], variants=[v.name for v in chosen])
  pathlib.Path(dest, MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def run(cmd: list[str]) -> str | None:
  """Runs a compiler command; the error message, or None."""
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                          check=False)
  except (OSError, subprocess.SubprocessError) as e:
    return f"compiling failed: {e}"
  if done.returncode != 0:
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return f"compiling with {' '.join(cmd)} failed (exit {done.returncode}): {tail}"
  return None
