"""One process of the 2-process run (tests/test_multiprocess.py), and its computations.

`python tests/multiprocess_worker.py PORT PROCESS_ID OUT_DIR` joins a
2-process JAX cluster on 127.0.0.1:PORT (2 CPU devices per process, CPU
collectives through gloo), then runs on a mesh of the 4 devices:

* `train`: a few data-parallel SGD steps of a small `dw5d_jax.nn` model
  (the batch split over the devices);
* `spatial`: the gradients of a 3D convolution with x split along depth.

Process 0 writes the results to OUT_DIR/results.npz. The test runs the same
functions in its own process on one device and compares. Not collected by
pytest (its name does not start with `test_`).
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS = 3
X_TRAIN = (8, 6, 8, 8, 4)  # (N, D, H, W, C): 2 samples per device
X_SPATIAL = (2, 16, 8, 8, 4)  # depth 16: 4 rows per device


def _data(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _global(value, mesh, spec):
  """A global array from the same host value in every process."""
  import jax
  from jax.sharding import NamedSharding

  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _host(value):
  """A global array's whole value, in every process."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return np.asarray(value)
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def train(mesh=None) -> dict[str, np.ndarray]:
  """Losses and final parameters of `STEPS` SGD steps (data parallel on `mesh`)."""
  import jax
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from dw5d_jax.nn import DepthwiseConv2D, DepthwiseConv3D

  rngs = nnx.Rngs(0)
  model = nnx.Sequential(DepthwiseConv3D(4, 3, depth_multiplier=2, rngs=rngs),
                         DepthwiseConv2D(8, 3, axes="HW", strides=2, rngs=rngs))
  graph, params = nnx.split(model)
  x, target = _data(X_TRAIN, 1), _data((8, 6, 4, 4, 8), 2)
  if mesh is not None:
    params = jax.tree.map(lambda p: _global(np.asarray(p), mesh, P()), params)
    x, target = _global(x, mesh, P("data")), _global(target, mesh, P("data"))

  @jax.jit
  def step(params, x, target):
    loss, grads = jax.value_and_grad(
        lambda p: ((nnx.merge(graph, p)(x) - target) ** 2).mean())(params)
    return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  losses = []
  for _ in range(STEPS):
    loss, params = step(params, x, target)
    losses.append(_host(loss))
  out = {"losses": np.array(losses)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out[f"param{jax.tree_util.keystr(path)}"] = _host(leaf)
  return out


def spatial(mesh=None) -> dict[str, np.ndarray]:
  """`y`, `dx` and `dk` of `sum(y ** 2)` of a 3D convolution, x split along depth."""
  import jax
  from jax.sharding import PartitionSpec as P

  import dw5d_jax as dw

  x, k = _data(X_SPATIAL, 3), _data((3, 3, 3, 4, 2), 4)
  if mesh is not None:
    x, k = _global(x, mesh, P(None, "data")), _global(k, mesh, P())

  @jax.jit
  def grads(x, k):
    f = lambda x, k: dw.depthwise_conv3d(x, k, strides=(1, 2, 1))  # noqa: E731
    return f(x, k), *jax.grad(lambda x, k: (f(x, k) ** 2).sum(), (0, 1))(x, k)

  y, dx, dk = grads(x, k)
  return {"y": _host(y), "dx": _host(dx), "dk": _host(dk),
          "y_split": np.array(str(y.sharding.spec) if mesh is not None else "")}


def main(port: str, process_id: str, out_dir: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id),
                             initialization_timeout=60, shutdown_timeout_seconds=30)
  assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
  mesh = jax.make_mesh((4,), ("data",))
  results = {**train(mesh), **{f"spatial_{k}": v for k, v in spatial(mesh).items()}}
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "results.npz"), **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  os.environ.setdefault("DW5D_JAX_NATIVE", "all")
  main(*sys.argv[1:])
