"""The docs tell the truth: docstring examples and README code blocks run.

Every module of `dw5d_jax` and `interop` (the `dw5d` application included)
has its examples run here, except `interop._keras`, whose examples depend on
the Keras backend: tests/keras_backend_checks.py runs them on each backend.
Every public function and class has at least one example.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PER_BACKEND = {"interop._keras"}

# The public modules and what each exports (checked against their `__all__`).
PUBLIC = {
    "dw5d_jax": ("StreamState", "depthwise_conv2d", "depthwise_conv3d", "deserialize_native",
                 "export_native", "native_status", "stream_init", "stream_step",
                 "tune_cpu_allocator"),
    "dw5d_jax.nn": ("DepthwiseConv2D", "DepthwiseConv3D", "depthwise_kernel_init"),
    "interop": ("DepthwiseWeights", "export_litert", "export_savedmodel",
                "export_streaming_savedmodel", "kernel_from_keras_grouped", "kernel_from_torch_grouped", "load_savedmodel",
                "tf_depthwise_conv2d", "tf_depthwise_conv3d", "weights_from_keras"),
    "interop.keras": ("DepthwiseConv2D", "DepthwiseConv3D"),
}


def _modules() -> list[str]:
  """Every module of the two packages, found on disk (nothing imported)."""
  names = []
  for package in ("dw5d_jax", "interop"):
    names.append(package)
    for info in pkgutil.walk_packages([str(ROOT / package)], package + "."):
      names.append(info.name)
  return sorted(n for n in names if n not in PER_BACKEND)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_the_listed_ones(module):
  assert sorted(importlib.import_module(module).__all__) == sorted(PUBLIC[module])


@pytest.mark.parametrize("qualname", [
    f"{m}.{n}" for m, names in sorted(PUBLIC.items()) for n in names])
def test_public_object_has_an_example(qualname):
  module, name = qualname.rsplit(".", 1)
  doc = getattr(importlib.import_module(module), name).__doc__ or ""
  assert re.search(r"^\s*>>> ", doc, re.M), f"{qualname}: no `>>>` example in its docstring"


def _python_blocks():
  text = README.read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
  assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_block_runs(index):
  blocks = _python_blocks()
  namespace: dict = {}
  # Blocks build on each other (imports, x, kernels), as a reader runs them.
  for block in blocks[:index + 1]:
    if re.match(r"\s*dw\.depthwise_conv\dd\(x, kernel, \*", block):
      continue  # the signature listing, not code to run
    exec(compile(block, f"README.md block {index}", "exec"), namespace)
