"""The activations the ops take by name (`activation=`), and their slopes.

A leaf: the argument checks (`_args`), the epilogue (`_epilogue`), the
layers and the Keras side name activations from here. The native kernels
know the same names (`_csrc/epilogue.h`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Activation(NamedTuple):
  """An activation: `fn` in JAX, and `act'(z)` from `y = act(z)` where it is one."""

  fn: Callable[[jax.Array], jax.Array]
  from_output: Callable[[jax.Array], jax.Array] | None = None


def _gelu_exact(z):
  return jax.nn.gelu(z, approximate=False)


def _gelu_tanh(z):
  return jax.nn.gelu(z, approximate=True)


def _relu_slope(y):
  return (y > 0).astype(y.dtype)


def _relu6_slope(y):
  return ((y > 0) & (y < 6)).astype(y.dtype)


def _sigmoid_slope(y):
  return y * (1 - y)


def _tanh_slope(y):
  return 1 - y * y


# The names the ops accept (the native kernels know the same names).
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(jax.nn.relu, _relu_slope),
    "relu6": Activation(jax.nn.relu6, _relu6_slope),
    "gelu": Activation(_gelu_exact),  # exact, with erf: Keras's and PyTorch's default
    "gelu_tanh": Activation(_gelu_tanh),  # the tanh approximation: jax.nn.gelu's default
    "silu": Activation(jax.nn.silu),
    "sigmoid": Activation(jax.nn.sigmoid, _sigmoid_slope),
    "tanh": Activation(jnp.tanh, _tanh_slope),
    "hard_swish": Activation(jax.nn.hard_swish),
}
# Other names users know them by (Keras's among them); "linear" is none.
ALIASES: dict[str, str | None] = {
    "swish": "silu", "hard_silu": "hard_swish", "gelu_approximate": "gelu_tanh",
    "approximate_gelu": "gelu_tanh", "linear": None,
}


def variant(activation: str | None, out_dtype: Any) -> str:
  """What the backward pass reads: "none" (g = ct), "output" (y) or "input" (recomputes z).

  y only where it holds act'(z) exactly enough: a float32 (or wider) y, or
  relu's sign. A bfloat16 y rounds values just below relu6's 6 onto it
  (slope 0 instead of 1), and sigmoid's and tanh's slopes near saturation
  to 0.
  """
  if activation is None:
    return "none"
  if ACTIVATIONS[activation].from_output is None:
    return "input"
  exact = np.dtype(out_dtype).itemsize >= 4 or activation == "relu"
  return "output" if exact else "input"
