"""Streams through a SavedModel from `interop.export_streaming_savedmodel`, TF only.

Usage: python -I tf_only_stream_runner.py MODEL_DIR INPUTS.npz OUTPUTS.npz

For every `x{i}` (a clip `(N, T, ...)`) and `len{i}` (the chunk length) in
INPUTS it starts from `initial_state(x[:, :1])` and feeds the clip chunk by
chunk along T through `step(state, chunk)`, and again through the
`initial_state` and `serving_default` signatures. It stores, for step `j`,
`y{i}_{j}` and `sig{i}_{j}` (the two outputs) and `s{i}_{j}_{name}` (every
scalar entry of the state after the step, e.g. how many frames are real).
It prints one JSON line: which of jax, jaxlib, dw5d_jax, interop are
importable (none may be), whether `jax` got imported, and the step count.
Uses only TensorFlow and NumPy.
"""

import importlib.util
import json
import sys

import numpy as np
import tensorflow as tf


def main(model_dir, inputs, outputs):
  importable = [m for m in ("jax", "jaxlib", "dw5d_jax", "interop")
                if importlib.util.find_spec(m) is not None]
  model = tf.saved_model.load(model_dir)
  serve, start = model.signatures["serving_default"], model.signatures["initial_state"]
  data = np.load(inputs)
  out = {}
  steps = 0
  i = 0
  while f"x{i}" in data:
    x, length = data[f"x{i}"], int(data[f"len{i}"])
    state = model.initial_state(tf.constant(x[:, :1]))
    sig_state = start(chunk=tf.constant(x[:, :1]))
    for j, t in enumerate(range(0, x.shape[1], length)):
      chunk = tf.constant(x[:, t:t + length])
      state, y = model.step(state, chunk)
      sig = serve(chunk=chunk, **sig_state)
      sig_state = {n: sig[n] for n in state}
      out[f"y{i}_{j}"], out[f"sig{i}_{j}"] = y.numpy(), sig["output"].numpy()
      for name, value in state.items():
        if value.shape.rank == 0:
          out[f"s{i}_{j}_{name}"] = value.numpy()
      steps += 1
    i += 1
  np.savez(outputs, **out)
  print(json.dumps({"importable": importable, "jax_imported": "jax" in sys.modules,
                    "steps": steps}))


if __name__ == "__main__":
  main(*sys.argv[1:])
