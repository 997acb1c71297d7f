"""benchmarks/gpu.py (the GPU measurement script) in its CPU smoke mode.

Not a benchmark: it checks that the one command a GPU session runs works end
to end (subprocess workers, the correctness check before timing, the JSON and
the markdown table), with tiny shapes and Pallas in interpret mode.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_run_checks_every_method_and_writes_the_table(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--workloads", "W3,W5",
       "--methods", "conv,shift,pallas", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  results = json.loads((tmp_path / "gpu_results.json").read_text())
  assert results["errors"] == []
  rows = {(r["workload"]["name"], row["dir"], row["method"]): row
          for r in results["jax"] for row in r["rows"]}
  want = {(w, d, m) for w in ("W3", "W5") for d in ("fwd", "bwd")
          for m in ("conv", "shift", "pallas")}
  assert set(rows) == want
  for key, row in rows.items():
    assert row["ok"] and row["us"] > 0, (key, row)
  table = (tmp_path / "gpu_results.md").read_text()
  assert "SMOKE (CPU, not a measurement)" in table
  assert "| W5 bfloat16 | bwd | pallas |" in table
