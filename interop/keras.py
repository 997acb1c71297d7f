"""Keras 3 layers: `DepthwiseConv3D` and `DepthwiseConv2D` (per slice or 4D).

They run on the JAX backend (through `dw5d_jax`) and on the TensorFlow backend
(through `interop`'s TF ops), and are registered as Keras serializables
(`"dw5d>DepthwiseConv3D"`, `"dw5d>DepthwiseConv2D"`): import this module
before `keras.models.load_model` of a model that uses them. `stream_functions`
turns a model of them (JAX backend) into the arguments of the streaming
exporters (`interop.export_streaming_litert`, `export_streaming_onnx`). `import interop`
does not import Keras; this module does.
"""

from interop._keras import DepthwiseConv2D as DepthwiseConv2D
from interop._keras import DepthwiseConv3D as DepthwiseConv3D
from interop._keras_stream import stream_functions as stream_functions

__all__ = ["DepthwiseConv2D", "DepthwiseConv3D", "stream_functions"]
