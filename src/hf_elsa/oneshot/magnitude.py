"""Magnitude pruning: keep the largest ``|W|`` of every comparison group. No data needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..targets import find_prunable_modules
from ._weights import check_arguments, oriented_weight, write_pruned


@torch.no_grad()
def magnitude(
    model: nn.Module,
    sparsity: float = 0.5,
    sparsity_type: str = "unstructured",
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place by weight magnitude; return ``{module_name: keep_mask}``.

    Score ``|W|``. Comparison group per ``sparsity_type``: the whole tensor (``"unstructured"``,
    exactly ``round(numel * sparsity)`` zeros), each output row (``"row"``) or every ``M`` consecutive
    input weights of a row (``"N:M"``, ``sparsity`` ignored). Prunable modules are those of
    :func:`hf_elsa.targets.find_prunable_modules` (every ``nn.Linear`` / ``Conv1D`` but the LM head).
    Cost: one ``kthvalue`` per tensor, no forward pass.
    """
    pattern = check_arguments(sparsity, sparsity_type)
    modules = find_prunable_modules(model, target_modules, exclude_modules, pattern)
    masks = {}
    for name, module in modules.items():
        weight = oriented_weight(module)
        keep = pattern.keep_mask(weight.abs(), sparsity)
        masks[name] = write_pruned(module, weight, keep)
    return masks
