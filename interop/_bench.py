"""`dw5d bench`: the CPU benchmark suite (benchmarks/ in a source checkout).

Runs benchmarks/suite.py in one fresh process per allocator setting (glibc
defaults, then `dw5d_jax.tune_cpu_allocator`'s setting through the
environment, so TF and PyTorch in that process get it too; both with
`OMP_WAIT_POLICY=PASSIVE`, see `_env`), then writes the
JSON, the tables in benchmarks/RESULTS.md and a PNG chart
(benchmarks/report.py).
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

HELP = "run the CPU benchmark suite (needs a source checkout) and write benchmarks/RESULTS.md"

_BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--quick", action="store_true",
                      help="W1 and W2 only, no XLA grouped convs, fewer rounds (< 1 minute)")
  parser.add_argument("--allocator", choices=("both", "default", "tuned"), default="both",
                      help="which allocator settings to run (default: both)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds per cell (default 9, --quick 5)")
  parser.add_argument("--out", default=str(_BENCH_DIR),
                      help="where RESULTS.md, results.json and bench.png go")
  parser.add_argument("--workloads", default="", help="comma-separated subset, e.g. W1,W3")
  parser.add_argument("--peers", default="",
                      help="comma-separated subset of floor,tf,tf_xla,torch,auto,shift,conv")
  parser.add_argument("--no-memory", action="store_true", help="skip the W2 peak-memory runs")
  parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def _suite_path() -> pathlib.Path:
  path = _BENCH_DIR / "suite.py"
  if not path.is_file():
    raise SystemExit(
        f"dw5d bench: the benchmark suite lives in the source checkout's benchmarks/ folder, "
        f"and {path} does not exist (an installed, non-editable dw5d-jax has no benchmarks). "
        f"Run it from a clone: `make bench` or `pip install -e .[bench]` then `dw5d bench`.")
  return path


def _load_report():
  spec = importlib.util.spec_from_file_location("dw5d_bench_report", _BENCH_DIR / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(mode: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in TUNED_ENV}
  if mode == "tuned":
    env.update(TUNED_ENV)
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
  suite = _suite_path()
  report = _load_report()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  modes = ("default", "tuned") if args.allocator == "both" else (args.allocator,)
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
