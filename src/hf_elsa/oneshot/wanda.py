"""Wanda (Sun, Liu, Bair, Kolter 2024): prune by ``|W_ij| * ||X_j||_2``, compared per output row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..patterns import Row, SparsityPattern, Unstructured, sparsity_pattern
from ..targets import find_prunable_modules
from ._sequential import all_reduce_sum, prune_layerwise
from ._weights import check_arguments, oriented_weight, write_pruned


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

    def all_reduce(self) -> None:
        all_reduce_sum(self.sum_sq, self.tokens)

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
    pattern = check_arguments(sparsity, sparsity_type)
    modules = find_prunable_modules(model, target_modules, exclude_modules, pattern)
    comparison = wanda_comparison_type(pattern)

    def make_statistic(module: nn.Module) -> InputNorms:
        weight = oriented_weight(module)
        return InputNorms(weight.shape[1], weight.device)

    def prune(name: str, module: nn.Module, stat: InputNorms) -> torch.Tensor:
        if stat.tokens == 0:
            raise RuntimeError(f"wanda: {name} saw no calibration input (is it used in the forward pass?).")
        weight = oriented_weight(module)
        keep = comparison.keep_mask(wanda_score(weight, stat.norms()), sparsity)
        return write_pruned(module, weight, keep)

    return prune_layerwise(
        model, calibration, modules, make_statistic, prune, batch_size=batch_size, progress=progress, desc="wanda"
    )
