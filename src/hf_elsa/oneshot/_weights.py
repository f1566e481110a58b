"""Weight layout and argument checks shared by the one-shot pruners.

The math of every pruner works on an ``(out_features, in_features)`` matrix. GPT-2's ``Conv1D`` stores
``(in_features, out_features)``; these helpers hide that transpose so the pruners never branch on it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..patterns import SparsityPattern, sparsity_pattern
from ..targets import is_transposed


def check_arguments(sparsity: float, sparsity_type: str | SparsityPattern) -> SparsityPattern:
    """Validate ``sparsity`` / ``sparsity_type`` once, before any work; returns the pattern."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must satisfy 0 <= sparsity < 1.")
    return sparsity_pattern(sparsity_type)


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``(out, in)`` view (no copy)."""
    weight = module.weight
    return weight.t() if is_transposed(module) else weight


def to_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Turn an ``(out, in)`` matrix back into the layout of ``module.weight``."""
    return matrix.t() if is_transposed(module) else matrix


def write_pruned(module: nn.Module, new_weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Write ``new_weight`` (``(out, in)``, any float dtype) with exact zeros outside ``keep``.

    Returns ``keep`` in the layout of ``module.weight`` (True = kept), on the weight's device.
    """
    weight = module.weight
    keep = to_weight_layout(module, keep).to(weight.device)
    new_weight = to_weight_layout(module, new_weight).to(device=weight.device, dtype=weight.dtype)
    # masked_fill rather than a multiply: gives +0.0 (not -0.0) and ignores any rounding residue
    weight.data.copy_(new_weight.masked_fill(~keep, 0))
    return keep.contiguous()
