"""File helpers shared by the sparse_io modules: safetensors opening with clear errors, checksums, JSON."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open


def open_safetensors(path: Path):
    """``safe_open(path)``; a missing or unreadable file is a ``ValueError`` naming it."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: the sparse checkpoint is incomplete.")
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the safetensors file ({exc}); it is truncated or corrupted.") from exc


def saved_weight_files(folder: Path) -> list[str]:
    """The weight files (and shard index) ``save_pretrained`` wrote."""
    names = sorted(os.listdir(folder))
    return [n for n in names if n.endswith((".safetensors", ".safetensors.index.json")) and not n.startswith("elsa_")]


def file_info(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupted.") from exc
    except RecursionError:  # "[[[[...": Python's parser recurses per level
        raise ValueError(
            f"{path}: its JSON values nest too deep to be checkpoint metadata; the file is corrupted or forged."
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); the file is corrupted.") from None


def shard_files(folder: Path, index_name: str) -> list[str]:
    """The shard files a ``*.safetensors.index.json`` names in its ``weight_map`` (checked to be a mapping of
    tensor names to file names), for the containment check before transformers opens them."""
    index = read_json(folder / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise ValueError(
            f"{folder / index_name}: 'weight_map' must map tensor names to shard file names; the index is "
            "corrupted or forged."
        )
    return sorted(set(weight_map.values()))


def check_inside(folder: Path, names, source: Any) -> None:
    """Refuse any of ``names`` (relative to ``folder``, existing or not) that resolves outside ``folder``.

    A listed ``../../etc/passwd`` or a symlink to a file elsewhere is an error naming ``source``. Inside a
    Hugging Face cache snapshot (``.../snapshots/<revision>``) links into the repo's ``blobs`` folder are the
    cache's layout and allowed.
    """
    root = folder.resolve()
    roots = [root]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    for name in names:
        try:
            real = (folder / name).resolve()
        except (RuntimeError, OSError) as exc:  # Python < 3.13: RuntimeError("Symlink loop ..."); then OSError ELOOP
            raise ValueError(
                f"{source}: {name!r} is a symlink loop (or a link that cannot be followed: {exc}); replace it with "
                "the file itself."
            ) from None
        if not any(real == r or r in real.parents for r in roots):
            raise ValueError(
                f"{source}: {name!r} resolves to {real}, outside the checkpoint folder {folder} (an absolute path, "
                "'..' or a symlink pointing out); hf_elsa reads only files inside the folder. Copy the file into the "
                "folder instead of linking it."
            )
