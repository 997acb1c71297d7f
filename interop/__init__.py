"""interop: the TensorFlow side of dw5d-jax.

Reference TF implementations, the JAX-vs-TF parity suite and SavedModel
export through jax2tf. This package may import `dw5d_jax`; `dw5d_jax` never
imports TensorFlow.
"""

from interop._export import export_savedmodel as export_savedmodel
from interop._export import load_savedmodel as load_savedmodel
from interop._weights import DepthwiseWeights as DepthwiseWeights
from interop._weights import kernel_from_keras_grouped as kernel_from_keras_grouped
from interop._weights import kernel_from_torch_grouped as kernel_from_torch_grouped
from interop._weights import weights_from_keras as weights_from_keras
