"""A Python environment with TensorFlow and NumPy only: no JAX, no dw5d-jax.

It is where a SavedModel written by `interop.export_savedmodel` must load and
run (tests/test_savedmodel_tf_only.py). A venv of its own is the honest test:
in the project's venv JAX stays installed, and hiding it from imports would
not show what TensorFlow does where JAX is absent.

Created once under `.venv-tf/` at the repository root and reused: `make test`
builds it first (`python tests/tf_only_env.py`), and the test's fixture calls
`ensure()` too, so a bare `pytest` works. TensorFlow is pinned to the version
installed here, so pip takes it from its cache (about 30 s).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-tf"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".installed"


def requirement() -> str:
  """`tensorflow-cpu==<the version installed in this environment>`."""
  for dist in ("tensorflow-cpu", "tensorflow"):
    try:
      return f"tensorflow-cpu=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
      continue
  raise RuntimeError("tf_only_env: TensorFlow is not installed in this environment; "
                     "install the project with its `interop-cpu` extra first.")


def ensure() -> pathlib.Path:
  """Creates `.venv-tf` if needed and returns its Python."""
  want = requirement()
  VENV.parent.mkdir(parents=True, exist_ok=True)
  with open(ROOT / ".venv-tf.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one creator at a time (pytest-xdist workers)
    if STAMP.exists() and STAMP.read_text().strip() == want and PYTHON.exists():
      return PYTHON
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", want, "numpy"], check=True)
    STAMP.write_text(want + "\n")
  return PYTHON


if __name__ == "__main__":
  print(ensure())
