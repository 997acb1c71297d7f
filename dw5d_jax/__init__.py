"""dw5d_jax: depthwise convolution on 5D tensors in JAX.

Public API:
  depthwise_conv2d: 2D depthwise convolution per slice of a 5D tensor (or a
    drop-in for `tf.nn.depthwise_conv2d` on 4D tensors).
  depthwise_conv3d: true 3D depthwise convolution.
  tune_cpu_allocator: opt-in glibc malloc setting that makes large CPU
    computations several times faster (see its docstring).
"""

from dw5d_jax._allocator import tune_cpu_allocator as tune_cpu_allocator
from dw5d_jax._depthwise import depthwise_conv2d as depthwise_conv2d
from dw5d_jax._depthwise import depthwise_conv3d as depthwise_conv3d

__version__ = "0.1.0"

__all__ = ["depthwise_conv2d", "depthwise_conv3d", "tune_cpu_allocator"]
