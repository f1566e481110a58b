"""Sparsity patterns. Adding one = a ``SparsityPattern`` subclass in its own module that calls ``register_pattern``."""

from __future__ import annotations

from .base import PATTERNS, SparsityPattern, register_pattern, sparsity_pattern
from .n_m import NM
from .row import Row
from .unstructured import Unstructured

__all__ = ["NM", "PATTERNS", "Row", "SparsityPattern", "Unstructured", "register_pattern", "sparsity_pattern"]
