"""Sharded ops: jit with Auto and Explicit mesh axes, shard_map, layers, errors.

The cases run on 8 simulated CPU devices in one subprocess per group
(`tests/sharding_worker.py`: the device count must be set before JAX is
imported, and pytest's own process has one device); each test here reads
its case's result. A case checks the values against one device and the
compiled HLO's collectives (see the worker's docstring).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import dw5d_jax as dw
from dw5d_jax import _args
from tests import sharding_worker as worker

ROOT = pathlib.Path(__file__).resolve().parent.parent
_RESULTS: dict[str, dict[tuple[str, str], dict]] = {}


def _group(group: str) -> dict[tuple[str, str], dict]:
  """The group's results, from one worker process (run once per test session)."""
  if group not in _RESULTS:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DW5D_JAX_NATIVE=os.environ.get("DW5D_JAX_NATIVE", "all"), KERAS_BACKEND="jax")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), group],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not results:
      pytest.fail(f"sharding worker {group!r} exited with {proc.returncode}:\n"
                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    _RESULTS[group] = {(r["case"], r["method"]): r for r in results}
  return _RESULTS[group]


def _check(group: str, case: str, method: str) -> dict:
  result = _group(group).get((case, method))
  assert result is not None, f"the worker reported nothing for {case} ({method})"
  assert not result["errors"], "\n".join(result["errors"])
  return result


def _ids(group: str) -> list:
  return [pytest.param(c.name, m, id=f"{c.name}-{m}")
          for c in worker.CASES[group] for m in c.methods]


@pytest.mark.parametrize("case, method", _ids("auto"))
def test_jit_auto_mesh(case, method):
  _check("auto", case, method)


@pytest.mark.parametrize("case, method", _ids("explicit"))
def test_jit_explicit_mesh(case, method):
  _check("explicit", case, method)


@pytest.mark.parametrize("case, method", _ids("shard_map"))
def test_shard_map_split_axes(case, method):
  _check("shard_map", case, method)


@pytest.mark.parametrize("case, method", _ids("pallas"))
def test_jit_pallas_interpret(case, method):
  _check("pallas", case, method)


@pytest.mark.parametrize("library, axis_types", worker.LAYER_CASES)
def test_layers_through_a_sharded_jit(library, axis_types):
  _check("layers", f"{library}_{axis_types}", "auto")


@pytest.mark.parametrize("case", [c[0] for c in worker.STREAM_CASES])
def test_sharded_streaming(case):
  """stream_init/stream_step with a state split by batch or a spatial axis other than
  time, under jit (Auto and Explicit): exact, the state stays split, halo-only."""
  _check("streaming", f"stream_{case}", "auto")


@pytest.mark.parametrize("case", ["explicit_indivisible_output", "split_axes_indivisible_output",
                                  "export", "readme"])
def test_errors_and_export(case):
  _check("misc", case, "auto")


def test_random_configurations():
  """A fixed-seed slice of tests/sharding_random.py: random ops, paddings, border modes,
  epilogues, layouts, meshes, axis types and splits against one device and the compiled
  HLO (longer runs: `python tests/sharding_random.py --seed 1 --count 500`)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             DW5D_JAX_NATIVE=os.environ.get("DW5D_JAX_NATIVE", "all"))
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_random.py"),
                         "--seed", "0", "--count", "40"],
                        capture_output=True, text=True, env=env, timeout=900, check=False)
  lines = proc.stdout.splitlines()
  failed = [json.loads(line) for line in lines if line.startswith("{")
            and json.loads(line)["status"] == "failed"]
  assert proc.returncode == 0 and not failed, (
      "\n".join(json.dumps(f) for f in failed) or proc.stderr[-5000:])
  done = re.fullmatch(r"40 configs: 40 passed \((\d+) refused as expected\), 0 failed", lines[-1])
  assert done and int(done.group(1)) <= 15, lines[-1]  # most are computed, not refused


def test_the_xla_partitioner_bug_is_covered():
  """The 4x kernel gradient XLA's partitioner gave (batch and depth split, 2x4 mesh)."""
  names = {c.name for g in ("auto", "explicit") for c in worker.CASES[g]}
  assert {"batch_depth_2x4_hw", "batch_height_2x4_dw"} <= names
  case = next(c for c in worker.CASES["auto"] if c.name == "batch_depth_2x4_hw")
  assert case.shape == (8, 16, 32, 24, 16) and case.mesh == ((2, 4), ("data", "space"))


def test_halo_bytes_from_the_definition():
  """The worker's analytic halo: SAME 3-tap, 16 rows in 4 blocks: 1 row each side."""
  assert worker.halo_rows("fwd", 16, 16, 4, 3, 1, 1, 1) == 2
  assert worker.halo_rows("dx", 16, 16, 4, 3, 1, 1, 1) == 2
  assert worker.halo_rows("fwd", 16, 16, 1, 3, 1, 1, 1) == 0
  assert worker.halo_rows("fwd", 16, 16, 8, 3, 1, 4, 4) == 8  # reach 9, blocks of 2


def test_collectives_are_read_from_hlo():
  hlo = ("  %a = f32[2,1,4]{2,1,0} collective-permute(%x), channel_id=1\n"
         "  %b = (f32[3,3], f32[5]) all-reduce(%p, %q), channel_id=2\n"
         "  %c = (f32[8], f32[64]{0}) all-gather-start(%y), channel_id=3\n")
  assert worker.collectives(hlo) == [("collective-permute", 8, 32), ("all-reduce", 9, 56),
                                     ("all-gather", 64, 256)]
  assert worker.check_collectives(worker.collectives(hlo), 9, 32) == [
      "all-gather of 64 elements (kernel: 9)"]


# ----------------------------------------------------------------------------
# In this process (one device).


def test_one_device_has_no_partitioning():
  x = np.ones((2, 8, 8, 8, 4), np.float32)
  k = np.ones((3, 3, 3, 4, 1), np.float32)
  for method in ("auto", "conv"):
    f = jax.jit(jax.grad(lambda x, k: dw.depthwise_conv3d(x, k, method=method).sum(), (0, 1)))
    lowered = f.lower(x, k)
    assert "CustomSPMDPartitioning" not in lowered.as_text()
    hlo = lowered.compile().as_text()
    assert not worker.collectives(hlo)


def test_split_axes_outside_shard_map():
  x = np.ones((1, 4, 8, 8, 4), np.float32)
  k = np.ones((3, 3, 4, 1), np.float32)
  with pytest.raises(ValueError, match=r"depthwise_conv2d: `split_axes` splits axis H over mesh "
                     r"axis 'space', which is not bound here: call the op inside jax.shard_map"):
    dw.depthwise_conv2d(x, k, split_axes={"H": "space"})


@pytest.mark.parametrize("value, error, match", [
    ("D", TypeError, r"must be None or a dict .* got str 'D'"),
    ({"C": "a"}, ValueError, r"\('D', 'H', 'W'\) .* got key 'C'"),
    ({"D": 3}, TypeError, r"got 3 for 'D'"),
    ({"D": ()}, TypeError, r"got \(\) for 'D'"),
    ({"D": "a", "H": ("b", "a")}, ValueError, r"a mesh axis may split one axis only"),
])
def test_split_axes_checks(value, error, match):
  with pytest.raises(error, match=r"f: `split_axes` .*" + match):
    _args.check_split_axes("f", value, "DHW")


def test_split_axes_of_rank_4_input():
  assert _args.check_split_axes("f", {"h": "a", "W": ("b", "c")}, "HW") == (
      (), ("a",), ("b", "c"))
  with pytest.raises(ValueError, match=r"\('H', 'W'\) .* got key 'D'"):
    _args.check_split_axes("f", {"D": "a"}, "HW")
