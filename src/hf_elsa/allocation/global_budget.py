"""Global allocation: one budget of zeros over all prunable weights, scores normalised per tensor.

The ``round(N * sparsity)`` lowest normalised scores over all N prunable weights are pruned, where each
tensor's scores are divided by their mean (so a tensor's scale alone does not decide), and every tensor's
sparsity is kept within ``[min_sparsity, max_sparsity]``: a tensor that would leave its bounds is fixed at
the bound and the rest of the budget is spread over the others again (water filling), so no layer is
emptied. The threshold is found by bisection on the float bits, over the entries inside a sampled bracket
(only those are normalised: the rest is decided by comparing raw scores with mean-scaled thresholds),
with counts summed over processes, so a sharded model needs no gather.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import Reduce, SparsityAllocation, bounded_counts, no_reduce, register_allocation


class NormalisedScores:
    """One tensor's scores divided by their mean, as int32 bit patterns (non-negative floats order like them;
    NaN, -0.0 and negative scores count as +0.0), computed only where needed.

    Comparing the raw scores with thresholds scaled by the mean (and widened by far more than the rounding of
    the division) decides every entry but those near a threshold; only those are normalised, by the same
    elementwise operation a full pass would apply, so the result is the same as on fully normalised scores.
    Scores that are not finite, or a mean that is not positive, take the full pass.
    """

    MARGIN = 1e-6  # relative widening of the raw thresholds: the division rounds by ~1e-7

    def __init__(self, score: torch.Tensor, reduce: Reduce, numel: int):
        total = float(reduce(score.sum(dtype=torch.float64).reshape(1))[0])
        self.score = score.detach().float().reshape(-1)
        self.mean = total / max(numel, 1)
        self.raw_comparable = math.isfinite(total) and self.mean > 0
        self._bits: torch.Tensor | None = None

    def numel(self) -> int:
        return self.score.numel()

    def bits_of(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw / self.mean if self.mean > 0 else raw.clone()
        return torch.where(x > 0, x, 0.0).view(torch.int32)

    def bits(self) -> torch.Tensor:
        """All entries (kept once computed: the fallback of a missed bracket)."""
        if self._bits is None:
            self._bits = self.bits_of(self.score)
        return self._bits

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        positions = torch.randint(0, self.numel(), (count,), generator=generator).to(self.score.device)
        return self.bits_of(self.score[positions])

    def split(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(number of entries ``< lo``, the bit patterns of the entries in ``[lo, hi]``)."""
        if not self.raw_comparable or lo <= 0 or self._bits is not None:
            b = self.bits()
            under = b < lo
            return under.sum(), b[(b <= hi).logical_xor_(under)]
        low, high = (_as_float(v) * self.mean for v in (lo, hi))
        under = self.score < low * (1 - self.MARGIN)  # certainly below lo once normalised
        near = self.bits_of(self.score[(self.score <= high * (1 + self.MARGIN)).logical_xor_(under)])
        return under.sum() + (near < lo).sum(), near[(near >= lo) & (near <= hi)]


def _as_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


# entries sampled (over all tensors) to bracket the k-th smallest value, and the bracket's margin in binomial
# standard deviations of the sampled rank: the bracket only decides how much work the search costs
SAMPLE = 65536
MARGIN_SD = 5.0
_SEED = 0x610BA1
_FULL_RANGE = (0, 0x7F800000)  # +0.0 .. +inf


def threshold_stats(bits: list[NormalisedScores], k: int, reduce: Reduce) -> torch.Tensor:
    """``[len(bits), 2]``: per tensor, the entries below ``t`` and equal to ``t`` (summed over processes), where
    ``t`` is the k-th smallest value (1-based) over all ``bits`` tensors and processes.

    A fixed-seed sample brackets ``t`` in ``[lo, hi]``; one pass per tensor counts the entries below ``lo`` and
    keeps those inside the bracket (a few percent). If the counts, summed over processes (so every process takes
    the same branch), put ``t`` inside, a bisection on the bit patterns runs over the kept entries alone and the
    statistics come from them; if the bracket missed, over all entries.
    """
    lo, hi = _sampled_bracket(bits, k, reduce)
    below, bands = zip(*(b.split(lo, hi) for b in bits))
    below_total, band_total = reduce(
        torch.stack([torch.stack(below).sum().double(), torch.tensor(float(sum(x.numel() for x in bands)))])
    )
    if below_total < k <= below_total + band_total:
        t = _bisect(bands, k - int(below_total), reduce, lo, hi)
        stats = [torch.stack([n + (x < t).sum(), (x == t).sum()]) for n, x in zip(below, bands)]
    else:
        full = [b.bits() for b in bits]
        t = _bisect(full, k, reduce, *_FULL_RANGE)
        stats = [torch.stack([(b < t).sum(), (b == t).sum()]) for b in full]
    return reduce(torch.stack(stats).double())


def _sampled_bracket(bits: list[NormalisedScores], k: int, reduce: Reduce) -> tuple[int, int]:
    local = sum(b.numel() for b in bits)
    total, processes = (float(v) for v in reduce(torch.tensor([float(local), 1.0], dtype=torch.float64)))
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    sample = (
        torch.cat(
            [b.sample(math.ceil(SAMPLE * b.numel() / local), gen) for b in bits if b.numel()]
            or [torch.zeros(0, dtype=torch.int32)]
        )
        .sort()
        .values
    )
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


def threshold_counts(bits: Mapping[str, NormalisedScores], k: int, reduce: Reduce) -> dict[str, int]:
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
        bits = {n: NormalisedScores(s, reduce, numels[n]) for n, s in scores.items()}
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


register_allocation(GlobalBudget)
