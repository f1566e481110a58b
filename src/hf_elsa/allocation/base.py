"""``SparsityAllocation``: how a mean sparsity is spread over the prunable tensors.

An allocation sees every prunable tensor's projection score at once and returns each tensor's sparsity.
It never gathers the tensors: it works on this process's shards and sums counts over processes with the
``reduce`` function it is given (identity on one process, an all-reduce under FSDP2), so every process
reaches the same allocation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch

from ..registry import Registry

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(counts: torch.Tensor) -> torch.Tensor:
    return counts


class SparsityAllocation:
    """Uniform allocation: every tensor at the mean sparsity. Subclasses spread it differently."""

    #: the name users pass as ``ElsaConfig.sparsity_allocation``
    name: str = ""
    #: the allocation is computed once (from the first scores with statistics) and then kept
    fixed_once_computed: bool = False

    def __init__(self, min_sparsity: float = 0.0, max_sparsity: float = 1.0):
        self.min_sparsity = min_sparsity
        self.max_sparsity = max_sparsity

    @classmethod
    def from_settings(cls, settings) -> SparsityAllocation:
        """The allocation with its bounds (and, in subclasses, its own options) read from ``settings``."""
        low = getattr(settings, "allocation_min_sparsity", 0.0)
        high = getattr(settings, "allocation_max_sparsity", 1.0)
        return cls(low, 1.0 if high is None else high)

    @classmethod
    def check_settings(cls, settings, owner: str) -> None:
        """Refuse settings this allocation cannot work with (called by ``ElsaSettings`` for a non-uniform one)."""

    def bounds(self, sparsity: float) -> tuple[float, float]:
        """Per-tensor sparsity bounds at mean ``sparsity`` (widened to include it, e.g. early in the ramp)."""
        return min(self.min_sparsity, sparsity), max(self.max_sparsity, sparsity)

    def tensor_sparsities(
        self,
        scores: Mapping[str, torch.Tensor],
        numels: Mapping[str, int],
        sparsity: float,
        reduce: Reduce = no_reduce,
    ) -> dict[str, float]:
        """``{name: sparsity}`` for every tensor of ``scores`` (local shards; ``numels``: whole sizes)."""
        return {name: sparsity for name in scores}


# allocations by name (``ElsaConfig.sparsity_allocation``); each module registers its own class
ALLOCATIONS: Registry[type[SparsityAllocation]] = Registry("sparsity_allocation")


def register_allocation(cls: type[SparsityAllocation], *, replace: bool = False) -> type[SparsityAllocation]:
    """Make ``cls`` available as ``ElsaConfig(sparsity_allocation=cls.name)`` (usable as a class decorator)."""
    return ALLOCATIONS.register(cls.name, cls, replace=replace)


def make_allocation(settings) -> SparsityAllocation:
    """The allocation ``settings.sparsity_allocation`` names, built by its ``from_settings``."""
    return ALLOCATIONS.get(getattr(settings, "sparsity_allocation", "uniform")).from_settings(settings)


def bounded_counts(
    wanted: Mapping[str, float], numels: Mapping[str, int], total: int, low: float, high: float
) -> dict[str, int]:
    """Integer zero counts near ``wanted[name] * numel`` within ``[low, high] * numel`` summing exactly to ``total``.

    Rounds each tensor's count, clamps it to its bounds, then moves the remaining difference one entry at a time onto the
    tensors with room whose rounding moved them furthest the other way, so the total is exact whenever the bounds allow it.
    """
    lo = {n: math.ceil(low * numels[n] - 1e-9) for n in wanted}
    hi = {n: math.floor(high * numels[n] + 1e-9) for n in wanted}
    counts = {n: min(max(round(wanted[n] * numels[n]), lo[n]), hi[n]) for n in wanted}
    missing = total - sum(counts.values())
    while missing:
        sign = 1 if missing > 0 else -1
        # one entry at a time, to the tensors whose rounding moved them furthest the other way
        movable = [n for n in counts if (hi[n] - counts[n] if sign > 0 else counts[n] - lo[n]) > 0]
        if not movable:  # the bounds cannot hold the total: the closest feasible counts, said (not silent)
            warnings.warn(
                f"sparsity allocation: the per-tensor bounds [{low:g}, {high:g}] cannot hold exactly {total:,} zeros "
                f"over these {len(counts)} tensors; the closest is {sum(counts.values()):,} (each tensor's bound "
                "rounds to whole weights). Widen allocation_min_sparsity / allocation_max_sparsity for the exact budget.",
                UserWarning,
                stacklevel=2,
            )
            break
        movable.sort(key=lambda n: (-sign * (wanted[n] * numels[n] - counts[n]), n))
        for name in movable[: abs(missing)]:
            counts[name] += sign
            missing -= sign
    return counts
