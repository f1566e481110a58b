"""SparseGPT (Frantar & Alistarh 2023): layer-wise OBS pruning with lazy batch updates.

For one linear layer with weight ``W`` (out x in) and calibration inputs ``X`` (tokens x in), SparseGPT
approximately solves ``min ||W X^T - W' X^T||^2`` over sparse ``W'``. With ``H = 2 X^T X / n`` and
``U`` the upper Cholesky factor of ``H^-1``, it walks the input columns left to right: a pruned entry
``w`` of column ``j`` leaves the error ``e = w / U_jj``, compensated on the not yet processed columns
by ``W[:, j:] -= e U[j, j:]`` (the OBS update restricted to the remaining columns). Columns are handled
in blocks of ``blocksize``: inside a block the update is applied column by column, to the rest of
the matrix once per block ("lazy batch" update). The mask of a block is chosen when the block is
reached, from the weights already updated by the earlier blocks, by the OBS saliency ``w^2 / U_jj^2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..patterns import NM
from ..projection import keep_mask
from ._sequential import all_reduce_sum
from ._weights import check_arguments, oriented_weight, write_pruned
from .base import OneShotPruner, register_pruner

logger = logging.getLogger(__name__)


class InputHessian:
    """Running ``X^T X`` and token count of one module's inputs; ``matrix()`` is ``2 X^T X / n`` (fp32).

    Each batch's product is computed in fp32 and added to an fp64 sum: the sum then does not depend on the order
    of the batches, so calibration split over processes (``all_reduce``) gives the Hessian of one process.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.xtx.device, torch.float32)
        self.xtx += (x.t() @ x).double()
        self.tokens += x.shape[0]

    def all_reduce(self, dst: int | None = None) -> None:
        all_reduce_sum(self.xtx, self.tokens, dst=dst)

    def matrix(self) -> torch.Tensor:
        return (self.xtx * (2.0 / max(float(self.tokens), 1.0))).float()


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)``.

    ``hessian`` must already have no zero diagonal entry. If the damped matrix is still not positive
    definite (low-precision inputs, rank deficiency), the dampening is multiplied by 10, up to
    ``retries`` times, with a warning.
    """
    mean_diag = hessian.diagonal().mean()
    damp = percdamp * mean_diag if percdamp > 0 else 1e-8 * mean_diag
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        if attempt < retries:
            logger.warning("SparseGPT: Hessian not positive definite; dampening x10 (%.3g)", float(damp * 10))
            damp = damp * 10
    raise RuntimeError("SparseGPT: the calibration Hessian stayed singular after extra dampening; use more samples.")


def _exact_count(start: int, stop: int, rows: int, sparsity: float, kind: str) -> int:
    """How many entries the columns ``[start, stop)`` must prune so the exact target holds in the end.

    Cumulative rounding: block counts ``round(a * stop * s) - round(a * start * s)`` telescope to
    ``round(a * in * s)``, the count ``keep_mask`` uses, with ``a = rows`` per tensor ("unstructured",
    count for the whole block) and ``a = 1`` per row ("row", count for each row of the block).
    """
    scale = rows if kind == "unstructured" else 1
    return round(scale * stop * sparsity) - round(scale * start * sparsity)


def _prune_lowest(score: torch.Tensor, count: int, kind: str) -> torch.Tensor:
    """Boolean prune mask of exactly ``count`` lowest scores (in the tensor, or in each row for "row")."""
    group = score.numel() if kind == "unstructured" else score.shape[1]
    if count <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if count >= group:
        return torch.ones_like(score, dtype=torch.bool)
    # keep_mask gives exactly round(group * count / group) == count zeros, with deterministic ties
    return ~keep_mask(score, count / group, kind)


@torch.no_grad()
def sparsegpt_prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    sparsity_type: str = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``(out, in)`` weight; returns ``(new_weight, keep_mask)``, both ``(out, in)``.

    ``hessian`` is ``2 X^T X / n`` (``in x in``). Inputs are not modified; the new weight is fp32 with
    exact zeros where ``keep_mask`` is False.

    Mask selection, per block of ``blocksize`` columns, by the OBS saliency ``w^2 / U_jj^2``:

    - ``"unstructured"``: lowest saliencies of the whole block (all rows compete, as in the paper);
    - ``"row"``: lowest saliencies of each row of the block;
    - ``"N:M"``: the ``M - N`` lowest of every ``M`` consecutive columns of each row, chosen when the
      first of those columns is reached (so from weights updated by the columns before it).

    Difference from the released code: its per-block threshold prunes *about* ``s`` of each block.
    Here each block prunes an exact count chosen by cumulative rounding, so the tensor ends with
    exactly ``round(numel * s)`` zeros (``"unstructured"``) or ``round(in * s)`` per row (``"row"``) —
    the counts of ``hf_elsa.projection.keep_mask`` — while every block still prunes ``s`` of itself
    up to one entry (per row).

    Inputs that never fire (``H_jj == 0``) get ``H_jj = 1`` and their weights set to 0 (their saliency
    is then 0, so they are pruned first).
    """
    pattern = check_arguments(sparsity, sparsity_type)
    nm = isinstance(pattern, NM)
    kind = "N:M" if nm else pattern.name
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"sparsegpt: weight must be (out, in) and hessian (in, in); got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}."
        )
    pattern.check_shape(weight.shape)
    if blocksize < 1 or (nm and blocksize % pattern.m != 0):
        raise ValueError(f"sparsegpt: blocksize={blocksize} must be a positive multiple of M for {sparsity_type!r}.")

    W = weight.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float32).clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, percdamp)
    del H

    prune = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        W1 = W[:, start:stop].clone()
        U1 = U[start:stop, start:stop]
        d = U1.diagonal()
        errors = torch.zeros_like(W1)
        if nm:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            saliency = W1.square() / d.square().unsqueeze(0)
            prune1 = _prune_lowest(saliency, _exact_count(start, stop, rows, sparsity, kind), kind)
        for j in range(stop - start):
            if nm and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                saliency = W1[:, group].square() / d[group].square().unsqueeze(0)
                prune1[:, group] = ~pattern.keep_mask(saliency, 0.0)
            w = W1[:, j]
            q = w.masked_fill(prune1[:, j], 0.0)
            err = (w - q) / d[j]
            # OBS compensation on the remaining columns of the block (rank-1 update)
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            W1[:, j] = q  # exact zeros and kept values, without rounding residue
            errors[:, j] = err
        W[:, start:stop] = W1
        # lazy batch update: the rest of the matrix sees the whole block's errors at once
        W[:, stop:] -= errors @ U[start:stop, stop:]
        prune[:, start:stop] = prune1
    return W.masked_fill(prune, 0.0), ~prune


class SparseGPT(OneShotPruner):
    """OBS pruning with lazy batch updates from the calibration Hessian ``2 X^T X / n`` of each module."""

    name = "sparsegpt"
    requires_calibration = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize, self.percdamp = blocksize, percdamp

    def check(self, pattern) -> None:
        if self.blocksize < 1 or (isinstance(pattern, NM) and self.blocksize % pattern.m != 0):
            raise ValueError(
                f"sparsegpt: blocksize={self.blocksize} must be a positive multiple of M for {pattern.name!r}."
            )

    def make_statistic(self, module: nn.Module) -> InputHessian:
        weight = oriented_weight(module)
        return InputHessian(weight.shape[1], weight.device)

    def prune_module(self, name, module, pattern, sparsity: float, statistic) -> torch.Tensor:
        new_weight, keep = sparsegpt_prune_weight(
            oriented_weight(module), statistic.matrix(), sparsity, pattern, self.blocksize, self.percdamp
        )
        return write_pruned(module, new_weight, keep)


register_pruner(SparseGPT())


def sparsegpt(
    model: nn.Module,
    calibration: Any,
    sparsity: float = 0.5,
    sparsity_type: str = "unstructured",
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place with SparseGPT; return ``{module_name: keep_mask}`` (True = kept).

    Every prunable module (``hf_elsa.targets.find_prunable_modules``) gets its Hessian
    ``H = 2 X^T X / n`` from the calibration inputs (fp32), then :func:`sparsegpt_prune_weight`
    (``blocksize`` columns per lazy update, dampening ``percdamp * mean(diag H)``). Exact zero counts:
    ``round(numel * s)`` per tensor (``"unstructured"``), ``round(in * s)`` per row (``"row"``),
    ``M - N`` of every ``M`` (``"N:M"``, ``sparsity`` ignored).

    Calibration is sequential, one decoder layer at a time: a layer's inputs come from the already
    pruned layers before it; the modules of one layer are pruned together from the dense layer's
    inputs, as in the paper. ``calibration`` is a LongTensor ``[num_samples, seqlen]`` or a
    ``datasets.Dataset`` with an ``input_ids`` column. Cost: two forward passes of each decoder layer,
    plus ``O(in^3 + out * in^2 / blocksize + out * in * blocksize)`` per module; memory: one layer's
    activations plus the ``in x in`` Hessians of one layer's modules.
    """
    return SparseGPT(blocksize, percdamp)(
        model, calibration, sparsity, sparsity_type, target_modules, exclude_modules, batch_size, progress
    )
