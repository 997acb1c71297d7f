"""The JAX-vs-TF parity suite (interop._app.parity) and the `dw5d parity` command.

Expected values here are TensorFlow's (interop's TF ops under
`tf.GradientTape`, themselves checked against the float64 reference in
test_tf_ops.py); the rows compare every dw5d_jax method with them.
"""

from __future__ import annotations

import pytest

from interop._app import cli, parity

QUICK = parity.plan(quick=True)


def test_quick_grid_covers_the_axes_of_variation():
  configs = {c for c, _ in QUICK}
  assert {c.op for c in configs} == {"2d", "3d"}
  assert {c.layout for c in configs} == {"NHWC", "NCHW", "NDHWC", "NCDHW"}
  assert {c.axes for c in configs} >= {"HW", "DW", "HD", "WH", "DHW"}
  assert {d for _, d in QUICK} == set(parity.DTYPES)
  assert any(isinstance(c.padding, tuple) for c in configs)
  assert any("CAUSAL" in c.name for c in configs)
  assert any(isinstance(c.padding, tuple) and "CAUSAL" in c.padding for c in configs)
  assert any(c.strides == (1, 2) and c.dilations == (2, 1) for c in configs)


@pytest.mark.parametrize("pair", QUICK, ids=[f"{c.name} {d}" for c, d in QUICK])
def test_every_row_passes(pair):
  config, dtype = pair
  rows = parity.check(config, dtype, seed=7)
  assert len(rows) == len(parity.MODES) * len(parity.METHODS)
  failed = [(r.mode, r.method, r.errors) for r in rows if not r.ok]
  assert not failed, failed


def test_command_prints_a_table(capsys):
  code = cli.main(["parity", "--quick", "--filter", "3d", "--filter", "NCDHW",
                    "--filter", "k2x3x2", "--dtypes", "float32", "--modes", "eager", "graph"])
  out = capsys.readouterr().out
  assert code == 0, out
  lines = out.splitlines()
  header = next(line for line in lines if line.startswith("case"))
  assert header.split() == ["case", "dtype", "tf", "jax", "max", "abs", "err", "max", "rel",
                            "err", "worst", "result"]
  rows = [line for line in lines if line.startswith("3d DHW NCDHW")]
  assert len(rows) == 2 * 3  # two TF modes, three JAX methods
  assert all(line.endswith(" ok") for line in rows)
  assert "6/6 rows pass" in out


def test_command_fails_when_tf_disagrees(capsys, monkeypatch):
  """A TF side off by 1e-3 is reported as failing rows and a non-zero exit."""
  real = parity.tf_op
  monkeypatch.setattr(parity, "tf_op", lambda config: (
      lambda x, k: real(config)(x, k) * (1 + 1e-3)))
  code = cli.main(["parity", "--quick", "--filter", "2d DW NDHWC", "--dtypes", "float32",
                    "--modes", "eager", "--methods", "shift", "--failures-only"])
  out = capsys.readouterr().out
  assert code == 1
  assert "FAIL" in out
  assert "0/1 rows pass" in out and "1 FAILED" in out


def test_command_with_no_matching_case(capsys):
  assert cli.main(["parity", "--filter", "no such case"]) == 2
  assert "no case matches" in capsys.readouterr().out

