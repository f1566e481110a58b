"""Unstructured sparsity: one comparison group per tensor (the paper's default)."""

from __future__ import annotations

import torch

from .base import SparsityPattern, register_pattern


class Unstructured(SparsityPattern):
    """Exactly ``round(numel * sparsity)`` zeros per tensor, anywhere in it."""

    spelling = "'unstructured' (per tensor)"

    groups_within_rows = False

    @property
    def name(self) -> str:
        return "unstructured"

    @classmethod
    def parse(cls, text: str) -> Unstructured | None:
        return cls() if text == "unstructured" else None

    def check_shape(self, shape, name: str = "weight") -> None:
        return None  # any shape

    def groups(self, score: torch.Tensor) -> torch.Tensor:
        return score.reshape(1, -1)

    def zeros(self, group_size: int, sparsity: float) -> int:
        return round(group_size * sparsity)


register_pattern(Unstructured, "unstructured")
