"""`dw5d export` (interop._app.export): export, reload, verify, report.

Besides the command's own checks, each exported SavedModel is loaded here and
compared with the float64 reference at a size the command did not try.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import dw5d_jax._reference
import interop
from interop._app import cli
from tests.helpers import Case, assert_close, random_array


@pytest.fixture
def kernel_file(tmp_path, rng):
  def save(shape, name="k.npy"):
    k = random_array(rng, shape)
    np.save(tmp_path / name, k)
    return str(tmp_path / name), k
  return save


def test_conv3d_strided_same(tmp_path, rng, kernel_file, capsys):
  path, k = kernel_file((3, 2, 3, 4, 2))
  out = str(tmp_path / "model")
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out", out,
                    "--strides", "1,2,2"]) == 0
  text = capsys.readouterr().out
  assert "x (b, d, h, w, 4); lowered for cpu, cuda" in text
  assert text.count("input-gradient error") == 2 and "FAIL" not in text
  assert "verified: the reloaded SavedModel matches the float64 reference at 2 input sizes" \
      in text
  model = interop.load_savedmodel(out)
  x = random_array(rng, (2, 4, 9, 6, 4))
  case = Case("3d", "NDHWC", "DHW", x.shape, k.shape, (1, 2, 2), 1, "SAME")
  assert_close(model.serve(x), case.expected(x, k))


def test_conv2d_per_slice_valid_derives_constraints(tmp_path, rng, kernel_file, capsys):
  path, k = kernel_file((3, 2, 3, 2))
  out = str(tmp_path / "model")
  assert cli.main(["export", "--op", "depthwise_conv2d", "--kernel", path, "--out", out,
                    "--axes", "DW", "--padding", "VALID", "--dilations", "2,1",
                    "--data-format", "NCDHW"]) == 0
  text = capsys.readouterr().out
  # Window along D: (3 - 1) * 2 + 1 = 5; along W: 2.
  assert "x (b, 3, d, h, w), d >= 5, w >= 2; lowered for cpu, cuda" in text
  assert "verified" in text
  model = interop.load_savedmodel(out)
  x = random_array(rng, (1, 3, 5, 3, 2))  # the smallest sizes allowed
  case = Case("2d", "NCDHW", "DW", x.shape, k.shape, 1, (2, 1), "VALID")
  assert_close(model.serve(x), case.expected(x, k))


def test_conv3d_causal_and_explicit_per_axis(tmp_path, rng, kernel_file, capsys):
  path, k = kernel_file((3, 2, 2, 3, 1))
  out = str(tmp_path / "model")
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out", out,
                   "--strides", "2,1,1", "--padding", "causal,0:0,SAME"]) == 0
  text = capsys.readouterr().out
  # Along H: VALID-like (0, 0) with a window of 2 needs h >= 2.
  assert "x (b, d, h, w, 3), h >= 2; lowered for cpu, cuda" in text and "verified" in text
  model = interop.load_savedmodel(out)
  x = random_array(rng, (1, 5, 2, 3, 3))
  case = Case("3d", "NDHWC", "DHW", x.shape, k.shape, (2, 1, 1), 1,
              ("CAUSAL", (0, 0), "SAME"))
  assert_close(model.serve(x), case.expected(x, k))


def test_rank4_half_precision_without_gradient(tmp_path, kernel_file, capsys):
  path, _ = kernel_file((2, 3, 3, 1))
  assert cli.main(["export", "--op", "depthwise_conv2d", "--kernel", path, "--out",
                    str(tmp_path / "model"), "--input-shape", "None,5,None,3",
                    "--padding", "0:1,2:2", "--dtype", "float16", "--no-gradient"]) == 0
  text = capsys.readouterr().out
  assert "x (b, 5, w, 3); lowered for cpu, cuda" in text
  assert text.count("input-gradient error skipped") == 2 and "verified" in text


def test_a_failed_check_exits_1(tmp_path, kernel_file, capsys, monkeypatch):
  """A reference that disagrees by 0.1% must fail the command."""
  real = dw5d_jax._reference.depthwise_reference
  monkeypatch.setattr(dw5d_jax._reference, "depthwise_reference",
                      lambda *a, **kw: real(*a, **kw) * 1.001)
  path, _ = kernel_file((3, 3, 3, 2, 1))
  out = str(tmp_path / "model")
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out", out]) == 1
  captured = capsys.readouterr()
  assert captured.out.count("FAIL (float32 tolerance: rtol 1e-05, atol 1e-05)") == 2
  assert f"dw5d export: the SavedModel at {out} FAILED 2 check(s)" in captured.err


@pytest.mark.parametrize("extra, k_shape, message", [
    (["--kernel", "missing.npy"], None,
     r"dw5d export: error: `--kernel` 'missing.npy' could not be read as a .npy array"),
    ([], (3, 3, 4, 1),
     r"dw5d export: error: `--kernel` for depthwise_conv3d must have rank 5, got shape "
     r"\(3, 3, 4, 1\)"),
    (["--padding", "1:1"], (3, 3, 3, 4, 1),
     r"dw5d export: error: depthwise_conv3d: `padding` must be one of 'SAME', 'VALID', "
     r"'CAUSAL', or a sequence of 3 entries"),
    (["--data-format", "NHWC"], (3, 3, 3, 4, 1),
     r"`--data-format` for depthwise_conv3d must be one of NDHWC, NCDHW, matching the rank of "
     r"`--input-shape`; got NHWC for rank 4"),
    (["--input-shape", "None,None,None,None,None"], (3, 3, 3, 4, 1),
     r"dw5d export: error: export_savedmodel: the channel dimension of `input_shape` \(axis "
     r"-1\) must be an int"),
    (["--input-shape", "None,None,None,None,5"], (3, 3, 3, 4, 1),
     r"export_savedmodel: `apply_fn` fails on an input of shape \(64, 64, 64, 64, 5\).*"
     r"in_channels \(dim 3, size 4\) must equal the channels of `x` \(5"),
    (["--platforms", "cpu,gpu"], (3, 3, 3, 4, 1), r"`platforms` must be a non-empty"),
])
def test_errors_exit_2(tmp_path, kernel_file, capsys, extra, k_shape, message):
  args = ["export", "--op", "depthwise_conv3d", "--out", str(tmp_path / "model")]
  if k_shape is not None:
    args += ["--kernel", kernel_file(k_shape)[0]]
  assert cli.main(args + extra) == 2
  err = capsys.readouterr().err
  assert re.search(message, err), err
  assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("content, message", [
    (b"1.0 2.0 3.0\n", r"is not a .npy file \(it does not start with NumPy's magic string "
     r"\\x93NUMPY, got b'1\.0 2\.'\); write the array with numpy\.save\."),
    (b"", r"is not a .npy file \(it does not start with NumPy's magic string \\x93NUMPY, "
     r"got b''\)"),
], ids=["text", "empty"])
@pytest.mark.parametrize("flag", ["--kernel", "--calibration"])
def test_a_file_that_is_not_npy_exits_2(tmp_path, kernel_file, capsys, content, message, flag):
  """NumPy itself calls any such file "pickled (object) data"; the message says what it is."""
  bad = tmp_path / "weights.txt"
  bad.write_bytes(content)
  args = ["export", "--op", "depthwise_conv3d", "--out", str(tmp_path / "model"), flag,
          str(bad)]
  if flag == "--calibration":
    args += ["--kernel", kernel_file((3, 3, 3, 4, 1))[0], "--litert", "--quantize", "int8",
             "--input-shape", "1,4,4,4,4"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert re.search(rf"dw5d export: error: `{flag}` '.*weights\.txt' {message}", err), err
  assert "pickled" not in err
  assert not (tmp_path / "model").exists()


def test_an_object_array_exits_2(tmp_path, capsys):
  bad = tmp_path / "objects.npy"
  np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  assert cli.main(["export", "--op", "depthwise_conv3d", "--out", str(tmp_path / "model"),
                   "--kernel", str(bad)]) == 2
  err = capsys.readouterr().err
  assert re.search(r"`--kernel` '.*objects\.npy' could not be read as a \.npy array of "
                   r"numbers \(object arrays are not loaded\)", err), err


def test_rank4_with_other_axes_exits_2(tmp_path, kernel_file, capsys):
  path, _ = kernel_file((3, 3, 4, 1))
  assert cli.main(["export", "--op", "depthwise_conv2d", "--kernel", path, "--out",
                    str(tmp_path / "m"), "--input-shape", "None,None,None,4",
                    "--axes", "DW"]) == 2
  assert ("`--axes` applies to rank-5 inputs only; a rank-4 input (NHWC) is convolved over "
          "H and W, got DW.") in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, kernel_file, capsys):
  path, _ = kernel_file((1, 1, 1, 2, 1))
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "file").write_text("x")
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out",
                    str(tmp_path / "m")]) == 2
  assert "exists and is not empty; choose a new path or pass overwrite=True" \
      in capsys.readouterr().err


def test_unparsable_arguments(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["export", "--op", "depthwise_conv3d", "--kernel", "k.npy", "--out", "m",
               "--strides", "1,two"])
  assert info.value.code == 2
  assert "argument --strides: expected an int or ints like 1,2,2, got '1,two'" \
      in capsys.readouterr().err


# ----------------------------------------------------------------------------
# --litert: a LiteRT flatbuffer, checked with the LiteRT interpreter.


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_litert(tmp_path, rng, kernel_file, capsys, quantize):
  from interop import _litert

  path, k = kernel_file((3, 2, 3, 2))
  out = tmp_path / "dw2d.tflite"
  extra = []
  if quantize:
    calibration = random_array(rng, (6, 1, 3, 7, 6, 9))
    np.save(tmp_path / "cal.npy", calibration)
    extra = ["--quantize", quantize, "--calibration", str(tmp_path / "cal.npy")]
  assert cli.main(["export", "--op", "depthwise_conv2d", "--kernel", path, "--out", str(out),
                    "--litert", "--input-shape", "1,3,7,6,9", "--data-format", "NCDHW",
                    "--axes", "DW", "--strides", "2,1", *extra]) == 0
  text = capsys.readouterr().out
  assert f"as LiteRT ({quantize or 'float32'})" in text
  assert "(all builtin)" in text and "DEPTHWISE_CONV_2D" in text
  assert text.count("output error") == 2 and "FAIL" not in text
  assert "verified: the reloaded flatbuffer matches the float64 reference on 2 inputs" in text
  # Our own check, on an input the command did not try (int8: one it was calibrated on).
  x = calibration[3] if quantize else random_array(rng, (1, 3, 7, 6, 9))
  want = Case("2d", "NCDHW", "DW", x.shape, k.shape, (2, 1), 1, "SAME").expected(x, k)
  y = _litert.run(_litert.interpreter(out), x)
  assert np.max(np.abs(y - want)) <= _litert.TOLERANCE[quantize] * np.max(np.abs(want))


@pytest.mark.parametrize("extra, message", [
    (["--litert"], r"`--litert` needs `--input-shape` with every size an int \(LiteRT needs "
     r"static shapes\), e\.g\. 1,16,32,32,2; got none\."),
    (["--litert", "--input-shape", "None,4,4,4,2"], r"`--litert` needs `--input-shape` with "
     r"every size an int"),
    (["--litert", "--input-shape", "1,4,4,4,2", "--quantize", "int8"], r"`--quantize int8` "
     r"needs `--calibration FILE\.npy`"),
    (["--quantize", "float16"], r"`--quantize` and `--calibration` apply to `--litert` "
     r"exports only\."),
    (["--litert", "--input-shape", "1,4,4,4,2", "--dtype", "float16"], r"`--litert` exports "
     r"float32 models"),
])
def test_litert_errors_exit_2(tmp_path, kernel_file, capsys, extra, message):
  path, _ = kernel_file((3, 3, 3, 2, 1))
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out",
                    str(tmp_path / "m.tflite"), *extra]) == 2
  err = capsys.readouterr().err
  assert re.search("dw5d export: error: " + message, err), err
  assert not (tmp_path / "m.tflite").exists()


def test_litert_stream(tmp_path, rng, kernel_file, capsys):
  """`--litert --stream`: one frame per step, the state rank 4, checked frame by frame."""
  from interop import _stream_export

  path, k = kernel_file((2, 3, 3, 3, 2))
  out = tmp_path / "step.tflite"
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out", str(out),
                    "--litert", "--stream", "--padding", "CAUSAL,SAME,1:1", "--dilations",
                    "2,1,1", "--input-shape", "2,5,6,7,3"]) == 0
  text = capsys.readouterr().out
  assert "frame (2, 6, 7, 3), state {'state': (2, 6, 7, 6)}; ops:" in text
  assert "(all builtin)" in text and text.count("output error") == 2 and "FAIL" not in text
  # Our own check, on a longer clip than the command tried.
  x = random_array(rng, (2, 9, 6, 7, 3))
  want = Case("3d", "NDHWC", "DHW", x.shape, k.shape, 1, (2, 1, 1),
              ("CAUSAL", "SAME", (1, 1))).expected(x, k)
  assert_close(_stream_export.run_litert_stream(out, x), want)
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out",
                    str(tmp_path / "s.tflite"), "--stream"]) == 2
  assert "`--stream` applies to `--litert` and `--onnx` exports only" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# --onnx: an ONNX model, checked with onnxruntime.


def test_onnx(tmp_path, rng, kernel_file, capsys):
  import onnxruntime

  path, k = kernel_file((3, 3, 3, 2, 2))
  out = tmp_path / "dw3d.onnx"
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out", str(out),
                    "--onnx", "--strides", "1,2,2", "--padding", "CAUSAL,1:1,VALID",
                    "--data-format", "NCDHW"]) == 0
  text = capsys.readouterr().out
  assert "as ONNX" in text and "ops: Transpose, Reshape, Conv, Identity" in text
  assert text.count("output error") == 2 and "FAIL" not in text
  assert "verified: the ONNX model matches the float64 reference at 2 input sizes" in text
  # Our own check, at a batch and size the command did not try.
  x = random_array(rng, (3, 2, 6, 5, 8))
  want = Case("3d", "NCDHW", "DHW", x.shape, k.shape, (1, 2, 2), 1,
              ("CAUSAL", (1, 1), "VALID")).expected(x, k)
  session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
  assert_close(session.run(None, {"x": x})[0], want)


@pytest.mark.parametrize("dtype, shape", [("float16", "None,5,6,3"), ("bfloat16", "2,5,6,3")])
def test_onnx_half_precision(tmp_path, kernel_file, capsys, dtype, shape):
  """Rank-4 inputs in float16 and bfloat16 (a bfloat16 `Expand` runs as float32)."""
  path, _ = kernel_file((3, 3, 3, 2))
  assert cli.main(["export", "--op", "depthwise_conv2d", "--kernel", path, "--out",
                   str(tmp_path / "m.onnx"), "--onnx", "--dtype", dtype, "--input-shape",
                   shape, "--padding", "SAME"]) == 0
  text = capsys.readouterr().out
  assert f"kernel (3, 3, 3, 2) {dtype}" in text and "Cast" in text, text
  assert text.count("output error") == 2 and "FAIL" not in text, text
  assert "verified: the ONNX model matches the float64 reference" in text


def test_onnx_refuses_float64(tmp_path, kernel_file, capsys):
  path, _ = kernel_file((3, 3, 3, 2, 1))
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out",
                   str(tmp_path / "m.onnx"), "--onnx", "--dtype", "float64"]) == 2
  assert ("`--onnx` exports float32, float16, bfloat16 models (onnxruntime's CPU provider "
          "has no float64 Conv), got --dtype float64." in capsys.readouterr().err)
  assert not (tmp_path / "m.onnx").exists()


def test_onnx_stream(tmp_path, rng, kernel_file, capsys):
  """`--onnx --stream`: one frame per step, the state rank 4, checked frame by frame."""
  from interop import _onnx

  path, k = kernel_file((3, 3, 3, 2, 2))
  out = tmp_path / "step.onnx"
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out", str(out),
                   "--onnx", "--stream", "--padding", "CAUSAL,SAME,1:1", "--input-shape",
                   "1,5,6,7,2", "--dtype", "float16"]) == 0
  text = capsys.readouterr().out
  assert "state {'state': ('b', 6, 7, 4)}" in text and "Conv" in text, text
  assert text.count("frame by frame: output error") == 2 and "FAIL" not in text, text
  assert "verified: the model, frame by frame, matches the float64 reference" in text
  x = random_array(rng, (2, 4, 6, 7, 2), "float16")  # our own clip
  want = Case("3d", "NDHWC", "DHW", x.shape, k.shape, 1, 1,
              ("CAUSAL", "SAME", (1, 1))).expected(x, k.astype(np.float16))
  got = _onnx.run_stream(_onnx_session(out), x)
  assert np.abs(got - want).max() <= _onnx.TOLERANCE["float16"] * np.abs(want).max()


def _onnx_session(path):
  import onnxruntime
  return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_refuses_litert_too(tmp_path, kernel_file, capsys):
  path, _ = kernel_file((3, 3, 3, 2, 1))
  assert cli.main(["export", "--op", "depthwise_conv3d", "--kernel", path, "--out",
                   str(tmp_path / "m"), "--onnx", "--litert"]) == 2
  assert "`--onnx` and `--litert` are two exports; choose one." in capsys.readouterr().err
