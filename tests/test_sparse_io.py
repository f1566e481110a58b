"""Sparse checkpoints (hf_elsa.sparse_io): formats, loading, validation, keep-mask fine-tuning, Hub, CLI.

Tiny fp32 models built from configs (Llama, GPT-2, OPT, Qwen2), seeded, offline; a "wide" Llama (256-wide
Linears) where the size of the coded masks matters.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import RepoUrl
from huggingface_hub.errors import OfflineModeIsEnabled
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

import hf_elsa
from hf_elsa import ElsaConfig, ElsaTrainer, load_sparse_model, sparse_io, sparsity_report
from hf_elsa.cli import main as cli_main
from hf_elsa.data import token_blocks
from hf_elsa.projection import project
from hf_elsa.sparse_io import (
    COMPRESSED_NAME,
    ELSA_CONFIG_NAME,
    MASKS_NAME,
    PackedMask,
    apply_masks,
    attach_sparsity,
    detach_sparsity,
    get_sparsity,
)
from hf_elsa.targets import find_prunable_modules

VOCAB = 128
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
}
ARCHS = sorted(CONFIGS)
# one layer of 256x256 (q, o), 128x256 (k, v) and 512x256 / 256x512 (MLP) weights: masks of 4-16 KB, so the
# size of their coded stream, not zlib's fixed overhead, decides the ratios
WIDE = lambda: LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


# -- helpers ----------------------------------------------------------------------------------------


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config({**CONFIGS, "wide": WIDE}[arch]()).eval()


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
    meta["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sparse_io._sha256(folder / name)}
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
    for name, where in ((ELSA_CONFIG_NAME, None), ("config.json", "elsa_sparsity")):
        data = json.loads((folder / name).read_text())
        (data[where] if where else data)["elsa_format_version"] = 1
        (folder / name).write_text(json.dumps(data))


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
    }
    defaults.update(overrides)
    return ElsaConfig(**defaults)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# -- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_round_trip_is_bit_identical_and_loads_with_plain_from_pretrained(arch, tmp_path):
    model = pruned_model(arch)
    expected, masks = state(model), masks_of(model)
    model.save_pretrained(tmp_path / "m")

    files = set(os.listdir(tmp_path / "m"))
    assert {"config.json", "model.safetensors", MASKS_NAME, ELSA_CONFIG_NAME, "README.md"} <= files
    loaded = load_sparse_model(tmp_path / "m")
    assert_bit_identical(expected, loaded)
    assert {k: v for k, v in masks_of(loaded).items()}.keys() == masks.keys()
    assert all(torch.equal(masks_of(loaded)[k], masks[k]) for k in masks)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a standard folder
    assert_bit_identical(expected, plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_round_trip_is_bit_identical(arch, tmp_path):
    model = pruned_model(arch)
    expected, masks = state(model), masks_of(model)
    model.save_pretrained(tmp_path / "c", compressed=True)

    files = set(os.listdir(tmp_path / "c"))
    assert COMPRESSED_NAME in files and "model.safetensors" not in files
    loaded = load_sparse_model(tmp_path / "c")
    # kept values bit for bit; a pruned entry saved as -0.0 reads back as +0.0
    assert_bit_identical(expected, loaded, canonical_zero=True)
    assert all(torch.equal(masks_of(loaded)[k], masks[k]) for k in masks)
    # the loaded model re-saves (masks restored), in either format
    loaded.save_pretrained(tmp_path / "again")
    assert_bit_identical(state(loaded), load_sparse_model(tmp_path / "again"))


@pytest.mark.parametrize("compressed", [False, True])
def test_sharded_checkpoints_round_trip(compressed, tmp_path):
    model = pruned_model("qwen2")
    expected = state(model)
    model.save_pretrained(tmp_path / "s", max_shard_size="20KB", compressed=compressed)
    shards = list((tmp_path / "s").glob("model-*.safetensors"))
    assert (len(shards) > 1) != compressed
    meta = json.loads((tmp_path / "s" / ELSA_CONFIG_NAME).read_text())
    assert set(meta["files"]) == {p.name for p in shards} | (
        {COMPRESSED_NAME, MASKS_NAME} if compressed else {"model.safetensors.index.json", MASKS_NAME}
    )
    assert_bit_identical(expected, load_sparse_model(tmp_path / "s"), canonical_zero=compressed)
    assert sparsity_report(tmp_path / "s").zeros == sparsity_report(model).zeros


def test_plain_from_pretrained_refuses_the_compressed_format(tmp_path):
    pruned_model().save_pretrained(tmp_path / "c", compressed=True)
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    entry = json.loads((tmp_path / "c" / "config.json").read_text())["elsa_sparsity"]
    assert entry["format"] == "compressed" and "load_sparse_model" in entry["note"]
    assert "cannot read it" in (tmp_path / "c" / "README.md").read_text()


def test_dense_round_trip_keeps_negative_zero_bits(tmp_path):
    model = pruned_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.neg_()  # pruned entries become -0.0
    expected = state(model)
    model.save_pretrained(tmp_path / "m")
    assert_bit_identical(expected, load_sparse_model(tmp_path / "m"))


def test_bf16_model_round_trips_and_load_accepts_dtype(tmp_path):
    model = pruned_model().to(torch.bfloat16)
    expected = state(model)
    model.save_pretrained(tmp_path / "c", compressed=True)
    loaded = load_sparse_model(tmp_path / "c")
    assert loaded.dtype == torch.bfloat16
    assert_bit_identical(expected, loaded, canonical_zero=True)
    as_fp32 = load_sparse_model(tmp_path / "c", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    assert sparsity_report(as_fp32).sparsity == pytest.approx(sparsity_report(model).sparsity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_pruned_tensors_take_at_most_015x_at_90_percent(dtype, tmp_path):
    # in bf16 a raw bitmask alone is 1/16 = 0.0625x: only the zlib-coded mask fits 0.1x values into 0.15x
    model = pruned_model("wide", sparsity=0.9).to(dtype)
    model.save_pretrained(tmp_path / "c", compressed=True)
    masks, _ = read_masks_raw(tmp_path / "c")
    stored = dense = 0
    with safe_open(tmp_path / "c" / COMPRESSED_NAME, "pt") as f:
        for key, mask_stream in masks.items():
            values = f.get_slice(key)
            n_values = values.get_shape()[0]
            numel = model.get_parameter(key).numel()
            tensor_stored = n_values * dtype.itemsize + mask_stream.numel()  # kept values + coded mask
            assert tensor_stored <= 0.15 * numel * dtype.itemsize, key
            stored, dense = stored + tensor_stored, dense + numel * dtype.itemsize
    assert stored / dense <= 0.15
    report = sparsity_report(tmp_path / "c")
    assert sum(t.stored_bytes for t in report.tensors) == stored
    assert sum(t.dense_bytes for t in report.tensors) == dense
    assert report.format == "compressed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compressed", [False, True])
def test_zlib_coded_masks_round_trip(dtype, compressed, tmp_path):
    model = pruned_model("wide").to(dtype)
    expected, masks = state(model), masks_of(model)
    model.save_pretrained(tmp_path / "m", compressed=compressed)

    stored, meta = read_masks_raw(tmp_path / "m")
    assert meta["elsa_format_version"] == str(sparse_io.FORMAT_VERSION) == "2"
    assert set(json.loads(meta["codecs"]).values()) == {"zlib"}
    raw_bytes = sum(m.bits.numel() for m in get_sparsity(model).masks.values())
    assert sum(t.numel() for t in stored.values()) < 0.5 * raw_bytes  # entropy bound at 90%: 0.469
    loaded = load_sparse_model(tmp_path / "m")
    assert loaded.dtype == dtype
    assert_bit_identical(expected, loaded, canonical_zero=compressed)
    assert all(torch.equal(masks_of(loaded)[k], masks[k]) for k in masks)


def test_incompressible_masks_are_stored_raw(tmp_path):
    model = pruned_model(sparsity=0.5)  # a 50% magnitude mask is ~random bits: zlib cannot shrink them
    model.save_pretrained(tmp_path / "m")
    stored, meta = read_masks_raw(tmp_path / "m")
    codecs = json.loads(meta["codecs"])
    assert "none" in codecs.values()
    for key, data in stored.items():
        bits = get_sparsity(model).masks[key].bits
        assert torch.equal(data, bits) if codecs[key] == "none" else data.numel() < bits.numel()
    assert_bit_identical(state(model), load_sparse_model(tmp_path / "m"))


@pytest.mark.parametrize("compressed", [False, True])
def test_format_1_folder_with_raw_masks_still_loads(compressed, tmp_path):
    model = pruned_model("wide")
    expected, masks = state(model), masks_of(model)
    model.save_pretrained(tmp_path / "old", compressed=compressed)
    downgrade_to_format_1(tmp_path / "old")
    stored, meta = read_masks_raw(tmp_path / "old")
    assert meta["elsa_format_version"] == "1" and "codecs" not in meta
    assert all(stored[k].numel() == (v.numel() + 7) // 8 for k, v in masks.items())

    loaded = load_sparse_model(tmp_path / "old")
    assert_bit_identical(expected, loaded, canonical_zero=compressed)
    assert all(torch.equal(masks_of(loaded)[k], masks[k]) for k in masks)
    report = sparsity_report(tmp_path / "old")
    assert report.zeros == sparsity_report(model).zeros
    if compressed:
        values = sum(m.sum().item() for m in masks.values()) * 4
        assert sum(t.stored_bytes for t in report.tensors) == values + sum(t.numel() for t in stored.values())

    loaded.save_pretrained(tmp_path / "new", compressed=compressed)  # re-saved in the current format
    _, meta = read_masks_raw(tmp_path / "new")
    assert meta["elsa_format_version"] == "2" and "codecs" in meta
    assert json.loads((tmp_path / "new" / ELSA_CONFIG_NAME).read_text())["elsa_format_version"] == 2
    assert (tmp_path / "new" / MASKS_NAME).stat().st_size < (tmp_path / "old" / MASKS_NAME).stat().st_size
    assert_bit_identical(expected, load_sparse_model(tmp_path / "new"), canonical_zero=compressed)


def test_resave_switches_format_in_place_and_keeps_foreign_files(tmp_path):
    folder = tmp_path / "m"
    model = pruned_model()
    expected = state(model)
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "checkpoint-1").mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"stale weights of an older save")
    model.save_pretrained(folder)
    assert not (folder / "pytorch_model.bin").exists()
    model.save_pretrained(folder, compressed=True)
    assert not (folder / "model.safetensors").exists()  # stale dense weights would load silently
    assert (folder / "tokenizer.json").exists() and (folder / "checkpoint-1").is_dir()
    assert_bit_identical(expected, load_sparse_model(folder), canonical_zero=True)
    model.save_pretrained(folder)
    assert not (folder / COMPRESSED_NAME).exists()
    assert_bit_identical(expected, load_sparse_model(folder))


# -- metadata and model card ------------------------------------------------------------------------


def test_metadata_in_config_elsa_config_and_model_card(tmp_path):
    evaluation = {"protocol": "word perplexity, 512-token windows", "results": {"wiki ppl": 31.5}}
    model = pruned_model("gpt2", metadata={"base_model": "openai-community/gpt2", "evaluation": evaluation})
    model.save_pretrained(tmp_path / "m")

    entry = json.loads((tmp_path / "m" / "config.json").read_text())["elsa_sparsity"]
    assert entry["method"] == "magnitude" and entry["sparsity"] == 0.9 and entry["sparsity_type"] == "unstructured"
    assert entry["hf_elsa_version"] == hf_elsa.__version__ and entry["format"] == "dense"
    assert set(entry["tensors"]) == {f"{n}.weight" for n in find_prunable_modules(model)}
    assert all(0.89 < s < 0.91 for s in entry["tensors"].values())
    assert "target_modules" in entry

    meta = json.loads((tmp_path / "m" / ELSA_CONFIG_NAME).read_text())
    assert meta["elsa_format_version"] == sparse_io.FORMAT_VERSION
    assert meta["save_id"] == entry["save_id"]
    assert set(meta["files"]) == {"model.safetensors", MASKS_NAME}

    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "hf_elsa"
    assert {"elsa", "sparse", "pruned"} <= set(card.data.tags)
    assert card.data.base_model == "openai-community/gpt2"
    assert "word perplexity, 512-token windows" in card.text and "31.5" in card.text
    assert "transformer.h.0.attn.c_attn.weight" in card.text and "magnitude" in card.text


def test_masks_file_is_bit_packed_zlib_coded_with_shapes(tmp_path):
    """The documented layout, read with zlib and numpy only (no hf_elsa)."""
    model = pruned_model("wide")
    model.save_pretrained(tmp_path / "m")
    masks, meta = read_masks_raw(tmp_path / "m")
    assert meta["bitorder"] == "little" and meta["elsa_format_version"] == "2"
    shapes, codecs = json.loads(meta["shapes"]), json.loads(meta["codecs"])
    packed_bytes, kept = json.loads(meta["packed_bytes"]), json.loads(meta["kept"])
    for key, stream in masks.items():
        weight = model.get_parameter(key)
        assert stream.dtype == torch.uint8 and stream.ndim == 1 and codecs[key] == "zlib"
        packed = zlib.decompress(stream.numpy().tobytes())  # a standard zlib stream
        assert len(packed) == packed_bytes[key] == (weight.numel() + 7) // 8
        assert tuple(shapes[key]) == tuple(weight.shape)
        bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=weight.numel(), bitorder="little")
        assert torch.equal(torch.from_numpy(bits.astype(bool)).reshape(weight.shape), weight != 0)
        assert kept[key] == int(bits.sum())
        unpacked = PackedMask(torch.frombuffer(bytearray(packed), dtype=torch.uint8), tuple(shapes[key]), 0).unpack()
        assert torch.equal(unpacked, weight != 0)


def test_unknown_keys_are_tolerated_and_kept(tmp_path, caplog):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / ELSA_CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["from_the_future"] = {"x": 1}
    path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="hf_elsa.sparse_io"):
        loaded = load_sparse_model(tmp_path / "m")
    assert "from_the_future" in caplog.text
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / ELSA_CONFIG_NAME).read_text())["from_the_future"] == {"x": 1}

    meta["elsa_format_version"] = sparse_io.FORMAT_VERSION + 1
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="newer"):
        load_sparse_model(tmp_path / "m")


def test_user_readme_text_is_kept(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mine\n---\n\n# My notes\n\nKeep this.\n")
    model = pruned_model()
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # the second save replaces only our section
    text = (folder / "README.md").read_text()
    card = huggingface_hub.ModelCard(text)
    assert "Keep this." in text and text.count(sparse_io._CARD_START) == 1
    assert card.data.license == "apache-2.0" and {"mine", "elsa"} <= set(card.data.tags)


# -- validation -------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "compressed, damage, filename",
    [
        (False, _truncate, "model.safetensors"),
        (False, _truncate, MASKS_NAME),
        (False, _flip_last_byte, "model.safetensors"),
        (True, _truncate, COMPRESSED_NAME),
        (True, _flip_last_byte, COMPRESSED_NAME),
        (True, _flip_last_byte, MASKS_NAME),
        (False, lambda p: p.unlink(), MASKS_NAME),
    ],
)
def test_damaged_files_are_rejected_naming_the_file(compressed, damage, filename, tmp_path):
    pruned_model().save_pretrained(tmp_path / "m", compressed=compressed)
    damage(tmp_path / "m" / filename)
    with pytest.raises(ValueError, match=filename.replace(".", r"\.")):
        load_sparse_model(tmp_path / "m")


@pytest.mark.parametrize("filename", ["model.safetensors", MASKS_NAME])
def test_truncated_files_are_rejected_even_without_checksums(filename, tmp_path):
    pruned_model().save_pretrained(tmp_path / "m")
    _truncate(tmp_path / "m" / filename, keep=0.7)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_sparse_model(tmp_path / "m", verify=False)


def test_truncated_compressed_file_rejected_without_checksums(tmp_path):
    pruned_model().save_pretrained(tmp_path / "c", compressed=True)
    _truncate(tmp_path / "c" / COMPRESSED_NAME, keep=0.7)
    with pytest.raises(ValueError, match=COMPRESSED_NAME.replace(".", r"\.")):
        load_sparse_model(tmp_path / "c", verify=False)


def _flip_middle(stream: bytes, meta: dict, key: str):
    data = bytearray(stream)
    data[len(data) // 2] ^= 0xFF
    return bytes(data), meta


def _longer(stream: bytes, meta: dict, key: str):  # a valid stream of too many bytes
    return zlib.compress(zlib.decompress(stream) + bytes(8)), meta


def _unknown_codec(stream: bytes, meta: dict, key: str):
    codecs = json.loads(meta["codecs"])
    codecs[key] = "zstd"
    return stream, {**meta, "codecs": json.dumps(codecs)}


@pytest.mark.parametrize(
    "damage, message",
    [
        (_flip_middle, "zlib stream"),
        (lambda s, m, k: (s[: len(s) // 2], m), "ends early"),
        (lambda s, m, k: (s + b"\x00\x01", m), "stray bytes"),
        (_longer, "more than"),
        (lambda s, m, k: (s[:-1] + bytes([s[-1] ^ 1]), m), "zlib stream is corrupted"),  # adler32 check
        (_unknown_codec, "codec 'zstd'"),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_corrupted_mask_stream_is_rejected_naming_file_and_tensor(compressed, damage, message, tmp_path):
    pruned_model("wide").save_pretrained(tmp_path / "m", compressed=compressed)
    key = "model.layers.0.mlp.down_proj.weight"
    masks, meta = read_masks_raw(tmp_path / "m")
    stream, meta = damage(masks[key].numpy().tobytes(), meta, key)
    masks[key] = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    save_file(masks, tmp_path / "m" / MASKS_NAME, metadata=meta)  # a well-formed file, a bad stream inside
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}.*(SHA-256 differs|were saved: the file is truncated)"):
        load_sparse_model(tmp_path / "m")
    rewrite_recorded_hash(tmp_path / "m", MASKS_NAME)  # past the checksum: the stream itself is checked
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}: mask '{key}'.*{message}") as err:
        load_sparse_model(tmp_path / "m")
    assert "corrupted" in str(err.value) or "newer hf_elsa" in str(err.value)
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}: mask '{key}'"):
        sparsity_report(tmp_path / "m")  # hf-elsa inspect reads the masks the same way


def test_mask_disagreeing_with_zeros_is_rejected(tmp_path):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    key = "model.layers.1.mlp.down_proj.weight"
    masks = {k: PackedMask(v.bits, v.shape, v.kept) for k, v in get_sparsity(model).masks.items()}
    wrong = masks[key].unpack().clone()
    wrong.view(-1)[wrong.view(-1).nonzero()[0]] = False  # a kept (nonzero) weight now marked pruned
    masks[key] = PackedMask.pack(wrong)
    sparse_io._write_masks(tmp_path / "m" / MASKS_NAME, masks, get_sparsity(model).config.save_id)
    rewrite_recorded_hash(tmp_path / "m", MASKS_NAME)
    with pytest.raises(ValueError, match=rf"{key}.*nonzero weights where its mask prunes them"):
        load_sparse_model(tmp_path / "m")


def test_mask_shape_mismatch_is_rejected(tmp_path):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    key = "model.layers.0.mlp.up_proj.weight"  # 64x32 stored as 32x64
    masks = dict(get_sparsity(model).masks)
    masks[key] = PackedMask.pack(masks[key].unpack().t().contiguous())
    sparse_io._write_masks(tmp_path / "m" / MASKS_NAME, masks, get_sparsity(model).config.save_id)
    rewrite_recorded_hash(tmp_path / "m", MASKS_NAME)
    with pytest.raises(ValueError, match=rf"{key}.*shape \(64, 32\).*mask has shape \(32, 64\)"):
        load_sparse_model(tmp_path / "m")


def test_masks_of_another_architecture_are_rejected(tmp_path):
    pruned_model("llama").save_pretrained(tmp_path / "llama")
    pruned_model("qwen2").save_pretrained(tmp_path / "qwen2")
    (tmp_path / "qwen2" / MASKS_NAME).unlink()
    os.link(tmp_path / "llama" / MASKS_NAME, tmp_path / "qwen2" / MASKS_NAME)
    with pytest.raises(ValueError, match="another save"):
        load_sparse_model(tmp_path / "qwen2", verify=False)


def test_folder_rewritten_by_a_plain_save_is_rejected(tmp_path):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        plain.model.layers[0].mlp.up_proj.weight.add_(1.0)  # densified by, e.g., dense fine-tuning
    plain.save_pretrained(tmp_path / "m")  # the stock method: leaves our files behind
    with pytest.raises(ValueError, match="model.safetensors.*rewritten outside hf_elsa"):
        load_sparse_model(tmp_path / "m")
    with pytest.raises(ValueError, match="nonzero weights where its mask prunes them"):
        load_sparse_model(tmp_path / "m", verify=False)
    plain.save_pretrained(tmp_path / "plain")  # config.json carries the entry, no elsa_config.json
    with pytest.raises(ValueError, match="rewritten by a plain save_pretrained"):
        load_sparse_model(tmp_path / "plain")


def test_not_a_sparse_folder(tmp_path):
    tiny_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not an hf_elsa sparse checkpoint"):
        load_sparse_model(tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        load_sparse_model(tmp_path / "nowhere")


def test_save_refuses_a_densified_model(tmp_path):
    model = pruned_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(0.5)
    with pytest.raises(ValueError, match=r"q_proj\.weight.*densified.*apply_masks"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    apply_masks(model)
    model.save_pretrained(tmp_path / "m")
    assert sparsity_report(load_sparse_model(tmp_path / "m")).sparsity == pytest.approx(0.9, abs=1e-3)
    detach_sparsity(model)  # an explicit opt-out writes a plain folder
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / MASKS_NAME).exists()
    assert "elsa_sparsity" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_attach_sparsity_validates_masks():
    model = tiny_model()
    with pytest.raises(ValueError, match="names no parameter or module"):
        attach_sparsity(model, {"model.layers.9.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        attach_sparsity(model, {"model.layers.0.mlp.up_proj": torch.ones(32, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="torch.bool"):
        attach_sparsity(model, {"model.layers.0.mlp.up_proj": torch.ones(64, 32)})
    with pytest.raises(ValueError, match="masks=None"):
        attach_sparsity(model)


def test_save_pretrained_signature_is_the_original_plus_compressed():
    import inspect

    model = pruned_model()
    params = inspect.signature(model.save_pretrained).parameters
    original = inspect.signature(type(model).save_pretrained).parameters
    assert set(original) - {"self"} <= set(params) and params["compressed"].default is False


# -- sparsity report --------------------------------------------------------------------------------


def test_sparsity_report_of_model_and_folder(tmp_path):
    model = pruned_model("opt", sparsity=0.75)
    report = sparsity_report(model)
    assert report.sparsity == pytest.approx(0.75, abs=1e-3)
    assert len(report.tensors) == len(find_prunable_modules(model))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert 0 < report.overall_sparsity < report.sparsity
    name = report.tensors[0].name
    assert report[name].sparsity == pytest.approx(0.75, abs=1e-2)
    assert json.loads(json.dumps(report.to_dict()))["tensors"][name]["shape"] == list(report[name].shape)
    text = str(report)
    assert name in text and "75.00%" in text and "whole model" in text

    model.save_pretrained(tmp_path / "c", compressed=True)
    from_folder = sparsity_report(tmp_path / "c")
    assert from_folder.zeros == report.zeros and from_folder.total_params == report.total_params
    unattached = sparsity_report(tiny_model("opt"))  # default targets: every Linear but the LM head
    assert len(unattached.tensors) == len(report.tensors) and unattached.sparsity == 0


# -- trainer integration and keep-mask fine-tuning --------------------------------------------------


def test_elsa_trainer_attaches_masks_and_save_model_writes_a_sparse_folder(tmp_path):
    model = tiny_model()
    trainer = ElsaTrainer(model=model, args=tiny_args(tmp_path), train_dataset=blocks())
    with pytest.warns(UserWarning):  # 4 steps do not converge; the warning is expected
        trainer.train()
    st = get_sparsity(model)
    assert st is not None and st.config.method == "elsa" and st.config.sparsity == 0.9
    assert st.config.hyperparameters["admm_interval"] == 1
    opt_masks = {f"{k}.weight": v for k, v in trainer.elsa_optimizer.masks().items()}
    assert all(torch.equal(st.mask(k), opt_masks[k]) for k in opt_masks)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = load_sparse_model(tmp_path / "saved")
    assert_bit_identical(state(model), loaded)
    assert (tmp_path / "saved" / "training_args.bin").exists()


def _keep_mask_args(tmp_path, max_steps, **overrides):
    return tiny_args(
        tmp_path,
        keep_mask=True,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_steps=max_steps,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=5,
        **overrides,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keep_mask_fine_tuning_keeps_the_mask_through_accumulation_checkpoint_and_resume(arch, tmp_path):
    pruned_model(arch).save_pretrained(tmp_path / "pruned")
    model = load_sparse_model(tmp_path / "pruned")
    masks, before = masks_of(model), state(model)

    trainer = ElsaTrainer(model=model, args=_keep_mask_args(tmp_path, 15), train_dataset=blocks())
    trainer.train()
    after = state(model)
    assert any(not torch.equal(before[k], after[k]) for k in masks)  # it did train, with lr 1e-2
    for key, mask in masks.items():
        assert torch.equal(after[key] != 0, mask), key  # same zeros, and every kept weight still nonzero
        assert torch.equal(masks_of(model)[key], mask)

    # the checkpoint is itself a sparse folder, and resuming from it keeps the mask
    checkpoint = tmp_path / "run" / "checkpoint-10"
    assert (checkpoint / MASKS_NAME).exists()
    assert all(torch.equal(masks_of(load_sparse_model(checkpoint))[k], masks[k]) for k in masks)
    resumed_model = load_sparse_model(tmp_path / "pruned")
    resumed = ElsaTrainer(model=resumed_model, args=_keep_mask_args(tmp_path, 15), train_dataset=blocks())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 15
    for key, mask in masks.items():
        assert torch.equal(resumed_model.get_parameter(key) != 0, mask), key
    st = get_sparsity(resumed_model)
    assert st.config.fine_tuning["keep_mask"] and st.config.method == "magnitude"  # the pruning facts survive

    resumed_model.save_pretrained(tmp_path / "final", compressed=True)
    final = load_sparse_model(tmp_path / "final")
    assert all(torch.equal(masks_of(final)[k], masks[k]) for k in masks)
    assert_bit_identical(state(resumed_model), final, canonical_zero=True)


def test_re_pruning_a_loaded_sparse_model_checkpoints_without_stale_masks(tmp_path):
    pruned_model(sparsity=0.5).save_pretrained(tmp_path / "half")
    model = load_sparse_model(tmp_path / "half")
    # ADMM for 5 of 6 steps, so checkpoint-2 is written mid-ADMM: weights move, the 50% masks are stale
    args = tiny_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, admm_interval=1, admm_fraction=0.8)
    trainer = ElsaTrainer(model=model, args=args, train_dataset=blocks())
    with pytest.warns(UserWarning):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-2" / MASKS_NAME).exists()
    assert (tmp_path / "run" / "checkpoint-6" / MASKS_NAME).exists()
    assert sparsity_report(model).sparsity == pytest.approx(0.9, abs=1e-3)
    assert get_sparsity(model).config.sparsity == 0.9


# -- Hub --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercept the Hub calls; record what would be uploaded (file names and a copy of the text files)."""
    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        files = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        texts = {f: (Path(folder_path) / f).read_text() for f in files if f.endswith((".json", ".md"))}
        calls["upload_folder"].append({"repo_id": repo_id, "files": files, "texts": texts, **kwargs})
        return "https://huggingface.co/commit/fake"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # nothing leaves: API patched
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


SPARSE_FILES = {"config.json", "generation_config.json", ELSA_CONFIG_NAME, MASKS_NAME, "README.md"}


@pytest.mark.parametrize("compressed", [False, True])
def test_save_pretrained_push_to_hub_uploads_the_sparse_checkpoint(compressed, fake_hub, tmp_path):
    model = pruned_model()
    model.save_pretrained(
        tmp_path / "m",
        compressed=compressed,
        push_to_hub=True,
        repo_id="me/tiny-sparse",
        private=True,
        commit_message="sparse!",
    )
    assert fake_hub["create_repo"][0]["repo_id"] == "me/tiny-sparse" and fake_hub["create_repo"][0]["private"]
    (upload,) = fake_hub["upload_folder"]
    weights = COMPRESSED_NAME if compressed else "model.safetensors"
    assert set(upload["files"]) == SPARSE_FILES | {weights}
    assert upload["repo_id"] == "me/tiny-sparse" and upload["commit_message"] == "sparse!"
    assert "model*.safetensors" in upload["delete_patterns"]  # a stale other format is removed on the Hub
    assert "library_name: hf_elsa" in upload["texts"]["README.md"]
    assert json.loads(upload["texts"]["config.json"])["elsa_sparsity"]["format"] == (
        "compressed" if compressed else "dense"
    )


def test_model_push_to_hub_uploads_the_sparse_checkpoint(fake_hub):
    pruned_model().push_to_hub("me/tiny", compressed=True, tags=["demo"])
    (upload,) = fake_hub["upload_folder"]
    assert set(upload["files"]) == SPARSE_FILES | {COMPRESSED_NAME}
    assert "- demo" in upload["texts"]["README.md"]


def test_trainer_push_to_hub_uploads_masks_metadata_and_our_card(fake_hub, tmp_path):
    model = tiny_model()
    args = tiny_args(tmp_path, hub_model_id="me/elsa-tiny")
    trainer = ElsaTrainer(model=model, args=args, train_dataset=blocks())
    with pytest.warns(UserWarning):
        trainer.train()
    trainer.push_to_hub(dataset="random-tokens")
    assert fake_hub["create_repo"][0]["repo_id"] == "me/elsa-tiny"
    (upload,) = fake_hub["upload_folder"]
    assert SPARSE_FILES | {"model.safetensors"} <= set(upload["files"])
    card = huggingface_hub.ModelCard(upload["texts"]["README.md"])
    assert card.data.library_name == "hf_elsa" and {"elsa", "sparse", "pruned"} <= set(card.data.tags)
    assert card.data.datasets == ["random-tokens"] and "admm_interval" in card.text
    meta = json.loads(upload["texts"][ELSA_CONFIG_NAME])
    assert meta["method"] == "elsa" and meta["hyperparameters"]["recipe"] == "elsa"


def test_push_offline_gives_a_clear_error(tmp_path):
    model = pruned_model()
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        model.save_pretrained(tmp_path / "m", push_to_hub=True, repo_id="me/x")
    assert not (tmp_path / "m").exists()  # fails before writing anything
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        model.push_to_hub("me/x")
    trainer = ElsaTrainer(model=tiny_model(), args=tiny_args(tmp_path, hub_model_id="me/x"), train_dataset=blocks())
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        trainer.push_to_hub()


def test_load_from_a_hub_repo_id(monkeypatch, tmp_path):
    model = pruned_model()
    model.save_pretrained(tmp_path / "snapshot", compressed=True)
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = load_sparse_model("me/tiny-sparse", revision="v1", dtype=torch.float32)
    assert seen == {"repo_id": "me/tiny-sparse", "revision": "v1"}
    assert_bit_identical(state(model), loaded, canonical_zero=True)


def test_load_offline_repo_id_gives_a_clear_error():
    with pytest.raises(OSError, match="offline mode is on.*not in the local Hugging Face cache"):
        load_sparse_model("me/not-cached-anywhere")


# -- atomic saves -----------------------------------------------------------------------------------


def _no_tmp_left(parent: Path) -> bool:
    return not list(parent.glob(f"{sparse_io._TMP_PREFIX}*"))


@pytest.mark.parametrize("failing", ["_write_masks", "_compress", "_file_info"])
def test_a_failing_save_leaves_the_old_folder_intact(failing, monkeypatch, tmp_path):
    old = pruned_model(seed=1)
    old.save_pretrained(tmp_path / "m")
    expected = state(old)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sparse_io, failing, boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pruned_model(seed=2).save_pretrained(tmp_path / "m", compressed=True)
    assert_bit_identical(expected, load_sparse_model(tmp_path / "m"))
    assert _no_tmp_left(tmp_path)


def test_an_interrupted_commit_never_leaves_a_loadable_wrong_model(monkeypatch, tmp_path):
    pruned_model(seed=1).save_pretrained(tmp_path / "m")
    real_replace, moved = os.replace, []

    def replace_then_die(src, dst):
        if Path(dst).parent == tmp_path / "m" and len(moved) == 2:
            raise KeyboardInterrupt  # killed in the middle of moving files into place
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(sparse_io.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        pruned_model(seed=2).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sparse_io.os, "replace", real_replace)
    with pytest.raises(ValueError, match="no config.json"):
        load_sparse_model(tmp_path / "m")
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers' own "no config" errors
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    new = pruned_model(seed=2)
    new.save_pretrained(tmp_path / "m")  # the next save repairs the folder
    assert_bit_identical(state(new), load_sparse_model(tmp_path / "m"))


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_sparse_io import pruned_model
    from hf_elsa import sparse_io

    real = sparse_io._write_masks
    def slow_write_masks(path, *args):
        real(path, *args)  # the weights and the masks are written: now we get killed
        Path({flag!r}).touch()
        time.sleep(60)
    sparse_io._write_masks = slow_write_masks
    pruned_model(seed=2).save_pretrained({target!r})
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10 s
def test_a_killed_save_process_leaves_the_old_folder_loadable(tmp_path):
    target, flag = tmp_path / "m", tmp_path / "writing"
    old = pruned_model(seed=1)
    old.save_pretrained(target)
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), flag=str(flag), target=str(target))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the save never reached the write"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert_bit_identical(state(old), load_sparse_model(target))  # the old model, intact
    (partial,) = tmp_path.glob(f"{sparse_io._TMP_PREFIX}*")
    with pytest.raises((OSError, ValueError), match="config.json"):  # the partial folder has no config.json
        AutoModelForCausalLM.from_pretrained(partial)
    with pytest.raises(ValueError):
        load_sparse_model(partial)
    pruned_model(seed=3).save_pretrained(tmp_path / "other")  # a later save cleans up after the dead one
    assert _no_tmp_left(tmp_path)


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_inspect(tmp_path, capsys):
    model = pruned_model("qwen2")
    model.save_pretrained(tmp_path / "c", compressed=True)
    assert cli_main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "format compressed" in out and "model.layers.1.mlp.down_proj.weight" in out and "90.0" in out
    report = sparsity_report(tmp_path / "c")
    ratio = sum(t.stored_bytes for t in report.tensors) / sum(t.dense_bytes for t in report.tensors)
    assert f"({ratio:.3f}x)" in out and ratio < 0.131  # 0.131x with raw masks; zlib pays off even on 2 KB masks

    assert cli_main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "compressed" and report["sparsity"] == pytest.approx(0.9, abs=1e-3)

    assert cli_main(["inspect", str(tmp_path / "c"), "--summary"]) == 0
    assert "layers.1" not in capsys.readouterr().out

    tiny_model().save_pretrained(tmp_path / "plain")
    assert cli_main(["inspect", str(tmp_path / "plain")]) == 0
    assert "plain" in capsys.readouterr().out

    _truncate(tmp_path / "c" / MASKS_NAME)
    assert cli_main(["inspect", str(tmp_path / "c")]) == 1
    assert MASKS_NAME in capsys.readouterr().err


def test_cli_lists_subcommands(capsys):
    assert cli_main([]) == 2
    assert "inspect" in capsys.readouterr().out
