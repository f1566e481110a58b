"""The steps of a ``hf-elsa prune``/``eval`` run: load the model and the text, cut the blocks, prune (ELSA or a
one-shot method), evaluate, save (:func:`run_prune`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..data import TextSplit, token_blocks
from ..loading import (
    check_tokenizer_source,
    load_model,
    load_tokenizer,
    looks_like_path,
)
from ..oneshot import PRUNERS
from .arguments import DataArguments, ModelArguments, RunArguments

# -- model ------------------------------------------------------------------------------------------


def load_model_and_tokenizer(model_args: ModelArguments, model_init_kwargs: dict | None = None):
    """The model (in ``--dtype``) and its tokenizer; the embedded SmolLM2 when no model is named.

    ``model_init_kwargs`` (``ElsaConfig.model_init_kwargs``): more ``from_pretrained`` keyword arguments."""
    kwargs = {**(model_init_kwargs or {}), **model_args.from_pretrained_kwargs()}
    name = model_args.model_name_or_path
    tok_name = model_args.tokenizer_name_or_path
    if tok_name is not None and looks_like_path(tok_name) and not os.path.isdir(os.path.expanduser(tok_name)):
        raise FileNotFoundError(f"--tokenizer_name_or_path {tok_name}: folder not found.")
    if name is None:
        from ..showcase.demo import load_smollm2

        dtype = kwargs["dtype"] if kwargs["dtype"] != "auto" else torch.float32
        model, tokenizer = load_smollm2(dtype)
    else:
        if tok_name is None:
            check_tokenizer_source(name)  # before the (slow) model load
        model = load_model(name, **kwargs)
        tokenizer = None
    if tok_name is not None:
        tokenizer = load_tokenizer(tok_name, "--tokenizer_name_or_path", trust_remote_code=model_args.trust_remote_code)
    elif tokenizer is None:
        tokenizer = load_tokenizer(name, trust_remote_code=model_args.trust_remote_code)
    return model, tokenizer


# -- data -------------------------------------------------------------------------------------------


def _has_dataset(data: DataArguments) -> bool:
    return bool(data.dataset_name or data.data_files)


def load_text(data: DataArguments, tokenizer, purpose: str = "prune") -> TextSplit:
    """Token streams for ``purpose``: ``"prune"`` (train + held-out) or ``"eval"`` (exactly the text given).

    ``eval``: every text file, or the chosen split (``--dataset_split``, default the only split or
    ``"test"``), or the embedded sample's held-out articles -- nothing is held back or sampled.
    ``prune``: the training split (default ``"train"``), held-out text from ``--eval_split`` or
    ``--eval_fraction`` (see :func:`hf_elsa.data.split_text`).
    """
    from ..data import load_documents, split_text, tokenize_documents

    source = {"text_files": data.text_files, "dataset": data.dataset_name, "dataset_config": data.dataset_config,
              "text_column": data.dataset_text_field, "data_files": data.data_files}  # fmt: skip
    if purpose == "eval":
        if data.text_files or _has_dataset(data):
            documents = load_documents(**source, split=data.dataset_split)
            what = f"{len(data.text_files)} file(s)" if data.text_files else _split_name(data, data.dataset_split)
        else:
            from ..showcase.demo import wikipedia_split

            documents = wikipedia_split(0)[1]
            what = "the embedded Wikipedia sample's held-out articles"
        return TextSplit(torch.empty(0, dtype=torch.long), tokenize_documents(documents, tokenizer), what)
    if data.text_files or _has_dataset(data):
        documents = load_documents(**source, split=data.dataset_split or "train")
    else:
        from ..showcase.demo import wikipedia_sample

        documents = wikipedia_sample()
    eval_documents = None
    if data.eval_split is not None:
        if not _has_dataset(data):
            raise ValueError("--eval_split needs a dataset (--dataset_name / --data_files).")
        eval_documents = load_documents(**source, split=data.eval_split)
    if not documents:
        raise ValueError("the training text is empty.")
    return split_text(documents, tokenizer, eval_fraction=data.eval_fraction, seed=0, eval_documents=eval_documents)


def _split_name(data: DataArguments, split: str | None) -> str:
    name = data.dataset_name or ",".join(data.data_files or [])
    return f"{name}" + (f" ({data.dataset_config})" if data.dataset_config else "") + f", split {split or 'default'}"


def block_length(data: DataArguments, model=None) -> int:
    """``--max_length``, or (unset) 1024 cut to the model's ``max_position_embeddings``, as ElsaTrainer does."""
    from ..trainer_inputs import DEFAULT_MAX_LENGTH, default_max_length

    if data.block_size is not None:
        return data.block_size
    return default_max_length(model) if model is not None else DEFAULT_MAX_LENGTH


def train_blocks(text: TextSplit, data: DataArguments, seed: int = 0, model=None):
    n, size = text.train.numel(), block_length(data, model)
    if n < size:
        raise ValueError(
            f"the training text has {n} tokens, fewer than --max_length {size}: pass more text or a smaller "
            "--max_length (alias --block_size)."
        )
    return token_blocks(text.train, block_size=size, num_blocks=data.num_blocks, seed=seed)


@dataclass
class EvalWindows:
    """The held-out windows: ``ids`` cut into ``windows`` non-overlapping windows of ``seqlen`` tokens."""

    ids: torch.Tensor
    seqlen: int
    windows: int
    note: str = ""

    def dataset(self):
        return token_blocks(self.ids[: self.windows * self.seqlen], block_size=self.seqlen)

    def protocol(self, source: str) -> str:
        windows = f"{self.windows} non-overlapping {self.seqlen}-token window" + ("s" if self.windows != 1 else "")
        return f"token perplexity on {windows} of {source}"


def eval_windows(ids: torch.Tensor | None, data: DataArguments, model=None) -> EvalWindows | None:
    """Windows of ``--eval_seqlen`` tokens (the first ``--eval_windows``); a shorter text is one window.

    ``model``: windows are cut to its ``max_position_embeddings`` when that is shorter (with a note)."""
    if ids is None or ids.numel() == 0:
        return None
    seqlen, note = data.eval_seqlen, ""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 1 < limit < seqlen:
        seqlen = limit
        note = f"--eval_seqlen {data.eval_seqlen} is longer than the model's {limit} positions: windows of {limit}"
    if ids.numel() < seqlen:
        if ids.numel() < 2:
            raise ValueError(f"the evaluation text has {ids.numel()} token(s): too few to score.")
        note = f"the evaluation text has {ids.numel()} tokens, fewer than a {seqlen}-token window: one window"
        seqlen = ids.numel()
    windows = ids.numel() // seqlen
    if data.eval_windows is not None:
        windows = min(windows, data.eval_windows)
    return EvalWindows(ids, seqlen, windows, note)


# -- the prune run ----------------------------------------------------------------------------------


def record_evaluation(
    model, ppl: float, protocol: str, dense: float | None = None, training_data: str | None = None
) -> None:
    """Put the held-out perplexity (and the dense model's on the same windows) into the sparsity metadata
    (``elsa_config.json`` and the model card), with what the model was trained on when given."""
    from .. import sparse_io

    if sparse_io.get_sparsity(model) is not None:
        results = {"perplexity": round(ppl, 4)}
        if dense is not None:
            results["dense_perplexity"] = round(dense, 4)
        spec = {"description": protocol, "training_data": training_data} if training_data else protocol
        sparse_io.record_evaluation(model, results, spec)


def describe_training_data(data: DataArguments, text: TextSplit, blocks: int, block_size: int) -> str:
    """One sentence for the model card: where the text came from, what was held out, what was trained on."""
    if data.text_files:
        source = f"{len(data.text_files)} text file(s)"
    elif _has_dataset(data):
        source = _split_name(data, data.dataset_split or "train")
    else:
        source = "the embedded Wikipedia sample (gensim's test dump of English Wikipedia articles)"
    return f"{source}; {text.how}; {blocks} training blocks of {block_size} tokens"


def source_dtype(model_args: ModelArguments) -> torch.dtype:
    """The dtype the model came in: its ``config.json``'s (read without loading weights); float32 when it does not
    say, and for the embedded SmolLM2 (dequantized from GGUF to float32)."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    if name is None:
        return torch.float32
    kwargs = {"trust_remote_code": True} if model_args.trust_remote_code else {}
    if model_args.model_revision:
        kwargs["revision"] = model_args.model_revision
    recorded = getattr(AutoConfig.from_pretrained(os.path.expanduser(name), **kwargs), "dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def cast_for_saving(model, run: RunArguments, model_args: ModelArguments) -> torch.dtype:
    """Cast the trained model to ``--save_dtype`` (``auto``: the dtype it came in) before it is written.

    The zeros stay exact in any float dtype; float16's range is checked (a weight beyond it would become inf)."""
    dtype = source_dtype(model_args) if run.save_dtype == "auto" else getattr(torch, run.save_dtype)
    if dtype == torch.float16:
        big = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
        if big > torch.finfo(torch.float16).max:
            raise ValueError(
                f"--save_dtype float16: a weight of magnitude {big:.3g} exceeds float16's range; use --save_dtype "
                "bfloat16 or float32."
            )
    model.to(dtype)
    return dtype


def save_compressed(trainer) -> None:
    """Re-save ``output_dir`` in the compressed format, on the main process (after ``trainer.save_model()``)."""
    from ..sparse_io import load_sparse_model

    if not trainer.is_world_process_zero():
        return
    out = trainer.args.output_dir
    if trainer.args.world_size == 1:
        trainer.model.save_pretrained(out, compressed=True)
    else:  # the weights may be sharded: read the dense folder just written
        load_sparse_model(out, dtype="auto").save_pretrained(out, compressed=True)


@dataclass
class PruneResult:
    output_dir: str
    method: str
    perplexity: float | None
    protocol: str | None
    notes: list[str]
    dense_perplexity: float | None = None  # the model before pruning, on the same windows
    save_dtype: str | None = None


def _check_cli_data_options(config, run: RunArguments | None = None) -> None:
    if run is not None and run.method != "elsa" and config.world_size > 1:
        raise ValueError(
            f"--method {run.method}: one-shot pruning runs on one process (every process would prune and save the "
            "same model); run it without accelerate launch / torchrun."
        )
    if not config.packing:
        raise ValueError(
            "--packing false: hf-elsa prune cuts the token stream of the text into --max_length blocks (packing); "
            "for one example per row, pass a text dataset to ElsaTrainer with ElsaConfig(packing=False)."
        )
    own = {"dtype", "torch_dtype", "attn_implementation", "revision", "trust_remote_code"}
    clash = sorted(own & set(config.model_init_kwargs or {}))
    if clash:
        raise ValueError(
            f"--model_init_kwargs {clash}: the command line has its own options for these (--dtype, "
            "--attn_implementation, --model_revision, --trust_remote_code); use them instead."
        )


def run_prune(model_args: ModelArguments, data: DataArguments, run: RunArguments, config, log=print) -> PruneResult:
    """Load, prune (ELSA or a one-shot baseline), evaluate on the held-out text, then save masks and card.

    The evaluation runs before the save, so its result lands in ``elsa_config.json`` and the model card; the dense
    model is scored first on the same windows. The weights are written in ``--save_dtype``.
    """
    _check_cli_data_options(config, run)
    model, tokenizer = load_model_and_tokenizer(model_args, config.model_init_kwargs)
    text = load_text(data, tokenizer, "prune")
    train = train_blocks(text, data, seed=config.seed, model=model)
    held = eval_windows(text.eval, data, model)
    notes = [f"data: {text.how}"] + ([held.note] if held is not None and held.note else [])
    protocol = held.protocol(f"held-out text ({text.how})") if held is not None else None
    dense = None
    if held is not None:
        from ..evaluation import perplexity

        model.to(config.device)
        dense = perplexity(model, text=held.ids, seqlen=held.seqlen, max_windows=held.windows)
    saving = Saving(dense, model_args, describe_training_data(data, text, len(train), block_length(data, model)))
    if run.method == "elsa":
        ppl = _prune_elsa(model, tokenizer, train, held, protocol, run, config, saving)
    else:
        ppl = _prune_oneshot(model, tokenizer, train, held, protocol, data, run, config, saving)
    return PruneResult(config.output_dir, run.method, ppl, protocol, notes, dense, str(saving.dtype).split(".")[-1])


@dataclass
class Saving:
    """What the save step needs besides the run: the dense score to record, the source for ``--save_dtype auto``."""

    dense_perplexity: float | None
    model_args: ModelArguments
    training_data: str
    dtype: torch.dtype | None = None  # set when the weights are cast


def _fill_base_model(model) -> None:
    """The card names the dense model: the Hub id, or what the source folder records (sparse_io.card)."""
    from ..sparse_io import get_sparsity
    from ..sparse_io.card import fill_base_model

    if get_sparsity(model) is not None:
        fill_base_model(model)


def _prune_elsa(model, tokenizer, train, held, protocol, run: RunArguments, config, saving: Saving) -> float | None:
    from ..trainer import ElsaTrainer

    trainer = ElsaTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=held.dataset() if held is not None else None,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    ppl = None
    if held is not None:
        ppl = trainer.evaluate()["eval_perplexity"]
        record_evaluation(trainer.model, ppl, protocol, saving.dense_perplexity, saving.training_data)
    _fill_base_model(trainer.model)
    saving.dtype = cast_for_saving(trainer.model, run, saving.model_args)
    trainer.save_model()
    if run.compressed:
        save_compressed(trainer)
    return ppl


def _prune_oneshot(
    model, tokenizer, train, held, protocol, data: DataArguments, run: RunArguments, config, saving: Saving
):
    from ..evaluation import perplexity
    from ..projection import pattern_sparsity
    from ..sparse_io import attach_sparsity

    model.to(config.device)
    pruner = PRUNERS.get(run.method)
    kwargs: dict[str, Any] = {}
    if pruner.requires_calibration:
        count = min(data.calibration_samples, len(train))
        kwargs = {"calibration": train[:count]["input_ids"], "progress": not config.disable_tqdm}
    torch.manual_seed(config.seed)
    masks = pruner(
        model,
        sparsity=config.sparsity,
        sparsity_type=config.sparsity_type,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        **kwargs,
    )
    hyper = {"block_size": block_length(data, model), "seed": config.seed}
    if pruner.requires_calibration:
        hyper["calibration_samples"] = len(kwargs["calibration"])
    attach_sparsity(
        model,
        masks,
        {
            "method": run.method,
            "sparsity": pattern_sparsity(config.sparsity_type, config.sparsity),
            "sparsity_type": config.sparsity_type,
            "target_modules": config.target_modules,
            "exclude_modules": config.exclude_modules,
            "hyperparameters": hyper,
        },
    )
    ppl = None
    if held is not None:
        ppl = perplexity(model, text=held.ids, seqlen=held.seqlen, max_windows=held.windows)
        record_evaluation(model, ppl, protocol, saving.dense_perplexity, saving.training_data)
    _fill_base_model(model)
    saving.dtype = cast_for_saving(model, run, saving.model_args)
    model.save_pretrained(config.output_dir, compressed=run.compressed)
    tokenizer.save_pretrained(config.output_dir)
    return ppl
