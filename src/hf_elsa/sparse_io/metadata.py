"""The sparsity metadata of a checkpoint: ``elsa_config.json`` and the ``elsa_sparsity`` entry of ``config.json``.

Versioned and tolerant of unknown keys (PEFT's convention): keys a newer hf_elsa (or a user) added are kept in
``extra`` and written back, so a load/save round trip never drops them.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..settings import elsa_fields
from ..version import __version__
from . import schema as s

logger = logging.getLogger(__name__)

# 2: the packed masks in elsa_masks.safetensors may be zlib streams (metadata ``codecs``); 1 (read too): raw bits
FORMAT_VERSION = 2
ELSA_CONFIG_NAME = "elsa_config.json"
MASKS_NAME = "elsa_masks.safetensors"
CONFIG_KEY = "elsa_sparsity"  # entry of config.json
CARD_NAME = "README.md"

# What a pruning run records as its hyper-parameters: every ELSA setting (the table in hf_elsa.settings) but
# those recorded at the top level, then the TrainingArguments fields that shape the result, which a
# ``keep_mask`` run records as ``fine_tuning``.
TOP_LEVEL_SETTINGS = ("sparsity", "sparsity_type", "target_modules", "exclude_modules")
TRAINING_HYPERPARAMETERS = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "optim",
    "seed",
)
RECORDED_HYPERPARAMETERS = (
    *(f.name for f in elsa_fields() if f.name not in TOP_LEVEL_SETTINGS),
    *TRAINING_HYPERPARAMETERS,
)


@dataclass
class ElsaSparsityConfig:
    """The sparsity metadata of a checkpoint (``elsa_config.json``).

    Unknown keys (from a newer hf_elsa, or added by the user) are kept in ``extra`` and written back, so a
    load/save round trip never drops them.

    Attributes:
        elsa_format_version: version of this file's layout (``FORMAT_VERSION``).
        hf_elsa_version: the hf_elsa version that wrote the checkpoint.
        format: the save format, ``"dense"`` or ``"compressed"`` (``formats.registered_formats()``).
        method: how the masks were found (``"elsa"``, ``"magnitude"``, ...).
        sparsity: the target sparsity (``1 - N/M`` for N:M patterns).
        sparsity_type: ``"unstructured"``, ``"row"`` or ``"N:M"`` such as ``"2:4"``.
        target_modules / exclude_modules: the module selection that was pruned.
        base_model: Hub id of the dense model the checkpoint was pruned from.
        hyperparameters: the pruning run's settings.
        fine_tuning: settings of a mask-keeping fine-tuning run, when there was one.
        evaluation: ``{"protocol": str, "results": {name: value}}`` when known.
        achieved_sparsity: zeros / weights over the masked tensors, measured at save time.
        tensors: ``{tensor: {"shape": [...], "sparsity": float}}`` measured at save time.
        files: ``{file: {"bytes": int, "sha256": str}}`` of the weight and mask files.
        save_id: id shared by ``config.json``, this file and the mask file of one save (a UUIDv7: time-ordered).
        extra: keys this version does not know.
    """

    elsa_format_version: int = FORMAT_VERSION
    hf_elsa_version: str = ""
    format: str = "dense"
    method: str | None = None
    sparsity: float | None = None
    sparsity_type: str | None = None
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    base_model: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    fine_tuning: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    achieved_sparsity: float | None = None
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    save_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: Any = ELSA_CONFIG_NAME) -> ElsaSparsityConfig:
        """Build from parsed JSON, every known key type-checked (a ``ValueError`` names ``source`` and the key);
        unknown keys go to ``extra`` (with a warning naming them)."""
        checked = s.validate(s.record(SCHEMA), data, source)
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = dict(checked.get("extra") or {})
        unknown = {k: v for k, v in checked.items() if k not in known and k != "extra"}
        if unknown:
            logger.warning(
                "%s: keys unknown to hf_elsa %s are kept but not used: %s", source, __version__, sorted(unknown)
            )
            extra.update(unknown)
        config = cls(**{k: v for k, v in checked.items() if k in known}, extra=extra)
        if config.elsa_format_version > FORMAT_VERSION:
            warnings.warn(
                f"{source} has elsa_format_version={config.elsa_format_version}, newer than this hf_elsa "
                f"({__version__}, version {FORMAT_VERSION}); upgrade hf_elsa if loading fails.",
                stacklevel=3,
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**extra, **data}

    def update(
        self, metadata: Mapping[str, Any] | ElsaSparsityConfig | None, source: Any = "attach_sparsity(metadata=...)"
    ) -> None:
        """Overwrite fields with the non-None values of ``metadata`` (type-checked like ``from_dict``; a
        ``ValueError`` names ``source`` and the key); unknown keys go to ``extra``."""
        if metadata is None:
            return
        if isinstance(metadata, ElsaSparsityConfig):
            self.extra.update(metadata.extra)
            metadata = {f.name: getattr(metadata, f.name) for f in fields(metadata) if f.name != "extra"}
        else:
            metadata = s.validate(s.record(_UPDATE_SCHEMA), metadata, source)
        known = {f.name for f in fields(self)} - {"extra"}
        for key, value in metadata.items():
            if value is None:
                continue
            if key in known:
                setattr(self, key, value)
            elif key == "extra":
                self.extra.update(value)
            else:
                self.extra[key] = value

    def config_entry(self) -> dict[str, Any]:
        """The short summary stored in ``config.json`` under ``elsa_sparsity`` (the format may add a note)."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "sparsity_type": self.sparsity_type,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "achieved_sparsity": self.achieved_sparsity,
            "tensors": {k: v["sparsity"] for k, v in self.tensors.items()},
            "format": self.format,
            "hf_elsa_version": self.hf_elsa_version,
            "elsa_format_version": self.elsa_format_version,
            "save_id": self.save_id,
            "load_with": "hf_elsa.load_sparse_model",
        }


def _shape_list(value: Any) -> list[int]:
    return list(s.shape(value))


def _sha256_hex(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise s.Invalid(f"expected a SHA-256 as 64 lowercase hex digits, got {value!r:.80}")
    return value


def _scalar(value: Any) -> Any:
    if value is not None and not isinstance(value, (str, int, float)):
        raise s.Invalid(f"expected a number or a string, got {value!r:.80}")
    return value


def _text_or_mapping(value: Any) -> Any:
    return value if isinstance(value, str) else s.mapping(value)


_TENSOR = s.record({"shape": _shape_list, "zeros": s.integer, "sparsity": s.fraction}, required=("shape", "sparsity"))
_FILE = s.record({"bytes": s.integer, "sha256": _sha256_hex}, required=("bytes", "sha256"))
_EVALUATION = s.record({"protocol": s.optional(_text_or_mapping), "results": s.optional(s.mapping_of(_scalar))})
# every field of ElsaSparsityConfig and its check: the one place that says what elsa_config.json may hold
SCHEMA: dict[str, s.Check] = {
    "elsa_format_version": s.positive_integer,
    "hf_elsa_version": s.string,
    "format": s.string,
    "method": s.optional(s.string),
    "sparsity": s.optional(s.fraction),
    "sparsity_type": s.optional(s.string),
    "target_modules": s.optional(s.strings),
    "exclude_modules": s.optional(s.strings),
    "base_model": s.optional(s.string),
    "hyperparameters": s.mapping,
    "fine_tuning": s.optional(s.mapping),
    "evaluation": s.optional(_EVALUATION),
    "achieved_sparsity": s.optional(s.fraction),
    "tensors": s.mapping_of(_TENSOR),
    "files": s.mapping_of(_FILE, key_check=s.relative_file),
    "save_id": s.optional(s.string),
    "extra": s.mapping,
}
assert set(SCHEMA) == {f.name for f in fields(ElsaSparsityConfig)}, "every metadata field needs a check"
# attach_sparsity(metadata=...): None means "keep what is attached"
_UPDATE_SCHEMA = {key: s.optional(check) for key, check in SCHEMA.items()}
# the elsa_sparsity entry of config.json: what loading relies on
_CONFIG_JSON = s.record(
    {CONFIG_KEY: s.optional(s.record({"save_id": s.optional(s.string), "format": s.optional(s.string)}))}
)


def config_json_entry(data: Any, source: Any) -> dict[str, Any] | None:
    """The ``elsa_sparsity`` entry of a parsed ``config.json`` (None when absent), type-checked."""
    return s.validate(_CONFIG_JSON, data, source).get(CONFIG_KEY)


def sparsity_metadata(args) -> dict[str, Any]:
    """Metadata of an ``ElsaConfig`` run, for :func:`attach_sparsity`: the fields of ``RECORDED_HYPERPARAMETERS``.

    A ``keep_mask`` run records its optimisation settings (the ``TrainingArguments`` fields among them) as
    ``fine_tuning`` and leaves the pruning fields of an earlier attachment (method, target sparsity) untouched.
    """
    from transformers import TrainingArguments

    from ..projection import pattern_sparsity

    training_fields = {f.name for f in fields(TrainingArguments)}
    values = {key: getattr(args, key, None) for key in RECORDED_HYPERPARAMETERS}
    values = {key: getattr(value, "value", value) for key, value in values.items()}  # enums -> str
    if (values.get("max_steps") or -1) > 0:
        values.pop("num_train_epochs", None)  # max_steps overrides it
    training = {key: value for key, value in values.items() if key in training_fields}
    if getattr(args, "keep_mask", False):
        return {"fine_tuning": {"keep_mask": True, **training}}
    return {
        "method": "elsa",
        "sparsity": pattern_sparsity(args.sparsity_type, args.sparsity),
        "sparsity_type": args.sparsity_type,
        "target_modules": args.target_modules,
        "exclude_modules": args.exclude_modules,
        "hyperparameters": values,
    }
