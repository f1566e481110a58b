"""What ``ElsaTrainer`` accepts besides a built model and token blocks: TRL's habits, checked up front.

- ``model="org/name"`` or a folder: loaded with ``AutoModelForCausalLM.from_pretrained`` (an hf_elsa sparse
  folder with ``load_sparse_model``, masks included) in **float32** unless ``model_init_kwargs`` says otherwise
  (``{"dtype": "bfloat16"}``, ``attn_implementation``, ...). float32 because the pruning run keeps master
  weights: ``bf16=True`` / ``fp16=True`` then train with autocast, as the Trainer does for any model. The
  tokenizer comes from the same id when ``processing_class`` is not given.
- ``peft_config=``: the model is wrapped with ``peft.get_peft_model`` (LoRA on a sparse model, see
  :mod:`hf_elsa.lora`).
- a dataset with a raw ``text`` column (``dataset_text_field``) or chat ``messages`` is tokenized (chat through
  the tokenizer's chat template) and packed into blocks of ``max_length`` tokens (default: 1024, or the
  model's ``max_position_embeddings`` if smaller); with ``packing=False`` one example per row, truncated to
  ``max_length`` and padded, the padding masked from the loss -- needs ``processing_class``.

``model_init_kwargs``, ``max_length``, ``dataset_text_field`` and ``packing`` are ``ElsaConfig`` fields, as in
TRL's ``SFTConfig``. The ``ElsaTrainer`` keyword arguments of the same names still work, with a FutureWarning.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from ._logging import get_logger

logger = get_logger(__name__)

DEFAULT_MAX_LENGTH = 1024


# TRL's SFTConfig names, ElsaConfig fields; ElsaTrainer(max_length=...) was the way before they were
TRL_FIELDS = ("model_init_kwargs", "max_length", "dataset_text_field", "packing")


def _option(kwargs: dict, args, name: str, default=None):
    """``args.<name>``; the old ``ElsaTrainer(<name>=...)`` keyword wins, with a FutureWarning naming the field."""
    value = kwargs.pop(name, None)
    if value is not None:
        warnings.warn(
            f"ElsaTrainer({name}=...) is deprecated: set ElsaConfig({name}=...) instead, as in TRL's SFTConfig.",
            FutureWarning,
            stacklevel=4,
        )
    else:
        value = getattr(args, name, None)
    return default if value is None else value


def load_model_from_id(model_id: str, model_init_kwargs: dict | None = None):
    """A causal LM from a Hub id or folder, float32 unless ``model_init_kwargs["dtype"]`` is set."""
    from .loading import load_model

    kwargs = dict(model_init_kwargs or {})
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "float32"))
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"model_init_kwargs dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16').")
        dtype = getattr(torch, dtype)
    return load_model(model_id, dtype=dtype, **kwargs)


def prepare_trainer_inputs(model, args, kwargs: dict):
    """Resolve a model id, ``peft_config`` and text/chat datasets; returns the model, updates ``kwargs``."""
    model_init_kwargs = _option(kwargs, args, "model_init_kwargs", {})
    max_length = _option(kwargs, args, "max_length")
    text_field = _option(kwargs, args, "dataset_text_field", "text")
    packing = _option(kwargs, args, "packing", True)
    peft_config = kwargs.pop("peft_config", None)
    if isinstance(model, (str, os.PathLike)):
        model_id = os.fspath(model)
        model = load_model_from_id(model_id, model_init_kwargs)
        if kwargs.get("processing_class") is None:
            from .loading import load_tokenizer

            kwargs["processing_class"] = load_tokenizer(model_id, "model")
    elif model_init_kwargs:
        warnings.warn("ElsaTrainer: model_init_kwargs is ignored, the model is already built.", stacklevel=3)
    if model is None:
        raise ValueError("ElsaTrainer needs a model (a transformers causal LM, a Hub id or a folder).")
    if peft_config is not None:
        from .lora import apply_peft_config

        model = apply_peft_config(model, peft_config)
    tokenizer = kwargs.get("processing_class")
    block_size = max_length or default_max_length(model)
    for key in ("train_dataset", "eval_dataset"):
        if kwargs.get(key) is not None:
            kwargs[key] = prepare_dataset(kwargs[key], tokenizer, block_size, text_field, key, packing=packing)
    return model


def default_max_length(model: nn.Module) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(DEFAULT_MAX_LENGTH, limit) if isinstance(limit, int) and limit > 1 else DEFAULT_MAX_LENGTH


def prepare_dataset(
    dataset, tokenizer, block_size: int, text_field: str = "text", name: str = "train_dataset", packing: bool = True
):
    """Token blocks as they are; a ``text_field`` or ``messages`` column tokenized and packed (TRL's habit), or
    one example per row with ``packing=False``."""
    from .data import pack_text_dataset

    if isinstance(dataset, dict):
        return {
            k: prepare_dataset(v, tokenizer, block_size, text_field, f"{name}[{k!r}]", packing)
            for k, v in dataset.items()
        }
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "features") and hasattr(dataset, "map"):  # IterableDataset, no features
        columns = list(next(iter(dataset), {}))
    if isinstance(columns, dict):  # a DatasetDict
        raise ValueError(f"{name} is a DatasetDict with the splits {list(columns)}: pass one split, e.g. ds['train'].")
    if not columns or "input_ids" in columns:
        return dataset
    if text_field not in columns and "messages" not in columns:
        raise ValueError(
            f"{name} has the columns {columns}: ElsaTrainer needs 'input_ids' (token blocks, e.g. "
            f"hf_elsa.data.token_blocks), a {text_field!r} text column (ElsaConfig(dataset_text_field=...)) or a "
            "'messages' "
            "chat column."
        )
    column = text_field if text_field in columns else "messages"
    if tokenizer is None:
        raise ValueError(
            f"{name} has a {column!r} column: pass processing_class=tokenizer so that ElsaTrainer tokenizes and packs "
            "it into blocks, or pass token blocks (hf_elsa.data.token_blocks)."
        )
    if not packing:
        rows = pad_text_dataset(dataset, tokenizer, block_size, column, chat=column != text_field)
        logger.info("%s: the %r column tokenized, one example per row of %d tokens (padded)", name, column, block_size)
        return rows
    packed = pack_text_dataset(dataset, tokenizer, block_size, text_field=text_field)
    logger.info("%s: the %r column tokenized and packed into blocks of %d tokens", name, column, block_size)
    return packed


def pad_text_dataset(dataset, tokenizer, max_length: int, column: str, chat: bool = False):
    """``packing=False``: each example (chat rendered with the template) tokenized with EOS, truncated to
    ``max_length`` and right-padded to it; ``attention_mask`` 0 and ``labels`` -100 on the padding.

    Every row has the same length, so the default collator and the SparseGPT/Wanda calibration (which stacks
    training rows) take them as they take packed blocks; the calibration then also sees the pad tokens."""
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The dataset has a 'messages' column but the tokenizer has no chat template to render it.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def rows(batch):
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for value in batch[column]:
            text = tokenizer.apply_chat_template(value, tokenize=False) if chat else value
            ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + eos)[:max_length] if text else []
            if not ids:
                continue  # an empty example would be a row of padding with no token to learn
            fill = max_length - len(ids)
            out["input_ids"].append(ids + [pad] * fill)
            out["attention_mask"].append([1] * len(ids) + [0] * fill)
            out["labels"].append(ids + [-100] * fill)
        return out

    columns = list(getattr(dataset, "column_names", None) or next(iter(dataset), {}))
    padded = dataset.map(rows, batched=True, remove_columns=columns)
    if hasattr(padded, "__len__") and len(padded) == 0:
        raise ValueError(f"the {column!r} column holds no text to train on (every example is empty).")
    return padded.with_format("torch") if hasattr(padded, "with_format") else padded


def frozen_weights_message(model: nn.Module, frozen: list[str]) -> str:
    """The error for prunable weights with ``requires_grad=False`` in a model without PEFT adapters."""
    from .lora import has_injected_adapters

    if has_injected_adapters(model):
        return (
            "The model has adapter layers injected into it (model.add_adapter) and frozen base weights: ElsaTrainer "
            "fine-tunes adapters on a sparse model when it gets a peft.PeftModel -- wrap it with "
            "peft.get_peft_model(model, config), or pass peft_config= to ElsaTrainer."
        )
    return (
        f"{len(frozen)} prunable weights are frozen (requires_grad=False), e.g. {frozen[:3]}: ELSA prunes a weight by "
        "training it. Unfreeze them (weight.requires_grad_(True)), or leave them dense with "
        "ElsaConfig(exclude_modules=[...]). To train LoRA adapters on an already sparse model, pass a peft.PeftModel "
        "(or peft_config=)."
    )


def planned_steps(args, train_dataset) -> int | None:
    """Optimizer steps the Trainer will run (``max_steps``, or epochs x batches), None when unknown."""
    if args.max_steps > 0:
        return args.max_steps
    try:
        n = len(train_dataset)
    except TypeError:
        return None
    batches = math.ceil(n / max(args.per_device_train_batch_size * max(args.world_size, 1), 1))
    if args.dataloader_drop_last:
        batches = n // max(args.per_device_train_batch_size * max(args.world_size, 1), 1)
    per_epoch = max(batches // max(args.gradient_accumulation_steps, 1), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def warn_short_budget(args, train_dataset) -> None:
    """Warn when the run is too short for any ADMM step (``round(admm_fraction * steps) == 0``)."""
    if args.keep_mask or not args.admm_fraction or train_dataset is None:
        return
    total = planned_steps(args, train_dataset)
    if total is None or round(args.admm_fraction * total) > 0:
        return
    need = math.ceil(0.5 / args.admm_fraction + 1e-9)
    how = "by magnitude" if args.admm_init == "magnitude" else f"by the {args.admm_init} warm start"
    warnings.warn(
        f"ElsaConfig: {total} optimizer step(s) with admm_fraction={args.admm_fraction} leave "
        f"round({args.admm_fraction} x {total}) = 0 ADMM steps: ELSA does not run, the weights are pruned {how} "
        f"at step 0 and only fine-tuned with that mask. Run at least {need} steps for one ADMM step (hundreds for "
        "ELSA's quality, docs/convergence.md), raise admm_fraction, or set admm_fraction=0 (recipe='oneshot_kd') "
        "to ask for masked fine-tuning on purpose.",
        UserWarning,
        stacklevel=3,
    )
