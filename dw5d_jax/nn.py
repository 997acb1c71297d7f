"""Flax NNX layers: `DepthwiseConv3D` and `DepthwiseConv2D`.

Needs the `flax` extra (`pip install 'dw5d-jax[flax]'`). `import dw5d_jax`
does not import flax; this module does, when first used.
"""

try:
  import flax.nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without flax
  raise ImportError(
      "dw5d_jax.nn needs Flax (NNX): install it with `pip install 'dw5d-jax[flax]'`."
  ) from e

from dw5d_jax._layers import DepthwiseConv2D as DepthwiseConv2D
from dw5d_jax._layers import DepthwiseConv3D as DepthwiseConv3D
from dw5d_jax._layers import depthwise_kernel_init as depthwise_kernel_init

__all__ = ["DepthwiseConv2D", "DepthwiseConv3D", "depthwise_kernel_init"]
