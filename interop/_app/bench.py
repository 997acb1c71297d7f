"""`dw5d bench`: the CPU benchmark suite, a tool of the source checkout.

The suite and its report live in the repository's benchmarks/ folder, beside
interop/, which an installed (non-editable) dw5d-jax does not have: run it
from a clone (`make bench`, or `pip install -e '.[bench]'` there). From an
installed copy it exits with status 2 and says so.

Runs benchmarks/suite.py in one fresh process per allocator setting (the
library's default, which tunes glibc's malloc when `dw5d_jax` is imported;
`dw5d_jax.tune_cpu_allocator`'s setting through the environment, so TF and
PyTorch in that process get it from the start; and with `--allocator glibc`
or `all`, glibc's own with `DW5D_JAX_TUNE_ALLOCATOR=0`; all with
`OMP_WAIT_POLICY=PASSIVE`, see `_env`), then writes the JSON, the tables in
benchmarks/RESULTS.md and a PNG chart (benchmarks/report.py).

`dw5d bench --models` runs benchmarks/models.py instead: the depthwise layers
of real video networks, and writes its tables into RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

from dw5d_jax._allocator import ENV as TUNED_ENV
from dw5d_jax._allocator import OPT_OUT

# The checkout's root, if this file is in one: <root>/interop/_app/bench.py.
ROOT = pathlib.Path(__file__).resolve().parents[2]


def configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--quick", action="store_true",
                      help="W1 and W2 only, no XLA grouped convs, fewer rounds (< 1 minute)")
  parser.add_argument("--allocator", choices=("both", "all", "default", "tuned", "glibc"),
                      default="both",
                      help="which allocator settings to run: both = default and tuned; all "
                           "adds glibc's own (DW5D_JAX_TUNE_ALLOCATOR=0)")
  parser.add_argument("--models", action="store_true",
                      help="the depthwise layers of real video networks instead "
                           "(benchmarks/models.py; with --quick: two networks, one setting)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds per cell (default 9, --quick 5)")
  parser.add_argument("--out", default=None, metavar="DIR",
                      help="where RESULTS.md, results.json and bench.png go (default: "
                           "benchmarks/ of the checkout)")
  parser.add_argument("--workloads", default="", help="comma-separated subset, e.g. W1,W3")
  parser.add_argument("--peers", default="",
                      help="comma-separated subset of floor,tf,tf_xla,torch,auto,shift,conv")
  parser.add_argument("--no-memory", action="store_true", help="skip the W2 peak-memory runs")
  parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def _benchmarks() -> pathlib.Path | None:
  """The checkout's benchmarks/ folder, or None in an installed copy."""
  folder = ROOT / "benchmarks"
  if (ROOT / "pyproject.toml").is_file() and (folder / "suite.py").is_file():
    return folder
  return None


def _load_report(folder: pathlib.Path):
  spec = importlib.util.spec_from_file_location("dw5d_bench_report", folder / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(mode: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in TUNED_ENV and k != OPT_OUT}
  if mode == "tuned":
    env.update(TUNED_ENV)
  elif mode == "glibc":
    env[OPT_OUT] = "0"
  # PyTorch's OpenMP threads spin after each call, on the cores the next timed
  # cell needs: interleaved with PyTorch, a native W1 forward took 3.2 ms
  # instead of 1.6 ms (PyTorch's own time unchanged with PASSIVE, 1.6 ms).
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  return env


def _command(args: argparse.Namespace) -> str:
  """The command line that reproduces this run (for RESULTS.md)."""
  words = ["dw5d", "bench"]
  words += ["--quick"] * args.quick + ["--tiny"] * args.tiny + ["--no-memory"] * args.no_memory
  if args.allocator != "both":
    words += ["--allocator", args.allocator]
  for flag in ("rounds", "workloads", "peers"):
    if getattr(args, flag):
      words += [f"--{flag}", str(getattr(args, flag))]
  return " ".join(shlex.quote(w) for w in words)


def run(args: argparse.Namespace) -> int:
  folder = _benchmarks()
  if folder is None:
    print(f"dw5d bench: error: the benchmark suite is part of the source checkout "
          f"(benchmarks/ beside interop/), and this dw5d-jax, installed at {ROOT}, has none. "
          f"Run it from a clone of the repository: `make bench`, or `pip install -e "
          f"'.[bench]'` there and then `dw5d bench`.", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out) if args.out else folder
  out.mkdir(parents=True, exist_ok=True)
  if args.models:
    cmd = [sys.executable, str(folder / "models.py"), "--out", str(out / "RESULTS.md")]
    cmd += ["--quick"] * args.quick + (["--rounds", str(args.rounds)] if args.rounds else [])
    return subprocess.run(cmd).returncode
  suite = folder / "suite.py"
  report = _load_report(folder)
  modes = {"both": ("default", "tuned"), "all": ("glibc", "default", "tuned")}.get(
      args.allocator, (args.allocator,))
  rounds = args.rounds or (5 if args.quick else 9)
  runs = {}
  for mode in modes:
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "r.json"
      cmd = [sys.executable, str(suite), "--allocator", mode, "--rounds", str(rounds),
             "--json", str(path)]
      cmd += ["--quick"] * args.quick + ["--tiny"] * args.tiny
      cmd += ["--memory"] * (not args.no_memory and not args.quick)
      if args.workloads:
        cmd += ["--workloads", args.workloads]
      if args.peers:
        cmd += ["--peers", args.peers]
      print(f"dw5d bench: {mode} allocator", file=sys.stderr, flush=True)
      done = subprocess.run(cmd, env=_env(mode))
      if done.returncode != 0:
        print(f"dw5d bench: the {mode}-allocator run failed (exit {done.returncode}).",
              file=sys.stderr)
        return 1
      runs[mode] = json.loads(path.read_text())
  (out / "results.json").write_text(json.dumps(runs, indent=1))
  block = report.markdown(runs, _command(args))
  report.write_results_md(out / "RESULTS.md", block)
  report.chart(runs, out / "bench.png")
  print(block)
  print(f"dw5d bench: wrote {out / 'RESULTS.md'}, {out / 'results.json'} and "
        f"{out / 'bench.png'}", file=sys.stderr)
  return 0
