"""The `dw5d` command's entry point (interop._app.cli)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from interop._app import cli


def test_help_describes_every_subcommand_without_importing_it(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["--help"])
  assert info.value.code == 0
  out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
  for name, (_, help_line) in cli.SUBCOMMANDS.items():
    assert f"{name} {help_line}" in out
  assert "(see dw5d" not in out
  # In a fresh process: which of the subcommand modules did `--help` import?
  code = ("import contextlib, io, sys\n"
          "from interop._app import cli\n"
          "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
          "  cli.main(['--help'])\n"
          "print(sorted(m for m in sys.modules if m.startswith('interop._app.')))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True)
  assert proc.stdout.strip() == "['interop._app.cli']"

@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_each_subcommand_module_configures_and_runs(name):
  module = importlib.import_module(cli.SUBCOMMANDS[name][0])
  assert callable(module.configure) and callable(module.run)


def test_subcommand_help_lists_its_options(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["demo", "--help"])
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert cli.SUBCOMMANDS["demo"][1].split(",")[0] in " ".join(out.split())
  assert "--quick" in out and "--out DIR" in out


def test_unknown_subcommand_is_an_error(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["frobnicate"])
  assert info.value.code == 2
  assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
