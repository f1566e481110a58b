"""Checkpoint formats: a registry of small classes, one per format, each with its write and read hooks.

- ``"dense"`` (default): the standard folder ``save_pretrained`` writes, with exact zeros; plain
  ``AutoModelForCausalLM.from_pretrained`` loads it.
- ``"compressed"`` (``save_pretrained(dir, compressed=True)``): ``elsa_compressed.safetensors`` holds every
  pruned tensor as its kept values only (model dtype) -- with the coded mask that is about
  ``(1 - s) * itemsize + H(s) / 8`` bytes per weight, ``H`` the binary entropy (0.47 bit at s = 0.9) -- and
  every other tensor dense. Plain ``from_pretrained`` cannot read it (there is no ``model.safetensors``, so it
  fails loudly); :func:`load_sparse_model` reads both.

A new format is one :class:`SaveFormat` subclass and one :func:`register_format`; saving
(``save_pretrained(dir, format=name)``), loading, ``sparsity_report``/``hf-elsa inspect``, the Hub upload and the
model card ask the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..registry import Registry
from .files import open_safetensors, saved_weight_files
from .masks import PackedMask
from .metadata import ELSA_CONFIG_NAME, FORMAT_VERSION, ElsaSparsityConfig

COMPRESSED_NAME = "elsa_compressed.safetensors"
COMPRESSED_NOTE = (
    "compressed hf_elsa checkpoint: load it with hf_elsa.load_sparse_model(path_or_repo_id); "
    "transformers' from_pretrained cannot read it"
)
# weight files of older saves (not written any more) that a new save into the same folder removes
LEGACY_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a format stores it, for :func:`sparsity_report` on a folder."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stored_bytes: int
    dense_bytes: int
    zeros: int | None  # None when the report did not ask for it (it reads the values)


class SaveFormat:
    """One checkpoint format. Subclasses set the class attributes and override the hooks they need.

    Attributes:
        name: the value of ``format`` in ``elsa_config.json`` and of ``save_pretrained(format=...)``.
        weight_patterns: the weight files a save of this format leaves in the folder (glob patterns); a save of
            any format removes those of the others, here and on the Hub.
        library_name: the model card's ``library_name`` (which library loads the folder).
        note: added to the ``elsa_sparsity`` entry of ``config.json`` when set.
    """

    name: ClassVar[str]
    weight_patterns: ClassVar[tuple[str, ...]]
    library_name: ClassVar[str] = "hf_elsa"
    note: ClassVar[str | None] = None

    def check_save(self, params: Mapping[str, Any]) -> None:
        """Refuse ``save_pretrained`` arguments this format cannot honour."""

    def write(self, folder: Path, weight_files: list[str], masks: Mapping[str, PackedMask], save_id: str) -> list[str]:
        """Turn the files ``save_pretrained`` wrote into ``folder`` into this format; returns the weight files."""
        return weight_files

    def detect(self, folder: Path) -> bool:
        """Whether ``folder`` holds this format's weights (for reading a folder without its metadata)."""
        raise NotImplementedError

    def weight_shapes(self, folder: Path, trust_remote_code: bool = False) -> tuple[dict[str, tuple[int, ...]], str]:
        """``({tensor: shape}, where they come from)`` of the folder's weights, read without loading them: the
        bound a mask's declared shape is checked against before it is decoded."""
        raise NotImplementedError

    def load(self, folder: Path, masks: Mapping[str, PackedMask], save_id: str | None, kwargs: dict):
        """The model of a verified folder; ``kwargs`` go to ``from_pretrained``."""
        raise NotImplementedError

    def stored_tensors(
        self, folder: Path, masks: Mapping[str, PackedMask], count: Callable[[str, tuple[int, ...]], bool]
    ) -> Iterator[StoredTensor]:
        """Every tensor of the folder with its stored size; zeros counted where ``count(name, shape)``."""
        raise NotImplementedError

    def config_entry(self, config: ElsaSparsityConfig) -> dict[str, Any]:
        """The ``elsa_sparsity`` entry of ``config.json``."""
        entry = config.config_entry()
        if self.note:
            entry["note"] = self.note
        return entry

    def card_loading_lines(self) -> list[str]:
        """What the model card says about loading this format (after the ``load_sparse_model`` snippet)."""
        return []


# formats by name (``save_pretrained(format=...)``, ``elsa_config.json``'s ``format``); each registers itself
SAVE_FORMATS: Registry[SaveFormat] = Registry("format")
DEFAULT_FORMAT = "dense"


def register_format(cls: type[SaveFormat]) -> type[SaveFormat]:
    """Register a :class:`SaveFormat` subclass under its ``name`` (usable as a class decorator; a taken name is
    refused)."""
    SAVE_FORMATS.register(cls.name, cls())
    return cls


def registered_formats() -> tuple[str, ...]:
    return tuple(SAVE_FORMATS)


def get_format(name: str, source: Any = None) -> SaveFormat:
    """The registered format ``name``; ``source`` (a file) is named in the error for an unknown one."""
    fmt = SAVE_FORMATS.get(name) if isinstance(name, str) and name in SAVE_FORMATS else None
    if fmt is None:
        where = f"{source}: " if source is not None else ""
        raise ValueError(f"{where}format={name!r} is unknown; expected one of {registered_formats()} (newer hf_elsa?).")
    return fmt


def resolve_format(format: str | None, compressed: bool) -> SaveFormat:
    """The format of ``save_pretrained(format=..., compressed=...)``: ``compressed=True`` means ``"compressed"``."""
    if format is None:
        return get_format("compressed" if compressed else DEFAULT_FORMAT)
    if compressed and format != "compressed":
        raise ValueError(f"save_pretrained: compressed=True contradicts format={format!r}; pass one of them.")
    return get_format(format)


def detect_format(folder: Path) -> SaveFormat:
    """The format whose weights ``folder`` holds; the default when no other format claims it."""
    for name, fmt in SAVE_FORMATS.items():
        if name != DEFAULT_FORMAT and fmt.detect(folder):
            return fmt
    return SAVE_FORMATS[DEFAULT_FORMAT]


def stale_file_patterns() -> tuple[str, ...]:
    """Files of an earlier save that a new save into the same folder (or Hub repo) must remove: left behind,
    plain ``from_pretrained`` could pick them up (e.g. a stale model.safetensors next to a compressed save)."""
    patterns = [p for fmt in SAVE_FORMATS.values() for p in fmt.weight_patterns]
    return tuple(dict.fromkeys([*patterns, *LEGACY_WEIGHT_PATTERNS, "elsa_*.safetensors", ELSA_CONFIG_NAME]))


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    return sizes.get(dtype, 1)


def _dense_tensors(f, keys, count) -> Iterator[StoredTensor]:
    """The tensors of one open safetensors file, stored as they are."""
    for key in keys:
        tslice = f.get_slice(key)
        shape = tuple(tslice.get_shape())
        nbytes = math.prod(shape) * itemsize(tslice.get_dtype())
        zeros = int((f.get_tensor(key) == 0).sum()) if count(key, shape) else None
        yield StoredTensor(key, shape, tslice.get_dtype(), nbytes, nbytes, zeros)


@register_format
class DenseFormat(SaveFormat):
    """The standard folder with exact zeros; plain ``from_pretrained`` loads it (without the masks)."""

    name = "dense"
    weight_patterns = ("model*.safetensors", "model*.safetensors.index.json")
    library_name = "transformers"  # plain AutoModelForCausalLM.from_pretrained loads it

    def detect(self, folder: Path) -> bool:
        return any(n.endswith(".safetensors") for n in saved_weight_files(folder))

    def weight_shapes(self, folder: Path, trust_remote_code: bool = False):
        """From the safetensors headers: safetensors checks them against the file size, so they are real data."""
        shapes = {}
        for name in saved_weight_files(folder):
            if name.endswith(".safetensors"):
                with open_safetensors(folder / name) as f:
                    shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})  # noqa: SIM118
        return shapes, "the weight files' safetensors headers"

    def load(self, folder: Path, masks, save_id, kwargs: dict):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except SafetensorError as exc:
            raise ValueError(f"{folder}: a weight file cannot be read ({exc}); it is truncated or corrupted.") from exc

    def stored_tensors(self, folder: Path, masks, count) -> Iterator[StoredTensor]:
        files = [n for n in saved_weight_files(folder) if n.endswith(".safetensors")]
        if not files:
            raise ValueError(f"{folder}: no safetensors weight files found.")
        for name in files:
            with open_safetensors(folder / name) as f:
                yield from _dense_tensors(f, list(f.keys()), count)

    def card_loading_lines(self) -> list[str]:
        return [
            (
                "The weights are stored dense with exact zeros: `AutoModelForCausalLM.from_pretrained` also loads it "
                "(without the masks)."
            ),
            "",
        ]


@register_format
class CompressedFormat(SaveFormat):
    """Pruned tensors as their kept values (1-D, model dtype) next to the masks file; other tensors dense."""

    name = "compressed"
    weight_patterns = (COMPRESSED_NAME,)
    note = COMPRESSED_NOTE

    def check_save(self, params: Mapping[str, Any]) -> None:
        if params.get("variant"):
            raise ValueError("save_pretrained(compressed=True) does not support variant=...; save the dense format.")

    def write(self, folder: Path, weight_files: list[str], masks: Mapping[str, PackedMask], save_id: str) -> list[str]:
        """Replace the dense weight files in ``folder`` by one file with pruned tensors as kept values."""
        tensors: dict[str, torch.Tensor] = {}
        for name in weight_files:
            if not name.endswith(".safetensors"):
                continue
            with open_safetensors(folder / name) as f:
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
        return [COMPRESSED_NAME]

    def detect(self, folder: Path) -> bool:
        return (folder / COMPRESSED_NAME).is_file() and not (folder / "model.safetensors").is_file()

    def weight_shapes(self, folder: Path, trust_remote_code: bool = False):
        """From the architecture in config.json, built on the meta device (the kept values carry no shape)."""
        config = _model_config(folder, trust_remote_code)
        with torch.device("meta"):
            model = _causal_lm_class(folder, config)._from_config(config)
        return {key: tuple(t.shape) for key, t in model.state_dict().items()}, "the architecture of config.json"

    def load(self, folder: Path, masks, save_id, kwargs: dict):
        config = _model_config(folder, kwargs.get("trust_remote_code", False))
        state_dict = read_compressed_state_dict(folder / COMPRESSED_NAME, masks, save_id)
        return _from_state_dict(folder, config, state_dict, kwargs)

    def stored_tensors(self, folder: Path, masks, count) -> Iterator[StoredTensor]:
        with open_safetensors(folder / COMPRESSED_NAME) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                packed = masks.get(key)
                if packed is None:
                    yield from _dense_tensors(f, [key], count)
                    continue
                dtype = f.get_slice(key).get_dtype()
                values = f.get_tensor(key)
                zeros = packed.numel - packed.kept + int((values == 0).sum())
                mask_bytes = packed.bits.numel() if packed.stored_nbytes is None else packed.stored_nbytes
                stored = packed.kept * itemsize(dtype) + mask_bytes  # kept values + the mask as stored
                yield StoredTensor(key, packed.shape, dtype, stored, packed.numel * itemsize(dtype), zeros)

    def card_loading_lines(self) -> list[str]:
        return [
            (
                "This folder uses the **compressed** format (kept values + a bitmask per pruned tensor): "
                "`transformers.AutoModelForCausalLM.from_pretrained` cannot read it; use `hf_elsa.load_sparse_model`."
            ),
            "",
        ]


def read_compressed_state_dict(path, masks: Mapping[str, PackedMask], save_id: str | None = None):
    """Dense state dict from ``elsa_compressed.safetensors``: kept values scattered back into their masks."""
    path = Path(path)
    state_dict = {}
    with open_safetensors(path) as f:
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


def _model_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _causal_lm_class(folder: Path, config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as exc:
        raise ValueError(f"{folder}: no causal-LM class for config {type(config).__name__}.") from exc


def _from_state_dict(folder: Path, config, state_dict: dict, kwargs: dict):
    """Build the model class of ``config`` from a state dict through ``from_pretrained`` (dtype, device_map...)."""
    from transformers import GenerationConfig

    model = _causal_lm_class(folder, config).from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    if (folder / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.name_or_path = str(folder)
    return model
