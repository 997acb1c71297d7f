"""Two JAX processes on 127.0.0.1 (2 CPU devices each, gloo): the same results as one.

Runs `tests/multiprocess_worker.py` twice as a cluster: a few data-parallel
training steps of a `dw5d_jax.nn` model and a depth-split forward and
backward, checked against the same functions on this process's one device.
Every wait has a timeout; the processes are killed if anything fails.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import multiprocess_worker as worker

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, np.ndarray]:
  out = tmp_path_factory.mktemp("cluster")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", DW5D_JAX_NATIVE=os.environ.get("DW5D_JAX_NATIVE", "all"),
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  port = _free_port()
  logs = [open(out / f"process{i}.log", "w+") for i in range(2)]  # noqa: SIM115
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"),
                             str(port), str(i), str(out)], env=env, stdout=logs[i],
                            stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
    codes = [p.returncode for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  text = []
  for i, log in enumerate(logs):
    log.seek(0)
    text.append(f"--- process {i} ---\n{log.read()[-4000:]}")
    log.close()
  if codes != [0, 0]:
    pytest.fail(f"the 2-process run {'timed out' if codes is None else f'exited {codes}'}:\n"
                + "\n".join(text))
  with np.load(out / "results.npz") as results:
    return dict(results)


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(want).max()))


def test_data_parallel_training_matches_one_process(cluster):
  want = worker.train()
  assert set(want) == {k for k in cluster if not k.startswith("spatial_")}
  for key, value in want.items():
    _close(cluster[key], value)
  assert cluster["losses"][-1] < cluster["losses"][0]


def test_depth_split_gradients_match_one_process(cluster):
  want = worker.spatial()
  for key in ("y", "dx", "dk"):
    _close(cluster[f"spatial_{key}"], want[key])
  assert str(cluster["spatial_y_split"]).startswith("P(None, 'data'")  # y split like x
