"""Sparsity allocation over tensors. Adding one = a ``SparsityAllocation`` subclass in its own module that calls
``register_allocation`` (and overrides ``from_settings`` when it reads options of its own)."""

from __future__ import annotations

from .base import ALLOCATIONS, SparsityAllocation, bounded_counts, make_allocation, register_allocation
from .global_budget import GlobalBudget
from .owl import Owl, layer_of, outlier_ratios, owl_layer_sparsities
from .uniform import Uniform

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
