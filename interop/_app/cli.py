"""The `dw5d` command: one entry point, each subcommand in its own module.

A subcommand module defines `configure(parser)` (adds its arguments) and
`run(args) -> int` (the exit code). Modules are imported only when their
subcommand runs, so `dw5d --help` imports none of them and `dw5d demo` never
pays for TensorFlow unless it uses it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing it, one-line help).
SUBCOMMANDS = {
    "demo": ("interop._app.demo",
             "train a separable 3D CNN on synthetic volumes, export it as a TensorFlow "
             "SavedModel and a LiteRT flatbuffer, serve them, and time the ops"),
    "parity": ("interop._app.parity",
               "check dw5d_jax against the TensorFlow reference ops (outputs and gradients; "
               "eager, graph and XLA modes)"),
    "export": ("interop._app.export",
               "export a depthwise op with given weights as a TensorFlow SavedModel (or, with "
               "--litert, a LiteRT flatbuffer), reload it and verify it against the float64 "
               "reference"),
    "bench": ("interop._app.bench",
              "run the CPU benchmark suite and write benchmarks/RESULTS.md (source checkout "
              "only)"),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
      prog="dw5d", description="dw5d-jax: depthwise convolution on 5D tensors.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  # Only the chosen subcommand's module is imported (to add its arguments).
  chosen = next((a for a in argv if not a.startswith("-")), None)
  for name, (module_name, help_line) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_line, description=help_line)
    if name == chosen:
      module = importlib.import_module(module_name)
      module.configure(p)
      p.set_defaults(run=module.run)
  args = parser.parse_args(argv)
  return int(args.run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
