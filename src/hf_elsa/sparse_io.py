"""Sparse checkpoints: masks and sparsity metadata that travel with a model (docs/checkpoints.md).

``attach_sparsity(model, masks, metadata)`` records the keep-masks of a pruned model on the instance and
patches its ``save_pretrained`` / ``push_to_hub`` so that a save writes, next to the usual files:

- ``config.json`` with an ``elsa_sparsity`` entry (method, target and achieved sparsity, pattern, targets,
  hf_elsa version);
- ``elsa_config.json``: versioned metadata that tolerates unknown keys (PEFT's convention), with the size
  and SHA-256 of every weight file, so a truncated, corrupted or foreign-rewritten file is caught on load;
- ``elsa_masks.safetensors``: one bit per weight (numpy ``packbits``, little bit order), each packed mask
  entropy-coded with ``zlib`` (Huffman only) when that makes it smaller; shapes and codecs recorded;
- ``README.md``: a model card (``huggingface_hub.ModelCard``).

Two formats. ``"dense"`` (default): a standard folder with exact zeros that plain
``AutoModelForCausalLM.from_pretrained`` loads. ``"compressed"`` (``save_pretrained(dir, compressed=True)``):
``elsa_compressed.safetensors`` holds every pruned tensor as its kept values only (model dtype) -- with the
coded mask that is about ``(1 - s) * itemsize + H(s) / 8`` bytes per weight, ``H`` the binary entropy
(0.47 bit at s = 0.9) -- and every other tensor dense. Plain
``from_pretrained`` cannot read it (there is no ``model.safetensors``, so it fails loudly);
:func:`load_sparse_model` reads both.

Saves are atomic: everything is written into a temporary sibling folder and moved into place with
``config.json`` last, so an interrupted save leaves either the old folder or one without ``config.json``
-- never a folder that loads as a wrong model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import types
import uuid
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

# 2: the packed masks in elsa_masks.safetensors may be zlib streams (metadata ``codecs``); 1 (read too): raw bits
FORMAT_VERSION = 2
MASK_CODECS = ("none", "zlib")
FORMATS = ("dense", "compressed")
ELSA_CONFIG_NAME = "elsa_config.json"
MASKS_NAME = "elsa_masks.safetensors"
COMPRESSED_NAME = "elsa_compressed.safetensors"
CONFIG_KEY = "elsa_sparsity"  # entry of config.json
CARD_NAME = "README.md"
_PENDING_CONFIG = ".config.json.pending"  # config.json of a save in progress: the folder does not load yet
_TMP_PREFIX = ".hf_elsa_tmp-"
_CARD_START, _CARD_END = "<!-- hf_elsa:start -->", "<!-- hf_elsa:end -->"
# Weight files of an earlier save that a new save into the same folder must remove: left behind, plain
# from_pretrained could pick them up (e.g. a stale model.safetensors next to a compressed save).
_WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "elsa_*.safetensors",
    ELSA_CONFIG_NAME,
)
_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "tags")
_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only")
COMPRESSED_NOTE = (
    "compressed hf_elsa checkpoint: load it with hf_elsa.load_sparse_model(path_or_repo_id); "
    "transformers' from_pretrained cannot read it"
)


def _version() -> str:
    from . import __version__

    return __version__


# -- metadata ---------------------------------------------------------------------------------------


@dataclass
class ElsaSparsityConfig:
    """The sparsity metadata of a checkpoint (``elsa_config.json``).

    Unknown keys (from a newer hf_elsa, or added by the user) are kept in ``extra`` and written back, so a
    load/save round trip never drops them.

    Attributes:
        elsa_format_version: version of this file's layout (``FORMAT_VERSION``).
        hf_elsa_version: the hf_elsa version that wrote the checkpoint.
        format: ``"dense"`` or ``"compressed"``.
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
        save_id: random id shared by ``config.json``, this file and the mask file of one save.
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
    def from_dict(cls, data: Mapping[str, Any], source: str = ELSA_CONFIG_NAME) -> ElsaSparsityConfig:
        """Build from a dict; unknown keys go to ``extra`` (with a warning naming them)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = dict(data.get("extra") or {})
        unknown = {k: v for k, v in data.items() if k not in known and k != "extra"}
        if unknown:
            logger.warning(
                "%s: keys unknown to hf_elsa %s are kept but not used: %s", source, _version(), sorted(unknown)
            )
            extra.update(unknown)
        config = cls(**{k: v for k, v in data.items() if k in known}, extra=extra)
        if isinstance(config.elsa_format_version, int) and config.elsa_format_version > FORMAT_VERSION:
            warnings.warn(
                f"{source} has elsa_format_version={config.elsa_format_version}, newer than this hf_elsa "
                f"({_version()}, version {FORMAT_VERSION}); upgrade hf_elsa if loading fails.",
                stacklevel=3,
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**extra, **data}

    def update(self, metadata: Mapping[str, Any] | ElsaSparsityConfig | None) -> None:
        """Overwrite fields with the non-None values of ``metadata``; unknown keys go to ``extra``."""
        if metadata is None:
            return
        if isinstance(metadata, ElsaSparsityConfig):
            self.extra.update(metadata.extra)
            metadata = {f.name: getattr(metadata, f.name) for f in fields(metadata) if f.name != "extra"}
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
        """The short summary stored in ``config.json`` under ``elsa_sparsity``."""
        entry = {
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
        if self.format == "compressed":
            entry["note"] = COMPRESSED_NOTE
        return entry


def sparsity_metadata(args) -> dict[str, Any]:
    """Metadata of an ``ElsaConfig`` run, for :func:`attach_sparsity`.

    A ``keep_mask`` run records itself as ``fine_tuning`` and leaves the pruning fields of an earlier
    attachment (method, target sparsity) untouched.
    """
    from .projection import pattern_sparsity

    training = {
        key: getattr(args, key, None)
        for key in (
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
    }
    training = {key: getattr(value, "value", value) for key, value in training.items()}  # enums -> str
    if training.get("max_steps", -1) > 0:
        training.pop("num_train_epochs")  # max_steps overrides it
    if getattr(args, "keep_mask", False):
        return {"fine_tuning": {"keep_mask": True, **training}}
    admm = {
        key: getattr(args, key, None)
        for key in (
            "recipe",
            "admm_penalty",
            "admm_lambda",
            "admm_lambda_schedule",
            "admm_lambda_init",
            "admm_interval",
            "admm_fraction",
            "sparsity_schedule",
            "importance",
            "importance_alpha",
            "final_projection",
            "admm_init",
            "elsa_l",
            "admm_z_dtype",
            "admm_u_dtype",
        )
    }
    return {
        "method": "elsa",
        "sparsity": pattern_sparsity(args.sparsity_type, args.sparsity),
        "sparsity_type": args.sparsity_type,
        "target_modules": args.target_modules,
        "exclude_modules": args.exclude_modules,
        "hyperparameters": {**admm, **training},
    }


# -- masks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedMask:
    """A boolean keep-mask stored as bits (numpy ``packbits``, little bit order, row-major)."""

    bits: torch.Tensor  # uint8, 1-D, on CPU
    shape: tuple[int, ...]
    kept: int
    stored_nbytes: int | None = field(default=None, compare=False)  # bytes in the masks file, when read from one

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
        bits = torch.from_numpy(np.packbits(flat, bitorder="little"))
        return cls(bits=bits, shape=tuple(mask.shape), kept=int(flat.sum()))

    def unpack(self, device: torch.device | str | None = None) -> torch.Tensor:
        expected = (self.numel + 7) // 8
        if self.bits.numel() != expected:
            raise ValueError(f"packed mask has {self.bits.numel()} bytes, shape {self.shape} needs {expected}")
        flat = np.unpackbits(self.bits.numpy(), count=self.numel, bitorder="little").astype(bool)
        return (
            torch.from_numpy(flat).reshape(self.shape).to(device)
            if device
            else torch.from_numpy(flat).reshape(self.shape)
        )


@dataclass
class SparsityState:
    """What :func:`attach_sparsity` records on a model: packed masks by tensor name and the metadata."""

    masks: dict[str, PackedMask]
    config: ElsaSparsityConfig

    def mask(self, name: str, device=None) -> torch.Tensor:
        return self.masks[name].unpack(device)


def _resolve_tensor_name(model: nn.Module, name: str, params: Mapping[str, torch.Tensor]) -> str:
    """``masks`` may be keyed by module ("...q_proj", as ``ElsaOptimizer.masks()``) or tensor name."""
    if name in params:
        return name
    if f"{name}.weight" in params:
        return f"{name}.weight"
    raise ValueError(
        f"attach_sparsity: mask {name!r} names no parameter or module of {type(model).__name__} "
        "(use module names such as 'model.layers.0.self_attn.q_proj' or tensor names ending in '.weight')."
    )


def get_sparsity(model: nn.Module) -> SparsityState | None:
    """The :class:`SparsityState` attached to ``model``, or None."""
    state = getattr(model, "elsa_sparsity", None)
    return state if isinstance(state, SparsityState) else None


def attach_sparsity(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | ElsaSparsityConfig | None = None,
) -> SparsityState:
    """Record keep-masks and metadata on ``model`` and make its saves sparse checkpoints.

    Args:
        model: a ``transformers.PreTrainedModel`` (any ``nn.Module`` for :func:`sparsity_report` only).
        masks: ``{module or tensor name: bool keep-mask}`` (``trainer.elsa_optimizer.masks()``). None keeps
            the masks attached before and only updates the metadata.
        metadata: :class:`ElsaSparsityConfig` fields (method, sparsity, evaluation, ...); merged over the
            metadata attached before. Unknown keys are kept.

    After this, ``model.save_pretrained(dir, compressed=False|True, push_to_hub=..., ...)`` writes the
    checkpoint described in the module docstring and ``model.push_to_hub(repo_id, compressed=...)`` uploads
    it. Every save checks that the weights are still zero where the masks prune them.
    """
    previous = get_sparsity(model)
    if masks is None:
        if previous is None:
            raise ValueError("attach_sparsity: masks=None needs masks attached before (pass the keep-masks).")
        packed = previous.masks
    else:
        if not masks:
            raise ValueError("attach_sparsity: masks is empty; pass {module_name: keep_mask} of the pruned weights.")
        params = dict(model.named_parameters(remove_duplicate=False))
        packed = {}
        for name, mask in masks.items():
            key = _resolve_tensor_name(model, name, params)
            if tuple(mask.shape) != tuple(params[key].shape):
                raise ValueError(
                    f"attach_sparsity: mask of {key!r} has shape {tuple(mask.shape)}, the weight {tuple(params[key].shape)}."
                )
            if mask.dtype != torch.bool:
                raise ValueError(f"attach_sparsity: mask of {key!r} has dtype {mask.dtype}; keep-masks are torch.bool.")
            packed[key] = PackedMask.pack(mask)
    config = ElsaSparsityConfig(hf_elsa_version=_version())
    if previous is not None:
        config.update(previous.config)
    else:
        # a model that came from a sparse checkpoint carries the config.json entry: keep its facts
        entry = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if isinstance(entry, Mapping):
            config.update(
                {k: entry.get(k) for k in ("method", "sparsity", "sparsity_type", "target_modules", "exclude_modules")}
            )
    if masks is not None:  # measurements of an earlier save describe other masks
        config.tensors, config.files, config.achieved_sparsity, config.save_id = {}, {}, None, None
    config.update(metadata)
    if config.base_model is None:
        config.base_model = _hub_id_or_none(getattr(model, "name_or_path", None))
    state = SparsityState(masks=packed, config=config)
    model.elsa_sparsity = state
    _patch_methods(model)
    return state


def detach_sparsity(model: nn.Module) -> None:
    """Forget the masks: ``save_pretrained`` writes a plain dense folder again."""
    for name in ("elsa_sparsity", "save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every weight that the attached masks prune (e.g. after an update that densified them)."""
    state = _require_state(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, packed in state.masks.items():
        # masked_fill, not mul: a pruned inf/NaN becomes 0 (mul keeps NaN) and zeros stay +0.0
        params[key].masked_fill_(~packed.unpack(params[key].device), 0)


def _require_state(model: nn.Module) -> SparsityState:
    state = get_sparsity(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no sparsity attached: call hf_elsa.sparse_io.attach_sparsity first."
        )
    return state


def _hub_id_or_none(name: str | None) -> str | None:
    """``name_or_path`` when it looks like a Hub id (not a local folder)."""
    if not name or os.path.exists(name) or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    return name


def _check_masks(state: SparsityState, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, int]:
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


def _measure(state: SparsityState, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Check the masks against ``tensors`` and record the achieved sparsity in ``state.config``."""
    zeros = _check_masks(state, tensors, where)
    state.config.tensors = {
        key: {"shape": list(p.shape), "zeros": zeros[key], "sparsity": round(zeros[key] / max(p.numel, 1), 6)}
        for key, p in state.masks.items()
    }
    total = sum(p.numel for p in state.masks.values())
    state.config.achieved_sparsity = round(sum(zeros.values()) / max(total, 1), 6)


# -- saving -----------------------------------------------------------------------------------------


def _patch_methods(model: nn.Module) -> None:
    """Bind the sparse ``save_pretrained`` / ``push_to_hub`` to this instance (not its class)."""
    if not hasattr(type(model), "save_pretrained"):
        return  # a bare nn.Module: masks are recorded for sparsity_report, nothing to save
    model.save_pretrained = types.MethodType(_wrapper_for(type(model)), model)
    model.push_to_hub = types.MethodType(_sparse_push_to_hub, model)


_WRAPPERS: dict[type, Any] = {}


def _wrapper_for(cls: type):
    """A ``save_pretrained`` with ``cls.save_pretrained``'s signature plus ``compressed`` (cached per class)."""
    if cls in _WRAPPERS:
        return _WRAPPERS[cls]
    original = inspect.signature(cls.save_pretrained)
    parameters = list(original.parameters.values())
    var_kw = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]

    def save_pretrained(self, save_directory, *args, compressed: bool = False, **kwargs):
        # the original's arguments by name, its **kwargs flattened (repo_id, commit_message, ...)
        params = dict(original.bind(self, save_directory, *args, **kwargs).arguments)
        params.pop(parameters[0].name)
        for p in var_kw:
            params.update(params.pop(p.name, {}))
        return _sparse_save_pretrained(self, cls, compressed=compressed, **params)

    rest = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    compressed = inspect.Parameter("compressed", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    save_pretrained.__signature__ = original.replace(parameters=rest + [compressed] + var_kw)
    save_pretrained.__doc__ = (
        "hf_elsa sparse save (see hf_elsa.sparse_io): the standard folder plus masks, metadata and model card;\n"
        "compressed=True stores pruned tensors as kept values + bitmask (read it with hf_elsa.load_sparse_model).\n\n"
        + (cls.save_pretrained.__doc__ or "")
    )
    save_pretrained.__name__ = save_pretrained.__qualname__ = "save_pretrained"
    save_pretrained._hf_elsa = True
    _WRAPPERS[cls] = save_pretrained
    return save_pretrained


def _sparse_save_pretrained(model, cls, save_directory, compressed: bool = False, **params):
    """``save_pretrained`` of an attached model: ``params`` are the original method's arguments, by name."""
    state = _require_state(model)
    if params.get("distributed_checkpoint"):
        raise NotImplementedError(
            "hf_elsa sparse saves do not support distributed_checkpoint=True: pass distributed_checkpoint=False "
            "(weights are gathered on rank 0), or detach_sparsity(model) for a plain distributed checkpoint."
        )
    if compressed and params.get("variant"):
        raise ValueError("save_pretrained(compressed=True) does not support variant=...; save the dense format.")
    push = params.pop("push_to_hub", False)
    hub = {k: params.pop(k) for k in _HUB_KWARGS if k in params}
    if not params.get("is_main_process", True):
        # other ranks only join the collectives of the original save; the main process writes everything
        return cls.save_pretrained(model, save_directory, **params)
    target = Path(save_directory)
    if push:
        _check_online("save_pretrained(push_to_hub=True)")
        hub["repo_id"] = _create_repo(hub.get("repo_id") or target.name, params.get("token"), hub.get("private"))
    written = _save_sparse(model, cls, state, target, compressed, params, tags=hub.get("tags"))
    if push:
        return _upload(target, written, token=params.get("token"), **hub)
    return None


def _save_sparse(
    model, cls, state: SparsityState, target: Path, compressed: bool, params: dict, tags=None
) -> list[str]:
    """Write the checkpoint into a temporary sibling folder, then commit it into ``target``."""
    _measure(state, params.get("state_dict") or model.state_dict(), f"save_pretrained({str(target)!r})")
    config = state.config
    config.hf_elsa_version = _version()
    config.elsa_format_version = FORMAT_VERSION  # a loaded older (or newer) folder is re-saved in this layout
    config.format = "compressed" if compressed else "dense"
    config.save_id = uuid.uuid4().hex

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_tmp_folders(target.parent)
    tmp = Path(
        tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-{socket.gethostname()}-{os.getpid()}-", dir=target.parent)
    )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the renamed folder should look like makedirs'
    model_config = getattr(model, "config", None)
    had_entry, old_entry = hasattr(model_config, CONFIG_KEY), getattr(model_config, CONFIG_KEY, None)
    try:
        setattr(model_config, CONFIG_KEY, config.config_entry())
        try:
            cls.save_pretrained(model, tmp, push_to_hub=False, **params)
        finally:
            if had_entry:
                setattr(model_config, CONFIG_KEY, old_entry)
            else:
                delattr(model_config, CONFIG_KEY)
        # until the commit, the temporary folder must not load as a model
        os.replace(tmp / "config.json", tmp / _PENDING_CONFIG)
        weight_files = _saved_weight_files(tmp)
        _check_saved_keys(tmp, weight_files, state)
        _write_masks(tmp / MASKS_NAME, state.masks, config.save_id)
        if compressed:
            weight_files = [_compress(tmp, weight_files, state.masks, config.save_id)]
        config.files = {name: _file_info(tmp / name) for name in [*weight_files, MASKS_NAME]}
        (tmp / ELSA_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        card = build_model_card(config, _report_from_config(config, model), tags=tags)
        (tmp / CARD_NAME).write_text(_merge_card(target / CARD_NAME, str(card)), encoding="utf-8")
        written = sorted(os.listdir(tmp))
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ["config.json" if name == _PENDING_CONFIG else name for name in written]


def _saved_weight_files(folder: Path) -> list[str]:
    """The weight files (and shard index) ``save_pretrained`` wrote."""
    names = sorted(os.listdir(folder))
    return [n for n in names if n.endswith((".safetensors", ".safetensors.index.json")) and not n.startswith("elsa_")]


def _check_saved_keys(folder: Path, weight_files: list[str], state: SparsityState) -> None:
    """Every masked tensor must be in the saved weights under its own name (not dropped as tied, not renamed)."""
    saved = set()
    for name in weight_files:
        if name.endswith(".safetensors"):
            with safe_open(folder / name, "pt") as f:
                saved.update(f.keys())
    missing = sorted(set(state.masks) - saved)
    if missing:
        raise ValueError(
            f"save_pretrained: masked tensors {missing[:5]} are not saved under their own names (tied to another "
            "weight or renamed on save); hf_elsa cannot store their masks -- exclude them from pruning."
        )


def _encode_mask(bits: torch.Tensor) -> tuple[str, torch.Tensor]:
    """``("zlib", stream)`` when zlib makes the packed bits smaller, else ``("none", bits)``.

    Huffman-only deflate: a pruned mask has no long repeats for LZ77 to find, but its bytes are skewed
    (at 90% sparsity 43% of them are 0x00), which the Huffman stage codes within 1% of the entropy bound --
    smaller than zlib level 9 and lzma on real masks, and ~50x faster than the former.
    """
    raw = bits.contiguous().numpy().tobytes()
    coder = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)
    stream = coder.compress(raw) + coder.flush()
    if len(stream) >= len(raw):
        return "none", bits.contiguous()
    return "zlib", torch.from_numpy(np.frombuffer(stream, np.uint8).copy())


def _decode_mask(stored: torch.Tensor, codec: str, expected: int, path: Path, key: str) -> torch.Tensor:
    """The packed bits of one mask as stored in ``path``; ``expected`` is their byte count (from the shape)."""
    if stored.dtype != torch.uint8 or stored.ndim != 1:
        raise ValueError(
            f"{path}: mask {key!r} is stored as {stored.dtype} with shape {tuple(stored.shape)}, not 1-D uint8; "
            "the file is corrupted."
        )
    if codec == "none":
        return stored
    if codec != "zlib":
        raise ValueError(
            f"{path}: mask {key!r} uses codec {codec!r}, unknown to hf_elsa {_version()} (knows {MASK_CODECS}); "
            "the file was written by a newer hf_elsa (upgrade it) or is corrupted."
        )
    decoder = zlib.decompressobj()
    try:
        raw = decoder.decompress(stored.numpy().tobytes(), expected + 1)  # +1: a too-long stream shows, unbounded not
    except zlib.error as exc:
        raise ValueError(f"{path}: mask {key!r}: its zlib stream is corrupted ({exc}).") from exc
    if len(raw) > expected:
        problem = f"decodes to more than the {expected} bytes of shape-derived packed bits"
    elif not decoder.eof:
        problem = f"ends early (cut short after {len(raw)} of {expected} bytes)"
    elif len(raw) != expected:
        problem = f"decodes to {len(raw)} bytes, {expected} expected"
    elif decoder.unused_data:
        problem = f"is followed by {len(decoder.unused_data)} stray bytes"
    else:
        return torch.from_numpy(np.frombuffer(raw, np.uint8).copy())  # writable, owns its memory
    raise ValueError(f"{path}: mask {key!r}: its zlib stream {problem}; the file is corrupted.")


def _write_masks(path: Path, masks: Mapping[str, PackedMask], save_id: str) -> None:
    """``elsa_masks.safetensors`` (format version 2): per mask, the packed bits or their zlib stream."""
    tensors, codecs = {}, {}
    for key, mask in masks.items():
        codecs[key], tensors[key] = _encode_mask(mask.bits)
    metadata = {
        "format": "pt",
        "elsa_file": "masks",
        "elsa_format_version": str(FORMAT_VERSION),
        "bitorder": "little",
        "save_id": save_id,
        "shapes": json.dumps({k: list(m.shape) for k, m in masks.items()}),
        "kept": json.dumps({k: m.kept for k, m in masks.items()}),
        "codecs": json.dumps(codecs),
        "packed_bytes": json.dumps({k: m.bits.numel() for k, m in masks.items()}),
    }
    save_file(tensors, path, metadata=metadata)


def _compress(folder: Path, weight_files: list[str], masks: Mapping[str, PackedMask], save_id: str) -> str:
    """Replace the dense weight files in ``folder`` by one file with pruned tensors as kept values."""
    tensors: dict[str, torch.Tensor] = {}
    for name in weight_files:
        if not name.endswith(".safetensors"):
            continue
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = f.get_tensor(key)
                # kept values in row-major order: exactly the True positions of the packed mask
                tensors[key] = tensor[masks[key].unpack()].contiguous() if key in masks else tensor
    metadata = {
        "format": "pt",
        "elsa_file": "compressed",
        "elsa_format_version": str(FORMAT_VERSION),
        "save_id": save_id,
    }
    save_file(tensors, folder / COMPRESSED_NAME, metadata=metadata)
    for name in weight_files:
        (folder / name).unlink()
    return COMPRESSED_NAME


def _file_info(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _commit(tmp: Path, target: Path) -> None:
    """Move a finished save from ``tmp`` into ``target``, ``config.json`` last.

    A new folder is one rename. An existing one keeps files that are not ours (tokenizer, checkpoints,
    logs): its ``config.json`` goes first, then stale weight files, then the new files move in and the new
    ``config.json`` last -- so an interruption leaves the old folder or one that does not load.
    """
    if not target.exists():
        try:
            os.rename(tmp, target)
            tmp = target
        except OSError:  # created meanwhile: fall through to the in-place commit
            pass
    if tmp != target:
        (target / "config.json").unlink(missing_ok=True)
        new = set(os.listdir(tmp))
        for name in os.listdir(target):
            if (
                name not in new
                and any(fnmatch.fnmatch(name, p) for p in _WEIGHT_PATTERNS)
                and (target / name).is_file()
            ):
                (target / name).unlink()
        for name in sorted(new - {_PENDING_CONFIG}):
            os.replace(tmp / name, target / name)
        os.replace(tmp / _PENDING_CONFIG, target / _PENDING_CONFIG)
        tmp.rmdir()
    os.replace(target / _PENDING_CONFIG, target / "config.json")


def _remove_dead_tmp_folders(parent: Path) -> None:
    """Remove temporary folders that killed saves on this host left behind (their process is gone)."""
    pattern = re.compile(rf"-{re.escape(socket.gethostname())}-(\d+)-[A-Za-z0-9_]+$")
    for path in parent.glob(f"{_TMP_PREFIX}*"):
        match = pattern.search(path.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive but not ours to signal
            continue


# -- Hub --------------------------------------------------------------------------------------------


def _check_online(what: str) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(
            f"{what}: offline mode is on (HF_HUB_OFFLINE=1), the Hugging Face Hub cannot be reached. Save locally "
            "(push_to_hub=False) and upload the folder later with `hf upload REPO_ID FOLDER`, or unset HF_HUB_OFFLINE."
        )


def _hf_api():
    from huggingface_hub import HfApi

    return HfApi(library_name="hf_elsa", library_version=_version())


def _create_repo(repo_id: str, token=None, private=None) -> str:
    return _hf_api().create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def _upload(
    folder: Path,
    files: list[str],
    repo_id: str,
    token=None,
    commit_message=None,
    commit_description=None,
    create_pr=False,
    revision=None,
    private=None,
    tags=None,
):
    """Upload the files of one save; weight files of another format left on the Hub are deleted."""
    return _hf_api().upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=files,
        delete_patterns=list(_WEIGHT_PATTERNS),
        commit_message=commit_message or "Upload sparse model (hf_elsa)",
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def _sparse_push_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size="50GB",
    tags: list[str] | None = None,
    compressed: bool = False,
    **kwargs,
):
    """``push_to_hub`` of an attached model: the sparse checkpoint (``compressed`` or dense) and its card."""
    _check_online("push_to_hub")
    repo_id = _create_repo(repo_id, token, private)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        self.save_pretrained(folder, compressed=compressed, max_shard_size=max_shard_size, tags=tags, **kwargs)
        return _upload(
            folder,
            sorted(os.listdir(folder)),
            repo_id,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            revision=revision,
        )


# -- loading ----------------------------------------------------------------------------------------


def load_sparse_model(path_or_repo_id: str | os.PathLike, *, verify: bool = True, **from_pretrained_kwargs):
    """Load a sparse checkpoint (dense or compressed format) from a folder or a Hub repo id.

    The masks are restored (:func:`attach_sparsity`), so the model can be re-saved, pushed or fine-tuned
    with ``ElsaConfig(keep_mask=True)``. ``from_pretrained_kwargs`` go to ``from_pretrained`` (``dtype``,
    ``device_map``, ...); ``revision``, ``cache_dir``, ``token``, ``force_download`` and
    ``local_files_only`` also select the Hub download.

    Raises ``ValueError`` naming the file or tensor when a file is missing, truncated or corrupted (size and
    SHA-256 are checked unless ``verify=False``), when a mask's shape differs from its weight, or when a
    weight is nonzero where its mask prunes it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _resolve_folder(path_or_repo_id, from_pretrained_kwargs)
    for key in _DOWNLOAD_KWARGS:
        from_pretrained_kwargs.pop(key, None)
    config = _read_elsa_config(folder)
    if verify:
        _verify_files(folder, config)
    masks = read_masks(folder / MASKS_NAME, config.save_id)
    if config.format == "compressed":
        model_config = AutoConfig.from_pretrained(
            folder, trust_remote_code=from_pretrained_kwargs.get("trust_remote_code", False)
        )
        state_dict = read_compressed_state_dict(folder / COMPRESSED_NAME, masks, config.save_id)
        model = _from_state_dict(folder, model_config, state_dict, from_pretrained_kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs)
        except SafetensorError as exc:
            raise ValueError(f"{folder}: a weight file cannot be read ({exc}); it is truncated or corrupted.") from exc
    state = SparsityState(masks=masks, config=config)
    tensors = model.state_dict()
    _check_masks(state, tensors, f"load_sparse_model({str(path_or_repo_id)!r})")
    model.elsa_sparsity = state
    attach_sparsity(model, None)  # re-patch save_pretrained / push_to_hub with this state
    return model


def _resolve_folder(path_or_repo_id, kwargs: dict) -> Path:
    """A local folder, or the snapshot of a Hub repo (``huggingface_hub.snapshot_download``)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"load_sparse_model: {name!r} is not a folder (and not a Hub repo id such as 'user/model')."
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
    try:
        return Path(snapshot_download(name, **download))
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode() or download.get("local_files_only"):
            raise OSError(
                f"load_sparse_model({name!r}): offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True) and this "
                "repo is not in the local Hugging Face cache. Pass a local folder, or download it once online "
                f"(`hf download {name}`)."
            ) from exc
        raise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupted.") from exc


def _read_elsa_config(folder: Path) -> ElsaSparsityConfig:
    """``elsa_config.json``, cross-checked with ``config.json`` (same save)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        pending = " (a save into it was interrupted)" if (folder / _PENDING_CONFIG).exists() else ""
        raise ValueError(f"{folder}: no config.json{pending}; this is not a complete checkpoint.")
    entry = _read_json(config_path).get(CONFIG_KEY)
    path = folder / ELSA_CONFIG_NAME
    if not path.is_file():
        if entry:
            raise ValueError(
                f"{folder}: config.json carries {CONFIG_KEY} but {ELSA_CONFIG_NAME} is missing -- the folder was rewritten "
                "by a plain save_pretrained, so its masks are gone and its sparsity is not guaranteed. Load it with "
                "AutoModelForCausalLM.from_pretrained, or re-save it from hf_elsa."
            )
        raise ValueError(
            f"{folder}: no {ELSA_CONFIG_NAME}, this is not an hf_elsa sparse checkpoint. Load it with "
            "AutoModelForCausalLM.from_pretrained (then attach_sparsity(model, masks) to record masks)."
        )
    config = ElsaSparsityConfig.from_dict(_read_json(path), source=str(path))
    if config.format not in FORMATS:
        raise ValueError(f"{path}: format={config.format!r} is unknown; expected one of {FORMATS} (newer hf_elsa?).")
    if not entry or entry.get("save_id") != config.save_id:
        raise ValueError(
            f"{folder}: config.json and {ELSA_CONFIG_NAME} come from different saves (save_id "
            f"{(entry or {}).get('save_id')} vs {config.save_id}): an interrupted copy, or a plain save_pretrained over "
            "an hf_elsa folder. Re-save the model with hf_elsa."
        )
    return config


def _verify_files(folder: Path, config: ElsaSparsityConfig) -> None:
    if not config.files:
        raise ValueError(
            f"{folder / ELSA_CONFIG_NAME}: lists no files; cannot verify the checkpoint (verify=False skips)."
        )
    for name, info in config.files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(
                f"{path} is missing but {ELSA_CONFIG_NAME} lists it: download or copy the whole folder again."
            )
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise ValueError(
                f"{path} has {size} bytes, {info.get('bytes')} were saved: the file is truncated or was rewritten "
                "outside hf_elsa. Download or copy it again."
            )
        if _sha256(path) != info.get("sha256"):
            raise ValueError(
                f"{path}: SHA-256 differs from {ELSA_CONFIG_NAME}: the file is corrupted or was rewritten outside "
                "hf_elsa (e.g. a plain save_pretrained into this folder). Download it again, or pass verify=False to "
                "check only masks against zeros."
            )


def _open(path: Path):
    if not path.is_file():
        raise ValueError(f"{path} is missing: the sparse checkpoint is incomplete.")
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the safetensors file ({exc}); it is truncated or corrupted.") from exc


def read_masks(path: str | os.PathLike, save_id: str | None = None) -> dict[str, PackedMask]:
    """The packed masks of ``elsa_masks.safetensors``, validated (shapes, sizes, codecs, kept counts, save id).

    Reads format version 2 (masks stored raw or as zlib streams, per the ``codecs`` metadata) and version 1
    (raw packed bits only, no ``codecs``).
    """
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
        try:
            shapes, kept = json.loads(meta["shapes"]), json.loads(meta["kept"])
            version = int(meta.get("elsa_format_version", "1"))
            # version 1 stored every mask raw; from version 2 on the codecs are required
            codecs = json.loads(meta["codecs"]) if version >= 2 else {}
            packed_bytes = json.loads(meta.get("packed_bytes", "{}"))
            if not all(isinstance(d, dict) for d in (shapes, kept, codecs, packed_bytes)):
                raise ValueError("not JSON objects")
        except (KeyError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(
                f"{path}: the mask shapes/counts/codecs metadata is missing or corrupted ({exc!r})."
            ) from exc
        if save_id is not None and meta.get("save_id") != save_id:
            raise ValueError(f"{path} comes from another save than {ELSA_CONFIG_NAME} (save_id {meta.get('save_id')}).")
        masks = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            try:
                stored = f.get_tensor(key)
            except SafetensorError as exc:
                raise ValueError(f"{path}: tensor {key!r} cannot be read ({exc}); the file is corrupted.") from exc
            if key not in shapes or key not in kept or (version >= 2 and key not in codecs):
                raise ValueError(f"{path}: mask {key!r} has no recorded shape/count/codec; the file is corrupted.")
            shape = tuple(shapes[key])
            expected = (math.prod(shape) + 7) // 8
            if key in packed_bytes and packed_bytes[key] != expected:
                raise ValueError(
                    f"{path}: mask {key!r} records {packed_bytes[key]} packed bytes, shape {shape} needs {expected}; "
                    "the file is corrupted."
                )
            bits = _decode_mask(stored, codecs.get(key, "none"), expected, path, key)
            packed = PackedMask(bits=bits, shape=shape, kept=int(kept[key]), stored_nbytes=stored.numel())
            if bits.numel() != expected:
                raise ValueError(
                    f"{path}: mask {key!r} holds {bits.numel()} bytes, shape {packed.shape} needs {expected}; the "
                    "file is truncated or corrupted."
                )
            actual = int(packed.unpack().sum())
            if actual != packed.kept:
                raise ValueError(
                    f"{path}: mask {key!r} keeps {actual} weights, {packed.kept} were saved; the file is corrupted."
                )
            masks[key] = packed
    if not masks:
        raise ValueError(f"{path} holds no masks.")
    return masks


def read_compressed_state_dict(path: str | os.PathLike, masks: Mapping[str, PackedMask], save_id: str | None = None):
    """Dense state dict from ``elsa_compressed.safetensors``: kept values scattered back into their masks."""
    path = Path(path)
    state_dict = {}
    with _open(path) as f:
        if save_id is not None and (f.metadata() or {}).get("save_id") != save_id:
            raise ValueError(f"{path} comes from another save than {ELSA_CONFIG_NAME}.")
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            try:
                tensor = f.get_tensor(key)
            except SafetensorError as exc:
                raise ValueError(f"{path}: tensor {key!r} cannot be read ({exc}); the file is corrupted.") from exc
            if key in masks:
                packed = masks[key]
                if tensor.ndim != 1 or tensor.numel() != packed.kept:
                    raise ValueError(
                        f"{path}: {key!r} stores {tensor.numel()} values but its mask keeps {packed.kept}; the files "
                        "do not belong together."
                    )
                dense = torch.zeros(packed.shape, dtype=tensor.dtype)
                dense.masked_scatter_(packed.unpack(), tensor)
                tensor = dense
            state_dict[key] = tensor
    missing = sorted(set(masks) - set(state_dict))
    if missing:
        raise ValueError(f"{path}: masked tensors {missing[:5]} are missing; the file is incomplete.")
    return state_dict


def _from_state_dict(folder: Path, config, state_dict: dict, kwargs: dict):
    """Build the model class of ``config`` from a state dict through ``from_pretrained`` (dtype, device_map...)."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as exc:
        raise ValueError(f"{folder}: no causal-LM class for config {type(config).__name__}.") from exc
    model = cls.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    if (folder / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.name_or_path = str(folder)
    return model


# -- report -----------------------------------------------------------------------------------------


@dataclass
class TensorSparsity:
    """One tensor of a :class:`SparsityReport`."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    masked: bool = False
    dtype: str | None = None
    stored_bytes: int | None = None  # on disk: values (+ packed mask for compressed tensors)
    dense_bytes: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class SparsityReport:
    """Per-tensor and total sparsity of the prunable weights of a model or a saved folder.

    ``total_params`` counts every parameter (embeddings included), so ``overall_sparsity`` is the share of
    zeros in the whole model. ``str(report)`` is a readable table; ``to_dict()`` is JSON-ready.
    """

    tensors: list[TensorSparsity]
    total_params: int
    format: str | None = None
    source: str | None = None

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)

    @property
    def overall_sparsity(self) -> float:
        return self.zeros / max(self.total_params, 1)

    def __getitem__(self, name: str) -> TensorSparsity:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "sparsity": self.sparsity,
            "overall_sparsity": self.overall_sparsity,
            "numel": self.numel,
            "zeros": self.zeros,
            "total_params": self.total_params,
            "tensors": {
                t.name: {
                    "shape": list(t.shape),
                    "zeros": t.zeros,
                    "sparsity": t.sparsity,
                    "masked": t.masked,
                    "stored_bytes": t.stored_bytes,
                    "dense_bytes": t.dense_bytes,
                }
                for t in self.tensors
            },
        }

    def summary(self) -> str:
        """The totals: prunable tensors, whole model and, for a saved folder, bytes on disk."""
        kind = "pruned" if any(t.masked for t in self.tensors) else "prunable"
        lines = [
            (
                f"{kind} tensors: {len(self.tensors)}, {100 * self.sparsity:.2f}% sparse "
                f"({self.numel - self.zeros:,} of {self.numel:,} weights nonzero)"
            ),
            f"whole model: {100 * self.overall_sparsity:.2f}% of {self.total_params:,} parameters are zero",
        ]
        stored = [t for t in self.tensors if t.stored_bytes is not None and t.dense_bytes]
        if stored:
            s, d = sum(t.stored_bytes for t in stored), sum(t.dense_bytes for t in stored)
            lines.append(
                f"{kind} tensors on disk ({self.format}): {s / 1e6:,.2f} MB vs {d / 1e6:,.2f} MB dense ({s / d:.3f}x)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.tensors] + [20])
        lines = [f"{'tensor':<{width}}  {'shape':>14}  {'sparsity':>8}  {'nonzero':>12}"]
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            lines.append(f"{t.name:<{width}}  {shape:>14}  {100 * t.sparsity:7.2f}%  {t.numel - t.zeros:>12,}")
        lines.append("-" * len(lines[0]))
        return "\n".join(lines) + "\n" + self.summary()


def sparsity_report(model_or_path: nn.Module | str | os.PathLike) -> SparsityReport:
    """Sparsity of every prunable weight of a model, or of a saved folder (either format).

    For a model: the tensors of its attached masks, or else every ``nn.Linear``/``Conv1D`` weight but the LM
    head. For a folder: read from the safetensors files without building the model.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return _folder_report(Path(model_or_path))
    return _model_report(model_or_path)


def _model_report(model: nn.Module) -> SparsityReport:
    from .targets import find_prunable_modules

    params = dict(model.named_parameters(remove_duplicate=False))
    state = get_sparsity(model)
    names = list(state.masks) if state else [f"{n}.weight" for n in find_prunable_modules(model)]
    tensors = [
        TensorSparsity(
            n, tuple(params[n].shape), int((params[n] == 0).sum()), masked=state is not None, dtype=str(params[n].dtype)
        )
        for n in names
    ]
    total = sum(p.numel() for p in model.parameters())
    return SparsityReport(tensors, total, format=None, source=type(model).__name__)


def _report_from_config(config: ElsaSparsityConfig, model: nn.Module) -> SparsityReport:
    """The report of a save being written (from its measured per-tensor numbers)."""
    tensors = [
        TensorSparsity(k, tuple(v["shape"]), v.get("zeros", round(v["sparsity"] * math.prod(v["shape"]))), masked=True)
        for k, v in config.tensors.items()
    ]
    return SparsityReport(tensors, sum(p.numel() for p in model.parameters()), format=config.format)


def _folder_report(folder: Path) -> SparsityReport:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    masks = read_masks(folder / MASKS_NAME) if (folder / MASKS_NAME).is_file() else {}
    compressed = (folder / COMPRESSED_NAME).is_file() and not (folder / "model.safetensors").is_file()
    files = [COMPRESSED_NAME] if compressed else [n for n in _saved_weight_files(folder) if n.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{folder}: no safetensors weight files found.")
    tensors, total = [], 0
    for name in files:
        with _open(folder / name) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tslice = f.get_slice(key)
                itemsize = _itemsize(tslice.get_dtype())
                packed = masks.get(key)
                if packed is not None and compressed:
                    values = f.get_tensor(key)
                    zeros = packed.numel - packed.kept + int((values == 0).sum())
                    mask_bytes = packed.bits.numel() if packed.stored_nbytes is None else packed.stored_nbytes
                    stored = packed.kept * itemsize + mask_bytes  # kept values + the mask as stored
                    tensors.append(
                        TensorSparsity(
                            key, packed.shape, zeros, True, tslice.get_dtype(), stored, packed.numel * itemsize
                        )
                    )
                    total += packed.numel
                    continue
                shape = tuple(tslice.get_shape())
                total += math.prod(shape)
                if packed is not None or (not masks and _looks_prunable(key, shape)):
                    values = f.get_tensor(key)
                    nbytes = math.prod(shape) * itemsize
                    tensors.append(
                        TensorSparsity(
                            key, shape, int((values == 0).sum()), packed is not None, tslice.get_dtype(), nbytes, nbytes
                        )
                    )
    fmt = "compressed" if compressed else ("dense" if masks else "plain")
    return SparsityReport(sorted(tensors, key=lambda t: _natural_key(t.name)), total, format=fmt, source=str(folder))


def _looks_prunable(key: str, shape: tuple[int, ...]) -> bool:
    """In a folder without masks: the 2-D weights that are not embeddings or the LM head."""
    return len(shape) == 2 and key.endswith(".weight") and not any(s in key for s in ("embed", "wte", "wpe", "lm_head"))


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    return sizes.get(dtype, 1)


def _natural_key(name: str):
    """``layers.2`` before ``layers.10``; (kind, value) pairs so numbers and names never compare."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


# -- model card -------------------------------------------------------------------------------------


def build_model_card(
    config: ElsaSparsityConfig,
    report: SparsityReport | None = None,
    *,
    tags: list[str] | str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
):
    """A ``huggingface_hub.ModelCard``: library_name hf_elsa, tags, base_model, sparsity table, method and
    hyper-parameters, evaluation protocol and results (``config.evaluation``) when known."""
    from huggingface_hub import ModelCard, ModelCardData

    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    all_tags = list(dict.fromkeys(["elsa", "sparse", "pruned", *extra_tags]))
    if config.sparsity_type and ":" in config.sparsity_type:
        all_tags.append(f"sparsity-{config.sparsity_type.replace(':', '-')}")
    data = ModelCardData(
        library_name="hf_elsa",
        tags=all_tags,
        base_model=config.base_model,
        pipeline_tag="text-generation",
        license=license,
        language=language,
        datasets=[datasets] if isinstance(datasets, str) else datasets,
    )
    body = _card_body(config, report, model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_CARD_START}\n{body}\n{_CARD_END}\n")


def _card_body(config: ElsaSparsityConfig, report: SparsityReport | None, model_name: str | None) -> str:
    achieved = config.achieved_sparsity
    title = model_name or (f"{config.base_model.split('/')[-1]}, pruned" if config.base_model else "Sparse model")
    head = f"{100 * achieved:.1f}% sparse" if achieved is not None else "sparse"
    lines = [f"# {title} ({head})", ""]
    base = f" from [{config.base_model}](https://huggingface.co/{config.base_model})" if config.base_model else ""
    lines += [
        (
            f"Pruned{base} with [hf_elsa](https://pypi.org/project/hf-elsa/) (method: `{config.method or 'unknown'}`, "
            f"pattern: `{config.sparsity_type or 'unstructured'}`, target sparsity: {_pct(config.sparsity)}). "
            f"Checkpoint format: **{config.format}**."
        ),
        "",
        "## Loading",
        "",
        "```python",
        "import hf_elsa",
        'model = hf_elsa.load_sparse_model("REPO_OR_FOLDER")  # restores and checks the masks',
        "print(hf_elsa.sparsity_report(model))",
        "```",
        "",
    ]
    if config.format == "compressed":
        lines += [
            (
                "This folder uses the **compressed** format (kept values + a bitmask per pruned tensor): "
                "`transformers.AutoModelForCausalLM.from_pretrained` cannot read it; use `hf_elsa.load_sparse_model`."
            ),
            "",
        ]
    else:
        lines += [
            (
                "The weights are stored dense with exact zeros: `AutoModelForCausalLM.from_pretrained` also loads it "
                "(without the masks)."
            ),
            "",
        ]
    lines += ["## Sparsity", ""]
    if report is not None and report.tensors:
        lines += _group_table(report)
        rows = "\n".join(f"| `{t.name}` | {'x'.join(map(str, t.shape))} | {_pct(t.sparsity)} |" for t in report.tensors)
        lines += [
            "",
            "<details><summary>Per tensor</summary>",
            "",
            "| tensor | shape | sparsity |",
            "|---|---|---|",
            rows,
            "",
            "</details>",
            "",
        ]
    lines += ["## Method and hyper-parameters", ""]
    settings = {
        "method": config.method,
        "sparsity": config.sparsity,
        "sparsity_type": config.sparsity_type,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        **config.hyperparameters,
    }
    lines += _kv_table(settings)
    if config.fine_tuning:
        lines += ["", "Mask-keeping fine-tuning (the zeros stay fixed):", ""] + _kv_table(config.fine_tuning)
    lines += ["", "## Evaluation", ""]
    evaluation = config.evaluation or {}
    if evaluation.get("protocol"):
        lines += [f"Protocol: {evaluation['protocol']}", ""]
    results = evaluation.get("results") or {}
    lines += _kv_table(results, ("metric", "value")) if results else ["Not evaluated yet."]
    lines += [
        "",
        f"_Written by hf_elsa {config.hf_elsa_version or _version()} (elsa format {config.elsa_format_version})._",
    ]
    return "\n".join(lines)


def _group_table(report: SparsityReport) -> list[str]:
    """Sparsity by layer type (``q_proj``, ``mlp.down_proj``, ...) and in total."""
    groups: dict[str, list[TensorSparsity]] = {}
    for t in report.tensors:
        parts = [p for p in t.name.split(".") if not p.isdigit() and p != "weight"]
        groups.setdefault(".".join(parts[-2:]) if len(parts) >= 2 else t.name, []).append(t)
    lines = ["| layers | tensors | weights | sparsity |", "|---|---|---|---|"]
    for name, ts in groups.items():
        numel, zeros = sum(t.numel for t in ts), sum(t.zeros for t in ts)
        lines.append(f"| `{name}` | {len(ts)} | {numel:,} | {_pct(zeros / max(numel, 1))} |")
    lines.append(f"| **all pruned** | {len(report.tensors)} | {report.numel:,} | **{_pct(report.sparsity)}** |")
    lines.append(f"| whole model | | {report.total_params:,} | {_pct(report.overall_sparsity)} |")
    return lines


def _kv_table(values: Mapping[str, Any], header=("setting", "value")) -> list[str]:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in values.items() if v is not None]
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _merge_card(existing: Path, ours: str) -> str:
    """Keep a user's own README text: replace only our marked section, or append it; merge the metadata."""
    if not existing.is_file():
        return ours
    from huggingface_hub import ModelCard

    text = existing.read_text(encoding="utf-8")
    old, new = ModelCard(text), ModelCard(ours)
    old_body, new_body = old.text, new.text
    if _CARD_START in old_body and _CARD_END in old_body:
        before, _, rest = old_body.partition(_CARD_START)
        _, _, after = rest.partition(_CARD_END)
        body = before + new_body.strip() + after
    else:
        body = old_body.rstrip() + "\n\n" + new_body.strip() + "\n"
    data = old.data.to_dict()
    for key, value in new.data.to_dict().items():
        if key == "tags":
            data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *value]))
        elif value is not None:
            data[key] = value
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{body.lstrip()}"


def write_model_card(model: nn.Module, folder: str | os.PathLike, **card_kwargs) -> Path:
    """Write (or update) ``README.md`` in ``folder`` for an attached model; used by ``ElsaTrainer``.

    ``card_kwargs``: ``tags``, ``model_name``, ``license``, ``language``, ``datasets`` and ``base_model``.
    """
    state = _require_state(model)
    config = state.config
    if card_kwargs.get("base_model"):
        config.base_model = card_kwargs["base_model"]
    card_kwargs.pop("base_model", None)
    _measure(state, model.state_dict(), "model card")  # the weights may have changed since the last save
    path = Path(folder) / CARD_NAME
    text = _merge_card(path, str(build_model_card(config, _report_from_config(config, model), **card_kwargs)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
