"""What a model carries once masks are attached (:class:`SparsityState`) and the check of masks against weights.

Shared by attaching, saving, loading and the model card; it imports nothing above ``masks``/``metadata``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .masks import PackedMask
from .metadata import ElsaSparsityConfig


@dataclass
class SparsityState:
    """What :func:`attach_sparsity` records on a model: packed masks by tensor name and the metadata."""

    masks: dict[str, PackedMask]
    config: ElsaSparsityConfig

    def mask(self, name: str, device=None) -> torch.Tensor:
        return self.masks[name].unpack(device)


def get_sparsity(model: nn.Module) -> SparsityState | None:
    """The :class:`SparsityState` attached to ``model``, or None."""
    state = getattr(model, "elsa_sparsity", None)
    return state if isinstance(state, SparsityState) else None


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<module>.weight": layer}`` of the layers that keep their weight in another form than a ``weight`` parameter
    (``to_sparse_inference``'s ``SparseLinear``: CSR buffers, the dense ``weight`` only in the state dict).

    Such a layer provides ``apply_keep_mask(keep)`` and ``stored_zeros()``; found by those methods, not by class,
    because inference sits above sparse_io.
    """
    return {
        f"{name}.weight": m
        for name, m in model.named_modules()
        if callable(getattr(m, "apply_keep_mask", None)) and callable(getattr(m, "stored_zeros", None))
    }


def require_state(model: nn.Module) -> SparsityState:
    state = get_sparsity(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no sparsity attached: call hf_elsa.sparse_io.attach_sparsity first."
        )
    return state


def check_masks(state: SparsityState, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, int]:
    """Check shapes and that pruned entries are zero; returns ``{tensor: zeros}``.

    The error names the tensor and the fixes: this is how a save refuses a silently densified model.
    """
    zeros = {}
    for key, packed in state.masks.items():
        if key not in tensors:
            raise ValueError(f"{where}: the masks cover {key!r} but the model has no such tensor.")
        weight = tensors[key].detach()
        if tuple(weight.shape) != packed.shape:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(weight.shape)} but its mask has shape {packed.shape} "
                "(masks of another model or architecture?)."
            )
        mask = packed.unpack(weight.device)
        nonzero = weight.ne(0)
        stray = int(nonzero.logical_and_(~mask).sum())
        if stray:
            raise ValueError(
                f"{where}: {key!r} has {stray} nonzero weights where its mask prunes them -- the model was densified "
                "after the masks were attached (trained without ElsaConfig(keep_mask=True), merged, ...). "
                "Re-zero them with hf_elsa.sparse_io.apply_masks(model), or call detach_sparsity(model) to save a "
                "plain dense model."
            )
        zeros[key] = int(weight.eq(0).sum())
    return zeros


def measure(state: SparsityState, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Check the masks against ``tensors`` and record the achieved sparsity in ``state.config``."""
    zeros = check_masks(state, tensors, where)
    state.config.tensors = {
        key: {"shape": list(p.shape), "zeros": zeros[key], "sparsity": round(zeros[key] / max(p.numel, 1), 6)}
        for key, p in state.masks.items()
    }
    total = sum(p.numel for p in state.masks.values())
    state.config.achieved_sparsity = round(sum(zeros.values()) / max(total, 1), 6)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (NaN count, inf count)}`` of the floating-point tensors that hold non-finite values."""
    found = {}
    for name, tensor in tensors.items():
        if not torch.is_floating_point(tensor) or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        if all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(1 << 24)):  # chunks bound the temporaries
            continue
        nan = sum(int(torch.isnan(chunk).sum()) for chunk in flat.split(1 << 24))
        found[name] = (nan, sum(int(torch.isinf(chunk).sum()) for chunk in flat.split(1 << 24)))
    return found


def describe_non_finite(found: Mapping[str, tuple[int, int]], shown: int = 5) -> str:
    """``3 tensors hold NaN/inf values: 'a' (2 NaN), 'b' (1 inf), ...`` (the first ``shown`` named)."""
    parts = []
    for name, (nan, inf) in list(found.items())[:shown]:
        counts = ", ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
        parts.append(f"{name!r} ({counts})")
    more = f", and {len(found) - shown} more" if len(found) > shown else ""
    verb = "tensor holds" if len(found) == 1 else "tensors hold"
    return f"{len(found)} {verb} NaN/inf values: {', '.join(parts)}{more}"


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse to save non-finite weights: the checkpoint would save and load without a word, and be useless."""
    found = non_finite(tensors)
    if found:
        raise ValueError(
            f"{where}: {describe_non_finite(found)}. Nothing was written. Usually the training diverged: lower "
            "learning_rate (or set max_grad_norm) and train again; if the model you started from already had them, "
            "check it before pruning (all(torch.isfinite(p).all() for p in model.parameters()))."
        )


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse a model that holds NaN/inf in any parameter or buffer, before training starts.

    The save refuses non-finite weights too, but only after the whole run: a NaN/inf in a weight that is not pruned
    (a norm, an embedding) trains to the end first. Call it where the work starts (``ElsaTrainer``)."""
    tensors = dict(model.named_parameters(remove_duplicate=True))
    tensors.update((n, b) for n, b in model.named_buffers() if torch.is_floating_point(b))
    found = non_finite(tensors)
    if found:
        raise ValueError(
            f"{where}: {describe_non_finite(found)} before training: nothing was trained. The model was loaded from a "
            "diverged or damaged checkpoint, or changed after loading; fix or reload it (a finite model passes "
            "all(torch.isfinite(p).all() for p in model.parameters()))."
        )
