"""ADMM as an optimizer wrapper: the optimizer, its schedules, its state storage and its DTensor plumbing."""

from .optimizer import PENALTIES, ElsaOptimizer
from .schedules import LAMBDA_SCHEDULES, SPARSITY_SCHEDULES, lambda_at, sparsity_at
from .storage import LAMBDA, MASK, RESIDUAL, SCALE_KEYS, STEP, U, Z, ZUStorage

__all__ = [
    "LAMBDA",
    "LAMBDA_SCHEDULES",
    "MASK",
    "PENALTIES",
    "RESIDUAL",
    "SCALE_KEYS",
    "SPARSITY_SCHEDULES",
    "STEP",
    "ElsaOptimizer",
    "U",
    "Z",
    "ZUStorage",
    "lambda_at",
    "sparsity_at",
]
