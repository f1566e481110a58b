"""Which weights are prunable: module selection shared by the trainer, the one-shot pruners and I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from ._messages import shorten
from .patterns import SparsityPattern, sparsity_pattern

PRUNABLE_TYPES = (nn.Linear, Conv1D)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix ("q_proj"), or as a full regex."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as (in_features, out_features)."""
    return isinstance(module, Conv1D)


def find_prunable_modules(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] | None = None,
    sparsity_type: str | SparsityPattern = "unstructured",
) -> dict[str, nn.Module]:
    """``{name: module}`` of the layers whose ``.weight`` is pruned.

    Default targets: every ``nn.Linear`` / ``Conv1D`` except the output embedding (LM head), which is
    also what an input embedding tied to it would share. Raises a ``ValueError`` that names the field
    and the candidates when nothing matches or a weight cannot take ``sparsity_type``.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES) and module is not output_embeddings
    }
    selected = dict(candidates)
    if target_modules is not None:
        selected = {n: m for n, m in candidates.items() if _matches(n, target_modules)}
        if not selected:
            examples = sorted({n.rsplit(".", 1)[-1] for n in candidates})[:12]
            raise ValueError(
                f"target_modules={shorten(list(target_modules))} matches no Linear layer of {type(model).__name__}. "
                f"Layer names end in: {examples}."
            )
    if exclude_modules:
        selected = {n: m for n, m in selected.items() if not _matches(n, exclude_modules)}
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has nothing to prune: no nn.Linear/Conv1D layer other than the LM head "
            "remains after target_modules/exclude_modules."
        )
    pattern = sparsity_pattern(sparsity_type)
    for name, module in selected.items():
        shape = module.weight.shape[::-1] if is_transposed(module) else module.weight.shape
        pattern.check_shape(shape, name=f"{name}.weight")
    return selected
