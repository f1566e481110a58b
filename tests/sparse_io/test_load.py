"""load_sparse_model: damaged, mismatched and foreign folders are refused; Hub repo ids (sparse_io.load)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_elsa import load_sparse_model
from hf_elsa.sparse_io import COMPRESSED_NAME, ELSA_CONFIG_NAME, MASKS_NAME, PackedMask, get_sparsity
from hf_elsa.sparse_io.files import sha256
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


# -- files outside the folder -------------------------------------------------------------------------------------


def _list_file(folder: Path, name: str) -> None:
    """Make elsa_config.json list ``name`` (joined to the folder) with its true size and hash."""
    path = folder / ELSA_CONFIG_NAME
    meta = json.loads(path.read_text())
    target = folder / name
    meta["files"][name] = {"bytes": target.stat().st_size, "sha256": sha256(target)}
    path.write_text(json.dumps(meta))


def _link_out(folder: Path, name: str) -> None:
    """Replace ``name`` by a symlink to a copy of it outside the folder (same bytes: checksums still agree)."""
    outside = folder.parent / f"outside-{name}"
    shutil.copy(folder / name, outside)
    (folder / name).unlink()
    (folder / name).symlink_to(outside)


@pytest.mark.parametrize(
    "escape, named",
    [
        (lambda f: _list_file(f, "../secret.txt"), "../secret.txt"),
        (lambda f: _list_file(f, str(f.parent / "secret.txt")), "secret.txt"),
        (lambda f: _link_out(f, "model.safetensors"), "model.safetensors"),
        (lambda f: _link_out(f, MASKS_NAME), MASKS_NAME),
        (lambda f: _link_out(f, "config.json"), "config.json"),
        (lambda f: _link_out(f, ELSA_CONFIG_NAME), ELSA_CONFIG_NAME),
        (lambda f: (f / "extra.bin").symlink_to("/etc/hostname") or _list_file(f, "extra.bin"), "extra.bin"),
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_files_outside_the_folder_are_never_read(escape, named, verify, tmp_path):
    (tmp_path / "secret.txt").write_text("not yours")
    pruned_model().save_pretrained(tmp_path / "m")
    escape(tmp_path / "m")
    with pytest.raises(ValueError, match="outside the checkpoint folder|not a file name inside the checkpoint") as err:
        load_sparse_model(tmp_path / "m", verify=verify)
    assert named in str(err.value)


def test_symlinks_inside_the_folder_and_the_hub_cache_layout_are_fine(tmp_path):
    model = pruned_model()
    expected = state(model)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "blobs").mkdir()
    os.replace(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "blobs" / "weights")
    (tmp_path / "m" / "model.safetensors").symlink_to("blobs/weights")  # points inside
    assert_bit_identical(expected, load_sparse_model(tmp_path / "m"))

    repo = tmp_path / "models--me--tiny"  # huggingface_hub's cache: snapshot files link to ../../blobs/<hash>
    snapshot = repo / "snapshots" / "abc123"
    model.save_pretrained(tmp_path / "src")
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in (tmp_path / "src").iterdir():
        digest = sha256(path)
        os.replace(path, repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(f"../../blobs/{digest}")
    assert_bit_identical(expected, load_sparse_model(snapshot))


def test_config_json_is_checksummed(tmp_path):
    pruned_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["rms_norm_eps"] = 0.5  # a different model, same weights
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(ValueError, match=r"config\.json.*(SHA-256 differs|were saved)"):
        load_sparse_model(tmp_path / "m")


# -- non-finite weights -------------------------------------------------------------------------------------------


def _poison(folder: Path, name: str, key: str, value: float) -> None:
    """Write ``value`` into the first kept entry of ``key`` in weight file ``name``; re-record its checksum."""
    with safe_open(folder / name, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    flat = tensors[key].view(-1)
    flat[flat.nonzero()[0]] = value
    save_file(tensors, folder / name, metadata=meta)
    rewrite_recorded_hash(folder, name)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_refuses_non_finite_weights_unless_allowed(compressed, value, tmp_path):
    pruned_model().save_pretrained(tmp_path / "m", compressed=compressed)
    key = "model.layers.1.self_attn.o_proj.weight"
    _poison(tmp_path / "m", COMPRESSED_NAME if compressed else "model.safetensors", key, value)
    kind = "NaN" if math.isnan(value) else "inf"
    with pytest.raises(
        ValueError, match=rf"1 tensor holds NaN/inf values: '{key}' \(1 {kind}\).*allow_non_finite=True"
    ):
        load_sparse_model(tmp_path / "m")
    loaded = load_sparse_model(tmp_path / "m", allow_non_finite=True)
    assert not torch.isfinite(loaded.get_parameter(key)).all()
