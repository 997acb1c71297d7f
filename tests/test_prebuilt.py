"""The wheel and its prebuilt native kernels (setup.py, dw5d_jax/_native_compile.py).

One wheel is built for this file (module fixture), from a copy of the
checkout, carrying the prebuilt variant this CPU selects: building every
variant takes three times as long, and which one a CPU gets is checked here
as a table (`test_choose_*`). It is installed with pip into a fresh venv
(no pip of its own; a `.pth` line lends it this environment's JAX) whose
PATH has no C++ compiler, and run there in fresh processes. Expected values
come from the float64 reference (tests/helpers.py: `reference_grads`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import numpy as np
import pytest

from dw5d_jax import _native_compile
from tests.helpers import Case, assert_close, reference_grads

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_CASE = Case("3d", "NDHWC", "DHW", (1, 3, 4, 5, 8), (3, 3, 3, 8, 1), 1, 1, "SAME")
_LEVELS = {v.name: v.cpu_flags for v in _native_compile.VARIANTS}
# The variant this machine's CPU gets (None: not x86-64, or older than x86-64-v3).
_HERE = _native_compile.choose(_native_compile.cpu_flags() or frozenset(), _LEVELS)


@pytest.mark.parametrize("extra,expected", [
    (set(), "x86-64-v3"),
    ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "x86-64-v4"),
    ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16"},
     "x86-64-v4-bf16"),
    ({"avx512f", "avx512_bf16"}, "x86-64-v3"),  # AVX-512 without VL/BW/DQ/CD is not v4
])
def test_choose_takes_the_best_level_the_cpu_has(extra, expected):
  v3 = {"sse2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}
  assert _native_compile.choose(frozenset(v3 | extra), _LEVELS).name == expected
  # Only among the variants the wheel carries.
  assert _native_compile.choose(frozenset(v3 | extra), ["x86-64-v3"]).name == "x86-64-v3"


@pytest.mark.parametrize("flags", [
    "sse2 avx fma",  # no AVX2: older than x86-64-v3
    "avx avx2 bmi1 bmi2 f16c abm movbe",  # no FMA
    "fp asimd evtstrm aes pmull sha1 sha2 crc32",  # an aarch64 CPU
])
def test_choose_none_below_x86_64_v3(flags):
  assert _native_compile.choose(frozenset(flags.split()), _LEVELS) is None


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
  assert _native_compile.cpu_flags(str(info)) == frozenset({"fpu", "avx2", "fma"})
  info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # aarch64 names them otherwise
  assert _native_compile.cpu_flags(str(info)) is None
  assert _native_compile.cpu_flags(str(tmp_path / "missing")) is None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """The project's wheel, built from a copy of it (no `build/` left in the checkout).

  On x86-64 (v3 or later) this is the suite's real compile from scratch, with
  `_native_compile.compile_libraries` as at first use; tests/test_native.py's
  build tests use stand-in compilers that never compile.
  """
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "setup.py"):
    shutil.copy(_ROOT / name, src / name)
  for package in ("dw5d_jax", "interop", "build_support"):
    shutil.copytree(_ROOT / package, src / package,
                    ignore=shutil.ignore_patterns("__pycache__", "_prebuilt"))
  env = dict(os.environ, DW5D_JAX_PREBUILT=_HERE.name if _HERE else "0")
  done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                         "--no-build-isolation", "-w", str(tmp / "wheel")],
                        capture_output=True, text=True, timeout=600, check=False, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  (built,) = (tmp / "wheel").glob("*.whl")
  return built


def test_wheel_ships_every_native_source_and_the_prebuilt_library(wheel):
  """Every file of `_csrc/` (the build hashes and compiles them all); the variant and manifest."""
  archive = zipfile.ZipFile(wheel)
  names = archive.namelist()
  shipped = {n for n in names if n.startswith("dw5d_jax/_csrc/")}
  assert shipped == {f"dw5d_jax/_csrc/{p.name}" for p in (_ROOT / "dw5d_jax" / "_csrc").iterdir()}
  assert any(n.endswith(".h") for n in shipped) and any(n.endswith(".cc") for n in shipped)
  if _HERE is None:
    assert not [n for n in names if "_prebuilt" in n]
    return
  assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name
  prebuilt = sorted(n for n in names if n.startswith("dw5d_jax/_prebuilt/"))
  assert prebuilt == [f"dw5d_jax/_prebuilt/depthwise-{_HERE.name}.so",
                      "dw5d_jax/_prebuilt/manifest.json"]
  manifest = json.loads(archive.read("dw5d_jax/_prebuilt/manifest.json"))
  import jax  # the headers it was compiled against are this jaxlib's (--no-build-isolation)

  assert manifest == dict(ffi_api=list(_native_compile.ffi_api_version(jax.ffi.include_dir())),
                          variants=[_HERE.name])


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> pathlib.Path:
  """A fresh venv with the wheel installed by pip, and JAX lent by a `.pth` line."""
  root = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                 timeout=120)
  python = root / "bin" / "python"
  site = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip())
  # Outside the checkout and without PYTHONPATH: pip would take a checkout's
  # dw5d_jax.egg-info (left by `pip install -e .`) on sys.path as installed.
  done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                         "--no-deps", "--no-index", str(wheel)],
                        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                        cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (site / "dw5d_jax" / "__init__.py").is_file(), done.stdout
  # Lent after the install (pip would take the lender's dw5d-jax as installed),
  # as a plain path line: the lender's own .pth files (its editable install of
  # this checkout) are not processed, so dw5d_jax comes from the wheel.
  (site / "lent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  return root


_RUN = textwrap.dedent("""
    import json, re, shutil, sys, warnings
    import numpy as np
    import jax
    import dw5d_jax as dw
    from dw5d_jax import _native_compile
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == "old-cpu":  # x86-64 without AVX2/FMA
      _native_compile.cpu_flags = lambda cpuinfo=None: frozenset({"sse2", "avx"})
    elif scenario == "aarch64":
      import platform
      platform.machine = lambda: "aarch64"
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      status = dw.native_status()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 8, 1)).astype(np.float32)
    ct = rng.standard_normal((1, 3, 4, 5, 8)).astype(np.float32)
    def fn(x, k, ct):
      y, pullback = jax.vjp(lambda a, b: dw.depthwise_conv3d(a, b), x, k)
      return (y, *pullback(ct))
    y, dx, dk = jax.jit(fn)(x, k, ct)
    np.savez(out, x=x, k=k, ct=ct, y=y, dx=dx, dk=dk)
    print(json.dumps(dict(
        status._asdict(), file=dw.__file__, warned=[str(w.message) for w in caught],
        compilers=[c for c in ("cc", "c++", "g++", "gcc", "clang++") if shutil.which(c)],
        calls=sorted(set(re.findall(r"custom_call_target=\\"(dw5d_\\w+)\\"",
                                    jax.jit(fn).lower(x, k, ct).compile().as_text()))))))
""")


def _run_without_compiler(venv: pathlib.Path, tmp_path, scenario: str = "cpu"):
  """`_RUN` in the venv, PATH = its bin and a few tools (no compiler), outside the checkout."""
  tools = tmp_path / "tools"
  tools.mkdir()
  for tool in ("sh", "uname"):
    if shutil.which(tool):
      (tools / tool).symlink_to(shutil.which(tool))
  env = {k: v for k, v in os.environ.items()
         if k not in ("CXX", "CC", "PYTHONPATH", "DW5D_JAX_NATIVE")}
  env.update(PATH=f"{venv / 'bin'}:{tools}", DW5D_JAX_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu")
  out = tmp_path / "arrays.npz"
  done = subprocess.run([venv / "bin" / "python", "-c", _RUN, scenario, str(out)], env=env,
                        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert pathlib.Path(got["file"]).is_relative_to(venv), got["file"]
  assert got["compilers"] == []
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
  arrays = np.load(out)
  x64, k64, ct64 = (arrays[n].astype(np.float64) for n in ("x", "k", "ct"))
  assert_close(arrays["y"], _CASE.expected(x64, k64), err_msg="y")
  assert_close((arrays["dx"], arrays["dk"]), reference_grads(_CASE, x64, k64, ct64),
               err_msg="dx, dk")
  return got


@pytest.mark.slow
def test_no_compiler_runs_the_prebuilt_kernels(venv, tmp_path):
  """The acceptance test of the prebuilt kernels: active, this CPU's level, running, right."""
  got = _run_without_compiler(venv, tmp_path)
  if _HERE is None:  # no prebuilt library fits this machine: the fallback, said once
    assert (got["active"], got["speed"], got["calls"]) == (False, "portable", [])
    assert len(got["warned"]) == 1
    return
  assert (got["active"], got["speed"], got["warned"]) == (True, "prebuilt", [])
  assert got["detail"] == f"prebuilt {_HERE.name}: no C++ compiler found (set CXX)"
  assert pathlib.Path(got["library"]).name == f"depthwise-{_HERE.name}.so"
  assert pathlib.Path(got["library"]).is_relative_to(venv)
  assert got["calls"] == ["dw5d_forward", "dw5d_input_grad", "dw5d_kernel_grad"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario,reason", [
    ("old-cpu", "this CPU lacks abm avx2 bmi1 bmi2 f16c fma movbe, which the prebuilt kernels "
                "need (x86-64-v3 at least)"),
    ("aarch64", "the prebuilt kernels are for x86-64, not aarch64"),
])
def test_no_compiler_and_no_fitting_prebuilt_falls_back_saying_why(venv, tmp_path, scenario,
                                                                  reason):
  got = _run_without_compiler(venv, tmp_path, scenario)
  assert (got["active"], got["speed"], got["calls"]) == (False, "portable", [])
  assert got["detail"] == f"no C++ compiler found (set CXX), and {reason}"
  assert got["warned"] == [
      f"dw5d_jax: native CPU kernels unavailable ({got['detail']}); using the XLA lowering "
      f"instead (slower). Set DW5D_JAX_NATIVE=0 to silence this."]


_PROBE = textwrap.dedent("""
    import json
    import dw5d_jax as dw
    print(json.dumps(dict(dw.native_status()._asdict(), file=dw.__file__)))
""")


@pytest.mark.slow
def test_installed_wheel_with_a_compiler_builds_for_this_cpu(wheel, tmp_path):
  """The wheel, unpacked outside the checkout: the compiler's -march=native build wins.

  It shares this process's cache: the library's name hashes every source it
  is built from, so a cached one came from the same files (tests/test_native.py's
  build tests use empty caches).
  """
  from dw5d_jax import _native_build

  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  env = {k: v for k, v in os.environ.items() if k not in ("DW5D_JAX_NATIVE", "CXX")}
  env.update(DW5D_JAX_CACHE_DIR=_native_build.cache_dir(), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(site))
  done = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert pathlib.Path(got["file"]).is_relative_to(site), got["file"]
  assert (got["active"], got["speed"]) == (True, "native")
  assert got["detail"] in ("compiled", "cached")
  assert pathlib.Path(got["library"]).is_relative_to(_native_build.cache_dir())
  assert re.fullmatch(r"depthwise-[0-9a-f]{20}\.so", pathlib.Path(got["library"]).name)
