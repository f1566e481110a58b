"""load_sparse_model: damaged, mismatched and foreign folders are refused; Hub repo ids (sparse_io.load)."""

from __future__ import annotations

import os

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_elsa import load_sparse_model
from hf_elsa.sparse_io import COMPRESSED_NAME, MASKS_NAME, PackedMask, get_sparsity
from hf_elsa.sparse_io.masks import write_masks

from .helpers import (
    assert_bit_identical,
    flip_last_byte,
    pruned_model,
    rewrite_recorded_hash,
    state,
    tiny_model,
    truncate,
)


@pytest.mark.parametrize(
    "compressed, damage, filename",
    [
        (False, truncate, "model.safetensors"),
        (False, truncate, MASKS_NAME),
        (False, flip_last_byte, "model.safetensors"),
        (True, truncate, COMPRESSED_NAME),
        (True, flip_last_byte, COMPRESSED_NAME),
        (True, flip_last_byte, MASKS_NAME),
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
    truncate(tmp_path / "m" / filename, keep=0.7)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_sparse_model(tmp_path / "m", verify=False)


def test_truncated_compressed_file_rejected_without_checksums(tmp_path):
    pruned_model().save_pretrained(tmp_path / "c", compressed=True)
    truncate(tmp_path / "c" / COMPRESSED_NAME, keep=0.7)
    with pytest.raises(ValueError, match=COMPRESSED_NAME.replace(".", r"\.")):
        load_sparse_model(tmp_path / "c", verify=False)


def test_mask_disagreeing_with_zeros_is_rejected(tmp_path):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    key = "model.layers.1.mlp.down_proj.weight"
    masks = {k: PackedMask(v.bits, v.shape, v.kept) for k, v in get_sparsity(model).masks.items()}
    wrong = masks[key].unpack().clone()
    wrong.view(-1)[wrong.view(-1).nonzero()[0]] = False  # a kept (nonzero) weight now marked pruned
    masks[key] = PackedMask.pack(wrong)
    write_masks(tmp_path / "m" / MASKS_NAME, masks, get_sparsity(model).config.save_id)
    rewrite_recorded_hash(tmp_path / "m", MASKS_NAME)
    with pytest.raises(ValueError, match=rf"{key}.*nonzero weights where its mask prunes them"):
        load_sparse_model(tmp_path / "m")


def test_mask_shape_mismatch_is_rejected(tmp_path):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    key = "model.layers.0.mlp.up_proj.weight"  # 64x32 stored as 32x64
    masks = dict(get_sparsity(model).masks)
    masks[key] = PackedMask.pack(masks[key].unpack().t().contiguous())
    write_masks(tmp_path / "m" / MASKS_NAME, masks, get_sparsity(model).config.save_id)
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
