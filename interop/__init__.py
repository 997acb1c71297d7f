"""interop: the TensorFlow side of dw5d-jax.

Reference TF implementations, the JAX-vs-TF parity suite and SavedModel
export through jax2tf. This package may import `dw5d_jax`; `dw5d_jax` never
imports TensorFlow.
"""

from interop._export import export_savedmodel as export_savedmodel
from interop._export import load_savedmodel as load_savedmodel
