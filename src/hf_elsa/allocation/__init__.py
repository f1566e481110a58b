"""Sparsity allocation over tensors. Adding one = a ``SparsityAllocation`` subclass + one ``register_allocation``."""

from __future__ import annotations

from .base import SparsityAllocation, bounded_counts
from .global_budget import GlobalBudget
from .owl import Owl, layer_of, outlier_ratios, owl_layer_sparsities
from .uniform import Uniform

ALLOCATIONS: dict[str, type[SparsityAllocation]] = {}


def register_allocation(cls: type[SparsityAllocation]) -> type[SparsityAllocation]:
    ALLOCATIONS[cls.name] = cls
    return cls


for _cls in (Uniform, GlobalBudget, Owl):
    register_allocation(_cls)


def make_allocation(settings) -> SparsityAllocation:
    """The allocation ``settings.sparsity_allocation`` names, with its bounds and options from ``settings``."""
    name = getattr(settings, "sparsity_allocation", "uniform")
    if name not in ALLOCATIONS:
        raise ValueError(f"sparsity_allocation={name!r}: use one of {tuple(ALLOCATIONS)}.")
    low, high = getattr(settings, "allocation_min_sparsity", 0.0), getattr(settings, "allocation_max_sparsity", 1.0)
    if name == "owl":
        return Owl(low, high, settings.owl_outlier_threshold, settings.owl_spread)
    return ALLOCATIONS[name](low, 1.0 if high is None else high)


__all__ = [
    "ALLOCATIONS",
    "GlobalBudget",
    "Owl",
    "SparsityAllocation",
    "Uniform",
    "bounded_counts",
    "layer_of",
    "make_allocation",
    "outlier_ratios",
    "owl_layer_sparsities",
    "register_allocation",
]
