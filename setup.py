"""The wheel build: adds the prebuilt native kernels (pyproject.toml has the metadata).

`pip install .` and `pip wheel .` compile `dw5d_jax/_csrc/` once per x86-64
level of `dw5d_jax/_native_compile.VARIANTS` into `dw5d_jax/_prebuilt/`, so an
installation without a C++ compiler still runs the native kernels. The
headers are jaxlib's (`jaxlib/include`): with build isolation pip installs
jaxlib into the build environment (`build_support/backend.py`); with
`--no-build-isolation` the installed one is used. `pip install -e .` skips
them: a checkout builds `-march=native` kernels at first use.

`DW5D_JAX_PREBUILT` picks the variants: unset builds them all where this is
an x86-64 machine with a C++ compiler (elsewhere it says why and skips);
`0` skips them; a comma-separated list of variant names builds those or fails.
"""

import importlib.util
import os
import pathlib
import platform
import shutil

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


def _native_compile():
  """`dw5d_jax/_native_compile.py`, loaded by path: importing `dw5d_jax` needs JAX."""
  spec = importlib.util.spec_from_file_location(
      "_dw5d_native_compile", ROOT / "dw5d_jax" / "_native_compile.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _missing() -> str | None:
  """Why the variants cannot be built here, or None."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"they are x86-64 code and this is {platform.machine()}"
  if not shutil.which(os.environ.get("CXX") or "c++"):
    return "no C++ compiler (set CXX)"
  if importlib.util.find_spec("jaxlib") is None:
    return "jaxlib (its FFI headers) is not installed in the build environment"
  return None


class BuildPyWithKernels(build_py):
  def run(self):
    super().run()
    wanted = os.environ.get("DW5D_JAX_PREBUILT", "").strip()
    if self.editable_mode or wanted == "0":
      return
    names = [n.strip() for n in wanted.split(",")] if wanted else None
    why = _missing()
    if why:
      if names is not None:
        raise RuntimeError(f"DW5D_JAX_PREBUILT={wanted}: cannot build prebuilt kernels: {why}")
      print(f"dw5d_jax: no prebuilt native kernels in this build ({why}); they are built with "
            f"-march=native at first use where a C++ compiler exists")
      return
    compile_ = _native_compile()
    jaxlib = importlib.util.find_spec("jaxlib").submodule_search_locations[0]
    cxx = shutil.which(os.environ.get("CXX") or "c++")
    compile_.build_prebuilt(
        cxx, os.path.join(self.build_lib, "dw5d_jax", "_prebuilt"),
        os.path.join(jaxlib, "include"),
        compile_.read_sources(ROOT / "dw5d_jax" / "_csrc"), names)


class WithLibraries(Distribution):
  """Platform-specific files (the libraries), so they install with the package (platlib)."""

  def has_ext_modules(self):
    return True


class PlatformWheel(bdist_wheel):
  """Tagged `py3-none-<platform>`: the libraries are CPU code but use no Python C API."""

  def get_tag(self):
    return ("py3", "none", super().get_tag()[2])


setup(distclass=WithLibraries,
      cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel})
