"""Uniform allocation: every prunable tensor at the target sparsity (the paper's)."""

from .base import SparsityAllocation, register_allocation


class Uniform(SparsityAllocation):
    name = "uniform"


register_allocation(Uniform)
