"""Sparsity patterns. Adding one = a ``SparsityPattern`` subclass in its own module + one ``register_pattern``."""

from __future__ import annotations

from .base import SparsityPattern
from .n_m import NM
from .row import Row
from .unstructured import Unstructured

PATTERN_TYPES: list[type[SparsityPattern]] = []


def register_pattern(cls: type[SparsityPattern]) -> type[SparsityPattern]:
    """Make ``sparsity_pattern`` recognise the strings ``cls.parse`` accepts."""
    PATTERN_TYPES.append(cls)
    return cls


for _cls in (Unstructured, Row, NM):
    register_pattern(_cls)


def sparsity_pattern(value: str | SparsityPattern) -> SparsityPattern:
    """The pattern named by ``value`` (``"unstructured"``, ``"row"``, ``"2:4"``, ...); patterns pass through."""
    if isinstance(value, SparsityPattern):
        return value
    if isinstance(value, str):
        for cls in PATTERN_TYPES:
            pattern = cls.parse(value.strip())
            if pattern is not None:
                return pattern
    raise ValueError(
        f"sparsity_type={value!r} is not supported: use 'unstructured' (per tensor), 'row' (per output row) "
        "or an N:M pattern such as '2:4' or '4:8'."
    )


__all__ = ["NM", "PATTERN_TYPES", "Row", "SparsityPattern", "Unstructured", "register_pattern", "sparsity_pattern"]
