"""Every place hf_elsa relies on a private or undocumented behaviour of transformers or torch.

transformers ships weekly; each touch point below is one function with the versions it was checked
against, so an upstream change breaks here, in one file, with a test that names it.
Checked: transformers 5.0-5.25 (``version.TRANSFORMERS_REQUIREMENT``, the range setup.py installs), torch 2.13
(2026-12). ``hf_elsa.version.check_transformers_version`` warns once when another transformers is installed anyway.

The known-harmless log lines and warnings of upstream packages are silenced here too, in two dated tables
(:data:`UPSTREAM_NOISE`: a filter on the one logger that emits each; :data:`UPSTREAM_WARNINGS`: a warnings filter).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import warnings

import torch

# -- known-harmless upstream noise ------------------------------------------------------------------------
# (logger, start of the message, when and why it is harmless). A filter drops exactly these records; the
# logger's other records pass. Drop an entry once the upstream release that stops printing it is the minimum.
UPSTREAM_NOISE: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward",
        (
            "2026-12, bitsandbytes 0.50 (imported by peft, which transformers imports when installed): on CPU it "
            "tries to fetch an optional 4-bit kernel from the Hub at import time; hf_elsa runs no 4-bit kernels."
        ),
    ),
    (
        "kernels._internals.hf_hub",
        "Skipping publisher trust check",
        (
            "2026-12, kernels 0.19 with HF_HUB_OFFLINE=1: the same optional bitsandbytes kernel fetch, announced at "
            "import time by every command, --help included."
        ),
    ),
)


# (warning category, start of the message, when and why it is harmless): Python warnings, ignored by a filter.
UPSTREAM_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        "'pin_memory' argument is set as true but no accelerator is found",
        (
            "2026-12, torch 2.13 with transformers 5.25: TrainingArguments.dataloader_pin_memory defaults to True "
            "and every CPU run's DataLoader warns that pinning is skipped; there is nothing to pin to on a CPU."
        ),
    ),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_upstream_noise() -> None:
    """Install the filters of :data:`UPSTREAM_NOISE` (idempotent). Runs on ``import hf_elsa``, before transformers
    imports peft and bitsandbytes; a script that imports transformers' Trainer before hf_elsa gets them anyway."""
    for name, prefix, _ in UPSTREAM_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnownNoise(prefix))
    for category, prefix, _ in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)


# 2026-11, transformers 5.x: the Trainer writes its step counter to this file in every checkpoint folder.
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_step(checkpoint: str | None) -> int | None:
    """``global_step`` recorded in a Trainer checkpoint folder, ``None`` without one (or without the file)."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME) if isinstance(checkpoint, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a readable Trainer state ({error}); the checkpoint is damaged.") from None
    return step if isinstance(step, int) else None


def cached_forward(model, input_ids: torch.Tensor, cache, **kwargs):
    """One forward with a KV cache; returns ``(output, the updated cache)``.

    2026-11, transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns and is
    to be removed in 5.40); earlier 5.x only know ``past_key_values``. The output carries it under the same name.
    """
    name = _cache_keyword(type(model))
    out = model(input_ids, **({name: cache} if cache is not None else {}), use_cache=True, **kwargs)
    return out, out[name]


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # once per class: cached_forward runs inside timed decode steps
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def attention_implementation(model) -> str | None:
    """The attention kernel a transformers model runs (2026-11, transformers 5.x: ``config._attn_implementation``)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def is_dcp_state_init_call(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this ``step()`` is torch.distributed.checkpoint building a fresh optimizer's state.

    2026-11, torch 2.13: ``torch.distributed.checkpoint.state_dict._init_optim_state`` creates the state of an
    optimizer that has none by calling ``step()`` with all-zero gradients and learning rate 0. An ADMM step
    there would move the weights (proximal pull, final projection) after the model was loaded.
    """
    if optimizer.state or any(group.get("lr", 1.0) != 0 for group in optimizer.param_groups):
        return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return all(not bool((g.to_local() if hasattr(g, "to_local") else g).any()) for g in grads)


def prepare_inputs(trainer, inputs: dict) -> dict:
    """Move a batch to the device the way the training loop does (2026-11, transformers 5.x: ``_prepare_inputs``)."""
    return trainer._prepare_inputs(inputs)


def loss_scale(trainer, num_items_in_batch) -> float:
    """The factor ``Trainer.compute_loss`` multiplies the model's loss by (2026-11, transformers 5.x).

    With ``average_tokens_across_devices`` the loss is normalised by the token count of all processes and then
    multiplied back by the number of data-parallel processes; an added loss term must get the same factor.
    """
    if (
        trainer.args.average_tokens_across_devices
        and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func)
        and num_items_in_batch is not None
    ):
        scale = trainer.accelerator.num_processes // trainer.get_tp_size()
        return scale if trainer.args.n_gpu <= 1 else trainer.args.n_gpu
    return 1.0
