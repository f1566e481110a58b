"""Exact selection of the k smallest entries per row: the ground floor of every projection.

Pure function on one 2-D tensor. Ties are broken deterministically (the lower column index is pruned
first), so two processes or two runs always agree, and exactly ``k`` entries per row are selected
whatever the values. Selection uses ``kthvalue`` (linear time); never a full sort.
"""

from __future__ import annotations

import torch


def prune_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of every row of a 2-D ``score`` (True = pruned)."""
    rows, cols = score.shape
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = score.kthvalue(k, dim=1, keepdim=True).values
    below = score < threshold
    at = score == threshold
    # how many of the tied entries each row still needs, taken left to right
    missing = k - below.sum(dim=1, keepdim=True)
    take_tied = at & (at.cumsum(dim=1) <= missing)
    return below | take_tied
