"""`dw5d demo` (interop._app.demo) and its learning task (interop._app.demo_task)."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from interop._app import demo
from interop._app import demo_task as task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# The task.


def test_volumes_are_balanced_reproducible_and_structured():
  v = task.make_volumes(np.random.default_rng(3), 256, (16, 16, 16), noise=0.0)
  assert v.x.shape == (256, 16, 16, 16, 1) and v.x.dtype == np.float32
  assert v.y.dtype == np.int32 and np.bincount(v.y).tolist() == [128, 128]
  again = task.make_volumes(np.random.default_rng(3), 256, (16, 16, 16), noise=0.0)
  np.testing.assert_array_equal(v.x, again.x)
  # Noise-free, every volume holds one solid at least a voxel inside the borders.
  inside = v.x[..., 0] > 0.5
  assert inside.any(axis=(1, 2, 3)).all()
  one_voxel_out = task.BRIGHTNESS[1] / (1 + np.exp(1 / task.EDGE))
  for axis in (1, 2, 3):
    assert np.take(v.x[..., 0], [0, -1], axis=axis).max() <= one_voxel_out * 1.0001
  # A cube fills its bounding box, a sphere about pi / 6 = 52% of it (small voxelised
  # spheres up to ~70%).
  fill = []
  for solid in inside:
    box = solid[np.ix_(*(np.flatnonzero(solid.any(axis=tuple(j for j in range(3) if j != a)))
                        for a in range(3)))]
    fill.append(box.mean())
  fill = np.asarray(fill)
  assert fill[v.y == 1].min() > 0.9 and fill[v.y == 0].max() < 0.8


def test_too_small_a_volume_is_refused():
  with pytest.raises(ValueError, match=r"make_volumes: `size` must be three sizes \(D, H, W\) "
                     r"of at least 16 voxels, room for the largest solid \(a sphere of diameter "
                     r"12.4\) and its edge, got \(16, 15, 16\)"):
    task.make_volumes(np.random.default_rng(0), 2, (16, 15, 16), noise=0.25)


def test_total_brightness_does_not_tell_the_classes_apart():
  """Sizes and brightness are drawn so that only shape separates the classes."""
  v = task.make_volumes(np.random.default_rng(0), 512, (16, 16, 16), noise=0.25)
  total = v.x.sum(axis=(1, 2, 3, 4))
  # The best threshold on total brightness, either direction.
  best = max(max(np.mean((total > t) == v.y), np.mean((total <= t) == v.y)) for t in total)
  assert best < 0.65, best


def test_model_takes_any_size_and_trains():
  model = task.ShapeNet(rngs=nnx.Rngs(0))
  assert task.count_params(model) == 1714
  assert model(jnp.ones((3, 9, 12, 7, 1))).shape == (3, 2)
  data = task.make_volumes(np.random.default_rng(1), 64, (16, 17, 16), noise=0.25)
  optimizer = task.make_optimizer(model, learning_rate=1e-2, steps=20)
  batches = task.batches(np.random.default_rng(2), data, 32)
  losses = []
  for _ in range(20):
    b = next(batches)
    loss, acc = task.train_step(model, optimizer, jnp.asarray(b.x), jnp.asarray(b.y))
    assert 0 <= float(acc) <= 1
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  logits = task.predict_all(model, data.x[:40], batch=16)  # padded last batch
  np.testing.assert_allclose(logits, np.asarray(model(jnp.asarray(data.x[:40]))), rtol=1e-5,
                             atol=1e-5)


def test_batches_visit_every_volume_once_per_epoch():
  data = task.Volumes(np.arange(10, dtype=np.float32)[:, None], np.arange(10, dtype=np.int32))
  stream = task.batches(np.random.default_rng(0), data, 5)
  epoch = np.concatenate([next(stream).y for _ in range(2)])
  assert sorted(epoch.tolist()) == list(range(10))


# ----------------------------------------------------------------------------
# The command.


def test_quick_halves_everything():
  full, quick = demo.Settings(), demo.Settings().halved()
  for name in ("train", "held_out", "steps", "served"):
    assert getattr(quick, name) == getattr(full, name) // 2
  assert quick.timing_x[0] == full.timing_x[0] // 2
  assert quick.timing_runs == max(full.timing_runs // 2, 3)


def test_a_failed_check_fails_the_command(monkeypatch, capsys):
  """Any failed check makes the exit status non-zero."""

  def train(settings, data, seed, checks):
    checks.add("held-out accuracy", False, "0.500 (a stand-in for training)")
    return None, {}

  def export(settings, model, data, out, checks):
    checks.add("TF vs JAX logits", True, "a stand-in")
    return {"path": None, "rows": []}

  monkeypatch.setattr(demo, "_step_data", lambda settings, seed: {})
  monkeypatch.setattr(demo, "_step_train", train)
  monkeypatch.setattr(demo, "_step_export", export)
  monkeypatch.setattr(demo, "_step_timing", lambda settings, seed, checks: [])
  monkeypatch.setattr(demo, "_summary", lambda *args, **kwargs: None)
  assert demo.run(argparse.Namespace(quick=True, out="unused", seed=0)) == 1
  assert "[FAIL] held-out accuracy" in capsys.readouterr().out


def test_export_refuses_a_directory_that_is_not_a_savedmodel(tmp_path, capsys):
  keep = tmp_path / "notes.txt"
  keep.write_text("mine")
  settings = demo.Settings(served=2)
  data = {k: task.make_volumes(np.random.default_rng(0), 2, size, noise=0.25)
          for k, size in (("held_out", (16, 16, 16)), ("other", (17, 16, 18)))}
  checks = demo.Checks()
  served = demo._step_export(settings, task.ShapeNet(rngs=nnx.Rngs(0)), data, str(tmp_path),
                              checks)
  assert served["path"] is None and checks.failed == ["SavedModel export"]
  assert "is a non-empty directory that is not a SavedModel" in capsys.readouterr().out
  assert keep.read_text() == "mine"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
  """`dw5d demo --quick`: the five steps, every check passing, a SavedModel that serves."""
  out = tmp_path / "model"
  proc = subprocess.run(
      [sys.executable, "-m", "interop._app.cli", "demo", "--quick", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  text = proc.stdout + proc.stderr
  assert proc.returncode == 0, text[-6000:]
  for step in range(1, len(demo.STEPS) + 1):
    assert f"[{step}/{len(demo.STEPS)}]" in proc.stdout
  assert re.search(r"all 6 checks passed", proc.stdout), text[-4000:]
  assert "[ok] LiteRT vs JAX logits, 16x16x16" in proc.stdout, text[-4000:]
  assert pathlib.Path(f"{out}.tflite").is_file()
  assert "[ok] streaming LiteRT vs JAX, slice by slice" in proc.stdout, text[-4000:]
  assert pathlib.Path(f"{out}.stream.tflite").is_file()
  accuracy = float(re.search(r"\[ok\] held-out accuracy: ([0-9.]+)", proc.stdout).group(1))
  assert accuracy >= demo.Settings().min_accuracy
  assert len(re.findall(r"^  (?:per-slice 2D, axes (?:HW|DW)|3D) ", proc.stdout, re.M)) == 9
  assert f"SavedModel  {out}" in proc.stdout
  # The SavedModel serves a third size, with TensorFlow alone.
  code = ("import sys, numpy as np, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]); "
          "y = m.serve(np.random.default_rng(0).standard_normal((3, 11, 13, 17, 1))"
          ".astype(np.float32)).numpy(); assert y.shape == (3, 2) and np.isfinite(y).all()")
  subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=300)
