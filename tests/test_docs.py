"""The docs tell the truth: docstring examples and the code blocks of README.md and
docs/*.md run, and their links resolve.

Every module of `dw5d_jax` and `interop` (the `dw5d` application included)
has its examples run here, except `interop._keras` and `interop._keras_stream`,
whose examples depend on the Keras backend: tests/keras_backend_checks.py runs them on each backend.
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
DOCS = ROOT / "docs"
PER_BACKEND = {"interop._keras", "interop._keras_stream"}

# The public modules and what each exports (checked against their `__all__`).
PUBLIC = {
    "dw5d_jax": ("StreamState", "depthwise_conv2d", "depthwise_conv3d", "deserialize_native",
                 "export_native", "native_status", "stream_init", "stream_step",
                 "tune_cpu_allocator"),
    "dw5d_jax.nn": ("DepthwiseConv2D", "DepthwiseConv3D", "depthwise_kernel_init"),
    "interop": ("DepthwiseWeights", "export_litert", "export_onnx", "export_savedmodel",
                "export_streaming_litert", "export_streaming_onnx", "export_streaming_savedmodel", "kernel_from_keras_grouped", "kernel_from_torch_grouped", "load_savedmodel",
                "litert_ops", "tf_depthwise_conv2d", "tf_depthwise_conv3d", "weights_from_keras",
                "weights_from_torch"),
    "interop.keras": ("DepthwiseConv2D", "DepthwiseConv3D", "stream_functions"),
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


def _pages() -> list[pathlib.Path]:
  """README.md and every page of docs/: the pages whose code runs and whose links resolve."""
  return [README, *sorted(DOCS.glob("*.md"))]


def _name(page: pathlib.Path) -> str:
  return page.relative_to(ROOT).as_posix()


def _python_blocks(page: pathlib.Path) -> list[tuple[int, str]]:
  """Each ```python block of `page`, with the file line of its first code line."""
  text = page.read_text()
  return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
          for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)]


def _is_signature_listing(block: str) -> bool:
  """The ops' signatures written out (docs/api.md): a fragment, not code to run."""
  return re.match(r"\s*dw\.depthwise_conv\dd\(x, kernel, \*", block) is not None


def test_readme_has_examples():
  assert _python_blocks(README)
  assert sum(len(_python_blocks(p)) for p in _pages()) >= 15


def test_readme_is_a_first_screen():
  lines = README.read_text().count("\n")
  assert lines <= 200, f"README.md has {lines} lines; move topics to docs/*.md"


@pytest.mark.parametrize("page", [_name(p) for p in _pages() if _python_blocks(p)])
def test_doc_page_blocks_run(page):
  namespace: dict = {}
  # Blocks of one page build on each other (imports, x, kernels), as a reader
  # runs them; each page starts afresh. Compiled at their own line numbers,
  # so a traceback points into the page.
  for line, block in _python_blocks(ROOT / page):
    if _is_signature_listing(block):
      continue
    exec(compile("\n" * (line - 1) + block, page, "exec"), namespace)


def _prose(text: str) -> str:
  """`text` without fenced code blocks and inline code spans (no links in there)."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: pathlib.Path) -> set[str]:
  """The anchors GitHub gives `page`'s headings (lower case, punctuation dropped)."""
  text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
  headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
  return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [_name(p) for p in _pages()])
def test_relative_links_resolve(page):
  """Every relative link names a file of this repository, and its anchor a heading there."""
  source = ROOT / page
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", _prose(source.read_text())):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):
      continue  # https:, mailto: ...
    path, _, anchor = target.partition("#")
    dest = (source.parent / path).resolve() if path else source
    if not dest.exists() or ROOT not in (dest, *dest.parents):
      broken.append(f"{target}: no such file in the repository")
    elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
      broken.append(f"{target}: no heading with anchor #{anchor}")
  assert not broken, f"{page}: " + "; ".join(broken)


def test_docs_index_lists_every_page():
  index = (DOCS / "README.md").read_text()
  missing = [p.name for p in sorted(DOCS.glob("*.md"))
             if p.name != "README.md" and f"]({p.name})" not in index]
  assert not missing, f"docs/README.md does not link {missing}"
