"""The demo's learning task: spheres vs cubes in noisy volumes, and a separable 3D CNN.

Pure JAX, Flax NNX and optax (no TensorFlow): `dw5d demo` uses it for its
data set, model and training loop (demo.py).

The task needs 3D structure. Each volume holds one solid, a sphere or an
axis-aligned cube, with a soft edge, a random size, position and brightness,
in Gaussian noise. Sizes are drawn so that both classes cover the same range
of volumes (sphere radius = cube side * (3 / (4 pi))^(1/3) for the same
draw), so total brightness says nothing: the model has to see faces, edges
and corners, which 3x3x3 depthwise filters do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dw5d_jax.nn import DepthwiseConv3D

CLASSES = ("sphere", "cube")
# Cube sides (voxels); the sphere of the same draw has the same volume.
SIDES = (6.0, 10.0)
EDGE = 0.4  # width of the soft edge (voxels)
BRIGHTNESS = (0.7, 1.3)
# Radius of the sphere with the volume of a unit cube, (3 / (4 pi))^(1/3).
_SPHERE = (3 / (4 * math.pi)) ** (1 / 3)


class Volumes(NamedTuple):
  """A labelled set: `x` `(N, D, H, W, 1)` float32, `y` `(N,)` int32 (index into CLASSES)."""

  x: np.ndarray
  y: np.ndarray


def make_volumes(rng: np.random.Generator, n: int, size: Sequence[int], *,
                 noise: float) -> Volumes:
  """`n` noisy volumes of shape `size` (D, H, W), half spheres and half cubes.

  Raises:
    ValueError: a `size` too small for the largest solid.

  Example:
    >>> v = make_volumes(np.random.default_rng(0), 4, (16, 16, 16), noise=0.3)
    >>> v.x.shape, v.x.dtype.name, sorted(v.y.tolist())
    ((4, 16, 16, 16, 1), 'float32', [0, 0, 1, 1])
  """
  smallest = math.ceil(2 * SIDES[1] * _SPHERE + 3)
  if len(size) != 3 or min(size) < smallest:
    raise ValueError(f"make_volumes: `size` must be three sizes (D, H, W) of at least "
                     f"{smallest} voxels, room for the largest solid (a sphere of diameter "
                     f"{2 * SIDES[1] * _SPHERE:.1f}) and its edge, got {tuple(size)}.")
  size = tuple(int(s) for s in size)
  labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int32)
  grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float32) for s in size), indexing="ij"),
                  axis=-1)
  x = np.empty((n, *size, 1), np.float32)
  for i, label in enumerate(labels):
    side = rng.uniform(*SIDES)
    sphere = CLASSES[label] == "sphere"
    # Half the cube's side, or the sphere's radius (larger: the same volume).
    reach = side * _SPHERE if sphere else side / 2
    # The whole solid and its soft edge stay inside the volume.
    centre = rng.uniform(reach + 1, np.asarray(size) - reach - 2).astype(np.float32)
    offset = grid - centre
    if sphere:
      distance = np.linalg.norm(offset, axis=-1) - reach
    else:
      distance = np.abs(offset).max(axis=-1) - reach
    brightness = rng.uniform(*BRIGHTNESS)
    x[i, ..., 0] = brightness / (1 + np.exp(distance / EDGE)) + noise * rng.standard_normal(size)
  return Volumes(x, labels)


class SeparableBlock(nnx.Module):
  """Depthwise 3D (spatial, per channel) then pointwise (channel mixing), then GELU.

  GELU rather than ReLU: with ReLU an unlucky initialisation sometimes left
  the network dead at chance for a hundred steps.
  """

  def __init__(self, in_features: int, out_features: int, *, strides: int, rngs: nnx.Rngs):
    self.depthwise = DepthwiseConv3D(in_features, 3, strides=strides, rngs=rngs)
    # A 1x1x1 convolution is a dense layer over the channel axis.
    self.pointwise = nnx.Linear(in_features, out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.gelu(self.pointwise(self.depthwise(x)))


class ShapeNet(nnx.Module):
  """A separable 3D CNN for any input size: `(N, D, H, W, 1)` to `(N, classes)` logits.

  A depthwise stem (one input channel, `width` filters), two separable
  blocks with stride 2, then global mean and max pooling over D, H, W, so
  one set of weights serves every volume size.

  Example:
    >>> model = ShapeNet(rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 16, 16, 16, 1))).shape, model(jnp.ones((1, 9, 12, 7, 1))).shape
    ((2, 2), (1, 2))
  """

  def __init__(self, *, width: int = 8, classes: int = len(CLASSES), rngs: nnx.Rngs):
    self.stem = DepthwiseConv3D(1, 3, depth_multiplier=width, rngs=rngs)
    self.block1 = SeparableBlock(width, 2 * width, strides=2, rngs=rngs)
    self.block2 = SeparableBlock(2 * width, 4 * width, strides=2, rngs=rngs)
    self.head = nnx.Linear(8 * width, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.block2(self.block1(nnx.gelu(self.stem(x))))
    pooled = jnp.concatenate([h.mean(axis=(1, 2, 3)), h.max(axis=(1, 2, 3))], axis=-1)
    return self.head(pooled)


def count_params(model: nnx.Module) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def make_optimizer(model: ShapeNet, *, learning_rate: float, steps: int) -> nnx.Optimizer:
  """Adam with a linear warm-up over the first 10% of `steps`, then cosine decay."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 10, 1), steps)
  return nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)


@nnx.jit
def train_step(model: ShapeNet, optimizer: nnx.Optimizer, x: jax.Array,
               y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One optax step on a batch; returns the batch's loss and accuracy (before the step)."""

  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


@nnx.jit
def predict(model: ShapeNet, x: jax.Array) -> jax.Array:
  return model(x)


def predict_all(model: ShapeNet, x: np.ndarray, *, batch: int = 128) -> np.ndarray:
  """Logits for `x` in batches of `batch` (one compiled shape, the last batch padded)."""
  out = []
  for i in range(0, len(x), batch):
    chunk = x[i:i + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)]) if len(chunk) < batch else chunk
    out.append(np.asarray(predict(model, jnp.asarray(padded)))[:len(chunk)])
  return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def batches(rng: np.random.Generator, data: Volumes, batch: int) -> Iterator[Volumes]:
  """Endless shuffled mini-batches: every epoch visits each volume once."""
  while True:
    order = rng.permutation(len(data.y))
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i:i + batch]
      yield Volumes(data.x[idx], data.y[idx])
