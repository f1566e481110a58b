"""PyTorch's CSR matmul (``torch.sparse_csr_tensor`` with int32 indices; MKL on x86 CPUs, cuSPARSE on CUDA).

Measured here: int32 indices are much faster than int64 (which torch converts on every call).
"""

from __future__ import annotations

import warnings

import torch

from .kernels import Kernel, register_kernel


@register_kernel
class TorchCsrKernel(Kernel):
    name = "torch_csr"
    description = "torch.sparse_csr_tensor (int32 indices) @ x.T"

    @classmethod
    def available(cls, dtype, device):
        if dtype not in (torch.float32, torch.float64):
            return False, f"torch CSR matmul is slower than dense or unsupported for {dtype} here"
        return True, ""

    def bind(self, module) -> None:
        # int16 column indices (the compact storage) are widened per call, not kept: no second copy
        self.matrix = self._matrix(module) if module.col_indices.dtype == torch.int32 else None

    @staticmethod
    def _matrix(module):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                module.crow_indices,
                module.col_indices.to(torch.int32),
                module.values,
                (module.out_features, module.in_features),
            )

    def __call__(self, module, x):
        matrix = self.matrix if self.matrix is not None else self._matrix(module)
        # (out, in) @ (in, tokens): the transposed view is what the CSR x dense kernel wants
        return torch.mm(matrix, x.t()).t()
