"""The "dense" and "compressed" formats: bit-identical round trips, sharding, sizes (hf_elsa.sparse_io.formats)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_elsa import load_sparse_model, sparsity_report
from hf_elsa.sparse_io import COMPRESSED_NAME, ELSA_CONFIG_NAME, MASKS_NAME, formats

from .helpers import ARCHS, assert_bit_identical, masks_of, pruned_model, read_masks_raw, state


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
    ) | {"config.json"}
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


def test_a_third_format_is_one_class_and_one_registration(monkeypatch, tmp_path):
    """A format that stores every tensor in one file named elsa_flat.safetensors: save, load, inspect, card."""
    monkeypatch.setattr(formats, "SAVE_FORMATS", formats.SAVE_FORMATS.copy())  # the registration ends with the test

    @formats.register_format
    class FlatFormat(formats.CompressedFormat):
        name = "flat"
        weight_patterns = ("elsa_flat.safetensors",)
        note = None

        def write(self, folder, weight_files, masks, save_id):
            tensors = {}
            for name in weight_files:
                if name.endswith(".safetensors"):
                    with safe_open(folder / name, "pt") as f:
                        tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
                (folder / name).unlink()
            save_file(tensors, folder / "elsa_flat.safetensors", metadata={"format": "pt", "save_id": save_id})
            return ["elsa_flat.safetensors"]

        def detect(self, folder):
            return (folder / "elsa_flat.safetensors").is_file()

        def load(self, folder, masks, save_id, kwargs):
            config = formats._model_config(folder, False)
            with safe_open(folder / "elsa_flat.safetensors", "pt") as f:
                state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            return formats._from_state_dict(folder, config, state_dict, kwargs)

        def stored_tensors(self, folder, masks, count):
            with safe_open(folder / "elsa_flat.safetensors", "pt") as f:
                yield from formats._dense_tensors(f, list(f.keys()), count)

    model = pruned_model()
    model.save_pretrained(tmp_path / "m", format="flat")
    assert "elsa_flat.safetensors" in os.listdir(tmp_path / "m") and "model.safetensors" not in os.listdir(
        tmp_path / "m"
    )
    assert_bit_identical(state(model), load_sparse_model(tmp_path / "m"))
    report = sparsity_report(tmp_path / "m")
    assert report.format == "flat" and report.zeros == sparsity_report(model).zeros
    assert "Checkpoint format: **flat**" in (tmp_path / "m" / "README.md").read_text()
    model.save_pretrained(tmp_path / "m")  # back to dense: the flat file is a stale weight file now
    assert not (tmp_path / "m" / "elsa_flat.safetensors").exists()
    with pytest.raises(ValueError, match="format='zip' is unknown; expected one of .*'flat'"):
        model.save_pretrained(tmp_path / "z", format="zip")
