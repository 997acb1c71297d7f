"""The `dw5d` command: one entry point, each subcommand in its own module.

A subcommand module defines `HELP` (one line), `configure(parser)` (adds its
arguments) and `run(args) -> int` (the exit code). Modules are imported only
when their subcommand runs, so `dw5d demo` never pays for TensorFlow unless it
uses it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module implementing it.
SUBCOMMANDS = {
    "demo": "interop._demo",
    "parity": "interop._parity",
    "export": "interop._export_cli",
    "bench": "interop._bench",
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
      prog="dw5d", description="dw5d-jax: depthwise convolution on 5D tensors.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  # Only the chosen subcommand's module is imported (to add its arguments).
  chosen = next((a for a in argv if not a.startswith("-")), None)
  for name, module_name in SUBCOMMANDS.items():
    if name == chosen:
      module = importlib.import_module(module_name)
      p = sub.add_parser(name, help=module.HELP, description=module.HELP)
      module.configure(p)
      p.set_defaults(run=module.run)
    else:
      sub.add_parser(name, help=f"(see dw5d {name} --help)")
  args = parser.parse_args(argv)
  return int(args.run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
