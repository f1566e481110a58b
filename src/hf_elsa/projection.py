"""Pure projections onto sparse sets (ALGORITHMS.md §3).

Every function here is side-effect free and works on one tensor. A projection keeps the entries of
highest score and zeroes the rest, with *exactly* ``round(group_size * sparsity)`` zeros per
comparison group. Ties are broken deterministically (the lower flat index is pruned first), so two
ranks or two runs always agree. Selection uses ``kthvalue`` (linear time); no full sort.
"""

from __future__ import annotations

import re

import torch

SPARSITY_TYPES = ("unstructured", "row", "N:M")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_sparsity_type(sparsity_type: str) -> tuple[str, tuple[int, int] | None]:
    """Return ``(kind, (n, m))`` for ``"N:M"`` strings such as ``"2:4"``, ``(kind, None)`` otherwise.

    Raises ``ValueError`` naming the allowed values for anything else.
    """
    if sparsity_type in ("unstructured", "row"):
        return sparsity_type, None
    match = _NM_PATTERN.match(sparsity_type or "")
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if m < 1 or n >= m:
            raise ValueError(
                f"sparsity_type={sparsity_type!r}: N:M needs 0 <= N < M (keep N of every M weights), e.g. '2:4'."
            )
        return "N:M", (n, m)
    raise ValueError(
        f"sparsity_type={sparsity_type!r} is not supported: use 'unstructured' (per tensor), 'row' (per output row) "
        "or an N:M pattern such as '2:4' or '4:8'."
    )


def pattern_sparsity(sparsity_type: str, sparsity: float) -> float:
    """The sparsity a pattern actually produces: ``1 - N/M`` for N:M, ``sparsity`` otherwise."""
    kind, nm = parse_sparsity_type(sparsity_type)
    return 1.0 - nm[0] / nm[1] if kind == "N:M" else sparsity


def check_shape(shape: torch.Size | tuple[int, ...], sparsity_type: str, name: str = "weight") -> None:
    """Raise a clear ``ValueError`` if ``sparsity_type`` cannot be applied to a tensor of ``shape``."""
    kind, nm = parse_sparsity_type(sparsity_type)
    if kind == "unstructured":
        return
    if len(shape) != 2:
        raise ValueError(f"{name}: sparsity_type={sparsity_type!r} needs a 2-D weight, got shape {tuple(shape)}.")
    if kind == "N:M" and shape[1] % nm[1] != 0:
        raise ValueError(
            f"{name}: sparsity_type={sparsity_type!r} needs in_features divisible by M={nm[1]}, but in_features="
            f"{shape[1]}. Use another M, sparsity_type='unstructured', or exclude this module (exclude_modules)."
        )


def _prune_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of every row of a 2-D ``score``.

    Ties at the threshold are pruned in order of increasing column index, so exactly ``k`` entries per
    row are selected whatever the values (all-equal rows included).
    """
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


def keep_mask(score: torch.Tensor, sparsity: float, sparsity_type: str = "unstructured") -> torch.Tensor:
    """Boolean mask (True = keep) with the highest-scoring entries of ``score`` kept.

    - ``"unstructured"``: exactly ``round(numel * sparsity)`` zeros in the tensor;
    - ``"row"``: exactly ``round(in_features * sparsity)`` zeros in every output row;
    - ``"N:M"``: at most N kept (exactly M - N zeros) in every block of M consecutive input weights
      of each row; ``sparsity`` is ignored.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must satisfy 0 <= sparsity < 1.")
    kind, nm = parse_sparsity_type(sparsity_type)
    check_shape(score.shape, sparsity_type)
    score = score.detach()
    if not score.is_floating_point():
        score = score.float()
    # NaN scores would make the selection undefined; treat them as least important.
    score = torch.nan_to_num(score, nan=float("-inf"))
    if kind == "unstructured":
        flat = score.reshape(1, -1)
        return ~_prune_smallest(flat, round(flat.numel() * sparsity)).reshape(score.shape)
    if kind == "row":
        return ~_prune_smallest(score, round(score.shape[1] * sparsity))
    n, m = nm
    blocks = score.reshape(-1, m)
    return ~_prune_smallest(blocks, m - n).reshape(score.shape)


def importance_score(
    values: torch.Tensor, curvature: torch.Tensor | None = None, alpha: float = 1.0, delta: float = 1e-12
) -> torch.Tensor:
    """Projection score of each entry.

    Without curvature: ``|v|`` (magnitude). With a positive diagonal curvature ``h``:
    ``(h + delta) ** alpha * v ** 2``, whose top-k is the exact minimiser of
    ``sum_i h_i (z_i - v_i) ** 2`` over k-sparse z for ``alpha = 1`` (ALGORITHMS.md §3).
    """
    values = values.detach().float()
    if curvature is None or alpha == 0:
        return values.abs()
    curvature = curvature.detach().float()
    if curvature.shape != values.shape:
        # per-input-column statistics (e.g. activation norms) broadcast over output rows
        curvature = curvature.expand_as(values)
    return (curvature + delta).pow(alpha) * values.square()


def project(
    values: torch.Tensor,
    sparsity: float,
    sparsity_type: str = "unstructured",
    curvature: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``values`` onto the sparse set: returns ``(projected, keep_mask)``."""
    mask = keep_mask(importance_score(values, curvature, alpha), sparsity, sparsity_type)
    return values * mask, mask
