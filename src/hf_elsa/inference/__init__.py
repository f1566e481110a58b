"""Sparse inference: make the zeros of a pruned model pay in speed and memory (docs/deployment.md).

``to_sparse_inference(model)`` swaps each pruned ``nn.Linear`` for a CSR :class:`SparseLinear` where a
measured kernel beats the dense matmul; ``from_sparse_inference(model)`` swaps them back. Kernels live in
one module each and register themselves in :data:`KERNELS`.
"""

from .convert import (
    InferenceReport,
    LayerChoice,
    SparseLinear,
    from_sparse_inference,
    sparse_layers,
    to_sparse_inference,
)
from .kernels import KERNELS, Kernel, available_kernels, kernel_names, register_kernel

__all__ = [
    "KERNELS",
    "InferenceReport",
    "Kernel",
    "LayerChoice",
    "SparseLinear",
    "available_kernels",
    "from_sparse_inference",
    "kernel_names",
    "register_kernel",
    "sparse_layers",
    "to_sparse_inference",
]
