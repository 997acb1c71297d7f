"""interop: the TensorFlow side of dw5d-jax.

Reference TF implementations of the ops, SavedModel export through jax2tf,
LiteRT export, weight converters and Keras 3 layers. This package may import
`dw5d_jax`; `dw5d_jax` never imports TensorFlow. The `dw5d` command (demo,
parity, export, bench) is an application built on it, in the private
`interop._app`.

Public API:
  tf_depthwise_conv2d, tf_depthwise_conv3d: the dw5d_jax ops written with
    TensorFlow ops only (reference implementations, return `tf.Tensor`).
  export_savedmodel, load_savedmodel: JAX functions to TF SavedModels through
    jax2tf, with symbolic batch and spatial dims.
  export_streaming_savedmodel: a stream (`dw5d_jax.stream_init`/`stream_step`,
    or a model's) to a SavedModel with `step(state, chunk) -> (state, output)`.
  export_streaming_litert: one frame of a stream to a LiteRT flatbuffer whose
    state enters and leaves as named rank-4 tensors (builtin ops only).
  export_litert: Keras models and JAX functions to LiteRT (TFLite)
    flatbuffers of builtin ops only, float32, float16 or int8.
  export_onnx: JAX functions, Flax models and Keras (JAX backend) models to
    ONNX, each dw5d_jax op one grouped `Conv`, symbolic batch.
  export_streaming_onnx: one frame of a stream to an ONNX model whose state
    is named rank-4 inputs and outputs.
  litert_ops: a .tflite's ops, and whether all are LiteRT builtins.
  weights_from_keras, weights_from_torch, kernel_from_keras_grouped,
    kernel_from_torch_grouped, DepthwiseWeights: layers' kernels, biases and
    options from Keras/PyTorch to `(..., C, M)` and the ops' arguments.
  keras: Keras 3 layers `DepthwiseConv3D`, `DepthwiseConv2D` (JAX and
    TensorFlow backends), imported on first access.
"""

import importlib
from typing import Any

# Public name -> the module defining it. Imported on first use, so importing
# `interop` (e.g. for the `dw5d` command) does not import TensorFlow.
_LAZY = {
    "tf_depthwise_conv2d": "interop._tf_ops",
    "tf_depthwise_conv3d": "interop._tf_ops",
    "export_savedmodel": "interop._export",
    "export_streaming_savedmodel": "interop._stream_export",
    "export_streaming_litert": "interop._stream_export",
    "load_savedmodel": "interop._export",
    "export_litert": "interop._litert",
    "export_onnx": "interop._onnx",
    "export_streaming_onnx": "interop._onnx",
    "litert_ops": "interop._litert",
    "DepthwiseWeights": "interop._weights",
    "kernel_from_keras_grouped": "interop._weights",
    "kernel_from_torch_grouped": "interop._weights",
    "weights_from_keras": "interop._weights",
    "weights_from_torch": "interop._weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
  if name == "keras":  # a submodule: importing it imports Keras
    return importlib.import_module("interop.keras")
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'interop' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *_LAZY, "keras"})
