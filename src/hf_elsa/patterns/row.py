"""Row sparsity: one comparison group per output row (Wanda's comparison group)."""

from __future__ import annotations

import torch

from .base import SparsityPattern, register_pattern


class Row(SparsityPattern):
    """Exactly ``round(in_features * sparsity)`` zeros in every output row."""

    spelling = "'row' (per output row)"

    @property
    def name(self) -> str:
        return "row"

    @classmethod
    def parse(cls, text: str) -> Row | None:
        return cls() if text == "row" else None

    def groups(self, score: torch.Tensor) -> torch.Tensor:
        return score

    def zeros(self, group_size: int, sparsity: float) -> int:
        return round(group_size * sparsity)


register_pattern(Row, "row")
