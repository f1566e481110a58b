"""PyTorch's semi-structured (2:4) sparse tensors on CUDA (sparse tensor cores, Ampere and later).

Only for weights with exactly 2 nonzeros in every block of 4 consecutive inputs, fp16 / bf16, on a GPU
of compute capability 8.0 or more. It refuses everywhere else (CPU included), and the conversion then
keeps the other kernels or the dense weight. Fast for large batches on A100-class GPUs; for batch-1
decode it is slower than dense on H100 (see docs/deployment.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import Kernel, register_kernel


@register_kernel
class SemiStructuredKernel(Kernel):
    name = "semi_structured_2:4"
    description = "torch.sparse.to_sparse_semi_structured (CUDA, 2:4, fp16/bf16)"

    @classmethod
    def available(cls, dtype, device):
        if device.type != "cuda":
            return False, "2:4 semi-structured sparsity runs on CUDA GPUs only"
        if not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 0):
            return False, "needs a CUDA GPU of compute capability >= 8.0 (Ampere or later)"
        if dtype not in (torch.float16, torch.bfloat16):
            return False, f"fp16 or bf16 weights only, got {dtype}"
        return True, ""

    @classmethod
    def accepts(cls, module):
        if module.in_features % 64 or module.out_features % 64:
            return False, "needs in and out features divisible by 64"
        counts = module.dense_weight().ne(0).reshape(module.out_features, -1, 4).sum(-1)
        if bool((counts > 2).any()):
            return False, "not 2:4 (a block of 4 inputs has more than 2 nonzeros)"
        return True, ""

    def bind(self, module) -> None:
        from torch.sparse import to_sparse_semi_structured

        self.weight = to_sparse_semi_structured(module.dense_weight())

    def __call__(self, module, x):
        return F.linear(x, self.weight)

    def extra_nbytes(self) -> int:
        packed = getattr(self.weight, "packed", None)
        meta = getattr(self.weight, "meta", None)
        return sum(t.numel() * t.element_size() for t in (packed, meta) if t is not None)
