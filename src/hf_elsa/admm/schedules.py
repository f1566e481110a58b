"""Schedules of the ADMM phase: the penalty weight lambda and the sparsity target of z (pure functions)."""

from __future__ import annotations

import math

LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "exponential")
SPARSITY_SCHEDULES = ("constant", "cubic")


def lambda_at(schedule: str, step: int, total: int, start: float, end: float) -> float:
    """Penalty weight at ``step`` of ``total`` for a schedule going from ``start`` to ``end``."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "constant":
        return end
    if schedule == "linear":
        return start + (end - start) * frac
    if schedule == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * frac)) / 2
    if schedule == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError("admm_lambda_schedule='exponential' needs admm_lambda_init > 0 and admm_lambda > 0.")
        return start * (end / start) ** frac
    raise ValueError(f"admm_lambda_schedule={schedule!r}: use one of {LAMBDA_SCHEDULES}.")


def sparsity_at(schedule: str, step: int, ramp_steps: int, final: float, start: float = 0.0) -> float:
    """Sparsity target of z: constant, or a cubic ramp ``start`` -> ``final`` over ``ramp_steps`` (Zhu & Gupta)."""
    if schedule == "constant" or step >= ramp_steps:
        return final
    if schedule == "cubic":
        return start + (final - start) * (1.0 - (1.0 - step / max(ramp_steps, 1)) ** 3)
    raise ValueError(f"sparsity_schedule={schedule!r}: use one of {SPARSITY_SCHEDULES}.")
