"""Magnitude pruning: keep the largest ``|W|`` of every comparison group. No data needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..patterns import SparsityPattern
from ._weights import oriented_weight, write_pruned
from .base import OneShotPruner, register_pruner


class Magnitude(OneShotPruner):
    """Score ``|W|``, compared within the pattern's groups. Cost: one ``kthvalue`` per tensor, no forward pass."""

    name = "magnitude"
    requires_calibration = False

    def prune_module(self, name, module, pattern: SparsityPattern, sparsity: float, statistic) -> torch.Tensor:
        weight = oriented_weight(module)
        return write_pruned(module, weight, pattern.keep_mask(weight.abs(), sparsity))


register_pruner(Magnitude())


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
    return Magnitude()(
        model,
        sparsity=sparsity,
        sparsity_type=sparsity_type,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
    )
