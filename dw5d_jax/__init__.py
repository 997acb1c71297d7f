"""dw5d_jax: depthwise convolution on 5D tensors in JAX.

Public API:
  depthwise_conv2d: 2D depthwise convolution per slice of a 5D tensor (or a
    drop-in for `tf.nn.depthwise_conv2d` on 4D tensors).
  depthwise_conv3d: true 3D depthwise convolution.
  stream_init, stream_step, StreamState: a convolution that is causal along
    one axis (time), fed chunk by chunk (streaming inference).
  nn: Flax NNX layers (`DepthwiseConv3D`, `DepthwiseConv2D`), imported on
    first access; needs the `flax` extra.
  tune_cpu_allocator: the glibc malloc setting that makes large CPU
    computations several times faster; applied on import unless
    `DW5D_JAX_TUNE_ALLOCATOR=0` (see dw5d_jax/_allocator.py).
  native_status: whether the native CPU kernels are in use, and if not, why.
  export_native, deserialize_native: `jax.export` artifacts that keep the
    native CPU kernels, for serving processes that import dw5d_jax.
"""

import importlib as _importlib

from dw5d_jax._allocator import _tune_at_import as _tune_allocator_at_import
from dw5d_jax._allocator import tune_cpu_allocator as tune_cpu_allocator
from dw5d_jax._depthwise import depthwise_conv2d as depthwise_conv2d
from dw5d_jax._depthwise import depthwise_conv3d as depthwise_conv3d
from dw5d_jax._native_build import native_status as native_status
from dw5d_jax._native_export import deserialize_native as deserialize_native
from dw5d_jax._native_export import export_native as export_native
from dw5d_jax._streaming import StreamState as StreamState
from dw5d_jax._streaming import stream_init as stream_init
from dw5d_jax._streaming import stream_step as stream_step

__version__ = "0.1.0"

# Large XLA CPU buffers are otherwise mmap'd and page-faulted on every call;
# opt out with DW5D_JAX_TUNE_ALLOCATOR=0 (dw5d_jax/_allocator.py).
_tune_allocator_at_import()

__all__ = ["StreamState", "depthwise_conv2d", "depthwise_conv3d", "deserialize_native",
           "export_native", "native_status", "stream_init", "stream_step", "tune_cpu_allocator"]


def __getattr__(name: str):
  # `dw5d_jax.nn` pulls in flax: import it only when a user asks for it.
  if name == "nn":
    return _importlib.import_module("dw5d_jax.nn")
  raise AttributeError(f"module 'dw5d_jax' has no attribute {name!r}")
