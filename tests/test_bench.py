"""`dw5d bench` machinery (interop._bench, benchmarks/) on tiny shapes.

Not a benchmark: it checks that one quick run writes the JSON, the tables in
RESULTS.md (keeping the written text around them) and the chart.
"""

from __future__ import annotations

import json
import os

import pytest

from interop import _cli

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_quick_tiny_run_writes_json_table_and_chart(tmp_path):
  (tmp_path / "RESULTS.md").write_text("# Results\n\nWritten analysis stays.\n")
  code = _cli.main(["bench", "--quick", "--tiny", "--allocator", "tuned", "--rounds", "2",
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
  code = _cli.main(["bench", "--tiny", "--allocator", "default", "--workloads", "W9",
                    "--out", str(tmp_path)])
  assert code == 1
