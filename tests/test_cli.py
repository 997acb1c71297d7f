"""The `dw5d` command (interop._cli)."""

from __future__ import annotations

import pytest

from interop import _cli


def test_demo_runs_and_checks_the_reference(capsys):
  assert _cli.main(["demo", "--seed", "3"]) == 0
  out = capsys.readouterr().out
  assert "all results match the reference" in out
  assert out.count("3D, 3x3x3") == 3


def test_unknown_subcommand_is_an_error(capsys):
  with pytest.raises(SystemExit) as info:
    _cli.main(["frobnicate"])
  assert info.value.code == 2
  assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
