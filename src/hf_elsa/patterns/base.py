"""``SparsityPattern``: what a sparsity pattern means, asked once instead of parsing a string everywhere.

A pattern splits a weight into comparison groups and says how many entries of each group are zero. It is
parsed once from the string users type (``"unstructured"``, ``"row"``, ``"2:4"``) and then answers every
question the rest of the library has: does a weight's shape fit, can z's sparsity follow a ramp, do its
groups lie within output rows (so row-sharded FSDP2 weights project locally), can its sparsity differ per
tensor (non-uniform allocation), and what sparsity it actually produces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..registry import Registry
from ..selection import prune_smallest


class SparsityPattern(ABC):
    """One sparsity pattern. Subclasses set the class attributes and implement ``groups``/``zeros``."""

    #: any sparsity can be asked for (z's ramp can start from dense); N:M has one fixed ratio and ramps only from
    #: a denser start (``ramp_mask``)
    can_ramp: bool = True
    #: every comparison group lies within one output row (FSDP2's row shards can be projected locally)
    groups_within_rows: bool = True
    #: the sparsity may differ per tensor (non-uniform allocation)
    allows_allocation: bool = True
    #: how error messages and docs spell the strings this pattern parses
    spelling: str = ""

    @property
    @abstractmethod
    def name(self) -> str:
        """The string users type for this pattern (its serialised form)."""

    @classmethod
    @abstractmethod
    def parse(cls, text: str) -> SparsityPattern | None:
        """The pattern ``text`` names, ``None`` when ``text`` is not this kind of pattern."""

    @abstractmethod
    def groups(self, score: torch.Tensor) -> torch.Tensor:
        """A ``(groups, group_size)`` view of ``score`` (already checked by ``check_shape``)."""

    @abstractmethod
    def zeros(self, group_size: int, sparsity: float) -> int:
        """Number of zeros in each comparison group of ``group_size`` entries at ``sparsity``."""

    def sparsity(self, requested: float) -> float:
        """The sparsity this pattern produces when ``requested`` is asked for."""
        return requested

    def check_shape(self, shape: torch.Size | tuple[int, ...], name: str = "weight") -> None:
        """Raise a clear ``ValueError`` when a weight of ``shape`` cannot take this pattern."""
        if len(shape) != 2:
            raise ValueError(f"{name}: sparsity_type={self.name!r} needs a 2-D weight, got shape {tuple(shape)}.")

    def keep_mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Boolean mask (True = keep) keeping the highest scores of every group; exact zero counts."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} must satisfy 0 <= sparsity < 1.")
        self.check_shape(score.shape)
        score = score.detach()
        if not score.is_floating_point():
            score = score.float()
        # NaN scores would make the selection undefined; treat them as least important.
        score = torch.nan_to_num(score, nan=float("-inf"))
        grouped = self.groups(score)
        return ~prune_smallest(grouped, self.zeros(grouped.shape[1], sparsity)).reshape(score.shape)

    def ramp_mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep mask at ``sparsity`` on z's ramp towards this pattern (``keep_mask`` for patterns whose sparsity is
        free; patterns with one fixed ratio keep a superset of one of their own masks, so the ramp ends in one)."""
        return self.keep_mask(score, sparsity)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SparsityPattern) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


# pattern families by name ("unstructured", "row", "n:m"); ``sparsity_pattern`` asks each one's ``parse``
PATTERNS: Registry[type[SparsityPattern]] = Registry("sparsity_type")


def register_pattern(cls: type[SparsityPattern], name: str | None = None, *, replace: bool = False):
    """Make ``sparsity_pattern`` recognise the strings ``cls.parse`` accepts (``name``: default the class name,
    lower case). Usable as a class decorator."""
    return PATTERNS.register(name or cls.__name__.lower(), cls, replace=replace)


def sparsity_pattern(value: str | SparsityPattern) -> SparsityPattern:
    """The pattern named by ``value`` (``"unstructured"``, ``"row"``, ``"2:4"``, ...); patterns pass through."""
    if isinstance(value, SparsityPattern):
        return value
    if isinstance(value, str):
        for cls in PATTERNS.values():
            pattern = cls.parse(value.strip())
            if pattern is not None:
                return pattern
    spellings = [cls.spelling or repr(name) for name, cls in PATTERNS.items()]
    listed = ", ".join(spellings[:-1]) + f" or {spellings[-1]}" if len(spellings) > 1 else spellings[0]
    raise ValueError(f"sparsity_type={value!r} is not supported: use {listed}.")
