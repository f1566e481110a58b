"""Keep-masks on disk: :class:`PackedMask` (one bit per weight), its zlib codec and ``elsa_masks.safetensors``.

Each mask is packed with numpy ``packbits`` (little bit order, row-major), then entropy-coded with ``zlib``
(Huffman only) when that makes it smaller; the file's metadata records shapes, kept counts and codecs.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..version import __version__
from . import schema as s
from .files import open_safetensors
from .metadata import ELSA_CONFIG_NAME, FORMAT_VERSION

MASK_CODECS = ("none", "zlib")


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
        mask = torch.from_numpy(flat).reshape(self.shape)
        return mask.to(device) if device else mask


def encode_mask(bits: torch.Tensor) -> tuple[str, torch.Tensor]:
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


def decode_mask(stored: torch.Tensor, codec: str, expected: int, path: Path, key: str) -> torch.Tensor:
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
            f"{path}: mask {key!r} uses codec {codec!r}, unknown to hf_elsa {__version__} (knows {MASK_CODECS}); "
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


def write_masks(path: Path, masks: Mapping[str, PackedMask], save_id: str) -> None:
    """``elsa_masks.safetensors`` (format version 2): per mask, the packed bits or their zlib stream."""
    tensors, codecs = {}, {}
    for key, mask in masks.items():
        codecs[key], tensors[key] = encode_mask(mask.bits)
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


def _json_text(check: s.Check) -> s.Check:
    """A safetensors metadata value holding a JSON object whose values pass ``check``."""

    def parse(text: Any) -> dict:
        try:
            value = json.loads(s.string(text))
        except json.JSONDecodeError as exc:
            raise s.Invalid(f"not valid JSON ({exc})") from None
        return s.mapping_of(check)(value)

    return parse


def _version_text(text: Any) -> int:
    if not isinstance(text, str) or not text.isdigit() or int(text) < 1:
        raise s.Invalid(f"expected a positive integer as text, got {text!r:.60}")
    return int(text)


# the metadata of elsa_masks.safetensors, checked field by field before any mask is read
_MASKS_METADATA = s.record(
    {
        "shapes": _json_text(s.shape),
        "kept": _json_text(s.integer),
        "codecs": _json_text(s.string),
        "packed_bytes": _json_text(s.integer),
        "elsa_format_version": _version_text,
        "save_id": s.string,
    },
    required=("shapes", "kept"),
)
_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def count_kept(bits: torch.Tensor, numel: int) -> int:
    """The set bits among the first ``numel`` of packed ``bits`` (little bit order), without unpacking them."""
    data = bits.numpy()
    if numel % 8 and len(data):
        return int(_POPCOUNT[data[:-1]].sum(dtype=np.int64)) + int(_POPCOUNT[data[-1] & ((1 << numel % 8) - 1)])
    return int(_POPCOUNT[data].sum(dtype=np.int64))


def read_masks(
    path: str | os.PathLike,
    save_id: str | None = None,
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
    weights_source: str = "the weights",
) -> dict[str, PackedMask]:
    """The packed masks of ``elsa_masks.safetensors``, validated (metadata, shapes, codecs, kept counts, save id).

    Reads format version 2 (masks stored raw or as zlib streams, per the ``codecs`` metadata) and version 1
    (raw packed bits only, no ``codecs``). With ``weight_shapes`` (``{tensor: shape}`` of the checkpoint's
    weights, e.g. from the safetensors headers: ``weights_source`` names them), a mask whose declared shape is
    not its weight's is refused before anything is decoded, so a small file cannot make hf_elsa allocate more
    than the weights it ships; decoding itself never produces more bytes than the declared shape needs.
    """
    path = Path(path)
    with open_safetensors(path) as f:
        meta = s.validate(_MASKS_METADATA, f.metadata() or {}, path, "metadata key")
        version = meta.get("elsa_format_version", 1)
        shapes, kept = meta["shapes"], meta["kept"]
        # version 1 stored every mask raw; from version 2 on the codecs are required
        if version >= 2 and "codecs" not in meta:
            raise ValueError(f"{path}: metadata key codecs: missing (required from elsa_format_version 2 on).")
        codecs, packed_bytes = meta.get("codecs", {}) if version >= 2 else {}, meta.get("packed_bytes", {})
        if save_id is not None and meta.get("save_id") != save_id:
            raise ValueError(f"{path} comes from another save than {ELSA_CONFIG_NAME} (save_id {meta.get('save_id')}).")
        masks = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if key not in shapes or key not in kept or (version >= 2 and key not in codecs):
                raise ValueError(f"{path}: mask {key!r} has no recorded shape/count/codec; the file is corrupted.")
            shape = shapes[key]
            if weight_shapes is not None:
                if key not in weight_shapes:
                    raise ValueError(
                        f"{path}: mask {key!r} names no weight in {weights_source}; the masks belong to another model "
                        "or the file is corrupted (refused before decoding)."
                    )
                if tuple(weight_shapes[key]) != shape:
                    raise ValueError(
                        f"{path}: {key!r} has shape {tuple(weight_shapes[key])} in {weights_source} but its mask has "
                        f"shape {shape} (masks of another model or architecture?); refused before decoding."
                    )
            numel = math.prod(shape)
            if kept[key] > numel:
                raise ValueError(
                    f"{path}: metadata key kept[{key!r}]: {kept[key]} kept weights, more than the {numel} of shape "
                    f"{shape}; the file is corrupted."
                )
            expected = (numel + 7) // 8
            if key in packed_bytes and packed_bytes[key] != expected:
                raise ValueError(
                    f"{path}: mask {key!r} records {packed_bytes[key]} packed bytes, shape {shape} needs {expected}; "
                    "the file is corrupted."
                )
            try:
                stored = f.get_tensor(key)
            except SafetensorError as exc:
                raise ValueError(f"{path}: tensor {key!r} cannot be read ({exc}); the file is corrupted.") from exc
            bits = decode_mask(stored, codecs.get(key, "none"), expected, path, key)
            if bits.numel() != expected:
                raise ValueError(
                    f"{path}: mask {key!r} holds {bits.numel()} bytes, shape {shape} needs {expected}; the "
                    "file is truncated or corrupted."
                )
            actual = count_kept(bits, numel)
            if actual != kept[key]:
                raise ValueError(
                    f"{path}: mask {key!r} keeps {actual} weights, {kept[key]} were saved; the file is corrupted."
                )
            masks[key] = PackedMask(bits=bits, shape=shape, kept=kept[key], stored_nbytes=stored.numel())
    if not masks:
        raise ValueError(f"{path} holds no masks.")
    return masks
