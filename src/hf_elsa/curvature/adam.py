"""Adam's second moment as the curvature (the paper's objective-aware "momentum" mode).

Free, but when the penalty goes through the gradient it also absorbs the penalty: at high sparsity the
penalty dominates ``exp_avg_sq`` and the ranking favours the entries being pruned (docs/curvature.md).
"""

from __future__ import annotations

import torch

from .base import CurvatureEstimator, register_estimator


class Adam(CurvatureEstimator):
    name = "adam"

    def curvature(self, name: str, state: dict) -> torch.Tensor | None:
        h = state.get("exp_avg_sq")
        if h is None and "step" in state:
            raise ValueError(
                f"importance='adam' needs an Adam-style base optimizer with an 'exp_avg_sq' state; {name} has "
                f"state keys {sorted(state)}. Use importance='magnitude' or an Adam optimizer."
            )
        return h  # None before the first base step: magnitude


register_estimator(Adam())
