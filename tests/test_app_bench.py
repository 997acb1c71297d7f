"""`dw5d bench` machinery (interop._app.bench, benchmarks/) on tiny shapes.

Not a benchmark: it checks that one quick run writes the JSON, the tables in
RESULTS.md (keeping the written text around them) and the chart.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from interop._app import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_an_installed_copy_says_bench_needs_a_checkout(tmp_path):
  """interop/ alone in site-packages (no benchmarks/ beside it): a clear error, exit 2."""
  site = tmp_path / "site-packages"
  shutil.copytree(ROOT / "interop", site / "interop",
                  ignore=shutil.ignore_patterns("__pycache__"))
  code = ("import sys; sys.path.insert(0, sys.argv[1]); from interop._app import cli; "
          "assert cli.__file__.startswith(sys.argv[1]); sys.exit(cli.main(['bench']))")
  proc = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == (
      f"dw5d bench: error: the benchmark suite is part of the source checkout (benchmarks/ "
      f"beside interop/), and this dw5d-jax, installed at {site}, has none. Run it from a "
      f"clone of the repository: `make bench`, or `pip install -e '.[bench]'` there and then "
      f"`dw5d bench`.")


def test_quick_tiny_run_writes_json_table_and_chart(tmp_path):
  pytest.importorskip("matplotlib")
  pytest.importorskip("tqdm")
  (tmp_path / "RESULTS.md").write_text("# Results\n\nWritten analysis stays.\n")
  code = cli.main(["bench", "--quick", "--tiny", "--allocator", "tuned", "--rounds", "2",
                    "--workloads", "W1", "--peers", "floor,shift,auto", "--out", str(tmp_path)])
  assert code == 0
  runs = json.loads((tmp_path / "results.json").read_text())
  cells = runs["tuned"]["workloads"]["W1"]["ms"]
  assert cells["auto"]["fwd"] > 0 and cells["auto"]["bwd"] > 0 and cells["floor"]["fwd"] > 0
  assert runs["tuned"]["env"]["MALLOC_MMAP_THRESHOLD_"] == "1073741824"
  assert runs["tuned"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
  assert runs["tuned"]["native"]["active"] in (True, False)
  text = (tmp_path / "RESULTS.md").read_text()
  assert text.startswith("# Results\n\nWritten analysis stays.\n")
  assert "| W1 2d | fwd |" in text and "W1 fwd: auto / floor" in text
  assert "dw5d bench --quick --tiny --allocator tuned" in text
  assert "- dw5d_jax native CPU kernels: " in text and "- OMP_WAIT_POLICY: " in text
  assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_workload_is_an_error(tmp_path, capsys):
  code = cli.main(["bench", "--tiny", "--allocator", "default", "--workloads", "W9",
                    "--out", str(tmp_path)])
  assert code == 1



def test_each_allocator_setting_gets_its_environment(monkeypatch):
  """glibc's own (opted out), the library's default (tuned on import), tuned by the environment."""
  from interop._app import bench
  monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
  monkeypatch.setenv("DW5D_JAX_TUNE_ALLOCATOR", "1")
  glibc, default, tuned = (bench._env(m) for m in ("glibc", "default", "tuned"))
  assert glibc["DW5D_JAX_TUNE_ALLOCATOR"] == "0" and "MALLOC_MMAP_THRESHOLD_" not in glibc
  assert "DW5D_JAX_TUNE_ALLOCATOR" not in default and "MALLOC_MMAP_THRESHOLD_" not in default
  assert tuned["MALLOC_MMAP_THRESHOLD_"] == "1073741824"
  assert "DW5D_JAX_TUNE_ALLOCATOR" not in tuned
