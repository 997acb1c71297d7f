"""SavedModel export (interop._export), loaded back in this process.

Expected values come from the float64 reference (`Case.expected`); gradients
from its linearity in x and in the kernel (`tests.helpers.reference_grads`).
Running without JAX is in test_export_tf_only.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import dw5d_jax as dw
import interop
import interop._export
from tests.helpers import Case, assert_close, random_array, reference_grads, run


def export_case(case: Case, kernel, path, input_shape, **kw):
  return interop.export_savedmodel(lambda k, x: run(case, x, k), kernel, path,
                                   input_shape=input_shape, **kw)


def serve_with_grads(model, x, ct):
  """`serve(x)` and the gradients of `sum(ct * serve(x))` w.r.t. x and the params."""
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = model.serve(x)
    loss = tf.reduce_sum(y * ct)
  dx, *dp = tape.gradient(loss, [x, *model.params])
  return y.numpy(), dx.numpy(), [None if g is None else g.numpy() for g in dp]


def call_module_nodes(path):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return [node for g in proto.meta_graphs for fn in g.graph_def.library.function
          for node in fn.node_def if node.op == "XlaCallModule"]


# (case, input_shape, constraints, sizes to serve): VALID and explicit padding
# need declared lower bounds; channels-first uses channel_axis=1.
ROUND_TRIPS = [
    (Case("3d", "NCDHW", "DHW", (), (3, 2, 3, 2, 2), (2, 1, 3), (1, 2, 1), "VALID"),
     (None, 2, None, None, None), ("d >= 3", "h >= 3", "w >= 3"),
     [(1, 2, 3, 3, 3), (2, 2, 6, 5, 8)]),
    (Case("2d", "NDHWC", "HW", (), (2, 3, 3, 1), 1, (2, 1), ((0, 1), (2, 0))),
     (None, None, None, None, 3), ("h >= 2",), [(1, 2, 2, 1, 3), (2, 3, 5, 4, 3)]),
    # CAUSAL needs no bound: any size >= 1 has ceil(n / s) outputs.
    (Case("3d", "NDHWC", "DHW", (), (3, 2, 2, 2, 1), (2, 1, 2), (2, 1, 1),
          ("CAUSAL", "SAME", "CAUSAL")),
     (None, None, None, None, 2), (), [(1, 1, 3, 2, 2), (2, 6, 4, 5, 2)]),
]


@pytest.mark.parametrize("entry", ROUND_TRIPS,
                         ids=["3d-NCDHW-VALID", "2d-HW-explicit", "3d-CAUSAL"])
def test_round_trip_with_constraints(tmp_path, rng, entry):
  case, input_shape, constraints, sizes = entry
  k = random_array(rng, case.k_shape)
  path = export_case(case, k, tmp_path / "m", input_shape, constraints=constraints,
                     channel_axis=-1 if case.layout.endswith("C") else 1)
  model = interop.load_savedmodel(path)
  for shape in sizes:
    x = random_array(rng, shape)
    want = case.expected(x, k)
    ct = random_array(rng, want.shape)
    y, dx, (dk,) = serve_with_grads(model, x, ct)
    assert_close(y, want, err_msg=f"forward at {shape}")
    want_dx, want_dk = reference_grads(case, x, k, ct)
    assert_close(dx, want_dx, err_msg=f"d/dx at {shape}")
    assert_close(dk, want_dk, err_msg=f"d/dk at {shape}")


def test_constraints_are_enforced_when_serving(tmp_path, rng):
  case = Case("2d", "NHWC", "HW", (), (3, 3, 4, 1), 1, 1, "VALID")
  model = interop.load_savedmodel(export_case(
      case, random_array(rng, case.k_shape), tmp_path / "m", (None, None, None, 4),
      constraints=("h >= 3", "w >= 3")))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"h >= 3"):
    model.serve(random_array(rng, (1, 2, 5, 4)))


def test_lowered_for_cpu_and_cuda_by_default(tmp_path, rng):
  """method="auto" picks its lowering per platform: the CUDA branch holds XLA's
  convolution, the CPU branch ("shift") none, so a CPU-only export has none."""
  case = Case("3d", "NDHWC", "DHW", (), (3, 3, 3, 2, 1), 2, 1, "SAME")
  k = random_array(rng, case.k_shape)
  both = call_module_nodes(export_case(case, k, tmp_path / "both", (None,) * 4 + (2,)))
  cpu = call_module_nodes(export_case(case, k, tmp_path / "cpu", (None,) * 4 + (2,),
                                      platforms=("cpu",)))
  assert len(both) >= 2 and len(cpu) >= 2  # forward and gradient
  assert all(list(n.attr["platforms"].list.s) == [b"CPU", b"CUDA"] for n in both)
  assert all(list(n.attr["platforms"].list.s) == [b"CPU"] for n in cpu)
  assert all(b"convolution" in n.attr["module"].s for n in both)
  assert not any(b"convolution" in n.attr["module"].s for n in cpu)


def test_pytree_params_and_outputs(tmp_path, rng):
  """Params in any pytree (an int leaf included); two outputs in the signature."""
  params = {"k": random_array(rng, (3, 3, 2, 2)), "scale": np.float32(1.5),
            "steps": np.int32(7)}

  def apply_fn(p, x):
    y = dw.depthwise_conv2d(x, p["k"], strides=2)
    return {"conv": y * p["scale"], "mean": jnp.mean(x, axis=(1, 2))}

  path = interop.export_savedmodel(apply_fn, params, tmp_path / "m",
                                   input_shape=(None, None, None, 2))
  model = interop.load_savedmodel(path)
  assert [v.shape for v in model.params] == [(3, 3, 2, 2), (), ()]
  x = random_array(rng, (2, 5, 4, 2))
  want = 1.5 * Case("2d", "NHWC", "HW", x.shape, (3, 3, 2, 2), 2, 1, "SAME").expected(
      x, params["k"])
  out = model.serve(x)
  assert sorted(out) == ["conv", "mean"]
  assert_close(out["conv"], want)
  assert_close(out["mean"], x.astype(np.float64).mean(axis=(1, 2)))
  sig = model.signatures["serving_default"](x=tf.constant(x))
  assert sorted(sig) == ["output_0", "output_1"]  # tree_leaves order: conv, mean
  assert_close(sig["output_0"], want)
  ct = random_array(rng, want.shape)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model.serve(x)["conv"] * ct)
  dk, dscale, dsteps = tape.gradient(loss, model.params)
  assert_close(dscale, np.sum(want / 1.5 * ct))
  assert dsteps is None  # integer params get no gradient


def test_without_gradient(tmp_path, rng):
  case = Case("2d", "NHWC", "HW", (), (3, 3, 2, 1), 1, 1, "SAME")
  model = interop.load_savedmodel(export_case(
      case, random_array(rng, case.k_shape), tmp_path / "m", (None, None, None, 2),
      with_gradient=False))
  assert not model.params[0].trainable
  x = tf.constant(random_array(rng, (1, 4, 4, 2)))
  # TF asks for the gradient already when the tape records the call.
  with pytest.raises(LookupError, match="does not support gradients"):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = model.serve(x)
    tape.gradient(y, x)


def test_overwrite_replaces_a_savedmodel_and_a_failed_export_keeps_it(tmp_path, rng):
  case = Case("2d", "NHWC", "HW", (), (3, 3, 2, 1), 1, 1, "SAME")
  k1, k2 = random_array(rng, case.k_shape), random_array(rng, case.k_shape)
  path = export_case(case, k1, tmp_path / "m", (None, None, None, 2))
  with pytest.raises(ValueError, match=r"export_savedmodel: `path` '.*m' exists and is not "
                     r"empty; choose a new path or pass overwrite=True"):
    export_case(case, k2, tmp_path / "m", (None, None, None, 2))
  with pytest.raises(ValueError, match=r"does not match"):  # fails before touching `path`
    export_case(case, k2, tmp_path / "m", (None, None, None, 3), overwrite=True)
  x = random_array(rng, (1, 4, 5, 2))
  model = interop.load_savedmodel(path)  # kept alive: its variables go with it
  assert_close(model.serve(x), case.expected(x, k1))
  export_case(case, k2, tmp_path / "m", (None, None, None, 2), overwrite=True)
  model = interop.load_savedmodel(path)
  assert_close(model.serve(x), case.expected(x, k2))
  assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left behind


def test_empty_directory_is_fine(tmp_path, rng):
  (tmp_path / "m").mkdir()
  case = Case("2d", "NHWC", "HW", (), (1, 1, 2, 1), 1, 1, "SAME")
  k = random_array(rng, case.k_shape)
  model = interop.load_savedmodel(export_case(case, k, tmp_path / "m", (None, 3, None, 2)))
  x = random_array(rng, (2, 3, 1, 2))
  assert_close(model.serve(x), case.expected(x, k))


def test_float64_in_64_bit_mode(tmp_path, rng):
  case = Case("3d", "NDHWC", "DHW", (), (2, 3, 2, 2, 1), (2, 1, 1), 1, "SAME")
  k = random_array(rng, case.k_shape, "float64")
  with jax.enable_x64(True):
    model = interop.load_savedmodel(export_case(case, k, tmp_path / "m", (None,) * 4 + (2,),
                                                dtype="float64"))
  x = random_array(rng, (2, 3, 4, 5, 2), "float64")
  y = model.serve(x)
  assert y.dtype == tf.float64
  assert_close(y, case.expected(x, k), dtype="float64")


# ----------------------------------------------------------------------------
# Bad input.

K = np.random.default_rng(0).standard_normal((3, 3, 4, 1)).astype(np.float32)


def conv_same(k, x):
  return dw.depthwise_conv2d(x, k)


def test_path_that_is_not_empty(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=r"`path` '.*m' exists and is not empty"):
    interop.export_savedmodel(conv_same, K, tmp_path / "m", input_shape=(None, 5, 5, 4))
  with pytest.raises(ValueError, match=r"is a non-empty directory that is not a SavedModel "
                     r"\(no saved_model.pb\); overwrite=True replaces only a SavedModel, so "
                     r"nothing was deleted"):
    interop.export_savedmodel(conv_same, K, tmp_path / "m", input_shape=(None, 5, 5, 4),
                              overwrite=True)
  assert (tmp_path / "m" / "notes.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match=r"`path` '.*notes.txt' exists and is not a directory"):
    interop.export_savedmodel(conv_same, K, tmp_path / "m" / "notes.txt",
                              input_shape=(None, 5, 5, 4))


def test_channel_dimension_must_be_known(tmp_path):
  with pytest.raises(ValueError, match=r"export_savedmodel: the channel dimension of "
                     r"`input_shape` \(axis -1\) must be an int: the params fix the number "
                     r"of channels, only batch and spatial sizes can be symbolic; got "
                     r"input_shape \(None, None, None, None\)"):
    interop.export_savedmodel(conv_same, K, tmp_path / "m", input_shape=(None,) * 4)
  with pytest.raises(ValueError, match=r"channel dimension of `input_shape` \(axis 1\)"):
    interop.export_savedmodel(conv_same, K, tmp_path / "m", input_shape=(2, None, 4, 4),
                              channel_axis=1)


def test_channel_dimension_must_match_the_params(tmp_path):
  with pytest.raises(ValueError, match=r"export_savedmodel: `apply_fn` fails on an input of "
                     r"shape \(64, 64, 64, 5\) \(`input_shape` \(None, None, None, 5\) with "
                     r"each None set to 64\), so `input_shape` does not match `apply_fn` and "
                     r"`params`: ValueError: depthwise_conv2d: `kernel` in_channels \(dim 2, "
                     r"size 4\) must equal the channels of `x` \(5"):
    interop.export_savedmodel(conv_same, K, tmp_path / "m", input_shape=(None, None, None, 5))
  assert not (tmp_path / "m").exists()


def test_valid_padding_names_the_dimensions_and_the_fix(tmp_path):
  with pytest.raises(ValueError, match=r"(?s)export_savedmodel: `apply_fn` works at concrete "
                     r"sizes but fails with the symbolic dimensions h \(axis 1\), w \(axis 2\) "
                     r"of x \(b, h, w, 4\): ValueError: depthwise_conv2d: along axis H .* "
                     r"fits only if h >= 3.*declare it with `constraints=`, e.g. "
                     r"constraints=\('h >= 3',\)"):
    interop.export_savedmodel(lambda k, x: dw.depthwise_conv2d(x, k, padding="VALID"), K,
                              tmp_path / "m", input_shape=(None, None, None, 4))


def test_apply_fn_failing_under_symbolic_shapes(tmp_path):
  def halves(k, x):  # needs an even height: fails for a symbolic one
    return dw.depthwise_conv2d(x[:, ::2] + x[:, 1::2], k)

  with pytest.raises(ValueError, match=r"`apply_fn` works at concrete sizes but fails with "
                     r"the symbolic dimension h \(axis 1\) of x \(b, h, 6, 4\): TypeError: "
                     r"add got incompatible shapes for broadcasting"):
    interop.export_savedmodel(halves, K, tmp_path / "m", input_shape=(None, None, 6, 4))

  def branches(k, x):
    return conv_same(k, x) if x.shape[2] > 3 else x

  with pytest.raises(ValueError, match=r"symbolic dimension w \(axis 2\) of x \(b, h, w, 4\): "
                     r"InconclusiveDimensionOperation: Symbolic dimension comparison 'w' > "
                     r"'3' is inconclusive"):
    interop.export_savedmodel(branches, K, tmp_path / "m", input_shape=(None, None, None, 4))
  # With the size fixed, the same function exports.
  interop.export_savedmodel(branches, K, tmp_path / "m", input_shape=(None, None, 5, 4))


def test_integer_outputs_need_with_gradient_false(tmp_path):
  with pytest.raises(ValueError, match=r"with_gradient=True needs floating outputs, but "
                     r"`apply_fn` returns int32\[b,h,w,4\]; pass with_gradient=False"):
    interop.export_savedmodel(lambda k, x: conv_same(k, x).astype(jnp.int32), K,
                              tmp_path / "m", input_shape=(None, None, None, 4))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(input_shape="b, h, w, 4"), TypeError,
     r"`input_shape` must be a sequence of ints and None .* got 'b, h, w, 4'"),
    (dict(input_shape=(None, 2.0, None, 4)), TypeError,
     r"`input_shape` must be a sequence of ints and None"),
    (dict(input_shape=(None, 0, None, 4)), ValueError,
     r"`input_shape` sizes must be positive ints or None, got \(None, 0, None, 4\)"),
    (dict(input_shape=()), ValueError, r"`input_shape` must have at least one dimension"),
    (dict(input_shape=(None, 4), channel_axis=2), ValueError,
     r"`channel_axis` must be an int in \[-2, 2\) for a rank-2 `input_shape`, got 2"),
    (dict(input_shape=(None, None, None, 4), dtype="float33"), TypeError,
     r"`dtype` must be a dtype or its name \(e.g. 'float32'\), got 'float33'"),
    (dict(input_shape=(None, None, None, 4), dtype="float64"), ValueError,
     r"`dtype` float64 needs JAX's 64-bit mode, which is off \(JAX would compute in float32\); "
     r"export inside `with jax.enable_x64\(True\):`, or use float32"),
    (dict(input_shape=(None, None, None, 4), platforms=("cpu", "gpu")), ValueError,
     r"`platforms` must be a non-empty sequence of distinct names from 'cpu', 'cuda', "
     r"'rocm', 'tpu', got \('cpu', 'gpu'\)"),
    (dict(input_shape=(None, None, None, 4), platforms=()), ValueError, r"`platforms` must"),
    (dict(input_shape=(None, None, None, 4), constraints="h >= 3"), TypeError,
     r"`constraints` must be a sequence of strings such as 'h >= 3', got 'h >= 3'"),
    (dict(input_shape=(None, None, None, 4), constraints=("h >= 3 and w",)), ValueError,
     r"`constraints` \('h >= 3 and w',\) are not valid for the symbolic dimensions "
     r"\(b, h, w, 4\): syntax error"),
])
def test_bad_arguments(tmp_path, kwargs, error, message):
  with pytest.raises(error, match="export_savedmodel: " + message):
    interop.export_savedmodel(conv_same, K, tmp_path / "m", **kwargs)


def test_params_must_be_arrays(tmp_path):
  with pytest.raises(TypeError, match=r"export_savedmodel: `params` must be a pytree of "
                     r"arrays, got str at \['name'\]"):
    interop.export_savedmodel(lambda p, x: conv_same(p["k"], x), {"k": K, "name": "conv"},
                              tmp_path / "m", input_shape=(None, None, None, 4))


def test_dim_names():
  assert interop._export.dim_names(4) == ("b", "h", "w", None)
  assert interop._export.dim_names(3, 1) == ("b", None, "w")
  assert interop._export.dim_names(2) == ("b", None)
  assert interop._export.dim_names(7) == ("b", "s1", "s2", "s3", "s4", "s5", None)


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match=r"load_savedmodel: `path` '.*nowhere' does not exist"):
    interop.load_savedmodel(tmp_path / "nowhere")
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "weights.npy").write_bytes(b"")
  for p in (tmp_path / "plain", tmp_path / "plain" / "weights.npy"):
    with pytest.raises(ValueError, match=r"load_savedmodel: `path` '.*' is not a SavedModel "
                       r"directory \(expected a directory with saved_model.pb"):
      interop.load_savedmodel(p)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "saved_model.pb").write_bytes(b"\x00not a protobuf")
  with pytest.raises(ValueError, match=r"load_savedmodel: `path` '.*broken' holds a "
                     r"SavedModel that TensorFlow cannot load: "):
    interop.load_savedmodel(tmp_path / "broken")
  other = tf.Module()
  other.v = tf.Variable(1.0)
  tf.saved_model.save(other, str(tmp_path / "other"))
  with pytest.raises(ValueError, match=r"load_savedmodel: the SavedModel at '.*other' has no "
                     r"`serve` function \(nor a streaming `step`\); it was not written by "
                     r"export_savedmodel or export_streaming_savedmodel\."):
    interop.load_savedmodel(tmp_path / "other")
