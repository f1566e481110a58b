"""The recipes: the values ``ElsaSettings`` gives the recipe-controlled fields left at ``None``.

Kept apart from the settings table (``hf_elsa.settings``) so that tuning a recipe is an edit of this one table.
"""

from __future__ import annotations

from typing import Any


class BySparsity:
    """A recipe default that follows the sparsity: ``high`` from ``high_at`` up (and for N:M), ``low`` up to
    ``low_at``, interpolated in between (log-linearly for ``log=True``). Measured on SmolLM2-135M at 100 steps of
    4 x 64 tokens (docs/quality.md): with distillation the learning rate is best at 1e-3 at 70-90% and 2:4 and at
    3e-4 at 50%, and keeping part of the next-token loss beats distilling only (w = 1): w = 0.5 at 50%, 0.75 from
    70% up and for 2:4."""

    def __init__(self, low: float, high: float, log: bool = False, low_at: float = 0.5, high_at: float = 0.7):
        self.low, self.high, self.log, self.low_at, self.high_at = low, high, log, low_at, high_at

    def __call__(self, settings) -> float:
        if not settings.pattern.can_ramp:
            return self.high
        frac = min(max((settings.sparsity - self.low_at) / (self.high_at - self.low_at), 0.0), 1.0)
        if self.log:
            return self.low * (self.high / self.low) ** frac
        return self.low + (self.high - self.low) * frac

    def __repr__(self) -> str:
        how = "log-linear" if self.log else "linear"
        return (
            f"{self.high:g} from {self.high_at:.0%} sparsity and N:M, {self.low:g} to {self.low_at:.0%}, {how} between"
        )


# Values of the recipe-controlled fields left at None. "paper" is the ICLR 2026 recipe verbatim; "elsa" is
# this library's default, which converges within short step budgets (docs/convergence.md).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "admm_penalty": "gradient",
        "admm_lambda": 0.01,
        "admm_lambda_schedule": "constant",
        "admm_lambda_init": 0.0,
        "admm_interval": 32,
        "admm_fraction": 1.0,
        "sparsity_schedule": "constant",
        "importance": "magnitude",
        "admm_init": "magnitude",
        "distill_weight": 0.0,
        "learning_rate": 1e-4,
    },
    "elsa": {
        "admm_penalty": "proximal",
        "admm_lambda": 1.0,
        "admm_lambda_schedule": "constant",
        "admm_lambda_init": 0.0,
        "admm_interval": 0,
        "admm_fraction": 0.15,
        "sparsity_schedule": "cubic",
        "importance": "activation",
        "admm_init": "sparsegpt",
        "distill_weight": BySparsity(0.5, 0.75),
        "learning_rate": BySparsity(3e-4, 1e-3, log=True),
    },
}
# "oneshot_kd": the one-shot mask kept as it is (no mask search), then fine-tuning with distillation; for tiny
# budgets, and the baseline that shows what the mask search adds (docs/quality.md)
RECIPES["oneshot_kd"] = {**RECIPES["elsa"], "admm_fraction": 0.0}
