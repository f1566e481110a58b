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

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..version import __version__
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


def read_masks(path: str | os.PathLike, save_id: str | None = None) -> dict[str, PackedMask]:
    """The packed masks of ``elsa_masks.safetensors``, validated (shapes, sizes, codecs, kept counts, save id).

    Reads format version 2 (masks stored raw or as zlib streams, per the ``codecs`` metadata) and version 1
    (raw packed bits only, no ``codecs``).
    """
    path = Path(path)
    with open_safetensors(path) as f:
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
            bits = decode_mask(stored, codecs.get(key, "none"), expected, path, key)
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
