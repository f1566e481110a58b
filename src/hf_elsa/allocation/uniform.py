"""Uniform allocation: every prunable tensor at the target sparsity (the paper's)."""

from .base import SparsityAllocation


class Uniform(SparsityAllocation):
    name = "uniform"
