"""The `dw5d` command (interop._cli)."""

from __future__ import annotations

import pytest

from interop import _cli


def test_subcommand_help_lists_its_options(capsys):
  with pytest.raises(SystemExit) as info:
    _cli.main(["demo", "--help"])
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert "--quick" in out and "--out DIR" in out


def test_unknown_subcommand_is_an_error(capsys):
  with pytest.raises(SystemExit) as info:
    _cli.main(["frobnicate"])
  assert info.value.code == 2
  assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
