"""Wanda (Sun, Liu, Bair, Kolter 2024): prune by ``|W_ij| * ||X_j||_2``, compared per output row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..patterns import Row, SparsityPattern, Unstructured, sparsity_pattern
from ._sequential import all_reduce_sum
from ._weights import oriented_weight, write_pruned
from .base import OneShotPruner, register_pruner


class InputNorms:
    """Running sum of squares of every input feature of one module, over all calibration tokens."""

    def __init__(self, in_features: int, device: torch.device):
        # fp64 sums of fp32 per-batch sums: independent of the batch order (see InputHessian)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.sum_sq.device, torch.float32)
        self.sum_sq += x.square().sum(dim=0).double()
        self.tokens += x.shape[0]

    def all_reduce(self, dst: int | None = None) -> None:
        all_reduce_sum(self.sum_sq, self.tokens, dst=dst)

    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` over every calibration token seen."""
        return self.sum_sq.sqrt().float()


def wanda_score(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for an ``(out, in)`` weight and the ``in`` input-feature norms."""
    return weight.detach().float().abs() * input_norms.float().to(weight.device).unsqueeze(0)


def wanda_comparison_type(sparsity_type: str | SparsityPattern) -> SparsityPattern:
    """Wanda compares per output row for unstructured sparsity (its paper's finding); N:M stays N:M."""
    pattern = sparsity_pattern(sparsity_type)
    return Row() if isinstance(pattern, Unstructured) else pattern


class Wanda(OneShotPruner):
    """Score ``|W_ij| * ||X_j||_2`` from the calibration inputs; no weight update."""

    name = "wanda"
    requires_calibration = True

    def make_statistic(self, module: nn.Module) -> InputNorms:
        weight = oriented_weight(module)
        return InputNorms(weight.shape[1], weight.device)

    def prune_module(self, name, module, pattern: SparsityPattern, sparsity: float, statistic) -> torch.Tensor:
        weight = oriented_weight(module)
        keep = wanda_comparison_type(pattern).keep_mask(wanda_score(weight, statistic.norms()), sparsity)
        return write_pruned(module, weight, keep)


register_pruner(Wanda())


def wanda(
    model: nn.Module,
    calibration: Any,
    sparsity: float = 0.5,
    sparsity_type: str = "unstructured",
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place with Wanda; return ``{module_name: keep_mask}`` (True = kept).

    Score ``|W_ij| * ||X_j||_2`` where ``X_j`` is input feature ``j`` of the module over every
    calibration token. Comparison group: each output row for ``"unstructured"`` (as in the paper: every
    row then has exactly ``round(in_features * sparsity)`` zeros, so a tensor's sparsity equals
    ``sparsity`` up to that per-row rounding) and ``"row"``; every ``M`` inputs of a row for ``"N:M"``.
    Kept weights are not changed (no weight update).

    Calibration is sequential, one decoder layer at a time: a layer's inputs come from the already
    pruned layers before it (see ``hf_elsa.oneshot._sequential``). ``calibration`` is a LongTensor
    ``[num_samples, seqlen]`` or a ``datasets.Dataset`` with an ``input_ids`` column
    (``hf_elsa.data.token_blocks``). Cost: two forward passes of each decoder layer over the
    calibration set; memory: one layer's activations plus one vector per module.
    """
    return Wanda()(model, calibration, sparsity, sparsity_type, target_modules, exclude_modules, batch_size, progress)
