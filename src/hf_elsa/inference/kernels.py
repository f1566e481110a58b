"""The kernel registry: how a :class:`~hf_elsa.inference.SparseLinear` multiplies by its CSR weight.

A kernel is a small class: ``available(dtype, device)`` says whether it can run, ``bind(module)`` builds
its view of the module's CSR buffers (sharing their memory, never copying the weight), and
``__call__(module, x)`` returns ``x @ W.T`` for a 2-D ``x`` of shape ``(tokens, in_features)``.
Adding a kernel = one class decorated with :func:`register_kernel`; the conversion times every
available one per layer and keeps the fastest (or the dense weight when none is faster).
"""

from __future__ import annotations

import torch

from ..registry import Registry

KERNELS: Registry[type[Kernel]] = Registry("kernel")


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    """Class decorator: make ``cls`` a candidate of :func:`~hf_elsa.inference.to_sparse_inference` (a taken or
    empty name is refused)."""
    return KERNELS.register(cls.name, cls)


class Kernel:
    """Base class. Subclasses set ``name`` and implement ``available``, ``bind`` and ``__call__``."""

    name: str = ""
    # a kernel that cannot serve every sparsity pattern (2:4 only, ...) overrides ``accepts``
    description: str = ""

    @classmethod
    def available(cls, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
        """``(True, "")`` when the kernel runs for this weight dtype and device, else ``(False, why)``."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, module) -> tuple[bool, str]:
        """Whether this layer's weight suits the kernel (e.g. exactly 2:4); ``(ok, why not)``."""
        return True, ""

    def bind(self, module) -> None:
        """Build views of ``module``'s CSR buffers (no copy of the weight)."""

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_nbytes(self) -> int:
        """Bytes this kernel holds beyond the module's CSR buffers (0 for views)."""
        return 0


def kernel_names() -> list[str]:
    """Registered kernels, in registration order."""
    return list(KERNELS)


def available_kernels(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[str, str]:
    """``{name: ""}`` for the kernels that run here, ``{name: why not}`` for the others."""
    device = torch.device(device)
    return {name: cls.available(dtype, device)[1] for name, cls in KERNELS.items()}
