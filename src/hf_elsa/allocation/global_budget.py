"""Global allocation: one budget of zeros over all prunable weights, scores normalised per tensor.

The ``round(N * sparsity)`` lowest normalised scores over all N prunable weights are pruned, where each
tensor's scores are divided by their mean (so a tensor's scale alone does not decide), and every tensor's
sparsity is kept within ``[min_sparsity, max_sparsity]``: a tensor that would leave its bounds is fixed at
the bound and the rest of the budget is spread over the others again (water filling), so no layer is
emptied. The threshold is found by bisection on the float bits with counts summed over processes, so a
sharded model needs no gather.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Reduce, SparsityAllocation, bounded_counts, no_reduce


def normalised(score: torch.Tensor, reduce: Reduce, numel: int) -> torch.Tensor:
    """``score / mean(score)`` over the whole tensor (its shards' sums reduced); all-zero scores stay zero."""
    total = reduce(score.double().sum().reshape(1))[0]
    mean = float(total) / max(numel, 1)
    return score.float() / mean if mean > 0 else score.float()


def _bits(score: torch.Tensor) -> torch.Tensor:
    # non-negative floats order like their int32 bit patterns (NaN treated as the least important)
    return torch.nan_to_num(score, nan=0.0).clamp_min(0.0).view(torch.int32)


def kth_smallest_bits(bits: list[torch.Tensor], k: int, reduce: Reduce) -> int:
    """Bit pattern of the k-th smallest value (1-based) over all ``bits`` tensors and processes."""
    low, high = 0, 0x7F800000  # +0.0 .. +inf
    while low < high:
        mid = (low + high) // 2
        count = reduce(torch.stack([(b <= mid).sum() for b in bits]).sum().reshape(1).double())[0]
        if count >= k:
            high = mid
        else:
            low = mid + 1
    return low


def threshold_counts(bits: Mapping[str, torch.Tensor], k: int, reduce: Reduce) -> dict[str, int]:
    """Per-tensor number of entries among the ``k`` smallest over all tensors (ties taken in name order)."""
    names = sorted(bits)
    if k <= 0:
        return {n: 0 for n in names}
    t = kth_smallest_bits([bits[n] for n in names], k, reduce)
    stats = reduce(torch.stack([torch.stack([(bits[n] < t).sum(), (bits[n] == t).sum()]) for n in names]).double())
    counts, missing = {}, k - int(stats[:, 0].sum())
    for i, n in enumerate(names):
        ties = min(int(stats[i, 1]), missing)
        counts[n] = int(stats[i, 0]) + ties
        missing -= ties
    return counts


class GlobalBudget(SparsityAllocation):
    name = "global"

    def tensor_sparsities(
        self,
        scores: Mapping[str, torch.Tensor],
        numels: Mapping[str, int],
        sparsity: float,
        reduce: Reduce = no_reduce,
    ) -> dict[str, float]:
        total = round(sum(numels.values()) * sparsity)
        low, high = self.bounds(sparsity)
        bits = {n: _bits(normalised(s, reduce, numels[n])) for n, s in scores.items()}
        fixed: dict[str, int] = {}
        while True:
            free = {n: b for n, b in bits.items() if n not in fixed}
            budget = total - sum(fixed.values())
            counts = threshold_counts(free, budget, reduce) if free else {}
            out_of_bounds = {}
            for n, c in counts.items():
                lo, hi = math.ceil(low * numels[n] - 1e-9), math.floor(high * numels[n] + 1e-9)
                if c < lo or c > hi:
                    out_of_bounds[n] = min(max(c, lo), hi)
            if not out_of_bounds:
                break
            fixed.update(out_of_bounds)
        counts.update(fixed)
        wanted = {n: counts[n] / numels[n] for n in counts}
        counts = bounded_counts(wanted, numels, total, low, high)  # exact total even if the bounds rounded
        return {n: counts[n] / numels[n] for n in counts}
