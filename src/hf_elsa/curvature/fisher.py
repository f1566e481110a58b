"""Empirical Fisher diagonal: a bias-corrected EMA of the squared task gradient (before the penalty)."""

from __future__ import annotations

import torch

from .base import CurvatureEstimator, accumulation_dtype, register_estimator, update_running_mean

FISHER, FISHER_COUNT = "elsa_fisher", "elsa_fisher_updates"


def update_fisher(state: dict, grad: torch.Tensor, beta: float) -> None:
    """Fold ``grad ** 2`` (the task gradient, before the penalty) into the bias-corrected EMA."""
    update_running_mean(state, FISHER, FISHER_COUNT, grad.detach().to(accumulation_dtype(grad)).square(), beta)


class Fisher(CurvatureEstimator):
    name = "fisher"
    bytes_per_weight = 4

    def curvature(self, name: str, state: dict) -> torch.Tensor | None:
        return state.get(FISHER)  # None before the first step: magnitude

    def on_task_gradient(self, state: dict, grad: torch.Tensor, beta: float) -> None:
        update_fisher(state, grad, beta)


register_estimator(Fisher())
