"""Diagonal curvature (Hessian-diagonal) estimates for the objective-aware projection (ALGORITHMS.md §4).

The projection scores an entry by ``(h + delta) ** alpha * v ** 2``; this module supplies ``h``.
``"magnitude"`` means no curvature (score ``|v|``). ``"adam"`` reads the base optimizer's second
moment (the paper's "momentum" mode: free, but it also absorbs the ADMM penalty gradient when the
penalty goes through the gradient).
"""

from __future__ import annotations

import torch

IMPORTANCES = ("magnitude", "adam")


def curvature_for(importance: str, name: str, param: torch.Tensor, optimizer_state: dict) -> torch.Tensor | None:
    """The curvature estimate ``h`` of ``param`` for ``importance``, or ``None`` for magnitude."""
    if importance == "magnitude":
        return None
    if importance == "adam":
        h = optimizer_state.get("exp_avg_sq")
        if h is None:
            # before the first base step there is no second moment yet: fall back to magnitude
            if "step" in optimizer_state:
                raise ValueError(
                    f"importance='adam' needs an Adam-style base optimizer with an 'exp_avg_sq' state; {name} has "
                    f"state keys {sorted(optimizer_state)}. Use importance='magnitude' or an Adam optimizer."
                )
            return None
        return h
    raise ValueError(f"importance={importance!r}: use one of {IMPORTANCES}.")
