"""Shared factories and checks of the sparse_io tests.

Tiny fp32 models from tests/conftest.py (Llama, GPT-2, OPT, Qwen2), seeded, offline; a "wide" Llama (256-wide
Linears) where the size of the coded masks matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import VOCAB, make_model
from safetensors import safe_open
from safetensors.torch import save_file

from hf_elsa import ElsaConfig, sparse_io
from hf_elsa.data import token_blocks
from hf_elsa.projection import project
from hf_elsa.sparse_io import COMPRESSED_NAME, ELSA_CONFIG_NAME, MASKS_NAME, attach_sparsity, get_sparsity
from hf_elsa.sparse_io.files import sha256
from hf_elsa.targets import find_prunable_modules

# the tiny configs of tests/conftest.py (seeded, eager attention); the sparse_io tests run on four of them
ARCHS = ["gpt2", "llama", "opt", "qwen2"]


def tiny_model(arch: str = "llama", seed: int = 0):
    """A tiny model of ``arch``, or "wide": one Llama layer of 256x256 (q, o), 128x256 (k, v) and 512x256 /
    256x512 (MLP) weights, where masks of 4-16 KB make the size of their coded stream, not zlib's fixed
    overhead, decide the ratios."""
    if arch == "wide":
        return make_model("llama", seed, hidden=256, intermediate=512, num_hidden_layers=1).eval()
    return make_model(arch, seed).eval()


@torch.no_grad()
def pruned_model(arch: str = "llama", sparsity: float = 0.9, seed: int = 0, metadata=None):
    """A tiny model with every prunable weight magnitude-projected to ``sparsity``, masks attached."""
    model = tiny_model(arch, seed)
    masks = {}
    for name, module in find_prunable_modules(model).items():
        projected, mask = project(module.weight, sparsity)
        module.weight.copy_(projected)
        masks[name] = mask
    attach_sparsity(
        model, masks, {"method": "magnitude", "sparsity": sparsity, "sparsity_type": "unstructured", **(metadata or {})}
    )
    return model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(expected: dict, model, canonical_zero: bool = False) -> None:
    """Every tensor equal bit for bit (``canonical_zero``: -0.0 and +0.0 count as the same bits)."""
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        a, b = value, actual[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if canonical_zero:
            a, b = torch.where(a == 0, torch.zeros_like(a), a), torch.where(b == 0, torch.zeros_like(b), b)
        if a.is_floating_point():
            a, b = (
                a.contiguous().view(torch.int32 if a.element_size() == 4 else torch.int16),
                b.contiguous().view(torch.int32 if b.element_size() == 4 else torch.int16),
            )
        assert torch.equal(a, b), key


def masks_of(model) -> dict[str, torch.Tensor]:
    st = get_sparsity(model)
    return {k: st.mask(k) for k in st.masks}


def rewrite_recorded_hash(folder: Path, name: str) -> None:
    """Make elsa_config.json agree with a file we edited, to reach the checks behind the checksum."""
    path = folder / ELSA_CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
    path.write_text(json.dumps(meta))


def read_masks_raw(folder: Path):
    """The tensors of the masks file as stored (zlib streams or raw packed bits) and its metadata."""
    with safe_open(folder / MASKS_NAME, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def downgrade_to_format_1(folder: Path) -> None:
    """Rewrite a fresh save exactly as hf_elsa's format 1 wrote it: raw packed masks, no codecs, version 1."""
    masks = sparse_io.read_masks(folder / MASKS_NAME)
    _, meta = read_masks_raw(folder)
    old_meta = {k: meta[k] for k in ("format", "elsa_file", "bitorder", "save_id", "shapes", "kept")}
    save_file(
        {k: m.bits for k, m in masks.items()}, folder / MASKS_NAME, metadata={**old_meta, "elsa_format_version": "1"}
    )
    rewrite_recorded_hash(folder, MASKS_NAME)
    if (folder / COMPRESSED_NAME).exists():  # same layout in format 1; only the version differs
        with safe_open(folder / COMPRESSED_NAME, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
        save_file(tensors, folder / COMPRESSED_NAME, metadata={**meta, "elsa_format_version": "1"})
        rewrite_recorded_hash(folder, COMPRESSED_NAME)
    data = json.loads((folder / "config.json").read_text())
    data["elsa_sparsity"]["elsa_format_version"] = 1
    (folder / "config.json").write_text(json.dumps(data))
    rewrite_recorded_hash(folder, "config.json")
    data = json.loads((folder / ELSA_CONFIG_NAME).read_text())
    data["elsa_format_version"] = 1
    del data["files"]["config.json"]  # format 1 did not checksum config.json
    (folder / ELSA_CONFIG_NAME).write_text(json.dumps(data))


def blocks(n_tokens: int = 4000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return token_blocks(torch.randint(0, VOCAB, (n_tokens,), generator=gen), block_size=32)


def tiny_args(tmp_path, **overrides) -> ElsaConfig:
    defaults = {
        "output_dir": str(tmp_path / "run"),
        "sparsity": 0.9,
        "max_steps": 4,
        "admm_interval": 1,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "per_device_train_batch_size": 4,
        "logging_steps": 100,
        "seed": 0,
        "disable_tqdm": True,
        # the default recipe's SparseGPT start and distillation are tested elsewhere (tests/test_runs.py)
        "admm_init": "magnitude",
        "distill_weight": 0.0,
    }
    defaults.update(overrides)
    return ElsaConfig(**defaults)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
