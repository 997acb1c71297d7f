"""The model benchmark's machinery (benchmarks/models.py), on small inputs; no timing.

Layers are taken from networks by forward hooks on their depthwise Conv3d
modules: the records must match the modules' own attributes and the shapes
PyTorch produces. Real networks are checked where their packages are
installed (the `bench` extra); a small PyTorch model built here always.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dw5d_bench_models", ROOT / "benchmarks/models.py")
models = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = models  # dataclasses look their module up there
_spec.loader.exec_module(models)


class _Small(torch.nn.Module):
  """Depthwise convs of several kinds, one used twice, and two convs that are not depthwise."""

  def __init__(self):
    super().__init__()
    self.dw = torch.nn.Conv3d(4, 4, 3, padding=1, groups=4)
    self.dw_m2 = torch.nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=4,
                                 bias=False)
    self.dw_same = torch.nn.Conv3d(8, 8, (3, 2, 3), padding="same", dilation=(1, 2, 1), groups=8,
                                   padding_mode="reflect")
    self.pointwise = torch.nn.Conv3d(8, 8, 1)
    self.grouped = torch.nn.Conv3d(8, 8, 3, padding=1, groups=2)

  def forward(self, x):
    x = self.dw(self.dw(x))  # the same module twice: two calls, one unique layer
    x = self.dw_same(self.dw_m2(x))
    return self.grouped(self.pointwise(x))


def _check_against_modules(model, found):
  modules = dict(model.named_modules())
  assert found, "no depthwise layer recorded"
  for name, layer in found:
    mod = modules[name]
    assert models.is_depthwise(mod)
    assert layer.x_shape[1] == mod.in_channels == mod.groups
    assert layer.out_channels == mod.out_channels
    assert (layer.kernel, layer.stride, layer.dilation) == (
        tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.dilation))
    assert layer.padding_mode == mod.padding_mode and layer.bias == (mod.bias is not None)
    if isinstance(mod.padding, tuple):
      assert layer.padding == tuple((p, p) for p in mod.padding)
    with torch.no_grad():  # the output shape PyTorch gives for the recorded input shape
      assert layer.y_shape == tuple(mod(torch.zeros(layer.x_shape)).shape)


def test_hooks_record_every_depthwise_call_and_nothing_else():
  model = _Small()
  found = models.depthwise_layers(model, torch.randn(2, 4, 5, 9, 7))
  assert [name for name, _ in found] == ["dw", "dw", "dw_m2", "dw_same"]
  _check_against_modules(model, found)
  m2, same = found[2][1], found[3][1]
  assert m2.multiplier == 2 and m2.y_shape == (2, 8, 5, 5, 4)
  # PyTorch's "same" with an even kernel pads the extra row at the end.
  assert same.padding == ((1, 1), (1, 1), (1, 1))  # dilation 2 x (2 - 1) = 2 rows: 1 + 1
  unique = models.unique_layers(found)
  assert [(u["names"], u["count"]) for u in unique] == [
      (["dw", "dw"], 2), (["dw_m2"], 1), (["dw_same"], 1)]
  assert not any(h for m in model.modules() for h in m._forward_hooks.values())


def test_roofline_counts_write_allocate_and_picks_the_larger_bound():
  layer = models.Layer((1, 8, 4, 6, 6), 8, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1),
                       "zeros", False)
  x = y = 8 * 4 * 6 * 6 * 4
  fwd = models.roofline_s(layer, bandwidth=1e9, peak=1e12, backward=False)
  assert fwd["bytes"] == x + 27 * 8 * 4 + 2 * y and fwd["macs"] == 8 * 4 * 6 * 6 * 27
  assert fwd["memory_bound"] and math.isclose(fwd["s"], fwd["bytes"] / 1e9)
  both = models.roofline_s(layer, bandwidth=1e15, peak=1e9, backward=True)
  assert both["macs"] == 3 * fwd["macs"] and not both["memory_bound"]
  assert math.isclose(both["s"], both["macs"] / 1e9)


def test_the_timed_cells_compute_the_same_convolution():
  # Ours in both layouts and PyTorch in both, on one recorded layer: the
  # benchmark converts weights and layouts itself, so check it converts right.
  model = _Small()
  _, layer = models.depthwise_layers(model, torch.randn(1, 4, 3, 7, 6))[2]  # M = 2, strided
  cells = models._cells(layer, np.random.default_rng(0))
  ref = cells["torch-nc fwd"]().numpy()
  np.testing.assert_allclose(cells["torch-cl fwd"]().numpy(), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cells["ncdhw fwd"]()), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.moveaxis(np.asarray(cells["ndhwc fwd"]()), -1, 1), ref,
                             rtol=1e-5, atol=1e-5)
  y, (dx, dk, db) = cells["ndhwc fwd+bwd"]()
  assert dx.shape == (1, 3, 7, 6, 4) and dk.shape == (1, 3, 3, 4, 2) and db is None


def test_report_tables_from_recorded_runs():
  model = _Small()
  found = models.depthwise_layers(model, torch.randn(1, 4, 3, 7, 6))
  layers = [{"layer": models.dataclasses.asdict(u["layer"]), "names": u["names"],
             "count": u["count"]} for u in models.unique_layers(found)]
  cells = {"ndhwc fwd": 1.0, "ncdhw fwd": 2.0, "ndhwc fwd+bwd": 3.0, "ncdhw fwd+bwd": 3.0,
           "torch-cl fwd": 4.0, "torch-nc fwd": 2.0, "torch-cl fwd+bwd": 30.0,
           "torch-nc fwd+bwd": 40.0}
  run = {"allocator": "tuned", "bandwidth_gbs": 10.0, "fma_peak_g": 50.0, "threads": 2,
         "native": {"detail": "cached"}, "load_before": (1.0, 1.0, 1.0),
         "load_after": (1.0, 1.0, 1.0),
         "networks": {"Small": [{"ms": cells, "least_ms": cells, "roofline_fwd_ms": 0.5,
                                 "roofline_bwd_ms": 1.0} for _ in layers]}}
  text = models.markdown({"Small": layers}, {"X": "X needs `x`"},
                         {"2 threads, default": run}, "dw5d bench --models")
  # Sums weigh each layer by its count (4 calls): 4 ms ours, 8 ms PyTorch's best (nc).
  assert "| Small | 2 threads, default | 4 | 4.00 | 8.00 | 8.00 | 0.50 | 1.00 |" in text
  assert "| per-network sum, fwd NDHWC / PyTorch best <= 0.7 | 2 threads, default | " \
         "1 of 1 <= 0.7; worst 0.50 (Small) | yes |" in text
  assert "every layer, fwd NCDHW / NDHWC <= 1.25 | 2 threads, default | 0 of 3" in text
  assert "Skipped: X: X needs `x`" in text
  assert text.startswith(models.BEGIN) and text.endswith(models.END)


@pytest.mark.skipif(importlib.util.find_spec("pytorchvideo") is None,
                    reason="pytorchvideo (the `bench` extra) is not installed")
def test_x3d_xs_layers_match_its_modules():
  model, x = models.build_network("X3D-XS")
  found = models.depthwise_layers(model, x)
  _check_against_modules(model, found)
  # X3D's depthwise layers: the stem's temporal 5x1x1 conv and one 3x3x3 per block.
  kernels = {layer.kernel for _, layer in found}
  assert kernels == {(5, 1, 1), (3, 3, 3)}
  assert {layer.x_shape[1] for _, layer in found} >= {54, 108, 216, 432}


def test_a_missing_package_is_named():
  def build():
    import not_a_package_dw5d  # noqa: F401
  models.NETWORKS["Nope"] = (build, (1, 3, 4, 8, 8), "nope-pkg")
  try:
    networks, skipped = models.extract(["Nope"])
  finally:
    del models.NETWORKS["Nope"]
  assert networks == {}
  assert skipped == {"Nope": "Nope needs `nope-pkg`: No module named 'not_a_package_dw5d'"}
