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


class DenserStart:
    """The recipe's start of the mask search: from ``from_sparsity`` up (patterns that can ramp) the one-shot start is
    ``points`` denser than the target and ADMM's cubic ramp prunes the rest under the training loss (distillation
    included); below it, for N:M, with ``keep_mask`` or without an ADMM phase: ``None``, the start at the target.
    Measured on SmolLM2-135M (docs/quality.md): at 100 steps of 4 x 64 tokens 80% -> 90% beats the 90% start by 7%
    (411.5 -> 382.4) and the frozen SparseGPT mask by 11% (428.9), 80% 138.9 -> 127.5; at 150 steps of 4 x 256 90%
    208.1 -> 179.6. At 70% it does not pay (72.0 -> 71.2 and 71.2 -> 72.55 at the first budget, 44.7 -> 45.8 at the
    second), so it starts at 80%."""

    def __init__(self, points: float = 0.1, from_sparsity: float = 0.8):
        self.points, self.from_sparsity = points, from_sparsity

    def __call__(self, settings) -> float | None:
        ramps = settings.pattern.can_ramp and not settings.keep_mask and settings.admm_fraction != 0
        if not ramps or settings.sparsity < self.from_sparsity - 1e-9:
            return None
        return round(settings.sparsity - self.points, 9)

    def __repr__(self) -> str:
        return f"sparsity - {self.points:g} from {self.from_sparsity:.0%} (unstructured, row), else the target"


class SearchPhase:
    """The ADMM phase's share of the steps: longer when the start is denser than the target (z's ramp prunes the rest
    during it), ``at_target`` otherwise."""

    def __init__(self, denser: float = 0.3, at_target: float = 0.15):
        self.denser, self.at_target = denser, at_target

    def __call__(self, settings) -> float:
        start = settings.admm_init_sparsity
        return self.denser if start is not None and start < settings.final_sparsity else self.at_target

    def __repr__(self) -> str:
        return f"{self.denser:g} with a denser start (admm_init_sparsity), else {self.at_target:g}"


# Values of the recipe-controlled fields left at None. "paper" is the ICLR 2026 recipe verbatim; "elsa" is
# this library's default, which converges within short step budgets (docs/convergence.md).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "admm_penalty": "gradient",
        "admm_lambda": 0.01,
        "admm_lambda_schedule": "constant",
        "admm_lambda_init": 0.0,
        "admm_interval": 32,
        "admm_init_sparsity": None,
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
        "admm_init_sparsity": DenserStart(0.1, 0.8),  # before admm_fraction, which follows it
        "admm_fraction": SearchPhase(0.3, 0.15),
        "sparsity_schedule": "cubic",
        "importance": "activation",
        "admm_init": "sparsegpt",
        "distill_weight": BySparsity(0.5, 0.75),
        "learning_rate": BySparsity(3e-4, 1e-3, log=True),
    },
}
# "oneshot_kd": the one-shot mask kept as it is (no mask search), then fine-tuning with distillation; for tiny
# budgets, and the baseline that shows what the mask search adds (docs/quality.md)
RECIPES["oneshot_kd"] = {**RECIPES["elsa"], "admm_init_sparsity": None, "admm_fraction": 0.0}
