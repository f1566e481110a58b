"""N:M semi-structured sparsity: at most N kept in every M consecutive input weights of a row."""

from __future__ import annotations

import re

import torch

from ..selection import prune_smallest
from .base import SparsityPattern, register_pattern

_NM = re.compile(r"^(\d+):(\d+)$")


class NM(SparsityPattern):
    """``n`` kept of every ``m`` consecutive inputs (2:4 is the pattern sparse tensor cores accelerate)."""

    spelling = "an N:M pattern such as '2:4' or '4:8'"

    can_ramp = False
    allows_allocation = False

    def __init__(self, n: int, m: int):
        if not 1 <= n < m:
            raise ValueError(
                f"sparsity_type='{n}:{m}': N:M needs 1 <= N < M (keep N of every M weights), e.g. '2:4' or '4:8'."
            )
        self.n, self.m = n, m

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> NM | None:
        match = _NM.match(text)
        return cls(int(match.group(1)), int(match.group(2))) if match else None

    def sparsity(self, requested: float) -> float:
        return 1.0 - self.n / self.m

    def check_shape(self, shape, name: str = "weight") -> None:
        super().check_shape(shape, name)
        if shape[1] % self.m != 0:
            raise ValueError(
                f"{name}: sparsity_type={self.name!r} needs in_features divisible by M={self.m}, but in_features="
                f"{shape[1]}. Use another M, sparsity_type='unstructured', or exclude this module (exclude_modules)."
            )

    def groups(self, score: torch.Tensor) -> torch.Tensor:
        return score.reshape(-1, self.m)

    def zeros(self, group_size: int, sparsity: float) -> int:
        return self.m - self.n  # the requested sparsity does not apply

    def ramp_mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        """On the way to N:M at ``sparsity`` below ``1 - N/M``: of the entries the N:M mask prunes (the ``M - N``
        lowest of every group), each row prunes its ``round(in_features * sparsity)`` lowest-scoring ones; the rest
        stay. Every such mask keeps a superset of the N:M mask, so a ramp from a denser start ends in N:M."""
        final = self.sparsity(sparsity)
        if sparsity >= final - 1e-9:
            return self.keep_mask(score, final)
        if sparsity < 0.0:
            raise ValueError(f"sparsity={sparsity} must satisfy 0 <= sparsity < 1.")
        candidates = ~self.keep_mask(score, final)
        score = torch.nan_to_num(score.detach().float(), nan=float("-inf")).masked_fill(~candidates, float("inf"))
        return ~prune_smallest(score, round(score.shape[1] * sparsity))


register_pattern(NM, "n:m")
