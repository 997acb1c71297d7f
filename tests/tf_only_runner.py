"""Loads and runs a SavedModel in the TF-only environment (tests/tf_only_env.py).

Usage: python -I tf_only_runner.py MODEL_DIR INPUTS.npz OUTPUTS.npz

For every `x{i}`, `ct{i}` in INPUTS it stores `y{i}` (`serve(x)`), `sig{i}`
(the `serving_default` signature), and the gradients of `sum(ct * serve(x))`
through `tf.GradientTape`: `dx{i}` and `dp{i}_{j}` for each variable `j`.
It prints one JSON line: which of jax, jaxlib, dw5d_jax, interop are importable
(none may be), whether `jax` got imported, and the platforms of every
`XlaCallModule` op in the SavedModel. Uses only TensorFlow and NumPy.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2


def call_module_platforms(model_dir):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(model_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return [[p.decode() for p in node.attr["platforms"].list.s]
          for graph in proto.meta_graphs for fn in graph.graph_def.library.function
          for node in fn.node_def if node.op == "XlaCallModule"]


def main(model_dir, inputs, outputs):
  importable = [m for m in ("jax", "jaxlib", "dw5d_jax", "interop")
                if importlib.util.find_spec(m) is not None]
  model = tf.saved_model.load(model_dir)
  data = np.load(inputs)
  out = {}
  i = 0
  while f"x{i}" in data:
    x = tf.constant(data[f"x{i}"])
    ct = tf.constant(data[f"ct{i}"])
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = model.serve(x)
      loss = tf.reduce_sum(y * ct)
    dx, *dp = tape.gradient(loss, [x, *model.params])
    out[f"y{i}"] = y.numpy()
    out[f"dx{i}"] = dx.numpy()
    for j, g in enumerate(dp):
      out[f"dp{i}_{j}"] = g.numpy()
    out[f"sig{i}"] = model.signatures["serving_default"](x=x)["output"].numpy()
    i += 1
  np.savez(outputs, **out)
  print(json.dumps({"importable": importable, "jax_imported": "jax" in sys.modules,
                    "platforms": call_module_platforms(model_dir), "count": i}))


if __name__ == "__main__":
  main(*sys.argv[1:])
