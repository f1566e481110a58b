"""Global allocation: one budget of zeros over all prunable weights, scores normalised per tensor.

The ``round(N * sparsity)`` lowest normalised scores over all N prunable weights are pruned, where each
tensor's scores are divided by their mean (so a tensor's scale alone does not decide), and every tensor's
sparsity is kept within ``[min_sparsity, max_sparsity]``: a tensor that would leave its bounds is fixed at
the bound and the rest of the budget is spread over the others again (water filling), so no layer is
emptied. The threshold is found by bisection on the float bits, over the entries inside a sampled bracket,
with counts summed over processes, so a sharded model needs no gather.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Reduce, SparsityAllocation, bounded_counts, no_reduce


def normalised(score: torch.Tensor, reduce: Reduce, numel: int) -> torch.Tensor:
    """``score / mean(score)`` over the whole tensor (its shards' sums reduced); all-zero scores stay zero."""
    total = reduce(score.sum(dtype=torch.float64).reshape(1))[0]
    mean = float(total) / max(numel, 1)
    return score.float() / mean if mean > 0 else score.float()


def _bits(score: torch.Tensor, reduce: Reduce, numel: int) -> torch.Tensor:
    """Normalised scores as int32 bit patterns: positive floats order like them (NaN, -0.0 and below: +0.0)."""
    x = normalised(score, reduce, numel)
    return torch.where(x > 0, x, 0.0).view(torch.int32)  # a new tensor: the caller's scores stay as they are


# entries sampled (over all tensors) to bracket the k-th smallest value, and the bracket's margin in binomial
# standard deviations of the sampled rank: the bracket only decides how much work the search costs
SAMPLE = 65536
MARGIN_SD = 5.0
_SEED = 0x610BA1
_FULL_RANGE = (0, 0x7F800000)  # +0.0 .. +inf


def threshold_stats(bits: list[torch.Tensor], k: int, reduce: Reduce) -> torch.Tensor:
    """``[len(bits), 2]``: per tensor, the entries below ``t`` and equal to ``t`` (summed over processes), where
    ``t`` is the k-th smallest value (1-based) over all ``bits`` tensors and processes.

    A fixed-seed sample brackets ``t`` in ``[lo, hi]``; one pass per tensor counts the entries below ``lo`` and
    keeps those inside the bracket (a few percent). If the counts, summed over processes (so every process takes
    the same branch), put ``t`` inside, a bisection on the bit patterns runs over the kept entries alone and the
    statistics come from them; if the bracket missed, over all entries.
    """
    lo, hi = _sampled_bracket(bits, k, reduce)
    below, bands = [], []
    for b in bits:
        under = b < lo
        below.append(under.sum())
        bands.append(b[(b <= hi).logical_xor_(under)])  # lo <= b <= hi (what is below lo is below hi too)
    below_total, band_total = reduce(
        torch.stack([torch.stack(below).sum().double(), torch.tensor(float(sum(x.numel() for x in bands)))])
    )
    if below_total < k <= below_total + band_total:
        t = _bisect(bands, k - int(below_total), reduce, lo, hi)
        stats = [torch.stack([n + (x < t).sum(), (x == t).sum()]) for n, x in zip(below, bands)]
    else:
        t = _bisect(bits, k, reduce, *_FULL_RANGE)
        stats = [torch.stack([(b < t).sum(), (b == t).sum()]) for b in bits]
    return reduce(torch.stack(stats).double())


def _sampled_bracket(bits: list[torch.Tensor], k: int, reduce: Reduce) -> tuple[int, int]:
    local = sum(b.numel() for b in bits)
    total, processes = (float(v) for v in reduce(torch.tensor([float(local), 1.0], dtype=torch.float64)))
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    sample = torch.cat(
        [
            b.view(-1)[torch.randint(0, b.numel(), (math.ceil(SAMPLE * b.numel() / local),), generator=gen).to(b.device)]
            for b in bits
            if b.numel()
        ]
        or [torch.zeros(0, dtype=torch.int32)]
    ).sort().values
    size = sample.numel()
    q = min(k / max(total, 1.0), 1.0)
    spread = MARGIN_SD * math.sqrt(size * q * (1.0 - q)) + 1.0
    i_lo, i_hi = math.floor(q * size - spread), math.ceil(q * size + spread)
    lo = int(sample[i_lo]) if 0 <= i_lo < size else _FULL_RANGE[0]
    hi = int(sample[i_hi]) if 0 <= i_hi < size else _FULL_RANGE[1]
    # one bracket for all processes (the mean of theirs): the counts above then mean the same everywhere
    lo_sum, hi_sum = (float(v) for v in reduce(torch.tensor([float(lo), float(hi)], dtype=torch.float64)))
    return math.floor(lo_sum / processes), math.ceil(hi_sum / processes)


def _bisect(bits: list[torch.Tensor], k: int, reduce: Reduce, low: int, high: int) -> int:
    """The smallest pattern ``t`` in ``[low, high]`` with at least ``k`` entries ``<= t`` over all processes."""
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
    stats = threshold_stats([bits[n] for n in names], k, reduce)
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
        bits = {n: _bits(s, reduce, numels[n]) for n, s in scores.items()}
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
