"""The docs tell the truth: docstring examples and README code blocks run."""

from __future__ import annotations

import doctest
import pathlib
import re

import pytest

import dw5d_jax._depthwise
import dw5d_jax._layers
import dw5d_jax._native_build
import dw5d_jax._streaming

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [dw5d_jax._depthwise, dw5d_jax._layers,
                                    dw5d_jax._native_build, dw5d_jax._streaming],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert tried > 0
  assert failures == 0


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
