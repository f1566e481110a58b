"""Dense matmul on a weight rebuilt from the CSR buffers for the call (prefill of many tokens).

For many tokens a dense GEMM can beat every sparse kernel; rebuilding the dense weight for the call costs
one write of ``out x in`` values, so the layer keeps the memory of its sparse format and still prefills
near dense speed. Chosen only where measured fastest.
"""

from __future__ import annotations

import torch.nn.functional as F

from .kernels import Kernel, register_kernel


@register_kernel
class DensifyKernel(Kernel):
    name = "densify"
    description = "rebuild the dense weight, then F.linear (for many tokens)"

    @classmethod
    def available(cls, dtype, device):
        return True, ""

    def __call__(self, module, x):
        return F.linear(x, module.dense_weight())
