"""SciPy's CSR matrix-vector / matrix-matrix product (single-threaded C++), on views of the buffers."""

from __future__ import annotations

import torch

from .kernels import Kernel, register_kernel


@register_kernel
class ScipyCsrKernel(Kernel):
    name = "scipy_csr"
    description = "scipy.sparse.csr_matrix @ x.T (CPU)"

    @classmethod
    def available(cls, dtype, device):
        if device.type != "cpu":
            return False, "SciPy runs on the CPU only"
        if dtype not in (torch.float32, torch.float64):
            return False, f"no SciPy path for {dtype}"
        try:
            import scipy.sparse  # noqa: F401
        except ImportError:  # pragma: no cover - scipy is a dependency
            return False, "scipy is not installed"
        return True, ""

    def bind(self, module) -> None:
        # int16 column indices (the compact storage) are widened per call, not kept: no second copy
        self.matrix = self._matrix(module) if module.col_indices.dtype == torch.int32 else None

    @staticmethod
    def _matrix(module):
        import scipy.sparse

        return scipy.sparse.csr_matrix(
            (module.values.numpy(), module.col_indices.to(torch.int32).numpy(), module.crow_indices.numpy()),
            shape=(module.out_features, module.in_features),
            copy=False,
        )

    def __call__(self, module, x):
        matrix = self.matrix if self.matrix is not None else self._matrix(module)
        if x.shape[0] == 1:
            return torch.from_numpy(matrix @ x[0].numpy()).unsqueeze(0)
        return torch.from_numpy(matrix @ x.t().contiguous().numpy()).t()
