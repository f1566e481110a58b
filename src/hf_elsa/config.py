"""``ElsaConfig``: the ELSA settings (``hf_elsa.settings``) on top of ``transformers.TrainingArguments``."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

from transformers import TrainingArguments

from ._messages import shorten
from .curvature import get_estimator
from .settings import RECIPES, ElsaSettings, settings_docstring
from .trainer_inputs import DEFAULT_MAX_LENGTH

# ELSA-L's 8-bit base optimizer: bitsandbytes' AdamW is the one that also runs on CPU (torchao's AdamW8bit
# needs torch.compile per tensor shape; docs/memory.md).
ELSA_L_OPTIM = "adamw_bnb_8bit"
ELSA_L_INSTALL = 'pip install "hf_elsa[elsa-l]"  (or: pip install bitsandbytes)'

_DEFAULT_OPTIM = next(f.default for f in fields(TrainingArguments) if f.name == "optim")
# the package each 8-bit optimizer of TrainingArguments.optim needs (bitsandbytes for the others)
_OPTIM_PACKAGES = {"adamw_torch_8bit": "torchao", "galore_": "galore_torch", "apollo_": "apollo_torch"}


@dataclass
class ElsaConfig(TrainingArguments, ElsaSettings):
    # learning_rate, adam_beta2 and logging_steps below change TrainingArguments' defaults (see the docstring).
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The initial learning rate. Default from recipe (elsa: 1e-3 from 0.7 sparsity up and for N:M, 3e-4 at 0.5; paper 1e-4)."
        },
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "Beta2 for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    # transformers passes find_unused_parameters=True to DDP for any model without activation checkpointing, and
    # torch then warns on every rank that it found none and that the search costs a graph traversal per step:
    # every parameter of a causal LM takes part in each forward. Set True for models whose forward skips some.
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. Default False (transformers: True without checkpointing): every "
            "weight of a causal LM is used in each step; set True for a model whose forward skips parameters "
            "(e.g. mixture-of-experts with unused experts)."
        },
    )

    # -- the model and text ElsaTrainer loads itself: TRL's SFTConfig names (hf_elsa.trainer_inputs) ----------
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of from_pretrained when the trainer's model is a Hub id or folder (a JSON "
            'object on the command line), e.g. {"dtype": "bfloat16"}; the dtype defaults to float32.'
        },
    )
    dataset_text_field: str = field(
        default="text",
        metadata={
            "help": "Column holding the text of a dataset (a 'messages' column is rendered with the chat template).",
            "aliases": ["--text_column"],
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training sequence: the block size of packing, the truncation length without it "
            f"(default {DEFAULT_MAX_LENGTH}, or the model's max_position_embeddings if smaller).",
            "aliases": ["--block_size"],
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "True: the tokenized examples are concatenated and cut into blocks of max_length (no padding; "
            "TRL's default is False). False: one example per row, truncated to max_length and padded (padding "
            "is masked from the loss)."
        },
    )
    # a JSON string (command line, YAML) -> dict, as TrainingArguments does for its own dict fields
    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    def __post_init__(self):
        self.resolve_elsa_settings()
        self._check_data_fields()
        self._check_learning_rate()
        self._resolve_elsa_l_optimizer()
        super().__post_init__()
        self._validate_double_backward()

    def validate(self) -> None:
        """Check every ELSA and TRL field again, as construction does (``ElsaSettings.validate``: ElsaTrainer calls
        this, so a field changed after construction is checked before training)."""
        super().validate()
        self._check_data_fields()
        self._check_learning_rate()
        self._validate_double_backward()

    def _check_learning_rate(self) -> None:
        if (
            not isinstance(self.learning_rate, (int, float))
            or isinstance(self.learning_rate, bool)
            or not (math.isfinite(self.learning_rate) and self.learning_rate >= 0)
        ):
            raise ValueError(
                f"ElsaConfig.learning_rate={shorten(self.learning_rate)} must be a finite number >= 0 (e.g. 1e-3)."
            )

    def _check_data_fields(self) -> None:
        """TRL's names, checked here so that a bad value fails at construction, naming the field."""
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2
        ):
            raise ValueError(
                f"ElsaConfig.max_length={shorten(self.max_length)} must be an integer >= 2 (tokens per sequence)."
            )
        if not isinstance(self.dataset_text_field, str) or not self.dataset_text_field:
            raise ValueError(
                f"ElsaConfig.dataset_text_field={shorten(self.dataset_text_field)} must name a column (e.g. 'text')."
            )
        if not isinstance(self.packing, bool):
            raise ValueError(f"ElsaConfig.packing={shorten(self.packing)} must be True or False.")
        kwargs = self.model_init_kwargs
        if (
            kwargs is not None
            and not isinstance(kwargs, dict)
            and not (isinstance(kwargs, str) and kwargs.startswith("{"))
        ):
            raise ValueError(
                f"ElsaConfig.model_init_kwargs={shorten(kwargs)} must be a dict (a JSON object on the command line), "
                "e.g. "
                '{"dtype": "bfloat16"}.'
            )

    def _resolve_elsa_l_optimizer(self) -> None:
        """ELSA-L picks the 8-bit base optimizer; an explicit optim must be 8-bit and installed."""
        if not self.elsa_l:
            return
        optim = str(getattr(self.optim, "value", self.optim))
        if optim == _DEFAULT_OPTIM:
            self.optim = optim = ELSA_L_OPTIM
        elif "8bit" not in optim:
            raise ValueError(
                f"ElsaConfig.elsa_l=True uses an 8-bit base optimizer, but optim={shorten(optim)} is not one: leave "
                "optim "
                f"unset ({ELSA_L_OPTIM!r}), use another 8-bit one (e.g. 'adamw_torch_8bit'), or set elsa_l=False."
            )
        package = next((pkg for prefix, pkg in _OPTIM_PACKAGES.items() if optim.startswith(prefix)), "bitsandbytes")
        if importlib.util.find_spec(package) is None:
            install = ELSA_L_INSTALL if package == "bitsandbytes" else f"pip install {package}"
            raise ValueError(f"ElsaConfig.elsa_l=True uses optim={shorten(optim)}, which needs {package}: {install}.")
        if package == "bitsandbytes" and self.importance == "adam":
            raise ValueError(
                f"ElsaConfig.importance='adam' reads Adam's exp_avg_sq, which optim={shorten(optim)} keeps quantized "
                "under "
                "another name: use importance='activation' or 'magnitude' with elsa_l=True."
            )

    def _validate_double_backward(self) -> None:
        """Hutchinson (importance or Sassha) needs a double backward: refuse setups that cannot do one.

        Runs after ``TrainingArguments.__post_init__``, which resolves the checkpointing aliases."""
        users = []
        if get_estimator(self.importance).needs_double_backward:
            users.append(f"importance={self.importance!r}")
        if self.base_optimizer == "sassha":
            users.append("base_optimizer='sassha'")
        if not users:
            return
        what = " and ".join(users)
        if self.torch_compile:
            raise ValueError(
                f"ElsaConfig.{what} needs a double backward (Hessian-vector products), which torch.compile does not "
                "support: set torch_compile=False, or use importance='fisher' with the Trainer's optimizer."
            )
        if self.fsdp:
            raise ValueError(
                f"ElsaConfig.{what} needs a double backward, which FSDP does not run with its default resharding: "
                "hf_elsa supports it on one process or under DDP. Use importance='fisher' or 'activation' with FSDP."
            )
        checkpointing = getattr(self, "activation_checkpointing", None) or self.gradient_checkpointing
        kwargs = getattr(self, "activation_checkpointing_kwargs", None) or self.gradient_checkpointing_kwargs or {}
        if checkpointing and isinstance(kwargs, dict) and kwargs.get("use_reentrant", False):
            raise ValueError(
                f"ElsaConfig.{what} needs a double backward, which reentrant gradient checkpointing does not "
                "support: drop use_reentrant=True from activation_checkpointing_kwargs (non-reentrant is the default)."
            )


def _recipe_table() -> str:
    names = list(RECIPES)
    rows = [f"        | field | {' | '.join(repr(n) for n in names)} |", f"        |---|{'---|' * len(names)}"]
    for key in RECIPES[names[0]]:
        rows.append(f"        | `{key}` | {' | '.join(repr(RECIPES[n][key]) for n in names)} |")
    return "\n".join(rows)


ElsaConfig.__doc__ = f"""
    Configuration for [`ElsaTrainer`]: every `TrainingArguments` field plus the ELSA fields below, which are
    declared once in `hf_elsa.settings.ElsaSettings` (this text and `--help` are generated from that table).

    Changed `TrainingArguments` defaults: `learning_rate` from the recipe (was 5e-5; for `"elsa"` 1e-3 from 70%
    sparsity up and for N:M, 3e-4 at 50%, measured on SmolLM2-135M at short budgets with distillation; the paper
    used 1e-4 to 2e-4 for 7B models, see docs/quality.md), `adam_beta2=0.95` (was 0.999, the paper's Adam betas are (0.9, 0.95)), `logging_steps=10`
    (was 500), `ddp_find_unused_parameters=False` (was None, which DDP turns into a per-step search and a warning
    per rank; set True for a model whose forward skips parameters).

    TRL's `SFTConfig` names, for what `ElsaTrainer` loads itself: `model_init_kwargs` (from_pretrained keyword
    arguments when `model` is a Hub id or folder; float32 unless it sets `dtype`), `dataset_text_field` (default
    `"text"`; a `messages` column is rendered with the chat template), `max_length` (tokens per sequence; default
    1024, or the model's `max_position_embeddings` if smaller) and `packing` (default True, TRL's is False: the
    examples are concatenated and cut into blocks; False: one example per row, truncated and padded, the padding
    masked from the loss).

    Recipe-resolved defaults (fields left unset take the column of `recipe`):

{_recipe_table()}

    Parameters:

{settings_docstring()}"""
