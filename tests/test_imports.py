"""The import graph of `dw5d_jax` and `interop`, read from source, has no cycle.

Every `import` and `from ... import` counts, those inside functions too
(importing inside a function to dodge a cycle leaves the cycle there).
Nothing is imported: the graph comes from `ast`, so the test runs in a
fraction of a second and without TensorFlow.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dw5d_jax", "interop")


def _modules() -> dict[str, pathlib.Path]:
  """Module name -> source file, for every module of the packages."""
  found = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules that module `name` imports, anywhere in its body."""
  is_package = path.name == "__init__.py"
  package = name if is_package else name.rpartition(".")[0]
  out = set()

  def add(target: str, whole: bool = False) -> None:
    # `import a.b.c` runs a, a.b and a.b.c, except the packages this module
    # is in (their bodies are running already); `whole` adds `target` itself
    # even then (a name taken from a package's own body).
    parts = target.split(".")
    for i in range(1, len(parts) + 1):
      candidate = ".".join(parts[:i])
      inside = name.startswith(candidate + ".") and not (whole and i == len(parts))
      if candidate in modules and candidate != name and not inside:
        out.add(candidate)

  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the package `level - 1` above this one's
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
      else:
        source = node.module or ""
      for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in modules:  # `from dw5d_jax import _x` imports the module _x
          add(submodule)
        else:  # a name defined in `source`'s body
          add(source, whole=True)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a path `[a, b, ..., a]`, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = _graph()
  cycle = _cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_sees_the_imports_it_must():
  """The graph is read right: known edges, local and relative forms included."""
  graph = _graph()
  assert {"dw5d_jax._primitive", "dw5d_jax._policy", "dw5d_jax._shift"} <= graph[
      "dw5d_jax._lowering"]
  assert "dw5d_jax._depthwise" in graph["dw5d_jax"]
  assert "interop._tf_ops" in graph["interop._keras"]  # imported inside a function
  assert graph["dw5d_jax._spec"] == {"dw5d_jax._geometry"}


def test_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycle(graph) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_policy_imports_no_implementation():
  """`_policy` is a pure decision: it imports only the leaf spec module."""
  assert _graph()["dw5d_jax._policy"] == {"dw5d_jax._spec"}
