"""Predict (and measure) the memory of an ELSA run: ``estimate_memory(model, config)``.

The prediction counts the tensors a training run keeps for its whole length -- weights, gradients, the
base optimizer's state and the ADMM state -- from the model's parameter shapes and dtypes and the
``ElsaConfig``; nothing is allocated, so it works on a model built on the ``meta`` device. Activations
and temporaries (e.g. the dequantized copy of one z while it is read) are not included.

Bytes per prunable weight of the ADMM state (docs/memory.md): z + u, ``4 + 4 = 8`` in float32 and
``1 + 2 = 3`` with ELSA-L (z FP8, u bf16; their per-tensor scales are Python floats, no tensor memory).
The activation-aware projection adds one fp32 vector per layer (``in_features``); after the ADMM
phase z and u are replaced by a boolean keep mask (1 byte per weight).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .curvature import get_estimator
from .states import bytes_per_element
from .targets import find_prunable_modules, is_transposed

# TrainingArguments.optim values whose state layout estimate_memory knows
TORCH_ADAM = ("adamw_torch", "adamw_torch_fused")
BNB_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
BNB_32BIT = ("paged_adamw_32bit", "paged_adamw")
SGD = ("sgd",)
KNOWN_OPTIMS = TORCH_ADAM + BNB_8BIT + BNB_32BIT + SGD
# bitsandbytes keeps tensors smaller than this in 32-bit state, quantizes the others in blocks of 256
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256
BNB_QMAP_BYTES = 2 * 256 * 4  # two 256-entry fp32 code books, shared by all tensors


@dataclass
class MemoryEstimate:
    """Bytes a training run keeps: weights, gradients, base optimizer state and ADMM state.

    ``admm_detail`` breaks the ADMM state down (``z``, ``u``, ``activation_statistics`` during the ADMM
    phase, or ``mask`` for a run that starts with the mask fixed); ``mask`` is the size of the keep masks
    that replace z and u once the mask is fixed. ``total`` is the ADMM phase, the larger of the two.
    """

    optim: str
    z_dtype: str
    u_dtype: str
    parameters: int
    trainable_parameters: int
    prunable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    admm: int
    mask: int
    admm_detail: dict[str, int] = field(default_factory=dict)
    teacher: int = 0  # the frozen dense copy that distillation reads

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.admm + self.teacher

    @property
    def admm_bytes_per_prunable(self) -> float:
        """ADMM state bytes per prunable weight (8 for float32 z and u, 3 for ELSA-L)."""
        return self.admm / max(self.prunable_parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        out["admm_bytes_per_prunable"] = self.admm_bytes_per_prunable
        return out

    def summary(self) -> str:
        n, p = max(self.parameters, 1), max(self.prunable_parameters, 1)
        detail = ", ".join(f"{k} {v / p:.2f}" for k, v in self.admm_detail.items())
        rows = [
            ("weights", self.weights, f"{self.weights / n:.2f} B per parameter"),
            ("gradients", self.gradients, f"{self.gradients / n:.2f} B per parameter"),
            (f"optimizer ({self.optim})", self.optimizer, f"{self.optimizer / n:.2f} B per parameter"),
            ("ADMM state", self.admm, f"{self.admm / p:.2f} B per prunable weight ({detail})"),
            *([("teacher (distillation)", self.teacher, "a frozen copy of the weights")] if self.teacher else []),
            ("total", self.total, ""),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [
            (
                f"{self.parameters:,} parameters ({self.trainable_parameters:,} trained, "
                f"{self.prunable_parameters:,} prunable); z {self.z_dtype}, u {self.u_dtype}"
            )
        ]
        lines += [f"  {name:<{width}}  {_mb(size):>12}  {note}".rstrip() for name, size, note in rows]
        lines.append(
            f"  once the mask is fixed, z and u give way to the keep masks: {_mb(self.mask)} "
            f"({self.mask / p:.2f} B per prunable weight)"
        )
        lines.append("  (activations and temporary buffers are not included)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def optimizer_state_bytes(optim: str, params: list[torch.Tensor], full_precision: frozenset[int] = frozenset()) -> int:
    """Bytes of the state ``TrainingArguments.optim`` keeps for ``params`` (after the first step).

    ``full_precision``: ``id()`` of the parameters an 8-bit optimizer keeps in 32-bit state (the Trainer
    does so for ``nn.Embedding`` weights with bitsandbytes).
    """
    optim = str(getattr(optim, "value", optim))
    if optim in TORCH_ADAM:
        # exp_avg and exp_avg_sq in the parameter's dtype, a 0-dim fp32 step tensor
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)
    if optim in BNB_8BIT:
        total, quantized = 0, False
        for p in params:
            n = p.numel()
            if n < BNB_MIN_8BIT_SIZE or id(p) in full_precision:
                total += 2 * n * 4
            else:
                quantized = True
                total += 2 * n + 2 * math.ceil(n / BNB_BLOCK_SIZE) * 4  # uint8 codes, fp32 absmax per block
        return total + (BNB_QMAP_BYTES if quantized else 0)
    if optim in BNB_32BIT:
        return sum(2 * p.numel() * 4 for p in params)
    if optim in SGD:
        return 0  # Trainer's "sgd" has no momentum, so no state
    raise ValueError(f"estimate_memory does not know the state of optim={optim!r}; it knows {KNOWN_OPTIMS}.")


def estimate_memory(model: nn.Module, config, processes: int = 1) -> MemoryEstimate:
    """Predicted memory of training ``model`` with ``config`` (an ``ElsaConfig``) on each of ``processes``.

    Counts every parameter once (tied weights share storage), gradients and base optimizer state for the
    parameters that require gradients, the ADMM state of the prunable weights chosen by
    ``config.target_modules`` / ``exclude_modules``, and the dense teacher when the run distils. Under FSDP
    (``config.fsdp``) each of the ``processes`` holds 1/N of every one of them, the teacher included (it is sharded
    like the student); under DDP every process holds all of it. The model may live on the ``meta`` device.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    modules = find_prunable_modules(model, config.target_modules, config.exclude_modules, config.sparsity_type)
    prunable = sum(m.weight.numel() for m in modules.values())
    embeddings = frozenset(id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    mask = prunable  # bool keep masks, 1 byte per weight
    if config.keep_mask or config.admm_fraction == 0:
        detail = {"mask": mask}
    else:
        detail = {
            "z": prunable * bytes_per_element(config.admm_z_dtype),
            "u": prunable * bytes_per_element(config.admm_u_dtype),
        }
        estimator = get_estimator(config.importance)
        inputs = sum(m.weight.shape[0 if is_transposed(m) else 1] for m in modules.values())
        if estimator.state_bytes(prunable, inputs):
            detail[f"{estimator.name}_statistics"] = estimator.state_bytes(prunable, inputs)
    estimate = MemoryEstimate(
        optim=str(getattr(config.optim, "value", config.optim)),
        z_dtype=config.admm_z_dtype,
        u_dtype=config.admm_u_dtype,
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in trainable),
        prunable_parameters=prunable,
        weights=sum(p.numel() * p.element_size() for p in params),
        gradients=sum(p.numel() * p.element_size() for p in trainable),
        optimizer=optimizer_state_bytes(config.optim, trainable, embeddings),
        admm=sum(detail.values()),
        mask=mask,
        admm_detail=detail,
        teacher=sum(p.numel() * p.element_size() for p in params) if getattr(config, "distills", False) else 0,
    )
    if not getattr(config, "fsdp", None) or processes <= 1:
        return estimate
    per_process = ("weights", "gradients", "optimizer", "admm", "mask", "teacher")
    shard = {key: -(-getattr(estimate, key) // processes) for key in per_process}  # ceil: uneven shards
    shard["admm_detail"] = {key: -(-value // processes) for key, value in detail.items()}
    return replace(estimate, **shard)


def measure_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the tensors in ``optimizer.state`` now: ``{"admm": elsa_* keys, "optimizer": the rest}``.

    Each storage counts once (bitsandbytes shares its code books between tensors).
    """
    seen: set[int] = set()
    out = {"admm": 0, "optimizer": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to_local() if hasattr(value, "to_local") else value  # FSDP2: this process's shard
            storage = value.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            out["admm" if key.startswith("elsa_") else "optimizer"] += storage.nbytes()
    return out
